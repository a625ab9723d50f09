//! Maintenance through SQL, inside one transaction: staleness with template
//! lifecycle overrides, the DLQ and its operator functions, retention.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    use crate::tests::tests::{failure, register, sql_value, step, template};

    fn count(q: &str) -> i64 {
        sql_value::<i64>(q).unwrap()
    }

    fn create(ns: &str, name: &str) -> String {
        sql_value::<pgrx::Uuid>(&format!("SELECT tasker.create_task('{ns}', '{name}')"))
            .unwrap()
            .to_string()
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
        sql_value::<String>(&format!(
            "SELECT state FROM tasker.tasks WHERE task_uuid = '{task}'"
        ))
        .unwrap()
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
        let plain = create("m_stale", "plain");
        let fast = create("m_stale", "quick");
        // both quiet for 2 minutes: only the template with a 1-minute threshold is stale
        age(&plain, 2);
        age(&fast, 2);
        let out = maintenance("staleness");
        let stale: Vec<&str> = out["stale"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["task_uuid"].as_str().unwrap())
            .collect();
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
        assert_eq!(sql_value::<String>(&format!("SELECT state || ':' || attempts FROM tasker.workflow_steps WHERE task_uuid = '{fast}' AND name = 'a'")).unwrap(), "enqueued:1");
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
        let old = create("m_ret", "flow");
        let recent = create("m_ret", "flow");
        let active = create("m_ret", "flow");
        let cancelled_old = create("m_ret", "flow");
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
}
