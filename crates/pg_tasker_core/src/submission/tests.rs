use super::*;

fn ok(status: &str, error: Option<&str>, metadata: Option<&str>) -> Submission {
    let s = check(Some(status), error, metadata).unwrap();
    assert_eq!(s.problem, None, "{s:?}");
    s
}

fn bad(status: Option<&str>, error: Option<&str>, metadata: Option<&str>) -> String {
    check(status, error, metadata)
        .unwrap()
        .problem
        .expect("a problem")
}

#[test]
fn a_success_reads_the_metadata() {
    let s = ok(
        "success",
        None,
        Some(
            r#"{"attempt": 3.0, "worker_id": "w\"1", "execution_time_ms": 12.50, "other": [[[]]]}"#,
        ),
    );
    assert_eq!(s.success, Some(true));
    assert_eq!(s.attempt, Some(3));
    assert_eq!(s.worker_id.as_deref(), Some("w\"1"));
    assert_eq!(s.execution_time_ms.as_deref(), Some("12.50"));
    assert_eq!(
        (s.message, s.retryable, s.requested_delay_ms),
        (None, None, None)
    );
    // JSON null error and metadata are no error and no metadata
    assert_eq!(ok("success", Some("null"), Some("null")).attempt, None);
    assert_eq!(ok("success", None, None).success, Some(true));
}

