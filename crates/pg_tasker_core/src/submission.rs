//! What a worker submits for a step attempt: `tasker.submit_result(step_uuid,
//! status, result, error, metadata)`, parsed and checked before anything is
//! written.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success { result: Value },
    Failure { error: StepError },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepError {
    pub message: String,
    pub error_code: Option<String>,
    /// Default true: a failure is transient unless the handler says otherwise.
    pub retryable: bool,
    pub retry_after_seconds: Option<f64>,
    /// The whole error object as sent (extra keys kept), stored as last_error.
    pub raw: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    pub execution_time_ms: Option<f64>,
    pub worker_id: Option<String>,
    /// The attempt the worker ran (the message's `attempt`); a submission
    /// for another attempt than the step's current one is stale.
    pub attempt: Option<u32>,
    /// `headers["retry-after"]` (any case) in seconds.
    pub retry_after_header_seconds: Option<f64>,
    /// `backoff_hint.seconds`.
    pub backoff_hint_seconds: Option<f64>,
    pub raw: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub outcome: Outcome,
    pub metadata: Metadata,
}

impl Submission {
    /// The delay the handler asked for, in ms: `error.retry_after_seconds`,
    /// else the `retry-after` header, else `backoff_hint.seconds`.
    pub fn requested_delay_ms(&self) -> Option<u64> {
        let from_error = match &self.outcome {
            Outcome::Failure { error } => error.retry_after_seconds,
            Outcome::Success { .. } => None,
        };
        from_error
            .or(self.metadata.retry_after_header_seconds)
            .or(self.metadata.backoff_hint_seconds)
            .map(|s| (s * 1000.0).round() as u64)
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

fn non_negative(v: &Value, what: &str) -> Result<f64> {
    match v.as_f64() {
        Some(f) if f >= 0.0 && f.is_finite() => Ok(f),
        _ => Err(bad(format!(
            "{what} must be a non-negative number, got {v}"
        ))),
    }
}

/// Parses a submission. `status` is `success` or `failure`; a failure needs
/// an `error` object with a `message`; a success carries no error.
pub fn parse(
    status: &str,
    result: Option<Value>,
    error: Option<Value>,
    metadata: Option<Value>,
) -> Result<Submission> {
    let outcome = match status {
        "success" => {
            if error.as_ref().is_some_and(|e| !e.is_null()) {
                return Err(bad(
                    "a successful result carries no error (status is 'success')",
                ));
            }
            Outcome::Success {
                result: result.unwrap_or(Value::Null),
            }
        }
        "failure" => Outcome::Failure {
            error: parse_error(error)?,
        },
        other => {
            return Err(bad(format!("invalid status \"{other}\""))
                .with_hint("status is 'success' or 'failure'"))
        }
    };
    Ok(Submission {
        outcome,
        metadata: parse_metadata(metadata)?,
    })
}

fn parse_error(error: Option<Value>) -> Result<StepError> {
    let raw = match error {
        Some(Value::Object(m)) => m,
        Some(Value::String(s)) => {
            let mut m = Map::new();
            m.insert("message".into(), Value::String(s));
            m
        }
        None | Some(Value::Null) => {
            return Err(bad("a failure needs an error object").with_hint(
                "error is {\"message\": text, \"error_code\": text, \"retryable\": bool, \"retry_after_seconds\": number}",
            ))
        }
        Some(other) => return Err(bad(format!("error must be an object, got {other}"))),
    };
    let message = match raw.get("message") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(bad("error.message is required"))
        }
        Some(other) => return Err(bad(format!("error.message must be a string, got {other}"))),
    };
    let error_code = match raw.get("error_code") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(bad(format!(
                "error.error_code must be a string, got {other}"
            )))
        }
    };
    let retryable = match raw.get("retryable") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(format!(
                "error.retryable must be a boolean, got {other}"
            )))
        }
    };
    let retry_after_seconds = match raw.get("retry_after_seconds") {
        None | Some(Value::Null) => None,
        Some(v) => Some(non_negative(v, "error.retry_after_seconds")?),
    };
    Ok(StepError {
        message,
        error_code,
        retryable,
        retry_after_seconds,
        raw,
    })
}

