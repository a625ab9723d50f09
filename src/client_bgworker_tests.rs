//! The background orchestrator, observed from clients: it runs workflows on
//! its own (retry timers), follows SIGHUP and pg_tasker.enabled, keeps its
//! last good configuration, and stands down on a version mismatch.
//! These tests change cluster-wide settings, so they hold ORCHESTRATOR.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};

use crate::client_tests::connect;

/// Serializes the tests that change the orchestrator's settings.
pub static ORCHESTRATOR: Mutex<()> = Mutex::new(());

pub fn lock() -> MutexGuard<'static, ()> {
    ORCHESTRATOR.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn health(c: &mut Client) -> Value {
    let s: String = c
        .query_one("SELECT tasker.health()::text", &[])
        .unwrap()
        .get(0);
    serde_json::from_str(&s).unwrap()
}

/// Waits until `f(health)` holds (the worker may be restarting: up to 20 s).
pub fn wait_for(c: &mut Client, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let h = health(c);
        if f(&h) {
            return h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |h| h["orchestrator"]["status"] == s && h["orchestrator"]["running"] == true
}

pub fn set_system(c: &mut Client, setting: &str, value: Option<&str>) {
    match value {
        Some(v) => c
            .batch_execute(&format!("ALTER SYSTEM SET {setting} = '{v}'"))
            .unwrap(),
        None => c
            .batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
            .unwrap(),
    }
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Turns the orchestrator on or off and waits until it says so.
pub fn set_enabled(c: &mut Client, on: bool) {
    set_system(c, "pg_tasker.enabled", Some(if on { "on" } else { "off" }));
    if on {
        wait_for(c, "orchestrator running", status_is("running"));
    } else {
        wait_for(
            c,
            "orchestrator disabled",
            status_is("disabled (pg_tasker.enabled = off)"),
        );
    }
}

fn register(c: &mut Client, t: &Value) {
    c.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
}

fn read_one(c: &mut Client, queue: &str) -> Option<Value> {
    c.query("SELECT message::text FROM pgmq.read($1, 30, 1)", &[&queue])
        .unwrap()
        .first()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
}

fn submit(c: &mut Client, msg: &Value, status: &str, error: Option<Value>) -> String {
    c.query_one(
        "SELECT tasker.submit_result($1::text::uuid, $2, '{}'::jsonb, $3::text::jsonb)",
        &[
            &msg["step_uuid"].as_str().unwrap(),
            &status,
            &error.map(|e| e.to_string()),
        ],
    )
    .unwrap()
    .get(0)
}

fn step_state(c: &mut Client, task: &str, step: &str) -> String {
    c.query_one(
        "SELECT state FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid AND name = $2",
        &[&task, &step],
    )
    .unwrap()
    .get(0)
}

#[test]
fn the_orchestrator_runs_workflows_by_itself() {
    let _guard = lock();
    let mut c = connect();
    set_enabled(&mut c, true);
    let h = health(&mut c);
    assert!(h["orchestrator"]["pid"].as_i64().unwrap() > 0, "{h}");
    assert_eq!(h["orchestrator"]["preloaded"], true);
    let step = |name: &str, deps: &[&str]| json!({"name": name, "dependencies": deps, "handler": {"callable": "T"}});
    register(
        &mut c,
        &json!({"name": "flow", "namespace_name": "b_auto", "version": "1.0.0",
        "steps": [step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["b", "c"])]}),
    );
    let task: String = c
        .query_one("SELECT tasker.create_task('b_auto', 'flow')::text", &[])
        .unwrap()
        .get(0);

    // A worker loop with no orchestration calls of its own. Step b fails
    // once asking for a 2 s delay; the background worker must enqueue the
    // retry when it is due.
    let queue = "tasker_b_auto_queue";
    let start = Instant::now();
    let mut failed_at: Option<Instant> = None;
    let mut retried_after: Option<Duration> = None;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "workflow did not finish"
        );
        let Some(msg) = read_one(&mut c, queue) else {
            let state: String = c
                .query_one(
                    "SELECT state FROM tasker.tasks WHERE task_uuid = $1::text::uuid",
                    &[&task],
                )
                .unwrap()
                .get(0);
            if state == "complete" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if msg["step_name"] == "b" && msg["attempt"] == 1 {
            submit(
                &mut c,
                &msg,
                "failure",
                Some(json!({"message": "busy", "retry_after_seconds": 2})),
            );
            failed_at = Some(Instant::now());
        } else {
            if msg["step_name"] == "b" {
                retried_after = failed_at.map(|t| t.elapsed());
            }
            submit(&mut c, &msg, "success", None);
        }
    }
    let gap = retried_after.expect("b was retried");
    assert!(
        gap >= Duration::from_millis(1900) && gap <= Duration::from_millis(2600),
        "retry enqueued after {gap:?}"
    );
    assert_eq!(step_state(&mut c, &task, "d"), "complete");
    let h = health(&mut c);
    assert!(h["orchestrator"]["ticks"].as_u64().unwrap() > 0, "{h}");
}

