//! The background orchestrator, observed from clients: it runs workflows on
//! its own (retry timers), follows SIGHUP and pg_tasker.enabled, keeps its
//! last good configuration, and stands down on a version mismatch.
//! These tests change cluster-wide settings, so they hold ORCHESTRATOR.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};

use super::{connect, connect_db, register, step_state};

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
    // The reload reaches this backend asynchronously: wait until this
    // session sees the value the configuration files now give.
    let expected: String = c
        .query_one(
            "SELECT coalesce(
                 (SELECT f.setting FROM pg_file_settings f WHERE f.name = $1 ORDER BY f.seqno DESC LIMIT 1),
                 (SELECT s.boot_val FROM pg_settings s WHERE s.name = $1), '')",
            &[&setting],
        )
        .unwrap()
        .get(0);
    for _ in 0..500 {
        let now: String = c
            .query_one(
                "SELECT coalesce(current_setting($1, true), '')",
                &[&setting],
            )
            .unwrap()
            .get(0);
        if now == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{setting} did not reach {expected:?} after a reload");
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

fn read_one(c: &mut Client, queue: &str) -> Option<Value> {
    c.query("SELECT message::text FROM pgmq.read($1, 30, 1)", &[&queue])
        .unwrap()
        .first()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
}

fn submit(c: &mut Client, msg: &Value, status: &str, error: Option<Value>) -> String {
    c.query_one(
        "SELECT tasker.submit_result($1::text::uuid, $2, '{}'::jsonb, $3::text::jsonb, $4::text::jsonb)",
        &[
            &msg["step_uuid"].as_str().unwrap(),
            &status,
            &error.map(|e| e.to_string()),
            &json!({"attempt": msg["attempt"]}).to_string(),
        ],
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
            let state: String = super::task_state(&mut c, &task);
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

#[test]
fn task_requests_sent_to_the_queue_become_tasks_or_dlq_entries() {
    let _guard = lock();
    let mut c = connect();
    set_enabled(&mut c, true);
    let step = json!({"name": "a", "handler": {"callable": "T"}});
    let mut t =
        json!({"name": "flow", "namespace_name": "b_req", "version": "1.0.0", "steps": [step]});
    t["input_schema"] = json!({"type": "object", "required": ["order_id"]});
    register(&mut c, &t);
    // an application that only speaks pgmq, as tasker_app
    c.batch_execute("CREATE ROLE b_req_app LOGIN; GRANT tasker_app TO b_req_app")
        .unwrap_or(());
    c.batch_execute("SET ROLE b_req_app").unwrap();
    let send = |c: &mut Client, req: Value| -> i64 {
        c.query_one(
            "SELECT * FROM pgmq.send('tasker_task_requests', $1::text::jsonb)",
            &[&req.to_string()],
        )
        .unwrap()
        .get(0)
    };
    send(
        &mut c,
        json!({"namespace": "b_req", "name": "flow", "context": {"order_id": 1}, "idempotency_key": "req-1"}),
    );
    send(
        &mut c,
        json!({"namespace": "b_req", "name": "flow", "context": {"order_id": 1}, "idempotency_key": "req-1"}),
    );
    let bad_schema = send(
        &mut c,
        json!({"namespace": "b_req", "name": "flow", "context": {}}),
    );
    let unknown = send(&mut c, json!({"namespace": "b_req", "name": "nope"}));
    let garbage = send(&mut c, json!({"hello": "world"}));
    c.batch_execute("RESET ROLE").unwrap();

    let start = Instant::now();
    loop {
        let left: i64 = c
            .query_one("SELECT count(*) FROM pgmq.q_tasker_task_requests", &[])
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "requests not ingested"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tasks: i64 = c
        .query_one(
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'b_req'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        tasks, 1,
        "one task (the second request had the same idempotency key)"
    );
    let mut rejected = std::collections::HashMap::new();
    for row in c
        .query(
            "SELECT (snapshot->>'msg_id')::bigint, error->>'sqlstate', error->>'message' FROM tasker.dlq
              WHERE reason = 'invalid_task_request' AND snapshot->>'queue' = 'tasker_task_requests'",
            &[],
        )
        .unwrap()
    {
        rejected.insert(row.get::<_, i64>(0), (row.get::<_, String>(1), row.get::<_, String>(2)));
    }
    assert_eq!(rejected[&bad_schema].0, "22023", "{rejected:?}");
    assert!(rejected[&bad_schema].1.contains("order_id"));
    assert_eq!(rejected[&unknown].0, "42704");
    assert_eq!(rejected[&garbage].0, "22023");
    let archived: i64 = c
        .query_one(
            "SELECT count(*) FROM pgmq.a_tasker_task_requests WHERE msg_id = ANY($1)",
            &[&vec![bad_schema, unknown, garbage]],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        archived, 3,
        "every request is archived, none silently dropped"
    );
}

#[test]
fn lost_attempts_are_failed_and_retried() {
    let mut c = connect();
    let mut s = json!({"name": "a", "handler": {"callable": "T"}});
    s["retry"] = json!({"max_attempts": 2, "backoff": "none"});
    register(
        &mut c,
        &json!({"name": "flow", "namespace_name": "b_lost", "version": "1.0.0", "steps": [s]}),
    );
    let task: String = c
        .query_one("SELECT tasker.create_task('b_lost', 'flow')::text", &[])
        .unwrap()
        .get(0);
    let lose_attempt = |c: &mut Client| {
        // three deliveries (recovery.max_deliveries), each lease ending without a result
        for _ in 0..3 {
            let start = Instant::now();
            while c
                .query("SELECT 1 FROM pgmq.read('tasker_b_lost_queue', 1, 1)", &[])
                .unwrap()
                .is_empty()
            {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "message not visible again"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(1100));
        // the orchestrator's recovery job runs every second in the test
        // environment; running it here as well must not double-count
        c.query_one("SELECT tasker.run_maintenance(ARRAY['recovery'])", &[])
            .unwrap();
    };
    lose_attempt(&mut c);
    let row = c.query_one("SELECT state::text, attempts, last_error->>'error_code' FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid", &[&task]).unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<String>>(2)
        ),
        ("enqueued".into(), 2, Some("LOST_ATTEMPT".into()))
    );
    lose_attempt(&mut c);
    let row = c.query_one("SELECT state::text, attempts, last_error->>'message' FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid", &[&task]).unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("error".into(), 2)
    );
    assert!(row
        .get::<_, String>(2)
        .contains("delivered 3 times without a result"));
    let state: String = super::task_state(&mut c, &task);
    assert_eq!(state, "blocked_by_failures");
}

#[test]
fn a_worker_that_dies_holding_messages_does_not_lose_them() {
    let mut c = connect();
    let step =
        |n: &str, d: &[&str]| json!({"name": n, "dependencies": d, "handler": {"callable": "T"}});
    register(
        &mut c,
        &json!({"name": "flow", "namespace_name": "b_die", "version": "1.0.0",
        "steps": [step("a", &[]), step("b", &["a"])]}),
    );
    for _ in 0..5 {
        c.query_one("SELECT tasker.create_task('b_die', 'flow')", &[])
            .unwrap();
    }
    {
        // a worker takes every message for 1 s, and dies
        let mut doomed = connect_db(&mut c, pgrx_tests::get_pg_dbname());
        let taken = doomed
            .query(
                "SELECT msg_id FROM pgmq.read('tasker_b_die_queue', 1, 10)",
                &[],
            )
            .unwrap();
        assert_eq!(taken.len(), 5);
    }
    let start = Instant::now();
    loop {
        if let Some(msg) = read_one(&mut c, "tasker_b_die_queue") {
            submit(&mut c, &msg, "success", None);
            continue;
        }
        let open: i64 = c.query_one("SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'b_die' AND state <> 'complete'", &[]).unwrap().get(0);
        if open == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "tasks did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn retention_archive_policy_and_queue_archive_pruning() {
    let _guard = lock();
    let mut c = connect();
    let step = json!({"name": "a", "handler": {"callable": "T"}});
    register(
        &mut c,
        &json!({"name": "flow", "namespace_name": "b_arch", "version": "1.0.0", "steps": [step]}),
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        let task: String = c
            .query_one("SELECT tasker.create_task('b_arch', 'flow')::text", &[])
            .unwrap()
            .get(0);
        let msg = read_one(&mut c, "tasker_b_arch_queue").unwrap();
        submit(&mut c, &msg, "success", None);
        ids.push(task);
    }
    c.execute("UPDATE tasker.tasks SET completed_at = now() - interval '40 days' WHERE task_uuid = $1::text::uuid", &[&ids[0]]).unwrap();
    c.execute("UPDATE pgmq.a_tasker_b_arch_queue SET archived_at = now() - interval '8 days' WHERE message->>'task_uuid' = $1", &[&ids[0]]).unwrap();

    let dir = config_dir("archive");
    std::fs::write(
        dir.join("environments/test/orchestration.toml"),
        "[orchestration.retention]\npolicy = \"archive\"\n",
    )
    .unwrap();
    set_system(&mut c, "pg_tasker.config_dir", Some(dir.to_str().unwrap()));
    let cfg: String = c
        .query_one(
            "SELECT tasker.config()->'config'->'orchestration'->'retention'->>'policy'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(cfg, "archive");
    let out: String = c
        .query_one(
            "SELECT tasker.run_maintenance(ARRAY['retention'])::text",
            &[],
        )
        .unwrap()
        .get(0);
    let out: Value = serde_json::from_str(&out).unwrap();
    set_system(&mut c, "pg_tasker.config_dir", None);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(out["retention"]["policy"], "archive", "{out}");
    assert!(
        out["retention"]["queue_archive_rows_pruned"]
            .as_i64()
            .unwrap()
            >= 1,
        "{out}"
    );
    let present: i64 = c
        .query_one(
            "SELECT count(*) FROM tasker.tasks WHERE task_uuid = ANY($1::text[]::uuid[])",
            &[&ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(present, 1, "only the old task left the live tables");
    let snapshot: String = c
        .query_one(
            "SELECT snapshot::text FROM tasker.task_archive WHERE task_uuid = $1::text::uuid",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    let snapshot: Value = serde_json::from_str(&snapshot).unwrap();
    assert_eq!(snapshot["steps"][0]["state"], "complete");
    assert!(snapshot["step_transitions"].as_array().unwrap().len() >= 3);
    let pruned_left: i64 = c
        .query_one(
            "SELECT count(*) FROM pgmq.a_tasker_b_arch_queue WHERE message->>'task_uuid' = $1",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(pruned_left, 0);
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM pgmq.a_tasker_b_arch_queue WHERE message->>'task_uuid' = $1",
            &[&ids[1]],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "recent archive rows stay");
}
