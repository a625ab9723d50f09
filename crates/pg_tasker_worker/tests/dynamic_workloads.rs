//! End to end: the dynamic workflows (decision, batch with checkpoints,
//! map, decision into batch), each on a throwaway cluster with the
//! orchestrator preloaded, run by real `pg-tasker-worker` processes.
//! Requires pg_tasker installed into PostgreSQL 15 (scripts/test.sh does it).

use std::time::{Duration, Instant};

mod common;
use common::{create, json, settle, setup, step, task_state, Worker};
use serde_json::{json, Value};

fn result(db: &mut postgres::Client, task: &str, name: &str) -> Value {
    step(db, task, name)["results"].clone()
}

#[test]
fn conditional_approval_takes_the_branches_the_amount_asks_for() {
    let mut env = setup("e2e_approval", &["approvals_conditional_approval.yaml"]);
    let tasks: Vec<(String, &str)> = [
        (500, "auto"),
        (2000, "manager"),
        (9000, "both"),
        (0, "none"),
    ]
    .into_iter()
    .map(|(amount, what)| {
        (
            create(
                &mut env.db,
                "approvals",
                "conditional_approval",
                &json!({ "amount": amount }).to_string(),
            ),
            what,
        )
    })
    .collect();
    let _worker = Worker::start(&env, &["approvals"], "dynamic", &[]);
    settle(&mut env, "approvals", Duration::from_secs(30));
    for (task, what) in &tasks {
        assert_eq!(task_state(&mut env.db, task), "complete", "{what}");
        let fin = result(&mut env.db, task, "finalize_approval");
        let expect = match *what {
            "auto" => json!(["auto_approve"]),
            "manager" => json!(["manager_approval"]),
            "both" => json!(["finance_review", "manager_approval"]),
            _ => Value::Null,
        };
        assert_eq!(fin["branches"], expect, "{what}: {fin}");
    }
    // no branches: only the steps before the decision and the decision
    let steps = json(
        &mut env.db,
        "SELECT jsonb_agg(step_name ORDER BY step_name) FROM tasker.step_status WHERE task_uuid = $1::text::uuid",
        &[&tasks[3].0],
    );
    assert_eq!(steps, json!(["routing_decision", "validate_request"]));
}