#[test]
fn a_failure_reads_the_error_and_the_delay_in_order() {
    let e = r#"{"message": "boom", "error_code": "E1", "retryable": false, "retry_after_seconds": 1.2345}"#;
    let s = ok(
        "failure",
        Some(e),
        Some(r#"{"headers": {"Retry-After": "9"}}"#),
    );
    assert_eq!(s.success, Some(false));
    assert_eq!(s.message.as_deref(), Some("boom"));
    assert_eq!(s.error_code.as_deref(), Some("E1"));
    assert_eq!(s.retryable, Some(false));
    assert_eq!(s.requested_delay_ms, Some(1235)); // half away from zero
    let header = ok(
        "failure",
        Some(r#""plain text""#),
        Some(r#"{"headers": {"RETRY-after": " 2.5 "}, "backoff_hint": {"seconds": 7}}"#),
    );
    assert_eq!(
        (
            header.message.as_deref(),
            header.retryable,
            header.requested_delay_ms
        ),
        (Some("plain text"), Some(true), Some(2500))
    );
    let hint = ok(
        "failure",
        Some(r#"{"message": "m"}"#),
        Some(r#"{"backoff_hint": {"seconds": 7}}"#),
    );
    assert_eq!(hint.requested_delay_ms, Some(7000));
    let huge = ok(
        "failure",
        Some(&format!(
            r#"{{"message": "m", "retry_after_seconds": 1{}}}"#,
            "0".repeat(400)
        )),
        None,
    );
    assert_eq!(huge.requested_delay_ms, Some(MAX_DELAY_MS));
    assert_eq!(
        ok(
            "failure",
            Some(r#"{"message": "m", "retry_after_seconds": 0.0004}"#),
            None
        )
        .requested_delay_ms,
        Some(0)
    );
    assert_eq!(
        ok(
            "failure",
            Some(r#"{"message": "m", "retry_after_seconds": 0.0005}"#),
            None
        )
        .requested_delay_ms,
        Some(1)
    );
    assert_eq!(
        ok("failure", Some(r#"{"message": "m"}"#), None).requested_delay_ms,
        None
    );
}

#[test]
fn deep_and_huge_values_are_skipped_not_parsed() {
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let e = format!(r#"{{"message": "m", "details": {deep}, "n": 1e400}}"#);
    let s = ok(
        "failure",
        Some(&e),
        Some(&format!(r#"{{"attempt": 1, "x": {deep}}}"#)),
    );
    assert_eq!((s.message.as_deref(), s.attempt), (Some("m"), Some(1)));
}

#[test]
fn the_first_problem_is_reported() {
    assert_eq!(bad(None, None, None), r#"invalid status """#);
    assert_eq!(bad(Some("done"), None, None), r#"invalid status "done""#);
    assert_eq!(
        bad(Some("success"), Some(r#"{"message": "x"}"#), Some("[]")),
        "a successful result carries no error (status is 'success')"
    );
    assert_eq!(
        bad(Some("failure"), None, None),
        "a failure needs an error object"
    );
    assert_eq!(
        bad(Some("failure"), Some("null"), None),
        "a failure needs an error object"
    );
    assert_eq!(
        bad(Some("failure"), Some("[1, 2]"), None),
        "error must be an object, got [1, 2]"
    );
    assert_eq!(
        bad(Some("failure"), Some(r#"{"message": 5}"#), None),
        "error.message must be a string, got 5"
    );
    assert_eq!(
        bad(Some("failure"), Some(r#"{"message": ""}"#), None),
        "error.message is required"
    );
    assert_eq!(
        bad(Some("failure"), Some(r#""""#), None),
        "error.message is required"
    );
    assert_eq!(
        bad(Some("failure"), Some(r#"{"error_code": 1}"#), None),
        "error.message is required"
    );
    assert_eq!(
        bad(
            Some("failure"),
            Some(r#"{"message": "m", "error_code": 1}"#),
            None
        ),
        "error.error_code must be a string, got 1"
    );
    assert_eq!(
        bad(
            Some("failure"),
            Some(r#"{"message": "m", "retryable": "yes"}"#),
            None
        ),
        r#"error.retryable must be a boolean, got "yes""#
    );
    assert_eq!(
        bad(
            Some("failure"),
            Some(r#"{"message": "m", "retry_after_seconds": -1}"#),
            Some("5")
        ),
        "error.retry_after_seconds must be a non-negative number, got -1"
    );
    assert_eq!(
        bad(Some("success"), None, Some(r#""x""#)),
        r#"metadata must be an object, got "x""#
    );
    assert_eq!(
        bad(Some("success"), None, Some(r#"{"execution_time_ms": "1"}"#)),
        r#"metadata.execution_time_ms must be a non-negative number, got "1""#
    );
    assert_eq!(
        bad(Some("success"), None, Some(r#"{"worker_id": 1}"#)),
        "metadata.worker_id must be a string, got 1"
    );
    for a in ["0", "-1", "1.5", "2147483648", "true", "\"1\""] {
        assert_eq!(
            bad(
                Some("success"),
                None,
                Some(&format!(r#"{{"attempt": {a}}}"#))
            ),
            format!("metadata.attempt must be a positive integer, got {a}")
        );
    }
    assert_eq!(
        ok("success", None, Some(r#"{"attempt": 2147483647}"#)).attempt,
        Some(i32::MAX)
    );
    assert_eq!(
        bad(Some("success"), None, Some(r#"{"headers": []}"#)),
        "metadata.headers must be an object, got []"
    );
    for h in [r#""soon""#, r#""1.""#, "-3", "null", r#""-1""#] {
        assert_eq!(
            bad(
                Some("success"),
                None,
                Some(&format!(r#"{{"headers": {{"retry-after": {h}}}}}"#))
            ),
            format!("metadata.headers.retry-after must be a number of seconds, got {h}")
        );
    }
    assert_eq!(
        bad(Some("success"), None, Some(r#"{"backoff_hint": 3}"#)),
        "metadata.backoff_hint must be an object, got 3"
    );
    assert_eq!(
        bad(
            Some("success"),
            None,
            Some(r#"{"backoff_hint": {"seconds": "3"}}"#)
        ),
        r#"metadata.backoff_hint.seconds must be a non-negative number, got "3""#
    );
    // with a problem nothing else is read
    assert_eq!(
        check(Some("failure"), None, Some(r#"{"attempt": 2}"#))
            .unwrap()
            .attempt,
        None
    );
}
