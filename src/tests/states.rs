//! The state machine's one home: the SQL types against their Rust mirror,
//! the legal-transition tables, and the invariants the tables enforce.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pg_tasker_core::{StepState, TaskState};
    use pgrx::prelude::*;
    use serde_json::json;

    use crate::tests::helpers::*;

    #[pg_test]
    fn sql_enums_match_the_rust_mirror() {
        let sql_tasks = text("SELECT string_agg(s::text, ',' ORDER BY s) FROM unnest(enum_range(NULL::tasker.task_state)) s");
        let rust_tasks: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(sql_tasks, rust_tasks.join(","));
        let sql_steps = text("SELECT string_agg(s::text, ',' ORDER BY s) FROM unnest(enum_range(NULL::tasker.step_state)) s");
        let rust_steps: Vec<&str> = StepState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(sql_steps, rust_steps.join(","));
        for s in TaskState::ALL {
            let terminal =
                sql_value::<bool>(&format!("SELECT tasker.task_state_is_terminal('{s}')")).unwrap();
            assert_eq!(terminal, s.is_terminal(), "{s}");
        }
        for s in StepState::ALL {
            assert_eq!(
                text(&format!("SELECT tasker.step_state_class('{s}')")),
                s.class(),
                "{s}"
            );
        }
        // the backoff policies too
        let sql_backoff = text("SELECT string_agg(b::text, ',' ORDER BY b) FROM unnest(enum_range(NULL::tasker.backoff)) b");
        let rust_backoff: Vec<&str> = [
            pg_tasker_core::Backoff::None,
            pg_tasker_core::Backoff::Linear,
            pg_tasker_core::Backoff::Exponential,
            pg_tasker_core::Backoff::Fibonacci,
        ]
        .iter()
        .map(|b| b.as_str())
        .collect();
        assert_eq!(sql_backoff, rust_backoff.join(","));
        // the execution statuses map to states of the enum
        // every task state the status table can produce is a value of the enum
        for (counts, state) in [
            ("4, 0, 0, 0, 4, 0, 0, 0", "complete"),
            ("4, 1, 1, 0, 2, 0, 0, 0", "steps_in_process"),
            ("4, 1, 0, 1, 2, 0, 0, 0", "waiting_for_retry"),
            ("4, 1, 0, 0, 2, 1, 0, 0", "blocked_by_failures"),
            ("4, 4, 0, 0, 0, 0, 0, 0", "waiting_for_dependencies"),
        ] {
            assert_eq!(
                text(&format!(
                    "SELECT task_state::tasker.task_state::text FROM tasker._task_status({counts})"
                )),
                state
            );
        }
    }

    #[pg_test]
    fn transition_tables_describe_the_machine() {
        // every state but the initial one can be reached, and every
        // non-terminal task state can be left
        assert_eq!(
            count("SELECT count(*) FROM unnest(enum_range(NULL::tasker.step_state)) s
                   WHERE NOT EXISTS (SELECT 1 FROM tasker.step_state_transitions t WHERE t.to_state = s)"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM unnest(enum_range(NULL::tasker.task_state)) s
                   WHERE NOT EXISTS (SELECT 1 FROM tasker.task_state_transitions t WHERE t.to_state = s)"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM unnest(enum_range(NULL::tasker.task_state)) s
                   WHERE NOT tasker.task_state_is_terminal(s)
                     AND NOT EXISTS (SELECT 1 FROM tasker.task_state_transitions t WHERE t.from_state = s)"),
            0
        );
        // terminal task states are never left, except error by a DLQ requeue
        assert_eq!(
            text("SELECT string_agg(from_state || '>' || to_state, ',') FROM tasker.task_state_transitions
                  WHERE tasker.task_state_is_terminal(from_state)"),
            "error>steps_in_process"
        );
        // only done steps are never left; error goes back to pending (a new budget)
        assert_eq!(
            count(
                "SELECT count(*) FROM tasker.step_state_transitions
                   WHERE tasker.step_state_class(from_state) IN ('done', 'cancelled')"
            ),
            0
        );
        // tasker._enqueue_steps moves exactly the states that can become
        // ready, and the table lists each of those moves
        assert_eq!(
            text("SELECT string_agg(s::text, ',' ORDER BY s) FROM unnest(enum_range(NULL::tasker.step_state)) s
                  WHERE tasker.step_is_runnable(s, 0)"),
            "pending,waiting_for_retry"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM unnest(enum_range(NULL::tasker.step_state)) s
                   WHERE tasker.step_is_runnable(s, 0)
                     AND NOT EXISTS (SELECT 1 FROM tasker.step_state_transitions t
                                     WHERE t.from_state = s AND t.to_state = 'enqueued')"
            ),
            0
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM tasker.step_state_transitions t
                   WHERE t.to_state = 'enqueued' AND NOT tasker.step_is_runnable(t.from_state, 0)"
            ),
            0
        );
        // the move predicates say what the tables list, pair by pair (a
        // step or task being created is no move: NULL is never legal) ...
        for machine in ["step", "task"] {
            assert_eq!(
                count(&format!(
                    "SELECT count(*) FROM unnest(enum_range(NULL::tasker.{machine}_state)) f
                     CROSS JOIN unnest(enum_range(NULL::tasker.{machine}_state)) t
                     WHERE tasker.{machine}_move_is_legal(f, t)
                           IS DISTINCT FROM EXISTS (SELECT 1 FROM tasker.{machine}_state_transitions l
                                                    WHERE l.from_state = f AND l.to_state = t)"
                )),
                0,
                "{machine}_move_is_legal disagrees with {machine}_state_transitions"
            );
            assert_eq!(
                count(&format!(
                    "SELECT count(*) FROM unnest(enum_range(NULL::tasker.{machine}_state)) t
                     WHERE tasker.{machine}_move_is_legal(NULL, t) IS DISTINCT FROM false"
                )),
                0
            );
        }
        // ... because they are written from them: a move added to a table
        // is legal once the predicates are written again
        Spi::run(
            "INSERT INTO tasker.step_state_transitions VALUES ('complete', 'pending', 'test');
             SELECT tasker._write_move_predicates()",
        )
        .unwrap();
        assert_eq!(
            sql_value::<bool>("SELECT tasker.step_move_is_legal('complete', 'pending')"),
            Some(true)
        );
        Spi::run(
            "DELETE FROM tasker.step_state_transitions WHERE via = 'test';
             SELECT tasker._write_move_predicates()",
        )
        .unwrap();
        assert_eq!(
            sql_value::<bool>("SELECT tasker.step_move_is_legal('complete', 'pending')"),
            Some(false)
        );
        // and _move_steps leaves enqueueing to it
        assert_fails(
            "SELECT tasker._move_steps('{}', 'enqueued', 'x')",
            "XX000",
            "tasker._enqueue_steps",
        );
    }

    #[pg_test]
    fn unsupported_pgmq_versions_are_refused_clearly() {
        assert_eq!(text("SELECT tasker._pgmq_check_version()"), "1.11.1");
        for (v, code) in [("1.9.0", "0A000"), ("2.0.0", "0A000"), ("nightly", "0A000")] {
            Spi::run(&format!(
                "UPDATE pg_catalog.pg_extension SET extversion = '{v}' WHERE extname = 'pgmq'"
            ))
            .unwrap();
            let f = failure("SELECT tasker._pgmq_check_version()");
            assert!(
                f.starts_with(&format!("{code}: ")) && f.contains("pgmq"),
                "{v}: {f}"
            );
        }
        Spi::run("UPDATE pg_catalog.pg_extension SET extversion = '1.11.1' WHERE extname = 'pgmq'")
            .unwrap();
        // and a queue whose table lacks a column pg_tasker uses is refused
        Spi::run(
            "SELECT pgmq.create('st_oddqueue'); ALTER TABLE pgmq.q_st_oddqueue DROP COLUMN headers",
        )
        .unwrap();
        assert_fails(
            "SELECT tasker._pgmq_ensure_queue('st_oddqueue')",
            "0A000",
            "lacks columns pg_tasker needs: {headers}",
        );
    }

    #[pg_test]
    fn the_primitives_refuse_illegal_moves() {
        register(&template(
            "st_moves",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let task = create("st_moves", "flow", json!({}));
        let b = step_field(task, "b", "step_uuid");
        // pending -> waiting_for_retry is not a legal move (only an attempt fails)
        assert_fails(
            &format!("SELECT tasker._move_steps(ARRAY[ROW('{b}', NULL, now(), NULL, NULL)::tasker.step_change], 'waiting_for_retry', 'x')"),
            "XX000",
            "could not move to waiting_for_retry",
        );
        // pending -> complete is legal for map steps only (expanded: one
        // attempt); a step never attempted cannot complete (the row check)
        assert_fails(
            &format!("SELECT tasker._move_steps(ARRAY[ROW('{b}', NULL, NULL, NULL, NULL)::tasker.step_change], 'complete', 'x')"),
            "23514",
            "never attempted",
        );
        assert_fails(
            &format!("SELECT tasker._settle_tasks('{{}}', 'x', ARRAY['{task}'::uuid], 'pending')"),
            "XX000",
            "to pending",
        );
        assert_eq!(step_field(task, "b", "state"), "pending");
        assert_task_consistent(task);
    }

    #[pg_test]
    fn check_constraints_encode_the_invariants() {
        register(&template(
            "st_check",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let task = create("st_check", "flow", json!({}));
        for (stmt, constraint) in [
            (format!("UPDATE tasker.tasks SET state = 'bogus' WHERE task_uuid = '{task}'"), "invalid input value for enum"),
            (format!("UPDATE tasker.workflow_steps SET state = 'done' WHERE task_uuid = '{task}'"), "invalid input value for enum"),
            (format!("UPDATE tasker.tasks SET steps_done = steps_done + 1 WHERE task_uuid = '{task}'"), "step counters add up to"),
            (format!("UPDATE tasker.tasks SET state = 'complete', completed_at = now() WHERE task_uuid = '{task}'"), "a complete task has 0 of 2 steps done"),
            (format!("UPDATE tasker.tasks SET state = 'cancelled' WHERE task_uuid = '{task}'"), "a task cancelled has no completed_at"),
            (format!("UPDATE tasker.workflow_steps SET queue_msg_id = NULL WHERE task_uuid = '{task}' AND name = 'a'"), "a step enqueued has no queue message"),
            (format!("UPDATE tasker.workflow_steps SET state = 'waiting_for_retry' WHERE task_uuid = '{task}' AND name = 'a'"), "a step waiting_for_retry has no next_retry_at"),
            (format!("UPDATE tasker.workflow_steps SET budget_offset = attempts + 1 WHERE task_uuid = '{task}' AND name = 'a'"), "budget_offset 2 is outside 0..=1"),
            (format!("UPDATE tasker.workflow_steps SET attempts = max_attempts + 1 WHERE task_uuid = '{task}' AND name = 'a'"), "exceeds max_attempts"),
            (format!("UPDATE tasker.workflow_steps SET state = 'resolved_manually' WHERE task_uuid = '{task}' AND name = 'b'"), "a step resolved_manually has no completed_at"),
            (format!("UPDATE tasker.workflow_steps SET state = 'error' WHERE task_uuid = '{task}' AND name = 'b'"), "a step error was never attempted"),
            (format!("UPDATE tasker.tasks SET priority = 101 WHERE task_uuid = '{task}'"), "priority 101 is outside"),
            (format!("UPDATE tasker.tasks SET context = '[]' WHERE task_uuid = '{task}'"), "context is not a JSON object"),
            (format!("UPDATE tasker.tasks SET claimed_by = 'x' WHERE task_uuid = '{task}'"), "claimed_by and claim_expires_at"),
            (format!("UPDATE tasker.workflow_steps SET pending_parents = 2 WHERE task_uuid = '{task}' AND name = 'b'"), "pending_parents 2 is outside 0..=1"),
            (format!("INSERT INTO tasker.task_transitions (task_uuid, sort_key, from_state, to_state) VALUES ('{task}', 1, NULL, 'pending')"), "task_transitions_pkey"),
        ] {
            let f = failure(&stmt);
            assert!(f.contains(constraint), "{stmt}: {f}");
            if !f.contains("invalid input value") && !f.contains("pkey") {
                assert!(f.contains("23514") && f.contains("pg_tasker invariant violated"), "{stmt}: {f}");
            }
        }
        assert_task_consistent(task);
    }
}
