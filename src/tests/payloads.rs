//! User payloads stay jsonb, byte-exact (compared with jsonb equality after
//! the round trip), whatever their numbers and nesting; size limits give
//! 54000 and change nothing.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::json;

    use crate::tests::helpers::*;

    /// A jsonb literal no f64 and no 128-level parser can hold.
    fn nasty() -> String {
        let deep = format!("{}\"bottom\"{}", "[".repeat(300), "]".repeat(300));
        format!(
            r#"{{"dec": 0.1000000000000000055511151231257827, "big": 63340286662973277706162286946811886609896461828096, "huge": 1e400, "tiny": 1e-400, "neg": -0.0, "deep": {deep}}}"#
        )
    }

    #[pg_test]
    fn contexts_results_and_errors_round_trip_exactly() {
        register(&template(
            "p_exact",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let v = nasty();
        let lit = format!("'{v}'::jsonb");
        let task = sql_value::<pgrx::Uuid>(&format!(
            "SELECT tasker.create_task('p_exact', 'flow', {lit})"
        ))
        .unwrap();
        assert!(sql_value::<bool>(&format!(
            "SELECT context = {lit} FROM tasker.tasks WHERE task_uuid = '{task}'"
        ))
        .unwrap());
        // the worker's message carries it exactly
        assert!(sql_value::<bool>(&format!(
            "SELECT message -> 'task_context' = {lit} FROM pgmq.q_tasker_p_exact_queue WHERE message ->> 'task_uuid' = '{task}'"
        )).unwrap());
        let a = step_field(task, "a", "step_uuid");
        let metadata = format!(r#"{{"attempt": 1, "trace": {v}}}"#);
        let state = text(&format!(
            "SELECT tasker.submit_result('{a}', 'success', {lit}, NULL, '{metadata}'::jsonb)"
        ));
        assert_eq!(state, "complete");
        assert!(sql_value::<bool>(&format!(
            "SELECT results = {lit} FROM tasker.workflow_steps WHERE step_uuid = '{a}'"
        ))
        .unwrap());
        assert!(sql_value::<bool>(&format!(
            "SELECT metadata -> 'metadata' = '{metadata}'::jsonb FROM tasker.step_transitions WHERE step_uuid = '{a}' AND to_state = 'complete'"
        )).unwrap());
        // the child's dependency_results carry the parent's result exactly
        assert!(sql_value::<bool>(&format!(
            "SELECT message -> 'dependency_results' -> 'a' = {lit} FROM pgmq.q_tasker_p_exact_queue WHERE message ->> 'step_name' = 'b' AND message ->> 'task_uuid' = '{task}'"
        )).unwrap());
        // errors too (kept as sent, with their extra keys)
        let b = step_field(task, "b", "step_uuid");
        let error = format!(r#"{{"message": "boom", "retryable": false, "context": {v}}}"#);
        assert_eq!(
            text(&format!(
                "SELECT tasker.submit_result('{b}', 'failure', NULL, '{error}'::jsonb)"
            )),
            "error"
        );
        assert!(sql_value::<bool>(&format!("SELECT last_error = '{error}'::jsonb FROM tasker.workflow_steps WHERE step_uuid = '{b}'")).unwrap());
        // an operator's result as well
        assert_eq!(
            text(&format!(
                "SELECT tasker.resolve_step_manually('{b}', {lit})"
            )),
            "resolved_manually"
        );
        assert!(sql_value::<bool>(&format!(
            "SELECT results = {lit} FROM tasker.workflow_steps WHERE step_uuid = '{b}'"
        ))
        .unwrap());
        assert_eq!(task_state(task), "complete");
        assert_task_consistent(task);
    }

    #[pg_test]
    fn a_string_error_is_kept_as_sent() {
        register(&template(
            "p_strerr",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        let task = create("p_strerr", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        assert_eq!(
            text(&format!(
                "SELECT tasker.submit_result('{a}', 'failure', NULL, '\"plain words\"')"
            )),
            "waiting_for_retry"
        );
        assert_eq!(step_field(task, "a", "last_error::text"), "\"plain words\"");
        assert_eq!(
            text(&format!(
                "SELECT last_error_message FROM tasker.step_status WHERE step_uuid = '{a}'"
            )),
            "plain words"
        );
        assert_fails(
            &format!("SELECT tasker.submit_result('{a}', 'failure', NULL, '\"\"')"),
            "22023",
            "error.message is required",
        );
    }

    #[pg_test]
    fn payloads_over_their_limit_are_refused_with_54000() {
        register(&template(
            "p_size",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        // 1 MiB by default (limits.max_context_bytes / max_result_bytes); a
        // random string does not compress below it
        let big = "(SELECT jsonb_build_object('blob', string_agg(md5(g::text), '')) FROM generate_series(1, 40000) g)";
        assert_fails(
            &format!("SELECT tasker.create_task('p_size', 'flow', {big})"),
            "54000",
            "the task context is",
        );
        assert_eq!(
            count("SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'p_size'"),
            0
        );
        let task = create("p_size", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        assert_fails(
            &format!("SELECT tasker.submit_result('{a}', 'success', {big})"),
            "54000",
            "the result is",
        );
        assert_fails(
            &format!("SELECT tasker.submit_result('{a}', 'failure', NULL, {big} || '{{\"message\": \"x\"}}')"),
            "54000",
            "the error is",
        );
        assert_fails(
            &format!("SELECT tasker.resolve_step_manually('{a}', {big})"),
            "54000",
            "the result is",
        );
        // nothing changed: the attempt is still out, its message still queued
        assert_eq!(step_field(task, "a", "state"), "enqueued");
        assert_eq!(count("SELECT count(*) FROM pgmq.q_tasker_p_size_queue"), 1);
        // a large payload within the limit is fine
        let ok = "(SELECT jsonb_build_object('blob', string_agg(md5(g::text), '')) FROM generate_series(1, 20000) g)";
        assert_eq!(
            text(&format!(
                "SELECT tasker.submit_result('{a}', 'success', {ok})"
            )),
            "complete"
        );
    }

    #[pg_test]
    fn validating_an_unparsable_context_against_a_schema_is_refused_clearly() {
        let mut t = template("p_schema", "flow", "1.0.0", json!([step("a", &[])]));
        t["input_schema"] = json!({"type": "object"});
        register(&t);
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_fails(
            &format!("SELECT tasker.create_task('p_schema', 'flow', '{{\"x\": {deep}}}')"),
            "54000",
            "the task context is nested more than 128 levels deep",
        );
        assert_fails(
            "SELECT tasker.create_task('p_schema', 'flow', '{\"x\": 1e400}')",
            "22023",
            "outside the range of a 64-bit float",
        );
        // without a schema the same contexts are simply stored
        register(&template(
            "p_noschema",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        Spi::run(&format!(
            "SELECT tasker.create_task('p_noschema', 'flow', '{{\"x\": {deep}, \"y\": 1e400}}')"
        ))
        .unwrap();
    }
}