fn config_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pg_tasker_bgcfg_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("environments/test")).unwrap();
    d
}

#[test]
fn sighup_reloads_configuration_and_an_invalid_file_keeps_the_last_good_one() {
    let _guard = lock();
    let mut c = connect();
    set_enabled(&mut c, true);
    let dir = config_dir("sighup");
    let file = dir.join("environments/test/orchestration.toml");
    std::fs::write(&file, "[orchestration]\ncycle_interval_ms = 1234\n").unwrap();
    set_system(&mut c, "pg_tasker.config_dir", Some(dir.to_str().unwrap()));
    wait_for(&mut c, "interval 1234", |h| {
        h["orchestrator"]["cycle_interval_ms"] == 1234
    });

    // a broken file: reported, logged, and the previous configuration stays
    std::fs::write(&file, "[orchestration]\ncycle_intervall_ms = 99\n").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let h = wait_for(&mut c, "config error recorded", |h| {
        h["orchestrator"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("orchestration.cycle_intervall_ms"))
    });
    assert!(
        h["orchestrator"]["last_error"]
            .as_str()
            .unwrap()
            .contains(file.to_str().unwrap()),
        "{h}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        health(&mut c)["orchestrator"]["cycle_interval_ms"],
        1234,
        "last good configuration kept"
    );
    // tasker.config() in a session (which followed the reload) tells the same story
    let cfg: String = c
        .query_one("SELECT tasker.config()::text", &[])
        .unwrap()
        .get(0);
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["valid"], false, "{cfg}");
    assert_eq!(cfg["error"]["key"], "orchestration.cycle_intervall_ms");
    assert!(cfg["error"]["file"]
        .as_str()
        .unwrap()
        .ends_with("environments/test/orchestration.toml"));

    // fixed again
    std::fs::write(&file, "[orchestration]\ncycle_interval_ms = 345\n").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(&mut c, "interval 345", |h| {
        h["orchestrator"]["cycle_interval_ms"] == 345
    });
    let cfg: String = c
        .query_one("SELECT tasker.config()::text", &[])
        .unwrap()
        .get(0);
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["valid"], true, "{cfg}");
    assert_eq!(cfg["config"]["orchestration"]["cycle_interval_ms"], 345);
    assert_eq!(
        cfg["sources"]["orchestration.cycle_interval_ms"],
        file.to_str().unwrap()
    );

    set_system(&mut c, "pg_tasker.config_dir", None);
    wait_for(&mut c, "interval back to the test default", |h| {
        h["orchestrator"]["cycle_interval_ms"] == 200
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn enabled_off_stops_work_and_on_resumes_it() {
    let _guard = lock();
    let mut c = connect();
    let mut s = json!({"name": "a", "handler": {"callable": "T"}});
    s["retry"] = json!({"max_attempts": 3});
    register(
        &mut c,
        &json!({"name": "flow", "namespace_name": "b_off", "version": "1.0.0", "steps": [s]}),
    );
    set_enabled(&mut c, false);
    let task: String = c
        .query_one("SELECT tasker.create_task('b_off', 'flow')::text", &[])
        .unwrap()
        .get(0);
    let msg = read_one(&mut c, "tasker_b_off_queue").unwrap();
    submit(
        &mut c,
        &msg,
        "failure",
        Some(json!({"message": "later", "retry_after_seconds": 0.2})),
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        step_state(&mut c, &task, "a"),
        "waiting_for_retry",
        "nobody enqueues while disabled"
    );
    set_enabled(&mut c, true);
    let start = Instant::now();
    while step_state(&mut c, &task, "a") != "enqueued" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the retry was not enqueued after re-enabling"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_version_mismatch_makes_the_orchestrator_stand_down() {
    let _guard = lock();
    let mut c = connect();
    set_enabled(&mut c, true);
    c.batch_execute(
        "UPDATE pg_catalog.pg_extension SET extversion = '0.0.0-other' WHERE extname = 'pg_tasker'",
    )
    .unwrap();
    // wake it: any SIGHUP sets its latch
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            &mut connect(),
            "stand down",
            status_is("standing down: extension version mismatch"),
        );
    }));
    c.batch_execute(&format!(
        "UPDATE pg_catalog.pg_extension SET extversion = '{}' WHERE extname = 'pg_tasker'",
        env!("CARGO_PKG_VERSION")
    ))
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(&mut c, "running again", status_is("running"));
    result.unwrap();
}
