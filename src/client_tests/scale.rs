//! Task size scales linearly: create_task, cancel_task and retention of a
//! 10,000-step task (the documented limit per template) take about ten
//! times what a 1,000-step task takes, not a hundred. Figures are printed
//! (docs/benchmarks.md records them); the assertions only bound the ratio
//! far above linear and far below quadratic.

use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};

use super::*;

fn timed(c: &mut Client, sql: &str) -> Duration {
    let start = Instant::now();
    c.batch_execute(sql).unwrap();
    start.elapsed()
}

/// Registers a template of n steps: a chain, or n roots and one join.
fn register_shape(c: &mut Client, ns: &str, n: usize, wide: bool) {
    let steps: Vec<Value> = (0..n)
        .map(|i| {
            let deps: Vec<String> = match (wide, i) {
                (_, 0) => vec![],
                (false, i) => vec![format!("s{}", i - 1)],
                (true, i) if i == n - 1 => (0..n - 1).map(|j| format!("s{j}")).collect(),
                (true, _) => vec![],
            };
            json!({"name": format!("s{i}"), "dependencies": deps, "handler": {"callable": "T"}})
        })
        .collect();
    register(c, &template(ns, "big", steps));
}

/// (create, cancel, retention) times of one task of the shape.
fn lifecycle(c: &mut Client, ns: &str) -> [Duration; 3] {
    let start = Instant::now();
    let task = create(c, ns, "big");
    let created = start.elapsed();
    let cancelled = timed(c, &format!("SELECT tasker.cancel_task('{task}')"));
    assert_eq!(task_problems(c, task), Vec::<String>::new());
    c.batch_execute(&format!(
        "UPDATE tasker.tasks SET completed_at = now() - interval '400 days' WHERE task_uuid = '{task}'"
    ))
    .unwrap();
    let removed = timed(
        c,
        "SELECT tasker._apply_retention('{cancelled}', 365, 10, false, 7, NULL)",
    );
    assert_eq!(
        count(
            c,
            &format!("SELECT count(*) FROM tasker.tasks WHERE task_uuid = '{task}'")
        ),
        0
    );
    [created, cancelled, removed]
}

#[test]
fn ten_thousand_steps_take_linear_time() {
    let mut c = connect();
    for wide in [false, true] {
        let shape = if wide { "wide" } else { "chain" };
        let small = format!("sc_{shape}_1k");
        let large = format!("sc_{shape}_10k");
        register_shape(&mut c, &small, 1_000, wide);
        register_shape(&mut c, &large, 10_000, wide);
        lifecycle(&mut c, &small); // warm caches and plans
        let s = lifecycle(&mut c, &small);
        let l = lifecycle(&mut c, &large);
        eprintln!(
            "scale {shape}: create 1k {:?} / 10k {:?}; cancel 1k {:?} / 10k {:?}; retention 1k {:?} / 10k {:?}",
            s[0], l[0], s[1], l[1], s[2], l[2]
        );
        for (what, a, b) in [
            ("create", s[0], l[0]),
            ("cancel", s[1], l[1]),
            ("retention", s[2], l[2]),
        ] {
            let ratio = b.as_secs_f64() / a.as_secs_f64().max(0.002);
            assert!(
                ratio < 35.0,
                "{shape} {what}: 10k steps took {ratio:.1}x 1k ({a:?} vs {b:?})"
            );
            assert!(
                b < Duration::from_secs(20),
                "{shape} {what} of 10k steps: {b:?}"
            );
        }
    }
}

