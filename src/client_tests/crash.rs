//! Crashes, on a cluster of the test's own (a crash restarts every backend
//! of a cluster): kill -9 of the orchestrator and an immediate restart of
//! PostgreSQL in the middle of 200 running tasks. Afterwards every task
//! finishes, and no result is lost or applied twice.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

/// The shared throwaway-cluster helper, with the client side of this test.
struct OwnCluster(pg_tasker_worker::testing::Cluster);

impl OwnCluster {
    fn start(tag: &str) -> Self {
        OwnCluster(pg_tasker_worker::testing::Cluster::start(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
            tag,
        ))
    }

    fn try_connect(&self) -> Result<Client, postgres::Error> {
        postgres::Config::new()
            .host_path(&self.0.dir)
            .port(self.0.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2))
            .connect(NoTls)
    }

    /// Connects, waiting while the server restarts.
    fn connect(&self) -> Client {
        let start = Instant::now();
        loop {
            match self.try_connect() {
                Ok(c) => return c,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "server did not come back: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn restart_immediate(&self) {
        self.0.restart_immediate();
    }
}

fn complete_count(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'crash' AND state = 'complete'",
        &[],
    )
    .map(|r| r.get(0))
    .unwrap_or(-1)
}

fn wait_until(cluster: &OwnCluster, what: &str, limit: Duration, f: impl Fn(&mut Client) -> bool) {
    let start = Instant::now();
    let mut c = cluster.connect();
    loop {
        let ok =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut c))).unwrap_or(false);
        if ok {
            return;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
        if c.is_closed() || c.simple_query("SELECT 1").is_err() {
            c = cluster.connect();
        }
    }
}

/// One worker: reads, answers, and reconnects whenever the server goes away.
fn worker(cluster: Arc<OwnCluster>, stop: Arc<AtomicBool>, submitted: Arc<AtomicUsize>) {
    let mut conn: Option<Client> = None;
    while !stop.load(Ordering::SeqCst) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match cluster.try_connect() {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let rows = match c.query(
            "SELECT message::text FROM pgmq.read('tasker_crash_queue', 5, 10)",
            &[],
        ) {
            Ok(r) => r,
            Err(_) => {
                conn = None;
                continue;
            }
        };
        if rows.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        for r in rows {
            let msg: Value = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
            let task = msg["task_uuid"].as_str().unwrap().to_string();
            // every fourth task's step b fails once and asks for 1 s: the
            // orchestrator must bring it back
            let flaky = msg["step_name"] == "b"
                && msg["attempt"] == 1
                && task.ends_with(['0', '4', '8', 'c']);
            let (status, result, error) = if flaky {
                (
                    "failure",
                    None,
                    Some(json!({"message": "flaky", "retry_after_seconds": 1}).to_string()),
                )
            } else {
                (
                    "success",
                    Some(
                        json!({"task": task, "step": msg["step_name"], "attempt": msg["attempt"]})
                            .to_string(),
                    ),
                    None,
                )
            };
            let res = c.query_one(
                "SELECT tasker.submit_result($1::text::uuid, $2, $3::text::jsonb, $4::text::jsonb, $5::text::jsonb)",
                &[&msg["step_uuid"].as_str().unwrap(), &status, &result, &error, &json!({"attempt": msg["attempt"]}).to_string()],
            );
            match res {
                Ok(_) => {
                    submitted.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    conn = None;
                    break;
                }
            }
        }
    }
}

#[test]
fn kill_9_of_the_orchestrator_and_an_immediate_restart_lose_nothing() {
    let cluster = Arc::new(OwnCluster::start("crash"));
    {
        let mut c = cluster.connect();
        c.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
            .unwrap();
        super::bgworker::set_system(&mut c, "pg_tasker.environment", Some("test"));
        let step = |n: &str, d: &[&str]| json!({"name": n, "dependencies": d, "handler": {"callable": "T"}, "retry": {"max_attempts": 10, "backoff": "none"}});
        let t = json!({"name": "chain", "namespace_name": "crash", "version": "1.0.0",
                       "steps": [step("a", &[]), step("b", &["a"]), step("c", &["b"])]});
        c.execute(
            "SELECT tasker.register_template($1::text::jsonb)",
            &[&t.to_string()],
        )
        .unwrap();
        c.batch_execute("SELECT tasker.create_task('crash', 'chain') FROM generate_series(1, 200)")
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (cl, st, sub) = (cluster.clone(), stop.clone(), submitted.clone());
            std::thread::spawn(move || worker(cl, st, sub))
        })
        .collect();

    // 1. kill -9 of the orchestrator in mid-flight
    wait_until(
        &cluster,
        "60 tasks complete",
        Duration::from_secs(60),
        |c| complete_count(c) >= 60,
    );
    {
        let mut c = cluster.connect();
        let pid: i32 = c
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_tasker'",
                &[],
            )
            .expect("the orchestrator runs")
            .get(0);
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    // 2. ... and later an immediate restart of the whole server
    wait_until(
        &cluster,
        "130 tasks complete",
        Duration::from_secs(90),
        |c| complete_count(c) >= 130,
    );
    cluster.restart_immediate();
    wait_until(
        &cluster,
        "all 200 tasks complete",
        Duration::from_secs(120),
        |c| complete_count(c) == 200,
    );
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }

    let mut c = cluster.connect();
    // every step completed exactly once, with the result of its own task
    let bad: i64 = c
        .query_one(
            "SELECT count(*) FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
              WHERE t.namespace_name = 'crash'
                AND NOT (s.state = 'complete' AND s.results->>'task' = s.task_uuid::text AND s.results->>'step' = s.name
                         AND (SELECT count(*) FROM tasker.step_transitions st
                               WHERE st.step_uuid = s.step_uuid AND st.to_state = 'complete') = 1)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "a step was lost or completed twice");
    let leftover: i64 = c
        .query_one("SELECT count(*) FROM pgmq.q_tasker_crash_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(leftover, 0, "no message left behind");
    // the flaky steps really were retried by the orchestrator
    let retried: i64 = c
        .query_one("SELECT count(*) FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid) WHERE t.namespace_name = 'crash' AND s.name = 'b' AND s.attempts = 2", &[])
        .unwrap()
        .get(0);
    assert!(retried > 0, "some steps went through a retry");
    assert!(submitted.load(Ordering::SeqCst) >= 600);
    // the orchestrator came back after both crashes
    let running: bool = c
        .query_one("SELECT running FROM tasker.orchestrator_status", &[])
        .unwrap()
        .get(0);
    assert!(running);
}
