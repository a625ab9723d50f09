//! The batched worker protocol: tasker.submit_results and tasker.exchange.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::tests::helpers::*;

    fn result(m: &Value, status: &str) -> Value {
        let mut r = json!({"step_uuid": m["step_uuid"], "status": status,
                           "metadata": {"attempt": m["attempt"], "worker_id": "w1"}});
        if status == "success" {
            r["result"] = json!({"from": m["step_name"]});
        } else {
            r["error"] = json!({"message": "boom", "retryable": false});
        }
        r
    }

    /// submit_results: (step_uuid, outcome, state, detail) rows as JSON.
    fn submit_results(results: &Value) -> Vec<Value> {
        json_of(&format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(r)), '[]') FROM tasker.submit_results({}) r",
            quote(results)
        ))
        .as_array()
        .unwrap()
        .clone()
    }

    #[pg_test]
    fn a_batch_of_results_is_applied_in_one_call_and_bad_elements_stop_nothing() {
        for ns in ["b_one", "b_two"] {
            register(&template(
                ns,
                "flow",
                "1.0.0",
                json!([step("a", &[]), step("b", &["a"])]),
            ));
        }
        let t1 = create("b_one", "flow", json!({}));
        let t2 = create("b_two", "flow", json!({}));
        let t3 = create("b_one", "flow", json!({}));
        let one = read_all("b_one");
        let two = read_all("b_two");
        assert_eq!((one.len(), two.len()), (2, 1));
        let never = step_field(t1, "b", "step_uuid");
        let mut stale = result(&one[1], "success");
        stale["metadata"]["attempt"] = json!(7);
        let batch = json!([
            result(&one[0], "success"),
            result(&two[0], "failure"),
            "not an object",
            {"step_uuid": "nope", "status": "success"},
            {"step_uuid": one[1]["step_uuid"], "status": "maybe"},
            result(&one[0], "success"),
            {"step_uuid": never, "status": "success", "result": 1},
            {"step_uuid": "00000000-0000-0000-0000-000000000000", "status": "success"},
            stale,
        ]);
        let rows = submit_results(&batch);
        let outcomes: Vec<&str> = rows
            .iter()
            .map(|r| r["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            [
                "applied",
                "applied",
                "rejected",
                "rejected",
                "rejected",
                "duplicate",
                "never_enqueued",
                "unknown_step",
                "stale_attempt"
            ]
        );
        assert_eq!(rows[0]["state"], "complete");
        assert_eq!(rows[1]["state"], "error");
        assert!(rows[0]["detail"].is_null());
        for (i, needle) in [
            (2, "result 3 is not a JSON object"),
            (3, "result 4: step_uuid must be a uuid"),
            (4, "result 5: invalid status \"maybe\""),
            (5, "an earlier result"),
            (6, "never been enqueued"),
            (7, "does not exist"),
            (8, "the current attempt is 1"),
        ] {
            let d = rows[i]["detail"].as_str().unwrap();
            assert!(d.contains(needle), "{i}: {d}");
        }
        // applied: t1's child is out, t2 is blocked, t3 untouched
        assert_eq!(step_field(t1, "b", "state"), "enqueued");
        assert_eq!(task_state(t2), "blocked_by_failures");
        assert_eq!(step_field(t3, "a", "state"), "enqueued");
        assert_eq!(step_field(t1, "a", "results"), r#"{"from": "a"}"#);
        // the audit row has the worker
        assert_eq!(
            text(&format!(
                "SELECT metadata->>'worker_id' FROM tasker.step_transitions st
                 JOIN tasker.workflow_steps s USING (step_uuid)
                 WHERE s.task_uuid = '{t1}' AND s.name = 'a' AND st.to_state = 'complete'"
            )),
            "w1"
        );
        for t in [t1, t2, t3] {
            assert_task_consistent(t);
        }
        // the messages of the applied results are archived
        assert_eq!(count("SELECT count(*) FROM pgmq.q_tasker_b_two_queue"), 0);
    }

    #[pg_test]
    fn a_batch_mixes_one_statement_and_general_results_in_order() {
        // successes whose children have no other parent apply in one
        // statement (tasker._complete_alone), the others in the general
        // way; each outcome stays in its place
        // (start -> left, right -> end)
        register(&diamond("b_mix"));
        register(&template(
            "b_mix",
            "chain",
            "1.0.0",
            json!([step("x", &[]), step("y", &["x"])]),
        ));
        let t1 = create("b_mix", "diamond", json!({}));
        let t2 = create("b_mix", "chain", json!({}));
        let t3 = create("b_mix", "chain", json!({}));
        let by = |msgs: &[Value], task: pgrx::Uuid, name: &str| -> Value {
            msgs.iter()
                .find(|m| m["task_uuid"] == task.to_string() && m["step_name"] == name)
                .unwrap_or_else(|| panic!("no message for {name} of {task}: {msgs:?}"))
                .clone()
        };
        let outcomes = |rows: &[Value]| -> Vec<String> {
            rows.iter()
                .map(|r| r["outcome"].as_str().unwrap().to_string())
                .collect()
        };
        Spi::run("SET LOCAL track_functions = 'pl'").unwrap();
        let msgs = read_all("b_mix");
        let (a1, x2, x3) = (
            by(&msgs, t1, "start"),
            by(&msgs, t2, "x"),
            by(&msgs, t3, "x"),
        );
        let moves = function_calls("_move_steps");
        let rows = submit_results(&json!([
            result(&x2, "success"),
            result(&a1, "success"),
            result(&x3, "success"),
            result(&x3, "success"),
            {"step_uuid": "00000000-0000-0000-0000-000000000000", "status": "success"}
        ]));
        assert_eq!(
            outcomes(&rows),
            ["applied", "applied", "applied", "duplicate", "unknown_step"]
        );
        let states: Vec<&Value> = rows.iter().map(|r| &r["state"]).collect();
        assert_eq!(
            states,
            [
                &json!("complete"),
                &json!("complete"),
                &json!("complete"),
                &json!("complete"),
                &Value::Null
            ]
        );
        // (x of t3, given twice, went the general way: one move to complete)
        assert_eq!(function_calls("_move_steps") - moves, 1);

        let msgs = read_all("b_mix");
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        let (b1, c1, y2, y3) = (
            by(&msgs, t1, "left"),
            by(&msgs, t1, "right"),
            by(&msgs, t2, "y"),
            by(&msgs, t3, "y"),
        );
        let rows = submit_results(&json!([
            result(&b1, "success"),
            result(&y2, "success"),
            result(&c1, "success"),
            result(&a1, "success"),
            result(&y3, "success")
        ]));
        assert_eq!(
            outcomes(&rows),
            ["applied", "applied", "applied", "settled", "applied"]
        );
        assert!(
            rows[3]["detail"]
                .as_str()
                .unwrap()
                .contains("already settled"),
            "{:?}",
            rows[3]
        );
        assert_eq!(
            (task_state(t2), task_state(t3)),
            ("complete".into(), "complete".into())
        );
        // the join is enqueued once, with both results
        let msgs = read_all("b_mix");
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert_eq!(
            msgs[0]["dependency_results"],
            json!({"left": {"from": "left"}, "right": {"from": "right"}})
        );
        let rows = submit_results(&json!([result(&msgs[0], "success")]));
        assert_eq!(outcomes(&rows), ["applied"]);
        assert_eq!(task_state(t1), "complete");
        for t in [t1, t2, t3] {
            assert_task_consistent(t);
        }
    }

    #[pg_test]
    fn a_batch_is_refused_whole_only_when_it_is_not_a_batch() {
        assert_fails(
            "SELECT * FROM tasker.submit_results('{}')",
            "22023",
            "must be a JSON array",
        );
        assert_fails(
            "SELECT * FROM tasker.submit_results(NULL)",
            "22023",
            "must be a JSON array",
        );
        assert_fails(
            "SELECT * FROM tasker.submit_results((SELECT jsonb_agg(i) FROM generate_series(1, 1001) i))",
            "54000",
            "at most 1000",
        );
        assert_eq!(count("SELECT count(*) FROM tasker.submit_results('[]')"), 0);
    }

    #[pg_test]
    fn oversized_results_in_a_batch_are_rejected_alone() {
        register(&template(
            "b_big",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &[])]),
        ));
        let task = create("b_big", "flow", json!({}));
        let msgs = read_all("b_big");
        let mut big = result(&msgs[0], "success");
        big["result"] = json!({"blob": "x".repeat(1_100_000)});
        let rows = submit_results(&json!([big, result(&msgs[1], "success")]));
        assert_eq!(rows[0]["outcome"], "rejected");
        assert!(rows[0]["detail"]
            .as_str()
            .unwrap()
            .contains("limits.max_result_bytes"));
        assert_eq!(rows[1]["outcome"], "applied");
        let rejected = msgs[0]["step_name"].as_str().unwrap();
        assert_eq!(step_field(task, rejected, "state"), "enqueued");
        assert_task_consistent(task);
    }

    #[pg_test]
    fn exchange_submits_then_reads_across_namespaces() {
        for ns in ["x_one", "x_two"] {
            register(&template(
                ns,
                "flow",
                "1.0.0",
                json!([step("a", &[]), step("b", &["a"])]),
            ));
        }
        let mut tasks = Vec::new();
        for _ in 0..3 {
            tasks.push(create("x_one", "flow", json!({})));
            tasks.push(create("x_two", "flow", json!({})));
        }
        // read only: qty shared among the namespaces, steps in_progress
        let got = json_of(
            "SELECT jsonb_agg(jsonb_build_object('ns', namespace, 'm', message, 'step', step_uuid))
             FROM tasker.exchange(ARRAY['x_one', 'x_two'], 'w1', NULL, 4)",
        );
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got.iter().filter(|g| g["ns"] == "x_one").count(), 2);
        assert_eq!(
            count("SELECT count(*) FROM tasker.workflow_steps WHERE state = 'in_progress'"),
            4
        );
        // results and the next read in one call; the children come back
        let results: Vec<Value> = got.iter().map(|g| result(&g["m"], "success")).collect();
        let next = json_of(&format!(
            "SELECT jsonb_agg(message->>'step_name' ORDER BY message->>'step_name')
             FROM tasker.exchange(ARRAY['x_one', 'x_two'], 'w1', {}, 10)",
            quote(&json!(results))
        ));
        // 2 roots not read before + 4 children
        assert_eq!(next, json!(["a", "a", "b", "b", "b", "b"]));
        // only submit: qty 0; a late duplicate is ignored, not an error
        let late = json!([results[0]]);
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM tasker.exchange(ARRAY['x_one'], 'w1', {}, 0)",
                quote(&late)
            )),
            0
        );
        for t in &tasks {
            assert_task_consistent(t);
        }
    }

    #[pg_test]
    fn exchange_checks_its_arguments() {
        register(&template(
            "x_args",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        assert_fails(
            "SELECT * FROM tasker.exchange(ARRAY['x_args', 'no_such'], 'w', NULL, 1)",
            "42704",
            "namespace \"no_such\" does not exist",
        );
        assert_fails(
            "SELECT * FROM tasker.exchange('{}', 'w', NULL, 1)",
            "22023",
            "at least one",
        );
        assert_fails(
            "SELECT * FROM tasker.exchange(ARRAY['x_args'], NULL, NULL, 1)",
            "22004",
            "worker_id",
        );
        assert_fails(
            "SELECT * FROM tasker.exchange(ARRAY['x_args'], 'w', NULL, 1001)",
            "22023",
            "qty",
        );
        assert_fails(
            "SELECT * FROM tasker.exchange(ARRAY['x_args'], 'w', NULL, 1, 0)",
            "22023",
            "visibility",
        );
        assert_fails(
            "SELECT * FROM tasker.exchange(ARRAY['x_args'], 'w', '\"x\"', 1)",
            "22023",
            "JSON array",
        );
    }
}