/// The checkpoints the batch workers of a task have saved.
fn checkpoints(db: &mut postgres::Client, task: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM tasker.workflow_steps
         WHERE task_uuid = $1::text::uuid AND checkpoint IS NOT NULL",
        &[&task],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_batch_aggregates_its_workers_and_a_killed_worker_resumes_from_its_checkpoint() {
    let mut env = setup(
        "e2e_csv",
        &[
            "csv_processing_batch.yaml",
            "csv_processing_batch_fail_fast.yaml",
        ],
    );
    // 250 rows, 3 workers, 15 ms a row: each batch takes over a second
    let task = create(
        &mut env.db,
        "csv_processing",
        "csv_batch",
        r#"{"rows": 250, "workers": 3, "row_delay_ms": 15}"#,
    );
    let mut first = Worker::start(
        &env,
        &["csv_processing"],
        "dynamic",
        &["--visibility-timeout", "2"],
    );
    let start = Instant::now();
    while checkpoints(&mut env.db, &task) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no checkpoints; log:\n{}",
            env.cluster.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // killed mid-batch, after checkpoints; another worker takes over
    first.kill9();
    let _second = Worker::start(
        &env,
        &["csv_processing"],
        "dynamic",
        &["--visibility-timeout", "2"],
    );
    settle(&mut env, "csv_processing", Duration::from_secs(60));
    assert_eq!(task_state(&mut env.db, &task), "complete");
    let agg = result(&mut env.db, &task, "aggregate_csv_results");
    assert_eq!(agg["batches"], 3, "{agg}");
    assert_eq!(agg["rows"], 250, "{agg}");
    assert_eq!(agg["sum"], (0..250u64).sum::<u64>(), "{agg}");
    assert_eq!(
        agg["resumed"], 3,
        "every batch resumed from its checkpoint: {agg}"
    );
    for id in ["001", "002", "003"] {
        let w = result(&mut env.db, &task, &format!("process_csv_batch_{id}"));
        let cursor = step(&mut env.db, &task, &format!("process_csv_batch_{id}"))["inputs"]
            ["cursor"]
            .clone();
        assert!(
            w["resumed_from"].as_u64().unwrap() > cursor["start_cursor"].as_u64().unwrap(),
            "{w} {cursor}"
        );
        assert_eq!(w["cursor_field"], "row_number");
    }

    // fail_fast: batch 002 is corrupt; the others are stopped (error, to retry)
    let task = create(
        &mut env.db,
        "csv_processing",
        "csv_batch_fail_fast",
        r#"{"rows": 250, "workers": 3, "row_delay_ms": 15, "bad_batch": "002"}"#,
    );
    settle(&mut env, "csv_processing", Duration::from_secs(30));
    assert_eq!(task_state(&mut env.db, &task), "blocked_by_failures");
    let states = json(
        &mut env.db,
        "SELECT jsonb_object_agg(step_name, state) FROM tasker.step_status WHERE task_uuid = $1::text::uuid",
        &[&task],
    );
    assert_eq!(
        states,
        json!({"analyze_csv": "complete", "process_csv_batch_001": "error",
               "process_csv_batch_002": "error", "process_csv_batch_003": "error",
               "aggregate_csv_results": "pending"})
    );
}

#[test]
fn a_map_squares_each_element_retries_a_flaky_one_and_ten_thousand_complete() {
    let mut env = setup("e2e_map", &["math_map_squares.yaml"]);
    let small = create(
        &mut env.db,
        "math",
        "squares",
        r#"{"numbers": [1, 2, 3, 4, 5]}"#,
    );
    let empty = create(&mut env.db, "math", "squares", r#"{"numbers": []}"#);
    let n = 10_000i64;
    let numbers: Vec<i64> = (0..n).collect();
    let wide = create(
        &mut env.db,
        "math",
        "squares",
        &json!({ "numbers": numbers }).to_string(),
    );
    let started = Instant::now();
    let _worker = Worker::start(
        &env,
        &["math"],
        "dynamic",
        &["--concurrency", "16", "--batch-size", "50"],
    );
    settle(&mut env, "math", Duration::from_secs(180));
    let took = started.elapsed();
    assert_eq!(task_state(&mut env.db, &small), "complete");
    assert_eq!(
        result(&mut env.db, &small, "sum_squares"),
        json!({"sum": 55, "count": 5})
    );
    assert_eq!(
        result(&mut env.db, &small, "square"),
        json!([1, 4, 9, 16, 25])
    );
    // the element of item 3 failed once and was retried
    assert_eq!(step(&mut env.db, &small, "square[2]")["attempts"], 2);
    assert_eq!(step(&mut env.db, &small, "square[1]")["attempts"], 1);
    assert_eq!(task_state(&mut env.db, &empty), "complete");
    assert_eq!(
        result(&mut env.db, &empty, "sum_squares"),
        json!({"sum": 0, "count": 0})
    );
    assert_eq!(task_state(&mut env.db, &wide), "complete");
    assert_eq!(
        result(&mut env.db, &wide, "sum_squares"),
        json!({"sum": (0..n).map(|x| x * x).sum::<i64>(), "count": n})
    );
    // the views over a 10,000-element map
    let t = Instant::now();
    let rows: i64 = env
        .db
        .query_one(
            // (every column of every row, as a client reading them would)
            "SELECT count(*) FROM (SELECT length(to_jsonb(s)::text) FROM tasker.step_status s
                                    WHERE task_uuid = $1::text::uuid) s",
            &[&wide],
        )
        .unwrap()
        .get(0);
    let view = t.elapsed();
    assert_eq!(rows, n + 3);
    let t = Instant::now();
    let graph: String = env
        .db
        .query_one("SELECT tasker.task_graph($1::text::uuid)", &[&wide])
        .unwrap()
        .get(0);
    let graph_took = t.elapsed();
    assert!(
        graph.contains("square#91;9999#93;"),
        "escaped like every label"
    );
    eprintln!(
        "10,000-element map: {took:?} end to end ({:.0} steps/s); step_status {view:?}, task_graph {graph_took:?}",
        (n + 3) as f64 / took.as_secs_f64()
    );
    // generous bounds: these catch a quadratic view, not a slow machine
    assert!(view < Duration::from_secs(5), "step_status took {view:?}");
    assert!(
        graph_took < Duration::from_secs(5),
        "task_graph took {graph_took:?}"
    );
}

#[test]
fn a_decision_leads_into_a_batch_or_a_manual_review() {
    let mut env = setup("e2e_mixed", &["approvals_bulk_review.yaml"]);
    let bulk = create(&mut env.db, "approvals", "bulk_review", r#"{"lines": 250}"#);
    let small = create(&mut env.db, "approvals", "bulk_review", r#"{"lines": 10}"#);
    let _worker = Worker::start(&env, &["approvals"], "dynamic", &[]);
    settle(&mut env, "approvals", Duration::from_secs(30));
    assert_eq!(task_state(&mut env.db, &bulk), "complete");
    assert_eq!(
        result(&mut env.db, &bulk, "summarize_review"),
        json!({"batches": 3, "rows": 250, "sum": (0..250u64).sum::<u64>(), "resumed": 0,
               "path": ["review_lines_001", "review_lines_002", "review_lines_003"]})
    );
    assert_eq!(task_state(&mut env.db, &small), "complete");
    assert_eq!(
        result(&mut env.db, &small, "summarize_review")["path"],
        json!(["manual_review"])
    );
    let origin = json(
        &mut env.db,
        "SELECT to_jsonb(origin) FROM tasker.step_status WHERE task_uuid = $1::text::uuid AND step_name = 'review_lines_002'",
        &[&bulk],
    );
    assert_eq!(origin, json!("batchable \"analyze_lines\""));
}
