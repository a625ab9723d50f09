//! Maintenance through SQL, inside one transaction: staleness with template
//! lifecycle overrides and live leases, the DLQ and its operator functions,
//! lost and timed-out attempts, retention, the task request queue.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    use crate::tests::helpers::*;

    /// The tasks a staleness run handled.
    fn stale_tasks(out: &Value) -> Vec<&str> {
        out["stale"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["task_uuid"].as_str().unwrap())
            .collect()
    }

    fn create_text(ns: &str, name: &str) -> String {
        create(ns, name, json!({})).to_string()
    }

    fn age(task: &str, minutes: i64) {
        Spi::run(&format!(
            "UPDATE tasker.tasks SET updated_at = now() - make_interval(mins => {minutes}) WHERE task_uuid = '{task}';
             UPDATE tasker.workflow_steps SET updated_at = now() - make_interval(mins => {minutes}) WHERE task_uuid = '{task}'"
        ))
        .unwrap();
    }

    fn maintenance(job: &str) -> Value {
        sql_value::<JsonB>(&format!("SELECT tasker.run_maintenance(ARRAY['{job}'])"))
            .unwrap()
            .0[job]
            .clone()
    }

    fn state(task: &str) -> String {
        task_state(task)
    }

    #[pg_test]
    fn stale_tasks_go_to_the_dlq_and_to_error_per_thresholds() {
        register(&template(
            "m_stale",
            "plain",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let mut quick = template(
            "m_stale",
            "quick",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        );
        quick["lifecycle"] = json!({"steps_in_process_minutes": 1});
        register(&quick);
        let plain = create_text("m_stale", "plain");
        let fast = create_text("m_stale", "quick");
        // both quiet for 2 minutes: only the template with a 1-minute threshold is stale
        age(&plain, 2);
        age(&fast, 2);
        let out = maintenance("staleness");
        let stale = stale_tasks(&out);
        assert!(
            stale.contains(&fast.as_str()) && !stale.contains(&plain.as_str()),
            "{out}"
        );
        assert_eq!(state(&fast), "error");
        assert_eq!(state(&plain), "steps_in_process");
        // the DLQ entry: reason, state before, a snapshot of task and steps
        let entry = sql_value::<JsonB>(&format!(
            "SELECT to_jsonb(d) FROM tasker.dlq d WHERE task_uuid = '{fast}'"
        ))
        .unwrap()
        .0;
        assert_eq!(
            (
                entry["reason"].as_str(),
                entry["original_state"].as_str(),
                entry["resolution_status"].as_str()
            ),
            (
                Some("staleness_timeout"),
                Some("steps_in_process"),
                Some("pending")
            )
        );
        assert_eq!(entry["snapshot"]["steps"].as_array().unwrap().len(), 2);
        assert_eq!(entry["snapshot"]["task"]["task_uuid"], fast);
        // the step that was out with a worker is stopped and its message archived
        assert_eq!(sql_value::<String>(&format!("SELECT state || ':' || (last_error->>'error_code') FROM tasker.workflow_steps WHERE task_uuid = '{fast}' AND name = 'a'")).unwrap(), "error:TASK_STALE");
        assert_eq!(count(&format!("SELECT count(*) FROM pgmq.q_tasker_m_stale_queue WHERE message->>'task_uuid' = '{fast}'")), 0);
        // a result arriving now is ignored
        let a = sql_value::<String>(&format!("SELECT step_uuid::text FROM tasker.workflow_steps WHERE task_uuid = '{fast}' AND name = 'a'")).unwrap();
        assert_eq!(
            sql_value::<String>(&format!("SELECT tasker.submit_result('{a}', 'success')")).unwrap(),
            "error"
        );

        // maximum lifetime
        Spi::run(&format!("UPDATE tasker.tasks SET created_at = now() - interval '25 hours' WHERE task_uuid = '{plain}'")).unwrap();
        let out = maintenance("staleness");
        let entry = out["stale"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["task_uuid"] == plain)
            .unwrap_or_else(|| panic!("{out}"));
        assert_eq!(entry["reason"], "task_max_lifetime_exceeded");
        assert_eq!(state(&plain), "error");
        // nothing is stale twice
        let again = maintenance("staleness");
        assert!(
            !again["stale"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["task_uuid"] == plain || s["task_uuid"] == fast),
            "{again}"
        );

        // operator: requeue one, discard the other
        let fast_dlq = sql_value::<String>(&format!(
            "SELECT dlq_uuid::text FROM tasker.dlq WHERE task_uuid = '{fast}'"
        ))
        .unwrap();
        let plain_dlq = sql_value::<String>(&format!(
            "SELECT dlq_uuid::text FROM tasker.dlq WHERE task_uuid = '{plain}'"
        ))
        .unwrap();
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT tasker.dlq_requeue('{fast_dlq}', 'worker fleet restored')"
            ))
            .unwrap(),
            "steps_in_process"
        );
        // a new retry budget; the attempt number keeps growing (fencing)
        assert_eq!(sql_value::<String>(&format!("SELECT state || ':' || attempts || ':' || (attempts - budget_offset) FROM tasker.workflow_steps WHERE task_uuid = '{fast}' AND name = 'a'")).unwrap(), "enqueued:2:1");
        assert_task_consistent(&fast);
        // a late result of the attempt that went stale is fenced out
        let a_fast = sql_value::<String>(&format!("SELECT step_uuid::text FROM tasker.workflow_steps WHERE task_uuid = '{fast}' AND name = 'a'")).unwrap();
        assert_eq!(
            sql_value::<String>(&format!("SELECT tasker.submit_result('{a_fast}', 'success', '\"late\"', NULL, '{{\"attempt\": 1}}')")).unwrap(),
            "enqueued"
        );
        assert_eq!(sql_value::<String>(&format!("SELECT coalesce(results::text, '-') FROM tasker.workflow_steps WHERE step_uuid = '{a_fast}'")).unwrap(), "-");
        assert_eq!(sql_value::<String>(&format!("SELECT resolution_status || ':' || resolution_note FROM tasker.dlq WHERE dlq_uuid = '{fast_dlq}'")).unwrap(), "requeued:worker fleet restored");
        let f = failure(&format!("SELECT tasker.dlq_requeue('{fast_dlq}')"));
        assert!(f.starts_with("55000"), "{f}");
        assert_eq!(
            sql_value::<String>(&format!(
                "SELECT tasker.dlq_resolve('{plain_dlq}', 'obsolete order', 'discarded')"
            ))
            .unwrap(),
            "discarded"
        );
        let f = failure(&format!("SELECT tasker.dlq_resolve('{plain_dlq}')"));
        assert!(f.starts_with("55000"), "{f}");
        let f = failure(&format!(
            "SELECT tasker.dlq_resolve('{}')",
            uuid::Uuid::now_v7()
        ));
        assert!(f.starts_with("P0002"), "{f}");
        let f = failure(&format!(
            "SELECT tasker.dlq_resolve('{fast_dlq}', 'x', 'forgotten')"
        ));
        assert!(f.starts_with("22023"), "{f}");
        let f = failure("SELECT tasker.run_maintenance(ARRAY['defrag'])");
        assert!(f.starts_with("22023"), "{f}");
    }

    #[pg_test]
    fn retention_deletes_only_old_finished_tasks() {
        register(&template("m_ret", "flow", "1.0.0", json!([step("a", &[])])));
        let finish = |task: &str| {
            let a = sql_value::<String>(&format!(
                "SELECT step_uuid::text FROM tasker.workflow_steps WHERE task_uuid = '{task}'"
            ))
            .unwrap();
            Spi::run(&format!("SELECT tasker.submit_result('{a}', 'success')")).unwrap();
            assert_eq!(state(task), "complete");
        };
        let old = create_text("m_ret", "flow");
        let recent = create_text("m_ret", "flow");
        let active = create_text("m_ret", "flow");
        let cancelled_old = create_text("m_ret", "flow");
        finish(&old);
        finish(&recent);
        Spi::run(&format!("SELECT tasker.cancel_task('{cancelled_old}')")).unwrap();
        Spi::run(&format!(
            "UPDATE tasker.tasks SET completed_at = now() - interval '31 days' WHERE task_uuid IN ('{old}', '{cancelled_old}');
             UPDATE tasker.tasks SET completed_at = now() - interval '1 day' WHERE task_uuid = '{recent}';
             UPDATE tasker.tasks SET created_at = now() - interval '40 days' WHERE task_uuid = '{active}'"
        ))
        .unwrap();
        let out = maintenance("retention");
        assert_eq!(out["policy"], "delete");
        let left = |t: &str| {
            count(&format!(
                "SELECT count(*) FROM tasker.tasks WHERE task_uuid = '{t}'"
            ))
        };
        assert_eq!(
            (
                left(&old),
                left(&cancelled_old),
                left(&recent),
                left(&active)
            ),
            (0, 0, 1, 1),
            "{out}"
        );
        // everything below the deleted tasks went with them
        assert_eq!(count(&format!("SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid IN ('{old}', '{cancelled_old}')")), 0);
        assert_eq!(count(&format!("SELECT count(*) FROM tasker.task_transitions WHERE task_uuid IN ('{old}', '{cancelled_old}')")), 0);
    }

    /// A task whose attempt is under a live lease is never stale, whatever
    /// its thresholds: a worker holds it.
    #[pg_test]
    fn a_live_lease_keeps_a_task_from_going_stale() {
        let mut t = template("m_lease", "flow", "1.0.0", json!([step("a", &[])]));
        t["lifecycle"] = json!({"steps_in_process_minutes": 1, "task_max_lifetime_hours": 1});
        t["steps"][0]["timeout_seconds"] = json!(7200);
        register(&t);
        let held = create_text("m_lease", "flow");
        let idle = create_text("m_lease", "flow");
        // a worker holds `held`'s message under a 10-minute lease; `idle`'s was
        // never read
        Spi::run(&format!(
            "UPDATE pgmq.q_tasker_m_lease_queue SET vt = clock_timestamp() + interval '10 minutes', read_ct = 1,
                    last_read_at = clock_timestamp()
              WHERE message->>'task_uuid' = '{held}';
             UPDATE tasker.tasks SET updated_at = now() - interval '5 minutes', created_at = now() - interval '2 hours'
              WHERE task_uuid IN ('{held}', '{idle}')"
        )).unwrap();
        let out = maintenance("staleness");
        let stale = stale_tasks(&out);
        assert_eq!(stale, vec![idle.as_str()], "{out}");
        assert_eq!(state(&held), "steps_in_process");
        assert_eq!(state(&idle), "error");
        assert_task_consistent(&held);
        assert_task_consistent(&idle);
    }

    /// Staleness arithmetic cannot overflow, even for definitions stored
    /// before lifecycle values were bounded.
    #[pg_test]
    fn huge_thresholds_in_old_definitions_do_not_break_staleness() {
        register(&template(
            "m_huge",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        let task = create_text("m_huge", "flow");
        Spi::run("UPDATE tasker.task_templates SET definition = jsonb_set(definition, '{lifecycle}', '{\"task_max_lifetime_hours\": 1e300, \"steps_in_process_minutes\": 1e300}')
                   WHERE name = 'flow' AND namespace_uuid = (SELECT namespace_uuid FROM tasker.namespaces WHERE name = 'm_huge')").unwrap();
        Spi::run(&format!("UPDATE tasker.tasks SET updated_at = now() - interval '100 days', created_at = now() - interval '100 days' WHERE task_uuid = '{task}'")).unwrap();
        let out = maintenance("staleness");
        assert_eq!(out["errors"], json!([]), "{out}");
        assert_eq!(state(&task), "steps_in_process");
    }

    /// Lost deliveries and timeouts are failed once no lease is live, and
    /// follow the retry policy.
    #[pg_test]
    fn recovery_fails_lost_and_timed_out_attempts() {
        let mut s = step("slow", &[]);
        s["timeout_seconds"] = json!(30);
        s["retry"] = json!({"max_attempts": 3, "backoff": "none"});
        let mut l = step("lossy", &[]);
        l["retry"] = json!({"max_attempts": 3, "backoff": "none"});
        register(&template(
            "m_rec",
            "flow",
            "1.0.0",
            json!([s, l, step("fine", &[])]),
        ));
        let task = create("m_rec", "flow", json!({}));
        count("SELECT count(*) FROM tasker.read_steps('m_rec', 'w', 10, 5)");
        let set = |name: &str, sql: &str| {
            Spi::run(&format!(
                "UPDATE pgmq.q_tasker_m_rec_queue q SET {sql} FROM tasker.workflow_steps s
                  WHERE s.task_uuid = '{task}' AND s.name = '{name}' AND q.msg_id = s.queue_msg_id"
            ))
            .unwrap();
        };
        // slow: started 40 s ago, lease over; lossy: read 3 times, lease over;
        // fine: read once, lease over, no timeout
        Spi::run(&format!("UPDATE tasker.workflow_steps SET started_at = now() - interval '40 seconds' WHERE task_uuid = '{task}' AND name = 'slow'")).unwrap();
        set("slow", "vt = clock_timestamp() - interval '1 second'");
        set(
            "lossy",
            "vt = clock_timestamp() - interval '1 second', read_ct = 3",
        );
        set("fine", "vt = clock_timestamp() - interval '1 second'");
        let out = maintenance("recovery");
        let kinds: Vec<(String, String)> = out["recovered"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["kind"].as_str().unwrap().to_string(),
                    r["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(kinds.len(), 2, "{out}");
        assert!(
            kinds.contains(&("TIMEOUT".into(), "enqueued".into())),
            "{out}"
        );
        assert!(
            kinds.contains(&("LOST_ATTEMPT".into(), "enqueued".into())),
            "{out}"
        );
        assert_eq!(
            step_field(
                task,
                "slow",
                "attempts::text || ':' || (last_error->>'error_code')"
            ),
            "2:TIMEOUT"
        );
        assert_eq!(
            step_field(
                task,
                "lossy",
                "attempts::text || ':' || (last_error->>'error_code')"
            ),
            "2:LOST_ATTEMPT"
        );
        assert_eq!(
            step_field(task, "fine", "state || ':' || attempts"),
            "in_progress:1"
        );
        // a live lease is never touched, however old the attempt
        count("SELECT count(*) FROM tasker.read_steps('m_rec', 'w', 10, 60)");
        Spi::run(&format!("UPDATE tasker.workflow_steps SET started_at = now() - interval '1 hour' WHERE task_uuid = '{task}' AND name = 'slow'")).unwrap();
        set("slow", "read_ct = 9");
        let out = maintenance("recovery");
        assert_eq!(out["recovered"], json!([]), "{out}");
        assert_task_consistent(task);
    }

    /// One bad request (unknown field, values jsonb accepts but nothing else
    /// does) is dead-lettered on its own; the others become tasks.
    #[pg_test]
    fn each_task_request_is_ingested_or_dead_lettered_on_its_own() {
        register(&template("m_req", "flow", "1.0.0", json!([step("a", &[])])));
        // a queue of this test's own (the orchestrator reads the configured one)
        Spi::run("SELECT tasker._ensure_request_queue('m_req_requests')").unwrap();
        for req in [
            r#"{"namespace": "m_req", "name": "flow", "context": {"n": 1}}"#,
            r#"{"namespace": "m_req", "name": "flow", "colour": "red"}"#,
            r#"{"namespace": "m_req", "name": "flow", "context": {"x": 1e400, "y": 0.1000000000000000055511151231257827}}"#,
            r#"{"namespace": "m_req", "name": "flow", "priority": 1e400}"#,
            r#"[1, 2]"#,
            r#"{"namespace": "m_req", "name": "flow", "tags": ["a", 2]}"#,
            r#"{"namespace": "m_req", "name": "flow", "context": {"n": 3}, "idempotency_key": "k"}"#,
        ] {
            Spi::run(&format!("SELECT pgmq.send('m_req_requests', '{req}')")).unwrap();
        }
        let out = json_of("SELECT tasker._ingest_requests('m_req_requests', 30, 50)");
        assert_eq!(out["created"].as_array().unwrap().len(), 3, "{out}");
        assert_eq!(out["rejected"].as_array().unwrap().len(), 4, "{out}");
        assert!(sql_value::<bool>("SELECT EXISTS (SELECT 1 FROM tasker.tasks WHERE namespace_name = 'm_req' AND context = '{\"x\": 1e400, \"y\": 0.1000000000000000055511151231257827}')").unwrap());
        for r in out["rejected"].as_array().unwrap() {
            assert_eq!(r["error"]["sqlstate"], "22023", "{r}");
        }
        assert_eq!(
            count("SELECT count(*) FROM pgmq.q_m_req_requests"),
            0,
            "every message archived"
        );
    }
}
