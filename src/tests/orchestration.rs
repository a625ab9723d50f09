//! The orchestration core through SQL, inside one transaction: messages,
//! results, retries and backoff, fencing, task evaluation after every kind
//! of change, readiness, claims, operator actions, the worker functions.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    use crate::tests::helpers::*;

    #[pg_test]
    fn message_carries_everything_a_worker_needs() {
        let mut t = template(
            "o_msg",
            "flow",
            "2.1.0",
            json!([step("a", &[]), step("b", &["a"])]),
        );
        t["steps"][1]["handler"]["initialization"] = json!({"url": "http://x"});
        t["steps"][1]["timeout_seconds"] = json!(12);
        register(&t);
        let task = create("o_msg", "flow", json!({"order": 9}));
        let msgs = read_all("o_msg");
        assert_eq!(msgs.len(), 1);
        let a = &msgs[0];
        assert_eq!(a["step_name"], "a");
        assert_eq!(a["dependency_results"], json!({}));
        submit(
            a["step_uuid"].as_str().unwrap(),
            "success",
            json!({"total": 42}),
            Value::Null,
            json!({"attempt": 1}),
        );
        let msgs = read_all("o_msg");
        assert_eq!(msgs.len(), 1);
        let b = &msgs[0];
        let expect = json!({
            "message_version": 1, "task_uuid": task.to_string(), "namespace": "o_msg",
            "task_name": "flow", "task_version": "2.1.0", "step_name": "b",
            "handler": {"callable": "Test::b", "method": null, "initialization": {"url": "http://x"}},
            "task_context": {"order": 9}, "dependency_results": {"a": {"total": 42}},
            "attempt": 1, "budget_attempt": 1, "max_attempts": 3, "timeout_seconds": 12,
        });
        for (k, v) in expect.as_object().unwrap() {
            assert_eq!(&b[k], v, "field {k}");
        }
        for k in ["step_uuid", "correlation_id", "enqueued_at"] {
            assert!(b[k].is_string(), "field {k} present");
        }
        // the parent's message was archived by submit_result, in the same transaction
        assert_eq!(count("SELECT count(*) FROM pgmq.a_tasker_o_msg_queue"), 1);
    }

    #[pg_test]
    fn submission_errors_have_specific_sqlstates() {
        register(&template(
            "o_err",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let task = create("o_err", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        let b = step_field(task, "b", "step_uuid");
        let expect = |sql: String, code: &str, needle: &str| {
            let f = failure(&sql);
            assert!(
                f.starts_with(&format!("{code}: ")) && f.contains(needle),
                "{sql}: {f}"
            );
        };
        expect(
            format!(
                "SELECT tasker.submit_result('{}', 'success')",
                uuid::Uuid::now_v7()
            ),
            "P0002",
            "does not exist",
        );
        expect(
            format!("SELECT tasker.submit_result('{a}', 'done')"),
            "22023",
            "invalid status",
        );
        expect(
            format!("SELECT tasker.submit_result('{a}', 'failure')"),
            "22023",
            "needs an error",
        );
        expect(
            format!("SELECT tasker.submit_result('{a}', 'failure', error => '{{\"message\": 1}}')"),
            "22023",
            "error.message",
        );
        expect(format!("SELECT tasker.submit_result('{a}', 'failure', error => '{{\"message\": \"x\", \"retryable\": \"no\"}}')"), "22023", "retryable");
        expect(
            format!("SELECT tasker.submit_result('{a}', 'success', metadata => '[1]')"),
            "22023",
            "metadata",
        );
        expect(
            format!("SELECT tasker.submit_result('{b}', 'success')"),
            "55000",
            "never been enqueued",
        );
        expect(
            "SELECT tasker.submit_result(NULL, 'success')".to_string(),
            "22004",
            "step_uuid",
        );
        // none of that changed anything
        assert_eq!(step_field(task, "a", "state"), "enqueued");
        assert_eq!(step_field(task, "b", "state"), "pending");
    }

    #[pg_test]
    fn duplicate_and_stale_submissions_change_nothing() {
        register(&template(
            "o_dup",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let task = create("o_dup", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        // a result for an attempt other than the current one is ignored
        assert_eq!(
            submit(&a, "success", json!(1), Value::Null, json!({"attempt": 7})),
            "enqueued"
        );
        assert_eq!(
            submit(
                &a,
                "success",
                json!({"v": 1}),
                Value::Null,
                json!({"attempt": 1})
            ),
            "complete"
        );
        // the same result again, or a late failure: nothing changes
        assert_eq!(
            submit(&a, "success", json!({"v": 2}), Value::Null, Value::Null),
            "complete"
        );
        assert_eq!(
            submit(
                &a,
                "failure",
                Value::Null,
                json!({"message": "late"}),
                Value::Null
            ),
            "complete"
        );
        assert_eq!(step_field(task, "a", "results"), "{\"v\": 1}");
        assert_eq!(
            step_field(task, "b", "state || ':' || attempts"),
            "enqueued:1"
        );
        assert_eq!(
            count("SELECT count(*) FROM pgmq.q_tasker_o_dup_queue"),
            1,
            "b enqueued exactly once"
        );
    }

    /// Each policy's delays: next_retry_at - now() is exactly the computed
    /// delay (now() is fixed within the test's transaction). The retry is
    /// then made due and the cycle enqueues the next attempt.
    #[pg_test]
    fn backoff_follows_each_policy() {
        let cases = [
            ("linear", [400, 800, 1200]),
            ("exponential", [400, 800, 1600]),
            ("fibonacci", [400, 400, 800]),
        ];
        for (backoff, expected) in cases {
            let ns = format!("o_bo_{backoff}");
            let mut s = step("a", &[]);
            s["retry"] = json!({"max_attempts": 5, "backoff": backoff, "backoff_base_ms": 400, "max_backoff_ms": 100000});
            register(&template(&ns, "flow", "1.0.0", json!([s])));
            let task = create(&ns, "flow", json!({}));
            let a = step_field(task, "a", "step_uuid");
            for (i, want_ms) in expected.iter().enumerate() {
                let state = submit(
                    &a,
                    "failure",
                    Value::Null,
                    json!({"message": "boom"}),
                    Value::Null,
                );
                assert_eq!(state, "waiting_for_retry");
                let got = count(&format!(
                    "SELECT (extract(epoch FROM next_retry_at - now()) * 1000)::bigint FROM tasker.workflow_steps WHERE step_uuid = '{a}'"
                ));
                assert_eq!(got, *want_ms, "{backoff} after attempt {}", i + 1);
                // the task waits for the retry time, and says so
                assert_eq!(count(&format!("SELECT (extract(epoch FROM next_action_at - now()) * 1000)::bigint FROM tasker.tasks WHERE task_uuid = '{task}'")), *want_ms);
                assert_eq!(
                    sql_value::<String>(&format!(
                        "SELECT state::text FROM tasker.tasks WHERE task_uuid = '{task}'"
                    ))
                    .unwrap(),
                    "waiting_for_retry"
                );
                // not due yet: a cycle leaves it alone
                let cycle = sql_value::<JsonB>(&format!(
                    "SELECT tasker.run_orchestration_cycle('test-{ns}', 100)"
                ))
                .unwrap()
                .0;
                assert_eq!(
                    step_field(task, "a", "state"),
                    "waiting_for_retry",
                    "{cycle}"
                );
                // make it due; the cycle enqueues the next attempt
                Spi::run(&format!("UPDATE tasker.workflow_steps SET next_retry_at = now() WHERE step_uuid = '{a}'")).unwrap();
                Spi::run(&format!(
                    "UPDATE tasker.tasks SET next_action_at = now() WHERE task_uuid = '{task}'"
                ))
                .unwrap();
                let cycle = sql_value::<JsonB>(&format!(
                    "SELECT tasker.run_orchestration_cycle('test-{ns}', 100)"
                ))
                .unwrap()
                .0;
                assert!(cycle["steps_enqueued"].as_i64().unwrap() >= 1, "{cycle}");
                assert_eq!(
                    step_field(task, "a", "state || ':' || attempts"),
                    format!("enqueued:{}", i + 2)
                );
            }
        }
        // backoff none: the retry is due at once and re-enqueued by the submission itself
        let mut s = step("a", &[]);
        s["retry"] = json!({"max_attempts": 3, "backoff": "none"});
        register(&template("o_bo_none", "flow", "1.0.0", json!([s])));
        let task = create("o_bo_none", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        assert_eq!(
            submit(
                &a,
                "failure",
                Value::Null,
                json!({"message": "boom"}),
                Value::Null
            ),
            "enqueued"
        );
        assert_eq!(step_field(task, "a", "attempts"), "2");
        assert_eq!(
            count("SELECT count(*) FROM pgmq.q_tasker_o_bo_none_queue"),
            1,
            "old message archived, one new"
        );
    }

    #[pg_test]
    fn retry_after_wins_and_is_capped() {
        let mut s = step("a", &[]);
        s["retry"] = json!({"max_attempts": 5, "backoff_base_ms": 100, "max_backoff_ms": 30000});
        register(&template("o_ra", "flow", "1.0.0", json!([s])));
        let delay = |error: Value, metadata: Value| {
            let task = create("o_ra", "flow", json!({}));
            let a = step_field(task, "a", "step_uuid");
            submit(&a, "failure", Value::Null, error, metadata);
            count(&format!("SELECT (extract(epoch FROM next_retry_at - now()) * 1000)::bigint FROM tasker.workflow_steps WHERE step_uuid = '{a}'"))
        };
        assert_eq!(
            delay(
                json!({"message": "x", "retry_after_seconds": 2}),
                Value::Null
            ),
            2000
        );
        assert_eq!(
            delay(
                json!({"message": "x"}),
                json!({"headers": {"Retry-After": "7"}})
            ),
            7000
        );
        assert_eq!(
            delay(
                json!({"message": "x"}),
                json!({"backoff_hint": {"seconds": 3}})
            ),
            3000
        );
        assert_eq!(
            delay(
                json!({"message": "x", "retry_after_seconds": 3600}),
                Value::Null
            ),
            30000,
            "capped at max_backoff_ms"
        );
        assert_eq!(
            delay(json!({"message": "x"}), Value::Null),
            100,
            "otherwise the policy"
        );
    }

    /// A submission's error and metadata are read for their top-level
    /// fields only (pg_tasker_core::submission): deep and huge values
    /// beside them are skipped, kept byte-exact, and change nothing; the
    /// one result and the batch read them alike.
    #[pg_test]
    fn submissions_are_read_without_parsing_their_payloads() {
        let mut s = step("a", &[]);
        s["retry"] = json!({"max_attempts": 5, "backoff_base_ms": 100, "max_backoff_ms": 30000});
        register(&template("o_deep", "flow", "1.0.0", json!([s])));
        let deep = format!("{}1e400{}", "[".repeat(600), "]".repeat(600));
        let error = format!(r#"{{"message": "x", "retry_after_seconds": 1.5, "deep": {deep}}}"#);
        let metadata =
            format!(r#"{{"attempt": 1.0, "noise": {deep}, "headers": {{"RETRY-AFTER": "9"}}}}"#);
        let delay = |a: &str| {
            count(&format!("SELECT (extract(epoch FROM next_retry_at - now()) * 1000)::bigint FROM tasker.workflow_steps WHERE step_uuid = '{a}'"))
        };
        let task = create("o_deep", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        let state = Spi::get_one::<String>(&format!(
            "SELECT tasker.submit_result('{a}', 'failure', NULL, '{error}', '{metadata}')"
        ))
        .unwrap()
        .unwrap();
        assert_eq!((state.as_str(), delay(&a)), ("waiting_for_retry", 1500));
        assert!(
            Spi::get_one::<bool>(&format!(
                "SELECT last_error = '{error}'::jsonb FROM tasker.workflow_steps WHERE step_uuid = '{a}'"
            ))
            .unwrap()
            .unwrap(),
            "the error is stored as sent"
        );
        let task = create("o_deep", "flow", json!({}));
        let b = step_field(task, "a", "step_uuid");
        let outcome = Spi::get_one::<String>(&format!(
            r#"SELECT outcome FROM tasker.submit_results('[{{"step_uuid": "{b}", "status": "failure", "error": {error}, "metadata": {metadata}}}]')"#
        ))
        .unwrap()
        .unwrap();
        assert_eq!((outcome.as_str(), delay(&b)), ("applied", 1500));
        // without error.retry_after_seconds the header (any case) decides
        let task = create("o_deep", "flow", json!({}));
        let c = step_field(task, "a", "step_uuid");
        submit(
            &c,
            "failure",
            Value::Null,
            json!({"message": "x"}),
            json!({"headers": {"RETRY-AFTER": " 9 "}}),
        );
        assert_eq!(delay(&c), 9000);
    }

    #[pg_test]
    fn permanent_and_exhausted_failures() {
        let mut s = step("a", &[]);
        s["retry"] = json!({"max_attempts": 3, "backoff": "none"});
        register(&template(
            "o_perm",
            "flow",
            "1.0.0",
            json!([s, step("b", &["a"])]),
        ));
        // non-retryable: error at once, task blocked
        let task = create("o_perm", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        assert_eq!(
            submit(
                &a,
                "failure",
                Value::Null,
                json!({"message": "card declined", "error_code": "DECLINED", "retryable": false}),
                Value::Null
            ),
            "error"
        );
        assert_eq!(step_field(task, "a", "attempts"), "1");
        assert_eq!(
            step_field(task, "a", "last_error->>'error_code'"),
            "DECLINED"
        );
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT state::text FROM tasker.tasks WHERE task_uuid = '{task}'"
            ))
            .unwrap(),
            "blocked_by_failures"
        );
        let ctx = sql_value::<JsonB>(&format!(
            "SELECT to_jsonb(c) FROM tasker.task_execution_context('{task}') c"
        ))
        .unwrap()
        .0;
        assert_eq!(ctx["execution_status"], "blocked_by_failures");
        assert_eq!(ctx["health"], "blocked");
        assert_eq!(ctx["failed_steps"], 1);
        // retryable but exhausted after max_attempts = 3 (backoff none: due at once)
        let task = create("o_perm", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        for attempt in 1..=3 {
            let state = submit(
                &a,
                "failure",
                Value::Null,
                json!({"message": "flaky"}),
                Value::Null,
            );
            if attempt < 3 {
                assert_eq!(state, "enqueued", "backoff none: retried at once");
                assert_eq!(step_field(task, "a", "attempts"), (attempt + 1).to_string());
            } else {
                assert_eq!(state, "error");
            }
        }
        assert_eq!(
            text(&format!("SELECT metadata->>'attempts_exhausted' FROM tasker.step_transitions WHERE step_uuid = '{a}' AND to_state = 'error'")),
            "true"
        );
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT state::text FROM tasker.tasks WHERE task_uuid = '{task}'"
            ))
            .unwrap(),
            "blocked_by_failures"
        );
    }

    #[pg_test]
    fn readiness_functions() {
        register(&template(
            "o_ready",
            "diamond",
            "1.0.0",
            json!([
                step("s", &[]),
                step("l", &["s"]),
                step("r", &["s"]),
                step("e", &["l", "r"])
            ]),
        ));
        let task = create("o_ready", "diamond", json!({}));
        let rows = sql_value::<JsonB>(&format!(
            "SELECT jsonb_agg(jsonb_build_array(step_name, state, dependencies_satisfied, ready, total_parents, completed_parents)) FROM tasker.step_readiness('{task}')"
        ))
        .unwrap()
        .0;
        assert_eq!(
            rows,
            json!([
                ["s", "enqueued", true, false, 0, 0],
                ["l", "pending", false, false, 1, 0],
                ["r", "pending", false, false, 1, 0],
                ["e", "pending", false, false, 2, 0]
            ])
        );
        let ctx = sql_value::<JsonB>(&format!(
            "SELECT to_jsonb(c) FROM tasker.task_execution_context('{task}') c"
        ))
        .unwrap()
        .0;
        assert_eq!(
            (
                ctx["execution_status"].as_str(),
                ctx["in_progress_steps"].as_i64(),
                ctx["completion_percentage"].as_f64()
            ),
            (Some("processing"), Some(1), Some(0.0))
        );
        let s = step_field(task, "s", "step_uuid");
        submit(&s, "success", json!(1), Value::Null, Value::Null);
        let ctx = sql_value::<JsonB>(&format!(
            "SELECT to_jsonb(c) FROM tasker.task_execution_context('{task}') c"
        ))
        .unwrap()
        .0;
        assert_eq!(
            (
                ctx["completed_steps"].as_i64(),
                ctx["in_progress_steps"].as_i64(),
                ctx["completion_percentage"].as_f64()
            ),
            (Some(1), Some(2), Some(25.0))
        );
        let f = failure(
            "SELECT * FROM tasker.task_execution_context('00000000-0000-7000-8000-000000000000')",
        );
        assert!(f.starts_with("P0002"), "{f}");
    }

    #[pg_test]
    fn claims_order_by_escalated_priority_oldest_first() {
        register(&template(
            "o_prio",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        // tasks with due work: fresh ones at various priorities, and one old
        // default-priority task that has waited 10 minutes
        let mut ids = Vec::new();
        for (prio, waited_s) in [(0, 0), (50, 0), (100, 0), (0, 600), (-20, 0)] {
            let id = sql_value::<pgrx::Uuid>(&format!(
                "SELECT tasker.create_task('o_prio', 'flow', priority => {prio})"
            ))
            .unwrap();
            Spi::run(&format!("UPDATE tasker.tasks SET next_action_at = now() - make_interval(secs => {waited_s}) WHERE task_uuid = '{id}'")).unwrap();
            ids.push(id.to_string());
        }
        let claimed = sql_value::<JsonB>(
            "SELECT jsonb_agg(jsonb_build_array(task_uuid, effective_priority) ORDER BY effective_priority DESC) FROM tasker.claim_ready_tasks('orch-a', 3, 'o_prio')",
        )
        .unwrap()
        .0;
        let got: Vec<(String, i64)> = claimed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_i64().unwrap()))
            .collect();
        // the old task escalated to the ceiling and, being older, precedes the fresh 100
        let got_ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(got_ids, [ids[3].as_str(), ids[2].as_str(), ids[1].as_str()]);
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [100, 100, 50]);
        // claimed tasks are not offered again until released or expired
        assert_eq!(
            count("SELECT count(*) FROM tasker.claim_ready_tasks('orch-b', 10, 'o_prio')"),
            2
        );
        assert_eq!(
            count("SELECT count(*) FROM tasker.claim_ready_tasks('orch-c', 10, 'o_prio')"),
            0
        );
        let released = sql_value::<bool>(&format!(
            "SELECT tasker.release_task_claim('{}', 'orch-a')",
            ids[3]
        ))
        .unwrap();
        assert!(released);
        assert!(
            !sql_value::<bool>(&format!(
                "SELECT tasker.release_task_claim('{}', 'orch-x')",
                ids[2]
            ))
            .unwrap(),
            "only the owner releases"
        );
        assert!(sql_value::<bool>(&format!(
            "SELECT tasker.extend_task_claim('{}', 'orch-a', 120)",
            ids[2]
        ))
        .unwrap());
        assert_eq!(
            count("SELECT count(*) FROM tasker.claim_ready_tasks('orch-c', 10, 'o_prio')"),
            1
        );
        // an expired claim returns to the pool
        Spi::run(&format!("UPDATE tasker.tasks SET claim_expires_at = now() - interval '1 second' WHERE task_uuid = '{}'", ids[2])).unwrap();
        assert_eq!(
            count("SELECT count(*) FROM tasker.claim_ready_tasks('orch-d', 10, 'o_prio')"),
            1
        );
        let f = failure("SELECT * FROM tasker.claim_ready_tasks('', 1)");
        assert!(f.starts_with("22023"), "{f}");
        let f = failure("SELECT * FROM tasker.claim_ready_tasks('x', 0)");
        assert!(f.starts_with("22023"), "{f}");
        let f = failure(&format!(
            "SELECT tasker.release_task_claim('{}', 'x')",
            uuid::Uuid::now_v7()
        ));
        assert!(f.starts_with("P0002"), "{f}");
    }

    #[pg_test]
    fn operator_actions() {
        let mut s = step("pay", &[]);
        s["retry"] = json!({"max_attempts": 1});
        register(&template(
            "o_ops",
            "flow",
            "1.0.0",
            json!([step("a", &[]), s, step("ship", &["a", "pay"])]),
        ));
        let task = create("o_ops", "flow", json!({}));
        let pay = step_field(task, "pay", "step_uuid");
        let a = step_field(task, "a", "step_uuid");
        let ship = step_field(task, "ship", "step_uuid");
        submit(&a, "success", json!({"a": 1}), Value::Null, Value::Null);
        assert_eq!(
            submit(
                &pay,
                "failure",
                Value::Null,
                json!({"message": "gateway down"}),
                Value::Null
            ),
            "error"
        );
        let state = |q: &str| {
            sql_value::<String>(&format!(
                "SELECT state::text FROM tasker.tasks WHERE task_uuid = '{q}'"
            ))
            .unwrap()
        };
        assert_eq!(state(&task.to_string()), "blocked_by_failures");
        // retry_step only from error
        let f = failure(&format!("SELECT tasker.retry_step('{a}')"));
        assert!(
            f.starts_with("55000") && f.contains("only a step in error"),
            "{f}"
        );
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT tasker.retry_step('{pay}', 'gateway is back')"
            ))
            .unwrap(),
            "enqueued"
        );
        assert_eq!(
            step_field(task, "pay", "attempts || '/' || (attempts - budget_offset)"),
            "2/1",
            "a new budget: attempt 2 is the first of the new budget"
        );
        assert_eq!(state(&task.to_string()), "steps_in_process");
        assert_eq!(
            sql_value::<String>(&format!("SELECT reason || '|' || actor FROM tasker.step_transitions WHERE step_uuid = '{pay}' AND to_state = 'pending' AND from_state = 'error'")).unwrap(),
            format!("gateway is back|{}", sql_value::<String>("SELECT session_user::text").unwrap())
        );
        // it fails again; an operator resolves it by hand with a result
        submit(
            &pay,
            "failure",
            Value::Null,
            json!({"message": "still down"}),
            Value::Null,
        );
        assert_eq!(sql_value::<String>(&format!("SELECT tasker.resolve_step_manually('{pay}', '{{\"paid\": \"offline\"}}', 'paid by phone')")).unwrap(), "resolved_manually");
        // the dependent runs, with the manual result among its inputs
        let msgs = read_all("o_ops");
        let ship_msg = msgs
            .iter()
            .find(|m| m["step_name"] == "ship")
            .expect("ship enqueued");
        assert_eq!(
            ship_msg["dependency_results"],
            json!({"a": {"a": 1}, "pay": {"paid": "offline"}})
        );
        let f = failure(&format!("SELECT tasker.resolve_step_manually('{pay}')"));
        assert!(f.starts_with("55000"), "{f}");
        submit(&ship, "success", json!(true), Value::Null, Value::Null);
        assert_eq!(state(&task.to_string()), "complete");
        assert!(sql_value::<bool>(&format!(
            "SELECT completed_at IS NOT NULL FROM tasker.tasks WHERE task_uuid = '{task}'"
        ))
        .unwrap());
        // finished tasks refuse operator actions and cancellation
        let f = failure(&format!("SELECT tasker.cancel_task('{task}', 'too late')"));
        assert!(f.starts_with("55000"), "{f}");

        // cancel: unfinished steps cancelled, their messages archived; late results ignored
        let t2 = create("o_ops", "flow", json!({}));
        let a2 = step_field(t2, "a", "step_uuid");
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT tasker.cancel_task('{t2}', 'customer changed mind')"
            ))
            .unwrap(),
            "cancelled"
        );
        assert_eq!(step_field(t2, "a", "state"), "cancelled");
        assert_eq!(count(&format!("SELECT count(*) FROM pgmq.q_tasker_o_ops_queue WHERE message->>'task_uuid' = '{t2}'")), 0);
        assert_eq!(
            submit(&a2, "success", json!(1), Value::Null, Value::Null),
            "cancelled"
        );
        let f = failure(&format!("SELECT tasker.retry_step('{a2}')"));
        assert!(f.starts_with("55000"), "{f}");
        let f = failure(&format!(
            "SELECT tasker.cancel_task('{}')",
            uuid::Uuid::now_v7()
        ));
        assert!(f.starts_with("P0002"), "{f}");
    }

    #[pg_test]
    fn read_steps_marks_in_progress() {
        register(&template(
            "o_read",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &[])]),
        ));
        let task = create("o_read", "flow", json!({}));
        let n = count("SELECT count(*) FROM tasker.read_steps('o_read', 'worker-1', 10, 30)");
        assert_eq!(n, 2);
        assert_eq!(step_field(task, "a", "state"), "in_progress");
        assert_eq!(
            sql_value::<String>(&format!("SELECT metadata->>'worker_id' FROM tasker.step_transitions st JOIN tasker.workflow_steps s ON s.step_uuid = st.step_uuid AND st.sort_key = s.transitions WHERE s.task_uuid = '{task}' AND s.name = 'a'")).unwrap(),
            "worker-1"
        );
        assert_eq!(
            count("SELECT count(*) FROM tasker.read_steps('o_read', 'worker-1')"),
            0,
            "invisible while leased"
        );
        let a = step_field(task, "a", "step_uuid");
        assert_eq!(
            submit(&a, "success", json!(1), Value::Null, Value::Null),
            "complete"
        );
        let f = failure("SELECT * FROM tasker.read_steps('o_nope', 'w')");
        assert!(f.starts_with("42704"), "{f}");
        let f = failure("SELECT * FROM tasker.read_steps('o_read', 'w', 0)");
        assert!(f.starts_with("22023"), "{f}");
    }

    /// Finding due work must not scan finished history: with 50,000 finished
    /// tasks in the table, the planner uses the partial index on
    /// next_action_at for the ready-task lookup and the claim.
    #[pg_test]
    fn ready_work_lookups_use_the_partial_index() {
        register(&template(
            "o_explain",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        let tpl = sql_value::<pgrx::Uuid>(
            "SELECT template_uuid FROM tasker.templates WHERE namespace = 'o_explain'",
        )
        .unwrap();
        Spi::run(&format!(
            "INSERT INTO tasker.tasks (template_uuid, namespace_name, task_name, task_version, state, steps_total, steps_pending, steps_done, completed_at)
             SELECT '{tpl}', 'o_explain', 'flow', '1.0.0', 'complete', 1, 0, 1, now() FROM generate_series(1, 50000)"
        ))
        .unwrap();
        Spi::run("ANALYZE tasker.tasks").unwrap();
        for q in [
            "SELECT * FROM tasker.ready_tasks",
            "SELECT task_uuid FROM tasker.tasks t WHERE t.next_action_at <= now() AND (t.claimed_by IS NULL OR t.claim_expires_at < now()) ORDER BY tasker.effective_priority(t.priority, now() - t.next_action_at) DESC, t.next_action_at LIMIT 10 FOR NO KEY UPDATE SKIP LOCKED",
        ] {
            let plan = Spi::explain(q).unwrap().0.to_string();
            assert!(plan.contains("tasks_next_action_idx"), "{q}: {plan}");
        }
    }

    fn diamond_task(ns: &str) -> (pgrx::Uuid, [String; 4]) {
        let mut t = diamond(ns);
        t["steps"][1]["retry"] = json!({"max_attempts": 1});
        register(&t);
        let task = create(ns, "diamond", json!({}));
        let ids = ["start", "left", "right", "end"].map(|n| step_field(task, n, "step_uuid"));
        (task, ids)
    }

    /// A branch failing for good while its sibling succeeds blocks the task
    /// (whatever the order), and nothing is left in steps_in_process.
    #[pg_test]
    fn a_failed_branch_blocks_its_task_in_either_order() {
        for (ns, fail_first) in [("o_branch_a", true), ("o_branch_b", false)] {
            let (task, [start, left, right, _]) = diamond_task(ns);
            submit(&start, "success", json!(1), Value::Null, Value::Null);
            let fail = || {
                submit(
                    &left,
                    "failure",
                    Value::Null,
                    json!({"message": "no", "retryable": false}),
                    Value::Null,
                )
            };
            let ok = || submit(&right, "success", json!(2), Value::Null, Value::Null);
            if fail_first {
                assert_eq!(fail(), "error");
                assert_eq!(task_state(task), "steps_in_process", "right still runs");
                ok();
            } else {
                ok();
                assert_eq!(fail(), "error");
            }
            assert_eq!(task_state(task), "blocked_by_failures", "{ns}");
            assert_task_consistent(task);
        }
    }

    /// Resolving a step whose parent still runs: the task completes when the
    /// rest is done (it used to stay unfinished with every step done).
    #[pg_test]
    fn resolving_a_step_whose_parent_still_runs() {
        let (task, [start, left, right, end]) = diamond_task("o_resolve_mid");
        assert_eq!(
            text(&format!(
                "SELECT tasker.resolve_step_manually('{left}', '{{\"by\": \"hand\"}}')"
            )),
            "resolved_manually"
        );
        assert_eq!(task_state(task), "steps_in_process");
        assert_task_consistent(task);
        submit(&start, "success", json!(1), Value::Null, Value::Null);
        assert_eq!(step_field(task, "right", "state"), "enqueued");
        assert_eq!(
            step_field(task, "end", "state"),
            "pending",
            "end still waits for right"
        );
        submit(&right, "success", json!(2), Value::Null, Value::Null);
        let end_msg = read_all("o_resolve_mid")
            .into_iter()
            .find(|m| m["step_name"] == "end")
            .unwrap();
        assert_eq!(
            end_msg["dependency_results"],
            json!({"left": {"by": "hand"}, "right": 2})
        );
        submit(&end, "success", json!(3), Value::Null, Value::Null);
        assert_eq!(task_state(task), "complete");
        assert_task_consistent(task);
        // resolving the last open step of a task completes it at once
        let (task, [start, left, right, end]) = diamond_task("o_resolve_last");
        for s in [&start, &left, &right] {
            submit(s, "success", json!(1), Value::Null, Value::Null);
        }
        assert_eq!(
            text(&format!("SELECT tasker.resolve_step_manually('{end}')")),
            "resolved_manually"
        );
        assert_eq!(task_state(task), "complete");
        assert_task_consistent(task);
    }

    /// A blocked task whose failed step is resolved (or retried) resumes.
    #[pg_test]
    fn a_blocked_task_resumes_when_its_failure_is_resolved_or_retried() {
        let (task, [start, left, right, end]) = diamond_task("o_unblock");
        submit(&start, "success", json!(1), Value::Null, Value::Null);
        submit(&right, "success", json!(2), Value::Null, Value::Null);
        submit(
            &left,
            "failure",
            Value::Null,
            json!({"message": "no", "retryable": false}),
            Value::Null,
        );
        assert_eq!(task_state(task), "blocked_by_failures");
        text(&format!(
            "SELECT tasker.resolve_step_manually('{left}', '\"fixed\"')"
        ));
        assert_eq!(task_state(task), "steps_in_process");
        assert_eq!(step_field(task, "end", "state"), "enqueued");
        submit(&end, "success", json!(3), Value::Null, Value::Null);
        assert_eq!(task_state(task), "complete");
        assert_task_consistent(task);

        let (task, [start, left, right, _]) = diamond_task("o_unblock_retry");
        submit(&start, "success", json!(1), Value::Null, Value::Null);
        submit(&right, "success", json!(2), Value::Null, Value::Null);
        submit(
            &left,
            "failure",
            Value::Null,
            json!({"message": "no"}),
            Value::Null,
        );
        assert_eq!(task_state(task), "blocked_by_failures");
        assert_eq!(
            text(&format!("SELECT tasker.retry_step('{left}')")),
            "enqueued"
        );
        assert_eq!(task_state(task), "steps_in_process");
        assert_task_consistent(task);
    }

    /// Attempts only grow: an operator's retry starts attempt 2, and a late
    /// result of attempt 1 is ignored with a NOTICE.
    #[pg_test]
    fn attempts_are_fenced_across_operator_retries() {
        let mut s = step("a", &[]);
        s["retry"] = json!({"max_attempts": 1});
        register(&template("o_fence", "flow", "1.0.0", json!([s])));
        let task = create("o_fence", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        let first = read_all("o_fence");
        assert_eq!(first[0]["attempt"], 1);
        assert_eq!(
            submit(
                &a,
                "failure",
                Value::Null,
                json!({"message": "down"}),
                json!({"attempt": 1})
            ),
            "error"
        );
        assert_eq!(
            text(&format!("SELECT tasker.retry_step('{a}')")),
            "enqueued"
        );
        let second = read_all("o_fence");
        assert_eq!(
            (
                second[0]["attempt"].clone(),
                second[0]["budget_attempt"].clone()
            ),
            (json!(2), json!(1))
        );
        // the late result of attempt 1 changes nothing
        assert_eq!(
            submit(
                &a,
                "success",
                json!("stale"),
                Value::Null,
                json!({"attempt": 1})
            ),
            "enqueued"
        );
        assert_eq!(step_field(task, "a", "results"), "");
        assert_eq!(
            submit(
                &a,
                "success",
                json!("fresh"),
                Value::Null,
                json!({"attempt": 2})
            ),
            "complete"
        );
        assert_eq!(step_field(task, "a", "results"), "\"fresh\"");
        assert_eq!(task_state(task), "complete");
        assert_eq!(
            text(&format!("SELECT string_agg(to_state || '@' || coalesce(metadata->>'attempt', ''), ',' ORDER BY sort_key) FROM tasker.step_transitions WHERE step_uuid = '{a}'")),
            "pending@,enqueued@1,error@1,pending@1,enqueued@2,complete@2"
        );
        assert_task_consistent(task);
    }

    #[pg_test]
    fn read_steps_survives_poison_and_foreign_messages() {
        register(&template(
            "o_poison",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        register(&template(
            "o_poison_other",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        let other = create("o_poison_other", "flow", json!({}));
        let other_a = step_field(other, "a", "step_uuid");
        let other_msg = step_field(other, "a", "queue_msg_id");
        // a forged message naming another namespace's step, with its msg_id
        Spi::run(&format!(
            "INSERT INTO pgmq.q_tasker_o_poison_queue (msg_id, vt, message) OVERRIDING SYSTEM VALUE
             VALUES ({other_msg}, clock_timestamp(), '{{\"step_uuid\": \"{other_a}\"}}');
             SELECT setval(pg_get_serial_sequence('pgmq.q_tasker_o_poison_queue', 'msg_id'), 1000)"
        ))
        .unwrap();
        Spi::run("SELECT pgmq.send('tasker_o_poison_queue', '{\"hello\": 1}')").unwrap();
        Spi::run("SELECT pgmq.send('tasker_o_poison_queue', '{\"step_uuid\": \"not-a-uuid\"}')")
            .unwrap();
        let task = create("o_poison", "flow", json!({}));
        let rows = json_of("SELECT jsonb_agg(jsonb_build_array(step_uuid, message ->> 'step_name')) FROM tasker.read_steps('o_poison', 'w', 10, 30)");
        // the forged and the malformed messages are quarantined, not returned
        assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
        assert_eq!(
            count(
                "SELECT count(*) FROM tasker.dlq WHERE reason = 'invalid_step_message'
                 AND snapshot->>'queue' = 'tasker_o_poison_queue'"
            ),
            3
        );
        assert_eq!(step_field(task, "a", "state"), "in_progress");
        assert_eq!(
            step_field(other, "a", "state"),
            "enqueued",
            "a foreign message marks nothing"
        );
        assert_task_consistent(task);
        assert_task_consistent(other);
    }

    #[pg_test]
    fn extend_lease_is_for_the_current_attempt_within_its_timeout() {
        let mut s = step("a", &[]);
        s["timeout_seconds"] = json!(60);
        register(&template(
            "o_lease",
            "flow",
            "1.0.0",
            json!([s, step("b", &[])]),
        ));
        let task = create("o_lease", "flow", json!({}));
        let a = step_field(task, "a", "step_uuid");
        let b = step_field(task, "b", "step_uuid");
        count("SELECT count(*) FROM tasker.read_steps('o_lease', 'w', 10, 5)");
        let secs = |step: &str, attempt: i32, want: i32| {
            sql_value::<i64>(&format!(
                "SELECT extract(epoch FROM tasker.extend_lease('{step}', {attempt}, {want}) - clock_timestamp())::bigint"
            ))
        };
        assert_eq!(secs(&b, 1, 300), Some(300), "no timeout: as asked");
        let capped = secs(&a, 1, 300).unwrap();
        assert!(
            (58..=60).contains(&capped),
            "capped at the 60 s timeout: {capped}"
        );
        assert_eq!(secs(&a, 2, 30), None, "not the current attempt");
        assert_fails(
            &format!("SELECT tasker.extend_lease('{a}', 1, 0)"),
            "22023",
            "seconds",
        );
        assert_fails(
            &format!(
                "SELECT tasker.extend_lease('{}', 1, 5)",
                uuid::Uuid::now_v7()
            ),
            "P0002",
            "does not exist",
        );
        submit(&a, "success", json!(1), Value::Null, Value::Null);
        assert_eq!(secs(&a, 1, 30), None, "settled");
    }

    #[pg_test]
    fn alone_and_general_paths_leave_the_same_rows() {
        // A success whose children have no other parent is applied in one
        // statement (tasker._complete_alone); everything else, and every
        // result with pg_tasker.one_statement_results off, the general
        // way. One workflow both ways must leave the same rows, audit rows
        // and messages: a fan-out (a -> b, c: one statement), a join (b, c
        // -> d: general), a chain (d -> e) and the last step (e, which
        // fails once, is retried at once and then completes the task). One
        // task through submit_result, the other through submit_results with
        // the setting off.
        Spi::run("SET LOCAL track_functions = 'pl'").unwrap();
        register(&template(
            "o_paths",
            "flow",
            "1.0.0",
            json!([
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["a"]),
                step("d", &["b", "c"]),
                step("e", &["d"])
            ]),
        ));
        let ctx = json!({"n": 12345678901234567890.5_f64});
        let plain = create("o_paths", "flow", ctx.clone());
        let batch = create("o_paths", "flow", ctx);
        // results as workers send them, byte-exact: numbers beyond f64
        let result = |name: &str| {
            format!(r#"{{"from": "{name}", "big": 123456789012345678901234567890.10}}"#)
        };
        let (alone, general) = (
            function_calls("_complete_alone"),
            function_calls("_move_steps"),
        );
        loop {
            let msgs = read_all("o_paths");
            if msgs.is_empty() {
                break;
            }
            for m in &msgs {
                let step = m["step_uuid"].as_str().unwrap();
                let meta =
                    json!({"attempt": m["attempt"], "worker_id": "w", "execution_time_ms": 2});
                let payload = result(m["step_name"].as_str().unwrap());
                // (e's first attempt fails, a retry due at once)
                let fails = m["step_name"] == "e" && m["attempt"] == 1;
                let (status, result, error) = if fails {
                    (
                        "failure",
                        "null".to_string(),
                        r#"{"message": "once", "retry_after_seconds": 0}"#.to_string(),
                    )
                } else {
                    ("success", payload, "null".to_string())
                };
                if m["task_uuid"] == plain.to_string() {
                    Spi::run("SELECT set_config('pg_tasker.one_statement_results', 'on', true)")
                        .unwrap();
                    Spi::run_with_args(
                        "SELECT tasker.submit_result($1::uuid, $2, nullif($3::text::jsonb, 'null'),
                                                     nullif($4::text::jsonb, 'null'), $5)",
                        &[
                            step.into(),
                            status.into(),
                            result.as_str().into(),
                            error.as_str().into(),
                            JsonB(meta).into(),
                        ],
                    )
                    .unwrap();
                } else {
                    Spi::run("SELECT set_config('pg_tasker.one_statement_results', 'off', true)")
                        .unwrap();
                    Spi::run_with_args(
                        "SELECT count(*) FROM tasker.submit_results(jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
                             'step_uuid', $1::text, 'status', $2::text, 'result', nullif($3::text::jsonb, 'null'),
                             'error', nullif($4::text::jsonb, 'null'), 'metadata', $5))))",
                        &[step.into(), status.into(), result.as_str().into(), error.as_str().into(), JsonB(meta).into()],
                    )
                    .unwrap();
                }
            }
        }
        // through submit_result every success but the two parents' of the
        // join went the one-statement way (those two tried it; the failure
        // went the general way); with the setting off none did
        assert_eq!(function_calls("_complete_alone") - alone, 5);
        assert_eq!(function_calls("_move_steps") - general, (2 + 1) + (5 + 1));
        // (what differs by nature: uuids, times, msg_ids; and the reason of
        // the task's audit rows, which names the operation)
        let rows = |task: pgrx::Uuid| {
            json_of(&format!(
                "SELECT jsonb_build_object(
                    'task', (SELECT to_jsonb(t) - '{{task_uuid,correlation_id,created_at,updated_at,completed_at}}'::text[]
                                 || jsonb_build_object('finished', t.completed_at IS NOT NULL)
                             FROM tasker.tasks t WHERE t.task_uuid = '{task}'),
                    'task_audit', (SELECT jsonb_agg(jsonb_build_array(a.sort_key, a.from_state, a.to_state,
                                                                      a.metadata) ORDER BY a.sort_key)
                                   FROM tasker.task_transitions a WHERE a.task_uuid = '{task}'),
                    'steps', (SELECT jsonb_object_agg(s.name, to_jsonb(s)
                                  - '{{step_uuid,task_uuid,queue_msg_id,enqueued_at,started_at,completed_at,created_at,updated_at}}'::text[]
                                  || jsonb_build_object('results_text', s.results::text,
                                                        'has_message', s.queue_msg_id IS NOT NULL,
                                                        'times', jsonb_build_array(s.enqueued_at IS NOT NULL,
                                                                                   s.started_at IS NOT NULL,
                                                                                   s.completed_at IS NOT NULL)))
                              FROM tasker.workflow_steps s WHERE s.task_uuid = '{task}'),
                    'step_audit', (SELECT jsonb_agg(jsonb_build_array(s.name, a.sort_key, a.from_state, a.to_state,
                                                                      a.reason, a.metadata)
                                                    ORDER BY s.name, a.sort_key)
                                   FROM tasker.step_transitions a JOIN tasker.workflow_steps s USING (step_uuid)
                                   WHERE s.task_uuid = '{task}'),
                    'messages', (SELECT jsonb_object_agg(q.message ->> 'step_name',
                                     q.message - '{{task_uuid,step_uuid,correlation_id,enqueued_at}}'::text[]
                                     || jsonb_build_object('dependency_results_text',
                                                           (q.message -> 'dependency_results')::text))
                                 FROM pgmq.a_tasker_o_paths_queue q WHERE q.message ->> 'task_uuid' = '{task}'))"
            ))
        };
        let (a, b) = (rows(plain), rows(batch));
        assert_eq!(a, b);
        assert_eq!(a["task"]["state"], "complete");
        assert_eq!(a["steps"]["e"]["attempts"], 2);
        assert_eq!(a["messages"].as_object().unwrap().len(), 5);
        // (jsonb's own key order; the numbers as sent)
        assert_eq!(
            a["messages"]["e"]["dependency_results_text"],
            r#"{"d": {"big": 123456789012345678901234567890.10, "from": "d"}}"#
        );
        assert_eq!(
            a["messages"]["d"]["dependency_results_text"],
            r#"{"b": {"big": 123456789012345678901234567890.10, "from": "b"}, "c": {"big": 123456789012345678901234567890.10, "from": "c"}}"#
        );
        assert_task_consistent(plain);
        assert_task_consistent(batch);
    }

    #[pg_test]
    fn hot_paths_inline_every_sql_function() {
        // An SQL function declared more strictly than its body (IMMUTABLE
        // over jsonb_build_object, which is STABLE) is not inlined: it then
        // runs through the SQL-function executor for every row it is used
        // on, ~20 µs each. track_functions counts exactly those calls (an
        // inlined function is never called); a fold at planning time is one
        // call per plan, so no function may be called once per result.
        Spi::run("SET LOCAL track_functions = 'all'").unwrap();
        register(&template(
            "o_inline",
            "lin",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"]), step("c", &["b"])]),
        ));
        let tasks = 12;
        // (the calls so far: setting up a namespace and its queue; from here
        // on: task creation, results one by one and in batches)
        Spi::run(
            "CREATE TEMP TABLE calls_before AS
             SELECT funcid, calls FROM pg_catalog.pg_stat_xact_user_functions",
        )
        .unwrap();
        for _ in 0..tasks {
            create("o_inline", "lin", json!({"n": 1}));
        }
        let meta = |m: &Value| json!({"attempt": m["attempt"], "worker_id": "w", "execution_time_ms": 1.5});
        let mut failed = false;
        loop {
            // the plain protocol for half of the messages, a batch for the rest
            let msgs = read_all("o_inline");
            if msgs.is_empty() {
                break;
            }
            let (plain, batch) = msgs.split_at(msgs.len() / 2);
            for m in plain {
                let step = m["step_uuid"].as_str().unwrap();
                if !failed {
                    // one failure with a retry due at once
                    failed = true;
                    submit(
                        step,
                        "failure",
                        Value::Null,
                        json!({"message": "x", "retry_after_seconds": 0}),
                        meta(m),
                    );
                } else {
                    submit(step, "success", json!({"ok": true}), Value::Null, meta(m));
                }
            }
            let results: Vec<Value> = batch
                .iter()
                .map(|m| json!({"step_uuid": m["step_uuid"], "status": "success", "result": {"ok": 1}, "metadata": meta(m)}))
                .collect();
            Spi::run(&format!(
                "SELECT count(*) FROM tasker.exchange(ARRAY['o_inline'], 'w', {}, 0)",
                quote(&Value::Array(results))
            ))
            .unwrap();
        }
        assert_eq!(
            count("SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'o_inline' AND state = 'complete'"),
            tasks
        );
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT string_agg(f.funcname || ' (' || f.calls - coalesce(b.calls, 0) || ' calls)', ', '
                                   ORDER BY f.funcname)
                 FROM pg_catalog.pg_stat_xact_user_functions f
                 JOIN pg_catalog.pg_proc p ON p.oid = f.funcid
                 JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                 LEFT JOIN calls_before b ON b.funcid = f.funcid
                 WHERE f.schemaname = 'tasker' AND l.lanname = 'sql'
                   AND f.calls - coalesce(b.calls, 0) >= {tasks}"
            )),
            None,
            "SQL functions called per row instead of inlined"
        );
    }
}
