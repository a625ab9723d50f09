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
