//! Dynamic steps through SQL: decisions and deferred convergence (nested
//! ones too), batches with their failure strategies, map steps,
//! checkpoints; every task checked against tests.task_problems.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::tests::helpers::*;

    fn typed(name: &str, ty: &str, deps: &[&str]) -> Value {
        let mut s = step(name, deps);
        s["type"] = json!(ty);
        s
    }

    /// Works a namespace's queue like a worker until it is empty: `handle`
    /// gives each message's result (Err: a failure with that message).
    fn work(ns: &str, handle: impl Fn(&Value) -> Result<Value, String>) {
        for _ in 0..1000 {
            let msgs = read_all(ns);
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                let meta = json!({"attempt": m["attempt"]});
                let step = m["step_uuid"].as_str().unwrap();
                match handle(&m) {
                    Ok(r) => submit(step, "success", r, Value::Null, meta),
                    Err(e) => submit(
                        step,
                        "failure",
                        Value::Null,
                        json!({"message": e, "retry_after_seconds": 0}),
                        meta,
                    ),
                };
            }
        }
        panic!("{ns}: the queue never emptied");
    }

    fn states(task: pgrx::Uuid) -> Value {
        json_of(&format!(
            "SELECT jsonb_object_agg(name, state) FROM tasker.workflow_steps WHERE task_uuid = '{task}'"
        ))
    }

    fn result_of(task: pgrx::Uuid, name: &str) -> Value {
        json_of(&format!(
            "SELECT results FROM tasker.workflow_steps WHERE task_uuid = '{task}' AND name = '{name}'"
        ))
    }

    fn deps_seen(m: &Value) -> Value {
        let mut k: Vec<&String> = m["dependency_results"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        k.sort();
        json!({ "saw": k })
    }

    fn approval(ns: &str) {
        register(&template(
            ns,
            "approval",
            "1.0.0",
            json!([
                step("validate", &[]),
                typed("decide", "decision", &["validate"]),
                step("auto_approve", &["decide"]),
                step("manager", &["decide"]),
                step("finance", &["decide"]),
                typed(
                    "finalize",
                    "deferred_convergence",
                    &["auto_approve", "manager", "finance"]
                ),
            ]),
        ));
    }

    fn decide_by_amount(m: &Value) -> Result<Value, String> {
        if m["step_name"] != "decide" {
            return Ok(deps_seen(m));
        }
        let amount = m["task_context"]["amount"].as_i64().unwrap();
        let outcome = match amount {
            a if a < 0 => json!({"type": "no_branches"}),
            a if a < 1000 => json!({"type": "create_steps", "step_names": ["auto_approve"]}),
            a if a < 5000 => json!({"type": "create_steps", "step_names": ["manager"]}),
            _ => json!({"type": "create_steps", "step_names": ["manager", "finance"]}),
        };
        Ok(json!({ "decision_point_outcome": outcome }))
    }

    #[pg_test]
    fn a_decision_creates_the_branches_it_names_and_the_convergence_sees_only_those() {
        approval("dy_appr");
        let task = |amount: i64| create("dy_appr", "approval", json!({ "amount": amount }));
        let small = task(500);
        // create_task makes only the steps before the decision
        assert_eq!(
            states(small),
            json!({"validate": "enqueued", "decide": "pending"})
        );
        assert_eq!(
            count(&format!(
                "SELECT steps_total FROM tasker.tasks WHERE task_uuid = '{small}'"
            )),
            2
        );
        let middle = task(2000);
        let large = task(9000);
        let none = task(-1);
        work("dy_appr", decide_by_amount);
        for (t, branches) in [
            (small, vec!["auto_approve"]),
            (middle, vec!["manager"]),
            (large, vec!["finance", "manager"]),
        ] {
            assert_eq!(task_state(t), "complete");
            assert_eq!(result_of(t, "finalize"), json!({ "saw": branches }));
            for b in &branches {
                assert_eq!(
                    text(&format!(
                        "SELECT origin FROM tasker.step_status WHERE task_uuid = '{t}' AND step_name = '{b}'"
                    )),
                    "decision \"decide\""
                );
            }
            assert_task_consistent(t);
        }
        assert_eq!(task_state(none), "complete");
        assert_eq!(
            states(none),
            json!({"validate": "complete", "decide": "complete"})
        );
        // the audit trail says who created the steps
        assert_eq!(
            text(&format!(
                "SELECT reason FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid)
                 WHERE s.task_uuid = '{large}' AND s.name = 'finance' AND st.sort_key = 1"
            )),
            "created by decision step \"decide\""
        );
    }

    #[pg_test]
    fn an_invalid_outcome_fails_the_decision_for_good_with_the_reason() {
        approval("dy_bad");
        for (result, needle) in [
            (json!({"x": 1}), "has no decision_point_outcome"),
            (
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["validate"]}}),
                "not in its segment (auto_approve, manager, finance, finalize)",
            ),
            (
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["nope"]}}),
                "which the template does not have",
            ),
            (
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": "manager"}}),
                "must be an array of step names",
            ),
            (
                json!({"decision_point_outcome": {"type": "maybe"}}),
                "must be create_steps or no_branches",
            ),
        ] {
            let t = create("dy_bad", "approval", json!({"amount": 1}));
            work("dy_bad", |m| {
                if m["step_name"] == "decide" {
                    Ok(result.clone())
                } else {
                    Ok(json!({}))
                }
            });
            assert_eq!(step_field(t, "decide", "state"), "error", "{result}");
            let err = json_of(&format!(
                "SELECT last_error FROM tasker.workflow_steps WHERE task_uuid = '{t}' AND name = 'decide'"
            ));
            assert!(err["message"].as_str().unwrap().contains(needle), "{err}");
            assert_eq!(err["error_code"], "invalid_outcome");
            assert_eq!(err["result"], result, "the result is kept, as given");
            // permanent: one attempt, no retry
            assert_eq!(step_field(t, "decide", "attempts"), "1");
            assert_eq!(task_state(t), "blocked_by_failures");
            assert_task_consistent(t);
        }
        // an operator resolving a decision gives an outcome too, or is told
        let t = create("dy_bad", "approval", json!({"amount": 1}));
        work("dy_bad", |m| {
            if m["step_name"] == "decide" {
                Err("down".into())
            } else {
                Ok(json!({}))
            }
        });
        let decide = step_field(t, "decide", "step_uuid");
        assert_fails(
            &format!("SELECT tasker.resolve_step_manually('{decide}', '{{\"ok\": 1}}')"),
            "22023",
            "has no decision_point_outcome",
        );
        Spi::run(&format!(
            "SELECT tasker.resolve_step_manually('{decide}', '{{\"decision_point_outcome\": {{\"type\": \"create_steps\", \"step_names\": [\"finance\"]}}}}')"
        ))
        .unwrap();
        work("dy_bad", |m| Ok(deps_seen(m)));
        assert_eq!(task_state(t), "complete");
        assert_eq!(result_of(t, "finalize"), json!({"saw": ["finance"]}));
    }

    #[pg_test]
    fn nested_decisions_keep_the_convergence_waiting_until_the_inner_one_decides() {
        register(&template(
            "dy_nest",
            "nested",
            "1.0.0",
            json!([
                step("start", &[]),
                typed("d1", "decision", &["start"]),
                step("a", &["d1"]),
                typed("d2", "decision", &["d1"]),
                step("b", &["d2"]),
                step("c", &["d2"]),
                typed("fin", "deferred_convergence", &["a", "b"]),
            ]),
        ));
        let t = create("dy_nest", "nested", json!({}));
        let outcome = |names: &[&str]| json!({"decision_point_outcome": {"type": "create_steps", "step_names": names}});
        // start, then d1 chooses a and d2
        for _ in 0..2 {
            let m = &read_all("dy_nest")[0];
            let r = if m["step_name"] == "d1" {
                outcome(&["a", "d2"])
            } else {
                json!({})
            };
            submit(
                m["step_uuid"].as_str().unwrap(),
                "success",
                r,
                Value::Null,
                Value::Null,
            );
        }
        // a and d2 are out; a completes: fin still waits for d2 (a gate)
        let msgs = read_all("dy_nest");
        let a = msgs.iter().find(|m| m["step_name"] == "a").unwrap();
        submit(
            a["step_uuid"].as_str().unwrap(),
            "success",
            json!({"a": 1}),
            Value::Null,
            Value::Null,
        );
        assert_eq!(step_field(t, "fin", "state"), "pending");
        assert_eq!(step_field(t, "fin", "pending_parents"), "1");
        assert_eq!(
            json_of(&format!(
                "SELECT to_jsonb(dependencies) FROM tasker.step_status WHERE task_uuid = '{t}' AND step_name = 'fin'"
            )),
            json!(["a"]),
            "a gate is no dependency"
        );
        assert!(text(&format!("SELECT tasker.task_graph('{t}')")).contains("-.->"));
        // d2 chooses b: fin now waits for b, and sees a and b
        let d2 = msgs.iter().find(|m| m["step_name"] == "d2").unwrap();
        submit(
            d2["step_uuid"].as_str().unwrap(),
            "success",
            outcome(&["b"]),
            Value::Null,
            Value::Null,
        );
        assert_eq!(step_field(t, "fin", "state"), "pending");
        work("dy_nest", |m| Ok(deps_seen(m)));
        assert_eq!(task_state(t), "complete");
        assert_eq!(result_of(t, "fin"), json!({"saw": ["a", "b"]}));
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = '{t}' AND name = 'c'"
            )),
            0,
            "c was never created"
        );
        assert_task_consistent(t);
        // and when d2 takes c only, fin runs with a alone
        let t2 = create("dy_nest", "nested", json!({}));
        work("dy_nest", |m| {
            Ok(match m["step_name"].as_str().unwrap() {
                "d1" => outcome(&["a", "d2"]),
                "d2" => outcome(&["c"]),
                _ => deps_seen(m),
            })
        });
        assert_eq!(task_state(t2), "complete");
        assert_eq!(result_of(t2, "fin"), json!({"saw": ["a"]}));
        assert_task_consistent(t2);
    }

    fn csv(ns: &str, strategy: &str, max_attempts: u32) {
        let mut worker = typed("process", "batch_worker", &["analyze"]);
        worker["handler"]["initialization"] = json!({"delimiter": ","});
        worker["retry"] = json!({"max_attempts": max_attempts});
        worker["batch_config"] =
            json!({"batch_size": 100, "cursor_field": "row", "failure_strategy": strategy});
        register(&template(
            ns,
            "csv",
            "1.0.0",
            json!([
                typed("analyze", "batchable", &[]),
                worker,
                typed("aggregate", "deferred_convergence", &["process"]),
                step("report", &["aggregate"]),
            ]),
        ));
    }

    fn batches(total: u64, workers: u64) -> Value {
        let cursors: Vec<Value> = pg_tasker_core::dynamic::split_cursors(total, workers)
            .into_iter()
            .map(|(id, start, end)| {
                json!({"batch_id": id, "start_cursor": start, "end_cursor": end, "batch_size": end - start})
            })
            .collect();
        json!({"batch_processing_outcome": {
            "type": "create_batches", "worker_template_name": "process", "worker_count": workers,
            "cursor_configs": cursors, "total_items": total}})
    }

    fn csv_worker(m: &Value) -> Result<Value, String> {
        let name = m["step_name"].as_str().unwrap();
        if name == "analyze" {
            Ok(batches(250, 3))
        } else if name.starts_with("process_") {
            let init = &m["handler"]["initialization"];
            let c = &init["cursor"];
            Ok(json!({
                "rows": c["end_cursor"].as_u64().unwrap() - c["start_cursor"].as_u64().unwrap(),
                "field": init["batch_metadata"]["cursor_field"], "delimiter": init["delimiter"],
                "no_op": init["is_no_op"]}))
        } else if name == "aggregate" {
            let total: u64 = m["dependency_results"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v["rows"].as_u64().unwrap())
                .sum();
            Ok(
                json!({"total": total, "batches": m["dependency_results"].as_object().unwrap().len()}),
            )
        } else {
            Ok(m["dependency_results"]["aggregate"].clone())
        }
    }

    #[pg_test]
    fn a_batch_creates_a_worker_per_cursor_and_the_aggregate_sees_them_all() {
        csv("dy_csv", "continue_on_failure", 3);
        let t = create("dy_csv", "csv", json!({}));
        assert_eq!(states(t), json!({"analyze": "enqueued"}));
        work("dy_csv", csv_worker);
        assert_eq!(task_state(t), "complete");
        assert_eq!(result_of(t, "report"), json!({"total": 250, "batches": 3}));
        assert_eq!(
            result_of(t, "process_003"),
            json!({"rows": 82, "field": "row", "delimiter": ",", "no_op": false})
        );
        assert_eq!(
            json_of(&format!(
                "SELECT inputs -> 'cursor' FROM tasker.workflow_steps WHERE task_uuid = '{t}' AND name = 'process_002'"
            )),
            json!({"batch_id": "002", "start_cursor": 84, "end_cursor": 168, "batch_size": 84})
        );
        assert_task_consistent(t);
        // no batches: one no-op placeholder, and the aggregate still runs
        let t = create("dy_csv", "csv", json!({}));
        work("dy_csv", |m| {
            if m["step_name"] == "analyze" {
                Ok(json!({"batch_processing_outcome": {"type": "no_batches"}}))
            } else {
                csv_worker(m)
            }
        });
        assert_eq!(task_state(t), "complete");
        assert_eq!(
            result_of(t, "process_000"),
            json!({"rows": 0, "field": "row", "delimiter": ",", "no_op": true})
        );
        assert_task_consistent(t);
        // an outcome naming a step that is not its worker template fails the step
        let t = create("dy_csv", "csv", json!({}));
        work("dy_csv", |m| {
            if m["step_name"] != "analyze" {
                return csv_worker(m);
            }
            let mut b = batches(10, 2);
            b["batch_processing_outcome"]["worker_template_name"] = json!("report");
            Ok(b)
        });
        assert!(step_field(t, "analyze", "last_error ->> 'message'")
            .contains("not one of its batch_worker steps (process)"));
    }

    #[pg_test]
    fn applying_a_batch_outcome_twice_creates_nothing_more() {
        csv("dy_twice", "continue_on_failure", 3);
        let t = create("dy_twice", "csv", json!({}));
        let m = &read_all("dy_twice")[0];
        let step = m["step_uuid"].as_str().unwrap();
        submit(step, "success", batches(30, 3), Value::Null, Value::Null);
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = '{t}'"
            )),
            6
        );
        // the same outcome applied again (a late duplicate: ignored; and
        // the plan itself says nothing is left to create)
        submit(step, "success", batches(30, 3), Value::Null, Value::Null);
        assert_eq!(
            json_of(&format!(
                "SELECT tasker._dynamic_plan('{step}', results) FROM tasker.workflow_steps WHERE step_uuid = '{step}'"
            )),
            json!({"steps": [], "edges": [], "cursors": batches(30, 3)["batch_processing_outcome"]["cursor_configs"]})
        );
        assert_task_consistent(t);
    }

    fn fail_first_worker(m: &Value) -> Result<Value, String> {
        if m["step_name"] == "process_001" {
            Err("bad row".into())
        } else {
            csv_worker(m)
        }
    }

    #[pg_test]
    fn fail_fast_cancels_the_other_workers() {
        csv("dy_ff", "fail_fast", 1);
        let t = create("dy_ff", "csv", json!({}));
        let m = &read_all("dy_ff")[0];
        submit(
            m["step_uuid"].as_str().unwrap(),
            "success",
            batches(250, 3),
            Value::Null,
            Value::Null,
        );
        let msgs = read_all("dy_ff");
        assert_eq!(msgs.len(), 3);
        let first = msgs
            .iter()
            .find(|m| m["step_name"] == "process_001")
            .unwrap();
        submit(
            first["step_uuid"].as_str().unwrap(),
            "failure",
            Value::Null,
            json!({"message": "bad row"}),
            Value::Null,
        );
        assert_eq!(
            states(t),
            json!({"analyze": "complete", "process_001": "error", "process_002": "error",
                   "process_003": "error", "aggregate": "pending", "report": "pending"})
        );
        assert_eq!(
            step_field(t, "process_002", "last_error ->> 'error_code'"),
            "batch_failed_fast"
        );
        // their messages are withdrawn
        assert_eq!(count("SELECT count(*) FROM pgmq.q_tasker_dy_ff_queue"), 0);
        assert_eq!(task_state(t), "blocked_by_failures");
        assert_task_consistent(t);
        // the operator fixes the cause and retries the stopped batch: it completes
        Spi::run(&format!(
            "SELECT tasker.retry_step(step_uuid, 'fixed') FROM tasker.workflow_steps
             WHERE task_uuid = '{t}' AND state = 'error'"
        ))
        .unwrap();
        work("dy_ff", csv_worker);
        assert_eq!(task_state(t), "complete");
        assert_eq!(result_of(t, "report"), json!({"total": 250, "batches": 3}));
        assert_task_consistent(t);
    }

    #[pg_test]
    fn a_map_created_without_its_dependency_fails_rather_than_reading_the_context() {
        let mut m = typed("m", "map", &["a"]);
        m["map_over"] = json!("items");
        register(&template(
            "dy_nodep",
            "t",
            "1.0.0",
            json!([
                step("r", &[]),
                typed("d", "decision", &["r"]),
                step("a", &["d"]),
                m
            ]),
        ));
        let t = create("dy_nodep", "t", json!({"items": ["from", "context"]}));
        work("dy_nodep", |m| {
            Ok(if m["step_name"] == "d" {
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["m"]}})
            } else {
                json!({})
            })
        });
        assert_eq!(step_field(t, "m", "state"), "error");
        assert!(step_field(t, "m", "last_error ->> 'message'").contains("never created"));
        assert_task_consistent(t);
    }

    #[pg_test]
    fn created_steps_take_the_environment_of_their_task() {
        let mut t = template(
            "dy_env",
            "t",
            "1.0.0",
            json!([
                step("r", &[]),
                typed("d", "decision", &["r"]),
                step("a", &["d"])
            ]),
        );
        t["environments"] = json!({"test": {"steps": [{"name": "ALL", "retry": {"max_attempts": 1},
                                                        "handler": {"initialization": {"env": "test"}}}]}});
        register(&t);
        Spi::run("SET LOCAL pg_tasker.environment = 'test'").unwrap();
        let task = create("dy_env", "t", json!({}));
        Spi::run("RESET pg_tasker.environment").unwrap();
        work("dy_env", |m| {
            Ok(if m["step_name"] == "d" {
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["a"]}})
            } else {
                json!({})
            })
        });
        assert_eq!(step_field(task, "a", "max_attempts"), "1");
        assert_eq!(step_field(task, "a", "inputs ->> 'env'"), "test");
    }

    #[pg_test]
    fn isolate_lets_the_aggregate_run_without_the_failed_worker() {
        csv("dy_iso", "isolate", 1);
        let t = create("dy_iso", "csv", json!({}));
        work("dy_iso", fail_first_worker);
        assert_eq!(step_field(t, "process_001", "state"), "error");
        assert_eq!(
            result_of(t, "aggregate"),
            json!({"total": 166, "batches": 2})
        );
        assert_eq!(step_field(t, "report", "state"), "complete");
        // the task still shows the failure for an operator to see to
        assert_eq!(task_state(t), "blocked_by_failures");
        assert_task_consistent(t);
        // continue_on_failure: the aggregate waits
        csv("dy_cont", "continue_on_failure", 1);
        let t = create("dy_cont", "csv", json!({}));
        work("dy_cont", fail_first_worker);
        assert_eq!(step_field(t, "process_002", "state"), "complete");
        assert_eq!(step_field(t, "aggregate", "state"), "pending");
        assert_task_consistent(t);
    }

    fn squares(ns: &str) {
        let mut m = typed("square", "map", &["split"]);
        m["map_over"] = json!("numbers");
        m["retry"] = json!({"max_attempts": 3, "backoff_base_ms": 0});
        register(&template(
            ns,
            "squares",
            "1.0.0",
            json!([step("split", &[]), m, step("reduce", &["square"])]),
        ));
    }

    fn square_worker(m: &Value) -> Result<Value, String> {
        match m["step_name"].as_str().unwrap() {
            "split" => Ok(json!({"numbers": m["task_context"]["numbers"]})),
            "reduce" => {
                let squares = &m["dependency_results"]["square"];
                let sum: i64 = squares
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .sum();
                Ok(json!({"sum": sum, "squares": squares}))
            }
            _ => {
                let x = m["map_item"].as_i64().unwrap();
                Ok(json!(x * x))
            }
        }
    }

    #[pg_test]
    fn a_map_step_runs_one_attempt_per_element_and_its_result_is_theirs_in_order() {
        squares("dy_map");
        let t = create("dy_map", "squares", json!({"numbers": [3, 1, 4, 1, 5]}));
        let failed = std::cell::Cell::new(false);
        work("dy_map", |m| {
            // element 2 fails once, then is retried
            if m["map_index"] == 2 && !failed.replace(true) {
                return Err("flaky".into());
            }
            if m["step_name"].as_str().unwrap().starts_with("square[") {
                assert_eq!(
                    m["step_name"],
                    format!("square[{}]", m["map_index"]).as_str()
                );
                assert_eq!(m["dependency_results"], json!({}));
                assert_eq!(
                    m["task_context"],
                    Value::Null,
                    "an element carries its item instead"
                );
            }
            square_worker(m)
        });
        assert_eq!(task_state(t), "complete");
        assert_eq!(result_of(t, "square"), json!([9, 1, 16, 1, 25]));
        assert_eq!(
            result_of(t, "reduce"),
            json!({"sum": 52, "squares": [9, 1, 16, 1, 25]})
        );
        assert_eq!(step_field(t, "square[2]", "attempts"), "2");
        // analytics count the elements under the map step's name
        assert_eq!(
            text("SELECT string_agg(DISTINCT f.step_name, ',') FROM tasker.analytics_failures('1 day') f
                  WHERE f.namespace = 'dy_map'"),
            "square"
        );
        assert_eq!(
            text(&format!(
                "SELECT origin FROM tasker.step_status WHERE task_uuid = '{t}' AND step_name = 'square[4]'"
            )),
            "map \"square\" element 4"
        );
        assert_task_consistent(t);
        // an empty array completes at once with []
        let t = create("dy_map", "squares", json!({"numbers": []}));
        work("dy_map", square_worker);
        assert_eq!(task_state(t), "complete");
        assert_eq!(result_of(t, "square"), json!([]));
        assert_eq!(result_of(t, "reduce"), json!({"sum": 0, "squares": []}));
        assert_task_consistent(t);
        // not an array: the map step fails for good, saying what it found
        let t = create("dy_map", "squares", json!({"numbers": {"a": 1}}));
        work("dy_map", square_worker);
        assert_eq!(step_field(t, "square", "state"), "error");
        assert!(
            step_field(t, "square", "last_error ->> 'message'").contains(
                "maps over the result of \"split\" at numbers, which is object, not an array"
            )
        );
        assert_eq!(task_state(t), "blocked_by_failures");
        assert_task_consistent(t);
    }

    #[pg_test]
    fn a_map_without_dependencies_maps_over_the_task_context_byte_exact() {
        let mut m = typed("m", "map", &[]);
        m["map_over"] = json!("$.order.items");
        register(&template(
            "dy_ctx",
            "ctx",
            "1.0.0",
            json!([m, step("r", &["m"])]),
        ));
        Spi::run(
            "SELECT tasker.create_task('dy_ctx', 'ctx', '{\"order\": {\"items\": [1.10, 123456789012345678901234567890, {\"deep\": [[]]}]}}')",
        )
        .unwrap();
        work("dy_ctx", |m| {
            if m["step_name"] == "r" {
                Ok(json!({}))
            } else {
                Ok(json!(null))
            }
        });
        // the items reach the elements as stored (numbers not rounded through floats)
        assert_eq!(
            text("SELECT string_agg(map_item::text, ' ' ORDER BY map_index) FROM tasker.workflow_steps
                  WHERE name LIKE 'm[%' AND task_uuid IN (SELECT task_uuid FROM tasker.tasks WHERE namespace_name = 'dy_ctx')"),
            "1.10 123456789012345678901234567890 {\"deep\": [[]]}"
        );
        assert_eq!(
            text("SELECT state::text FROM tasker.tasks WHERE namespace_name = 'dy_ctx'"),
            "complete"
        );
    }

    #[pg_test]
    fn a_checkpoint_travels_with_the_next_delivery_of_the_current_attempt() {
        register(&template(
            "dy_cp",
            "cp",
            "1.0.0",
            json!([step("long", &[])]),
        ));
        let t = create("dy_cp", "cp", json!({}));
        let m = json_of("SELECT message FROM tasker.read_steps('dy_cp', 'w', 1, 1)");
        let s = m["step_uuid"].as_str().unwrap();
        assert!(m.get("checkpoint").is_none());
        assert_eq!(
            text(&format!(
                "SELECT tasker.checkpoint('{s}', '{{\"cursor\": 40, \"sum\": 1.50}}', 1)::text"
            )),
            "true"
        );
        // a stale attempt saves nothing
        assert_eq!(
            text(&format!(
                "SELECT tasker.checkpoint('{s}', '{{\"cursor\": 99}}', 2)::text"
            )),
            "false"
        );
        assert_eq!(
            text(&format!(
                "SELECT checkpoint::text FROM tasker.step_status WHERE task_uuid = '{t}'"
            )),
            "{\"sum\": 1.50, \"cursor\": 40}"
        );
        // the lease runs out: the same message comes back with it
        Spi::run(&format!(
            "UPDATE pgmq.q_tasker_dy_cp_queue SET vt = now() - interval '1 second' WHERE msg_id = {}",
            step_field(t, "long", "queue_msg_id")
        ))
        .unwrap();
        let again = json_of("SELECT message FROM tasker.read_steps('dy_cp', 'w', 1, 30)");
        assert_eq!(again["step_uuid"], s);
        assert_eq!(again["checkpoint"], json!({"cursor": 40, "sum": 1.50}));
        // a failure and retry: the new attempt's message carries it too
        submit(
            s,
            "failure",
            Value::Null,
            json!({"message": "crash", "retry_after_seconds": 0}),
            json!({"attempt": 1}),
        );
        let retry = &read_all("dy_cp")[0];
        assert_eq!(retry["attempt"], 2);
        assert_eq!(retry["checkpoint"]["cursor"], 40);
        assert_fails(
            &format!("SELECT tasker.checkpoint('{s}', NULL)"),
            "22004",
            "must not be NULL",
        );
        assert_fails(
            "SELECT tasker.checkpoint('00000000-0000-0000-0000-000000000000', '{}')",
            "P0002",
            "does not exist",
        );
        submit(s, "success", json!({}), Value::Null, Value::Null);
        assert_eq!(
            text(&format!("SELECT tasker.checkpoint('{s}', '{{}}')::text")),
            "false",
            "a finished step takes no checkpoint"
        );
    }

    #[pg_test]
    fn dynamic_templates_are_checked_at_registration() {
        let bad = |steps: Value| register_sql(&template("dy_reg", "t", "1.0.0", steps));
        assert_fails(
            &bad(json!([typed("d", "decision", &[])])),
            "22023",
            "needs at least one dependency",
        );
        assert_fails(
            &bad(json!([step("a", &[]), typed("w", "batch_worker", &["a"])])),
            "22023",
            "a batchable one",
        );
        assert_fails(
            &bad(json!([typed("m", "map", &[])])),
            "22023",
            "needs map_over",
        );
        assert_fails(
            &bad(json!([typed("x", "sometimes", &[])])),
            "22023",
            "unknown step type",
        );
        // the SQL enum and pg_tasker_core's StepType list the same types
        assert_eq!(
            text("SELECT string_agg(t::text, ',' ORDER BY t) FROM unnest(enum_range(NULL::tasker.step_type)) t"),
            pg_tasker_core::template::StepType::ALL
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        // and agree on which types create steps
        assert_eq!(
            text("SELECT string_agg(t::text, ',' ORDER BY t) FROM unnest(enum_range(NULL::tasker.step_type)) t
                  WHERE tasker.step_type_creates_steps(t)"),
            pg_tasker_core::template::StepType::ALL
                .iter()
                .filter(|t| t.is_generator())
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        // a limit from the configuration
        let mut steps = vec![step("s", &[]), typed("d", "decision", &["s"])];
        for i in 0..60 {
            steps.push(step(&format!("b{i}"), &["d"]));
        }
        register(&template("dy_reg", "wide", "1.0.0", Value::Array(steps)));
        let t = create("dy_reg", "wide", json!({}));
        work("dy_reg", |m| {
            if m["step_name"] == "d" {
                let names: Vec<String> = (0..60).map(|i| format!("b{i}")).collect();
                Ok(json!({"decision_point_outcome": {"type": "create_steps", "step_names": names}}))
            } else {
                Ok(json!({}))
            }
        });
        assert!(step_field(t, "d", "last_error ->> 'message'").contains(
            "asks for 60 steps, more than the limit of 50 (limits.max_steps_per_decision)"
        ));
    }
}