fn parse_metadata(metadata: Option<Value>) -> Result<Metadata> {
    let raw = match metadata {
        None | Some(Value::Null) => return Ok(Metadata::default()),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(bad(format!("metadata must be an object, got {other}"))),
    };
    let mut md = Metadata::default();
    if let Some(v) = raw.get("execution_time_ms").filter(|v| !v.is_null()) {
        md.execution_time_ms = Some(non_negative(v, "metadata.execution_time_ms")?);
    }
    match raw.get("worker_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => md.worker_id = Some(s.clone()),
        Some(other) => {
            return Err(bad(format!(
                "metadata.worker_id must be a string, got {other}"
            )))
        }
    }
    match raw.get("attempt") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_u64() {
            Some(a) if a >= 1 && a <= u32::MAX as u64 => md.attempt = Some(a as u32),
            _ => {
                return Err(bad(format!(
                    "metadata.attempt must be a positive integer, got {v}"
                )))
            }
        },
    }
    match raw.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            if let Some((_, v)) = h
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
            {
                let secs = match v {
                    Value::String(s) => s
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|f| *f >= 0.0 && f.is_finite()),
                    other => other.as_f64().filter(|f| *f >= 0.0),
                };
                md.retry_after_header_seconds = Some(secs.ok_or_else(|| {
                    bad(format!(
                        "metadata.headers.retry-after must be a number of seconds, got {v}"
                    ))
                })?);
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "metadata.headers must be an object, got {other}"
            )))
        }
    }
    match raw.get("backoff_hint") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            if let Some(v) = h.get("seconds").filter(|v| !v.is_null()) {
                md.backoff_hint_seconds = Some(non_negative(v, "metadata.backoff_hint.seconds")?);
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "metadata.backoff_hint must be an object, got {other}"
            )))
        }
    }
    md.raw = raw;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde_json::json;

    #[test]
    fn success_and_failure() {
        let s = parse("success", Some(json!({"ok": 1})), None, None).unwrap();
        assert_eq!(
            s.outcome,
            Outcome::Success {
                result: json!({"ok": 1})
            }
        );
        let f = parse(
            "failure",
            None,
            Some(json!({"message": "boom", "error_code": "E1"})),
            None,
        )
        .unwrap();
        match f.outcome {
            Outcome::Failure { error } => {
                assert!(error.retryable, "retryable defaults to true");
                assert_eq!(error.error_code.as_deref(), Some("E1"));
            }
            _ => panic!(),
        }
    }

    #[test]
    fn invalid_shapes_are_22023() {
        let cases = [
            parse("done", None, None, None),
            parse("failure", None, None, None),
            parse("failure", None, Some(json!({"code": 1})), None),
            parse(
                "failure",
                None,
                Some(json!({"message": "x", "retryable": "yes"})),
                None,
            ),
            parse(
                "failure",
                None,
                Some(json!({"message": "x", "retry_after_seconds": -1})),
                None,
            ),
            parse("failure", None, Some(json!([1])), None),
            parse("success", None, Some(json!({"message": "x"})), None),
            parse("success", None, None, Some(json!([]))),
            parse("success", None, None, Some(json!({"attempt": 0}))),
            parse(
                "success",
                None,
                None,
                Some(json!({"headers": {"Retry-After": "soon"}})),
            ),
        ];
        for c in cases {
            assert_eq!(c.unwrap_err().kind, ErrorKind::InvalidValue);
        }
    }

    #[test]
    fn requested_delay_precedence() {
        let md = json!({"headers": {"Retry-After": "30"}, "backoff_hint": {"seconds": 60}});
        let with_err = parse(
            "failure",
            None,
            Some(json!({"message": "x", "retry_after_seconds": 2})),
            Some(md.clone()),
        )
        .unwrap();
        assert_eq!(with_err.requested_delay_ms(), Some(2000));
        let header = parse("failure", None, Some(json!({"message": "x"})), Some(md)).unwrap();
        assert_eq!(header.requested_delay_ms(), Some(30_000));
        let hint = parse(
            "failure",
            None,
            Some(json!({"message": "x"})),
            Some(json!({"backoff_hint": {"seconds": 1.5}})),
        )
        .unwrap();
        assert_eq!(hint.requested_delay_ms(), Some(1500));
        let none = parse("failure", None, Some(json!("plain message")), None).unwrap();
        assert_eq!(none.requested_delay_ms(), None);
    }
}