/// Every operation on a worker's path reaches its rows by key, whatever the
/// statistics said when its plans were made. The plans are made once per
/// session (sql/98_plans.sql); a session that starts on empty tables (a new
/// database, or one ANALYZE has not seen yet) must not keep a plan that
/// walks every task of a namespace: one such plan made each read of 10
/// messages visit all the namespace's tasks (2 ms at 300 tasks, growing
/// without bound). So: plans made on a nearly empty database, then 600
/// tasks more, then each operation once, counting the rows it fetched from
/// tasks, workflow_steps and step_edges (pg_stat_xact_user_tables): at
/// most ~20 per step it settles or reads, far from the 1,200 of a walk.
#[test]
fn plans_made_on_empty_tables_reach_rows_by_key() {
    let mut admin = connect();
    admin
        .batch_execute("DROP DATABASE IF EXISTS tasker_plans")
        .unwrap();
    admin.batch_execute("CREATE DATABASE tasker_plans").unwrap();
    {
        let mut setup = connect_db(&mut admin, "tasker_plans");
        setup
            .batch_execute("CREATE EXTENSION pg_tasker CASCADE")
            .unwrap();
        register_linear(&mut setup, "plans", "lin", 3);
        register(
            &mut setup,
            &template(
                "plans",
                "dia",
                vec![
                    step("a", &[]),
                    step("b", &["a"]),
                    step("c", &["a"]),
                    step("d", &["b", "c"]),
                ],
            ),
        );
        let mut w = connect_db(&mut admin, "tasker_plans");
        let exchange = |w: &mut Client, results: &Value, qty: i32| -> Vec<Value> {
            w.query(
                "SELECT message::text FROM tasker.exchange(ARRAY['plans'], 'w', $1::text::jsonb, $2, 30)",
                &[&results.to_string(), &qty],
            )
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
            .collect()
        };
        let success = |m: &Value| json!({"step_uuid": m["step_uuid"], "status": "success", "result": {"ok": true}});
        let plain = |w: &mut Client, m: &Value| {
            w.query_one(
                "SELECT tasker.submit_result($1::text::uuid, 'success', '{}', NULL, $2::text::jsonb)",
                &[&m["step_uuid"].as_str().unwrap(), &json!({"attempt": m["attempt"]}).to_string()],
            )
            .unwrap();
        };
        let read_steps = |w: &mut Client, qty: i32| -> Vec<Value> {
            w.query(
                "SELECT message::text FROM tasker.read_steps('plans', 'w', $1, 30)",
                &[&qty],
            )
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
            .collect()
        };
        // every operation once, on a database of two tasks: the plans
        for name in ["lin", "dia"] {
            w.query_one("SELECT tasker.create_task('plans', $1)", &[&name])
                .unwrap();
        }
        let cycle = |w: &mut Client| {
            w.query_one("SELECT tasker.run_orchestration_cycle('w', 10)", &[])
                .unwrap();
        };
        cycle(&mut w);
        let recovery = |w: &mut Client| {
            w.query_one("SELECT tasker.run_maintenance(ARRAY['recovery'])", &[])
                .unwrap();
        };
        recovery(&mut w);
        let msgs = read_steps(&mut w, 10);
        assert_eq!(msgs.len(), 2);
        plain(&mut w, &msgs[0]);
        let next = exchange(&mut w, &json!([success(&msgs[1])]), 10);
        let more = exchange(
            &mut w,
            &Value::Array(next.iter().map(success).collect()),
            10,
        );
        assert!(!more.is_empty());
        w.query(
            "SELECT * FROM tasker.submit_results($1::text::jsonb)",
            &[&Value::Array(more.iter().map(success).collect()).to_string()],
        )
        .unwrap();

        // then a namespace of 1,200 tasks more
        setup
            .batch_execute(
                "SELECT tasker.create_task('plans', 'lin') FROM generate_series(1, 600);
                 SELECT tasker.create_task('plans', 'dia') FROM generate_series(1, 600);",
            )
            .unwrap();
        // rows an operation fetched from the tables of tasks and steps
        let fetched = |w: &mut Client, what: &str, op: &mut dyn FnMut(&mut Client)| {
            let rows = "SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0)::bigint
                          FROM pg_stat_xact_user_tables
                         WHERE schemaname = 'tasker' AND relname IN ('tasks', 'workflow_steps', 'step_edges')";
            w.batch_execute("BEGIN").unwrap();
            let before = count(w, rows);
            op(w);
            let n = count(w, rows) - before;
            w.batch_execute("COMMIT").unwrap();
            // (a step costs ~20 fetches by key: its row, its task, audit
            // rows' key checks, edges, children; a walk of the namespace
            // fetches 1,200 tasks at least)
            println!("{what}: {n} rows of tasks and steps fetched");
            assert!(n < 500, "{what} fetched {n} rows of tasks and steps");
            n
        };
        let mut msgs = Vec::new();
        fetched(&mut w, "read_steps", &mut |w| msgs = read_steps(w, 10));
        assert_eq!(msgs.len(), 10);
        let first = msgs.remove(0);
        fetched(&mut w, "submit_result", &mut |w| plain(w, &first));
        let results = Value::Array(msgs.iter().map(success).collect());
        let mut read = Vec::new();
        fetched(&mut w, "exchange", &mut |w| {
            read = exchange(w, &results, 10)
        });
        assert_eq!(read.len(), 10);
        let results = Value::Array(read.iter().map(success).collect());
        fetched(&mut w, "submit_results", &mut |w| {
            w.query(
                "SELECT * FROM tasker.submit_results($1::text::jsonb)",
                &[&results.to_string()],
            )
            .unwrap();
        });
        // (nothing is due: the cycle finds that by its index)
        fetched(&mut w, "run_orchestration_cycle", &mut |w| cycle(w));
        // (no lease has ended: recovery finds that from the queue, not by
        // walking the namespace's steps; the orchestrator's session makes
        // its plans when it starts, often on an empty database)
        fetched(&mut w, "recovery", &mut |w| recovery(w));
        fetched(&mut w, "create_task", &mut |w| {
            w.query_one("SELECT tasker.create_task('plans', 'dia')", &[])
                .unwrap();
        });
    }
    admin.batch_execute("DROP DATABASE tasker_plans").unwrap();
}
