//! Client-side tests: real connections to the test cluster (autocommit,
//! real transactions), where commits, rollbacks, concurrency, other
//! databases, processes or the background orchestrator matter (a
//! `#[pg_test]` runs inside one rolled-back transaction). This module holds
//! their one set of helpers.

mod basics;
mod bgworker;
mod concurrency;
mod crash;
mod health;
mod observability;
mod orchestration;
mod scale;
mod security;
mod upgrade;

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

/// Boots the shared test cluster (once per test binary) by running one
/// ordinary `#[pg_test]`, then returns an autocommit connection.
pub fn connect() -> Client {
    pgrx_tests::run_test(
        "cluster_boots",
        None,
        crate::pg_test::postgresql_conf_options(),
    )
    .expect("test cluster boots");
    pgrx_tests::client().expect("client connects").0
}

/// A connection to another database of the test cluster.
pub fn connect_db(via: &mut Client, dbname: &str) -> Client {
    let port: String = via.query_one("SHOW port", &[]).unwrap().get(0);
    postgres::Config::new()
        .host("localhost")
        .port(port.parse().unwrap())
        .user(&pgrx_tests::get_pg_user())
        .dbname(dbname)
        .connect(NoTls)
        .expect("connect to the database")
}

/// Another connection to the test database.
pub fn other_connection(c: &mut Client) -> Client {
    connect_db(c, pgrx_tests::get_pg_dbname())
}

pub fn register(c: &mut Client, t: &Value) {
    c.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
}

pub fn step(name: &str, deps: &[&str]) -> Value {
    json!({"name": name, "dependencies": deps, "handler": {"callable": format!("Test::{name}")}})
}

pub fn template(ns: &str, name: &str, steps: Vec<Value>) -> Value {
    json!({"name": name, "namespace_name": ns, "version": "1.0.0", "steps": steps})
}

pub fn register_linear(c: &mut Client, ns: &str, name: &str, steps: usize) {
    let steps: Vec<Value> = (0..steps)
        .map(|i| {
            let deps: Vec<String> = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            json!({"name": format!("s{i}"), "dependencies": deps, "handler": {"callable": "Test::Step"}})
        })
        .collect();
    register(c, &template(ns, name, steps));
}

pub fn create(c: &mut Client, ns: &str, name: &str) -> uuid::Uuid {
    let s: String = c
        .query_one("SELECT tasker.create_task($1, $2)::text", &[&ns, &name])
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

pub fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// A query's one value as JSON (NULL: `Value::Null`).
pub fn query_json(c: &mut Client, sql: &str) -> Value {
    let s: Option<String> = c
        .query_one(&format!("SELECT ({sql})::text"), &[])
        .unwrap()
        .get(0);
    s.map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(Value::Null)
}

/// The state of a task.
pub fn task_state(c: &mut Client, task: impl std::fmt::Display) -> String {
    c.query_one(
        "SELECT state::text FROM tasker.tasks WHERE task_uuid = $1::text::uuid",
        &[&task.to_string()],
    )
    .unwrap()
    .get(0)
}

/// The state of a task's step.
pub fn step_state(c: &mut Client, task: impl std::fmt::Display, step: &str) -> String {
    c.query_one(
        "SELECT state::text FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid AND name = $2",
        &[&task.to_string(), &step],
    )
    .unwrap()
    .get(0)
}

/// What is inconsistent in a task (tests.task_problems): empty when none.
pub fn task_problems(c: &mut Client, task: impl std::fmt::Display) -> Vec<String> {
    c.query(
        "SELECT p FROM tests.task_problems($1::text::uuid) p",
        &[&task.to_string()],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

pub enum Reply {
    Success(Value),
    Failure(Value),
}

/// submit_result for a message, fenced by its attempt.
pub fn submit(c: &mut Client, msg: &Value, reply: &Reply) -> String {
    let step = msg["step_uuid"].as_str().unwrap();
    let metadata = json!({"attempt": msg["attempt"], "worker_id": "test-worker"}).to_string();
    let (status, result, error) = match reply {
        Reply::Success(r) => ("success", Some(r.to_string()), None),
        Reply::Failure(e) => ("failure", None, Some(e.to_string())),
    };
    c.query_one(
        "SELECT tasker.submit_result($1::text::uuid, $2, $3::text::jsonb, $4::text::jsonb, $5::text::jsonb)",
        &[&step, &status, &result, &error, &metadata],
    )
    .unwrap()
    .get(0)
}

/// Waits until `f` holds, or panics after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
