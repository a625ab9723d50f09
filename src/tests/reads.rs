//! The read path: poison messages are quarantined, and a read costs what it
//! reads, whatever is enqueued elsewhere.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::tests::helpers::*;

    fn send(ns: &str, message: &Value) {
        count(&format!(
            "SELECT pgmq.send('tasker_{ns}_queue', {})",
            quote(message)
        ));
    }

    /// read_steps' step names, in message order.
    fn read_steps(ns: &str) -> Value {
        json_of(&format!(
            "SELECT coalesce(jsonb_agg(message->>'step_name' ORDER BY msg_id), '[]')
             FROM tasker.read_steps('{ns}', 'w1', 10)"
        ))
    }

    fn dead_letters() -> Value {
        json_of(
            "SELECT coalesce(jsonb_agg(error->>'message' ORDER BY (snapshot->>'msg_id')::bigint), '[]')
             FROM tasker.dlq WHERE reason = 'invalid_step_message'",
        )
    }

    #[pg_test]
    fn poison_messages_are_quarantined_and_never_block_their_queue() {
        for ns in ["r_one", "r_two"] {
            register(&template(
                ns,
                "flow",
                "1.0.0",
                json!([step("a", &[]), step("b", &["a"])]),
            ));
        }
        let done = create("r_one", "flow", json!({}));
        let old = read_all("r_one");
        assert_eq!(old.len(), 1);
        assert_eq!(
            submit(
                old[0]["step_uuid"].as_str().unwrap(),
                "success",
                json!({}),
                Value::Null,
                json!({"attempt": 1})
            ),
            "complete"
        );
        // the child b of `done` is enqueued and valid; take it out of sight
        assert_eq!(read_all("r_one").len(), 1);
        let fresh = create("r_one", "flow", json!({}));
        let foreign = create("r_two", "flow", json!({}));
        let theirs = read_all("r_two");
        send("r_one", &json!({"hello": 1}));
        send(
            "r_one",
            &json!({"step_uuid": "not-a-uuid", "step_name": "x"}),
        );
        send(
            "r_one",
            &json!({"step_uuid": "00000000-0000-7000-8000-000000000000"}),
        );
        send("r_one", &theirs[0]);
        send("r_one", &old[0]); // an attempt that is over
                                // the valid message comes back alone; the others are moved aside
        assert_eq!(read_steps("r_one"), json!(["a"]));
        assert_eq!(
            step_field(fresh, "a", "state"),
            "in_progress",
            "the valid step is marked"
        );
        let dead = dead_letters();
        let dead: Vec<&str> = dead
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert_eq!(dead.len(), 5, "{dead:?}");
        assert!(dead[0].starts_with("not a step message: step_uuid is missing"));
        assert!(dead[1].contains("step_uuid is \"not-a-uuid\""));
        assert!(dead[2].contains("does not exist"));
        assert!(dead[3].contains("belongs to namespace r_two, not to r_one"));
        assert!(dead[4].contains("not the current attempt"), "{}", dead[4]);
        // archived: nothing left to deliver, nothing changed elsewhere
        assert_eq!(
            count("SELECT count(*) FROM pgmq.q_tasker_r_one_queue WHERE vt <= now()"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pgmq.a_tasker_r_one_queue WHERE message ? 'hello'"),
            1
        );
        let snap = json_of(
            "SELECT snapshot FROM tasker.dlq
             WHERE reason = 'invalid_step_message' AND snapshot->'message' ? 'hello'",
        );
        assert_eq!(snap["queue"], "tasker_r_one_queue");
        assert_eq!(snap["namespace"], "r_one");
        assert_eq!(snap["message"], json!({"hello": 1}));
        assert_eq!(step_field(foreign, "a", "state"), "enqueued");
        assert_eq!(task_state(done), "steps_in_process");
        // exchange quarantines the same way
        send("r_one", &json!([1, 2, 3]));
        let two = create("r_one", "flow", json!({}));
        let got = json_of(
            "SELECT coalesce(jsonb_agg(step_uuid), '[]') FROM tasker.exchange(ARRAY['r_one'], 'w1', NULL, 10)",
        );
        assert_eq!(got, json!([step_field(two, "a", "step_uuid")]));
        assert_eq!(dead_letters().as_array().unwrap().len(), 6);
        // counted by health; such entries have no task to requeue
        assert_eq!(
            count(
                "SELECT (tasker.health()->'dlq_pending_by_reason'->>'invalid_step_message')::bigint"
            ),
            6
        );
        let entry = text(
            "SELECT dlq_uuid::text FROM tasker.dlq WHERE reason = 'invalid_step_message' LIMIT 1",
        );
        assert_fails(
            &format!("SELECT tasker.dlq_requeue('{entry}')"),
            "55000",
            "has no task to requeue",
        );
        assert_eq!(
            text(&format!(
                "SELECT tasker.dlq_resolve('{entry}', 'looked at it', 'discarded')"
            )),
            "discarded"
        );
        for t in [done, fresh, foreign, two] {
            assert_task_consistent(t);
        }
    }

    /// Rows of `table` the current transaction has read so far (from the
    /// heap and through indexes), and its sequential scans.
    fn reads_of(table: &str) -> (i64, i64) {
        let r = json_of(&format!(
            "SELECT jsonb_build_array(pg_stat_get_xact_tuples_returned('{table}'::regclass)
                                      + pg_stat_get_xact_tuples_fetched('{table}'::regclass),
                                      pg_stat_get_xact_numscans('{table}'::regclass))"
        ));
        (r[0].as_i64().unwrap(), r[1].as_i64().unwrap())
    }

    #[pg_test]
    fn a_read_costs_what_it_reads_whatever_is_enqueued_elsewhere() {
        let wide: Vec<Value> = (0..1000).map(|i| step(&format!("s{i}"), &[])).collect();
        register(&template("r_backlog", "wide", "1.0.0", json!(wide)));
        for _ in 0..50 {
            create("r_backlog", "wide", json!({}));
        }
        register(&template(
            "r_small",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        create("r_small", "flow", json!({}));
        create("r_small", "flow", json!({}));
        assert_eq!(
            count(
                "SELECT count(*) FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
                 WHERE t.namespace_name = 'r_backlog' AND s.state = 'enqueued'"
            ),
            50_000
        );
        for (what, call) in [
            (
                "read_steps",
                "SELECT count(*) FROM tasker.read_steps('r_small', 'w1', 1)",
            ),
            (
                "exchange",
                "SELECT count(*) FROM tasker.exchange(ARRAY['r_small'], 'w1', NULL, 1)",
            ),
        ] {
            let before = (reads_of("tasker.workflow_steps"), reads_of("tasker.tasks"));
            assert_eq!(count(call), 1, "{what}");
            let after = (reads_of("tasker.workflow_steps"), reads_of("tasker.tasks"));
            let steps = after.0 .0 - before.0 .0;
            let tasks = after.1 .0 - before.1 .0;
            assert!(
                steps < 20 && tasks < 20,
                "{what} read {steps} step rows and {tasks} task rows for one message"
            );
            assert_eq!(
                (after.0 .1 - before.0 .1, after.1 .1 - before.1 .1),
                (0, 0),
                "{what}: no sequential scan"
            );
        }
    }

    /// The msg_id one read of one message returns (0: none).
    fn read_one(queue: &str) -> i64 {
        sql_value::<i64>(&format!(
            "SELECT coalesce((SELECT (r ->> 'msg_id')::bigint
                              FROM unnest(tasker._pgmq_read('{queue}', 30, 1)) r), 0)"
        ))
        .unwrap_or(0)
    }

    /// A read starts at the lowest msg_id the session's previous read
    /// returned (src/pgmq.rs, ReadFloor): a message below it that becomes
    /// visible is still read — at once when nothing above the floor is
    /// visible, and after 200 ms at the latest otherwise. No message is
    /// left behind.
    #[pg_test]
    fn reads_from_a_floor_never_leave_a_message_behind() {
        let q = "floor_q";
        count(&format!("SELECT count(*) FROM pgmq.create('{q}')"));
        let send = || count(&format!("SELECT pgmq.send('{q}', '{{}}')"));
        let ids: Vec<i64> = (0..3).map(|_| send()).collect();
        assert_eq!(read_one(q), ids[0]);
        assert_eq!(read_one(q), ids[1]);
        // the first message's lease runs out: it is below the floor now
        count(&format!(
            "SELECT count(*) FROM pgmq.set_vt('{q}', {}, 0)",
            ids[0]
        ));
        let third = read_one(q);
        assert!(third == ids[2] || third == ids[0], "read {third}");
        let next = read_one(q);
        assert!(
            [third, next].contains(&ids[0]),
            "with nothing visible above the floor, the read looks below it at once (read {third}, {next})"
        );
        assert_eq!(read_one(q), 0, "nothing is visible");
        // a message below the floor while others above it stay visible
        let more: Vec<i64> = (0..4).map(|_| send()).collect();
        assert_eq!(read_one(q), more[0]);
        count(&format!(
            "SELECT count(*) FROM pgmq.set_vt('{q}', {}, 0)",
            ids[1]
        ));
        count("SELECT count(*) FROM pg_sleep(0.25)");
        assert_eq!(
            read_one(q),
            ids[1],
            "200 ms after the last read of the whole queue, a read starts at its beginning"
        );
        let rest: Vec<i64> = (0..3).map(|_| read_one(q)).collect();
        assert_eq!(rest, more[1..].to_vec());
        assert_eq!(read_one(q), 0);
    }
}
