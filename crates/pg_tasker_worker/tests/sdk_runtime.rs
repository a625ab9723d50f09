//! The SDK runtime in-process against a throwaway cluster: transactional
//! handlers commit their writes exactly once (a crash before COMMIT leaves
//! nothing, a duplicate attempt is rolled back), and idle workers are woken
//! by NOTIFY instead of polling.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod common;
use common::task_state;
use pg_tasker_worker::testing::Cluster;
use pg_tasker_worker::{Outcome, Registry, StepContext, Tx, WorkerOptions};
use postgres::{Client, NoTls};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn setup(tag: &str) -> (Cluster, Client) {
    let cluster = Cluster::start(&repo(), tag);
    let mut db = Client::connect(&cluster.url(), NoTls).expect("connect");
    db.batch_execute(
        "CREATE EXTENSION pg_tasker CASCADE;
         CREATE TABLE effects (step_uuid uuid, attempt int, read_ct int);",
    )
    .unwrap();
    let t = json!({"name": "flow", "namespace_name": "txn", "version": "1.0.0",
                   "steps": [{"name": "a", "handler": {"callable": "Effect"}},
                             {"name": "b", "dependencies": ["a"], "handler": {"callable": "Effect"}}]});
    db.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
    (cluster, db)
}

fn options(cluster: &Cluster, poll: Duration, vt: Duration) -> WorkerOptions {
    let mut o = WorkerOptions::new(cluster.url(), vec!["txn".into()]);
    o.poll_interval = poll;
    o.visibility_timeout = vt;
    o.shutdown_timeout = Duration::from_secs(2);
    o.worker_id = format!("w-{}", std::process::id());
    o
}

/// `options` for `n` handlers at once, reading up to `n` per exchange.
fn busy_options(cluster: &Cluster, vt: Duration, n: u32) -> WorkerOptions {
    let mut o = options(cluster, Duration::from_millis(200), vt);
    o.concurrency = n;
    o.batch_size = n;
    o
}

fn create(db: &mut Client, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            db.query_one("SELECT tasker.create_task('txn', 'flow')::text", &[])
                .unwrap()
                .get(0)
        })
        .collect()
}

fn count(db: &mut Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).unwrap().get(0)
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn record(step: &StepContext, tx: &Tx) {
    tx.client()
        .execute(
            "INSERT INTO effects VALUES ($1::text::uuid, $2, $3)",
            &[
                &step.message.step_uuid,
                &(step.message.attempt as i32),
                &step.read_ct,
            ],
        )
        .await
        .unwrap();
}

/// Holds handlers until the test opens it: a handler calls `pass` (or just
/// `arrive`), the test waits for the arrival, does what it must meanwhile,
/// then opens the gate.
#[derive(Clone)]
struct Gate {
    arrived: Arc<std::sync::Mutex<mpsc::Sender<()>>>,
    open: tokio::sync::watch::Receiver<bool>,
}

struct GateControl {
    arrived: mpsc::Receiver<()>,
    open: tokio::sync::watch::Sender<bool>,
}

fn gate() -> (Gate, GateControl) {
    let (arrived_tx, arrived) = mpsc::channel();
    let (open_tx, open) = tokio::sync::watch::channel(false);
    (
        Gate {
            arrived: Arc::new(std::sync::Mutex::new(arrived_tx)),
            open,
        },
        GateControl {
            arrived,
            open: open_tx,
        },
    )
}

impl Gate {
    fn arrive(&self) {
        let _ = self.arrived.lock().unwrap().send(());
    }

    async fn pass(&self) {
        self.arrive();
        let mut open = self.open.clone();
        while !*open.borrow() {
            open.changed().await.unwrap();
        }
    }
}

impl GateControl {
    fn wait_arrival(&self) {
        self.arrived.recv_timeout(Duration::from_secs(20)).unwrap();
    }

    fn open(&self) {
        self.open.send(true).unwrap();
    }
}

/// Runs a worker on a runtime of its own, on a thread; `stop` ends it
/// gracefully, dropping the returned runtime handle kills it (its
/// connections close without COMMIT, as in a crash).
struct Running {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: mpsc::Receiver<pg_tasker_worker::Stats>,
}

fn start(options: WorkerOptions, registry: Registry) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = mpsc::channel();
    runtime.spawn(async move {
        let stats = pg_tasker_worker::run(options, registry, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        let _ = done_tx.send(stats);
    });
    Running {
        runtime: Some(runtime),
        stop: Some(stop),
        done,
    }
}

impl Running {
    fn stop(mut self) -> pg_tasker_worker::Stats {
        let _ = self.stop.take().unwrap().send(());
        let stats = self.done.recv_timeout(Duration::from_secs(20)).unwrap();
        self.runtime
            .take()
            .unwrap()
            .shutdown_timeout(Duration::from_secs(2));
        stats
    }

    fn crash(mut self) {
        self.runtime.take().unwrap().shutdown_background();
    }
}

#[test]
fn transactional_handlers_commit_their_writes_exactly_once() {
    let (cluster, mut db) = setup("sdk_tx");
    let tasks = create(&mut db, 3);

    // 1. a worker that crashes after its handlers wrote, before COMMIT
    let (wrote_tx, wrote) = mpsc::channel::<()>();
    let wrote_tx = Arc::new(std::sync::Mutex::new(wrote_tx));
    let mut registry = Registry::new();
    registry.register_transactional("Effect", move |step: StepContext, tx: Tx| {
        let wrote_tx = wrote_tx.clone();
        async move {
            record(&step, &tx).await;
            let _ = wrote_tx.lock().unwrap().send(());
            // the crash point: never returns
            std::future::pending::<()>().await;
            Outcome::success(json!({}))
        }
    });
    let first = start(
        options(&cluster, Duration::from_millis(50), Duration::from_secs(2)),
        registry,
    );
    for _ in 0..3 {
        wrote.recv_timeout(Duration::from_secs(20)).unwrap();
    }
    first.crash();
    // nothing of the crashed attempts is left
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&mut db, "SELECT count(*) FROM effects"), 0);

    // 2. a healthy worker: the messages come back after their lease, each
    // step's effect commits once, with its result
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register_transactional("Effect", move |step: StepContext, tx: Tx| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            record(&step, &tx).await;
            Outcome::success(json!({"done": step.message.step_name}))
        }
    });
    let second = start(
        options(&cluster, Duration::from_millis(50), Duration::from_secs(2)),
        registry,
    );
    wait_until("every task complete", Duration::from_secs(30), || {
        count(
            &mut db,
            "SELECT count(*) FROM tasker.tasks WHERE state = 'complete'",
        ) == 3
    });
    // after the commit, never again: wait past a lease
    std::thread::sleep(Duration::from_millis(2500));
    let stats = second.stop();
    assert_eq!(runs.load(Ordering::SeqCst), 6, "{stats:?}");
    assert_eq!(count(&mut db, "SELECT count(*) FROM effects"), 6);
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM (SELECT step_uuid FROM effects GROUP BY 1 HAVING count(*) > 1) d"
        ),
        0
    );
    // the a steps ran again after the crash (second delivery of attempt 1)
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM effects e JOIN tasker.workflow_steps s USING (step_uuid)
              WHERE s.name = 'a' AND e.attempt = 1 AND e.read_ct = 2"
        ),
        3
    );
    assert_eq!(
        count(&mut db, "SELECT count(*) FROM pgmq.q_tasker_txn_queue"),
        0
    );
    drop(tasks);
}

#[test]
fn a_duplicate_transactional_attempt_is_rolled_back() {
    let (cluster, mut db) = setup("sdk_dup");
    create(&mut db, 1);
    // the first delivery blocks until the test lets it go
    let (gate, control) = gate();
    let mut registry = Registry::new();
    registry.register_transactional("Effect", move |step: StepContext, tx: Tx| {
        let gate = gate.clone();
        async move {
            record(&step, &tx).await;
            if step.read_ct == 1 {
                gate.pass().await;
            }
            Outcome::success(json!({"read_ct": step.read_ct}))
        }
    });
    let slow = start(
        options(&cluster, Duration::from_millis(50), Duration::from_secs(30)),
        registry.clone(),
    );
    control.wait_arrival();
    // its lease ends early (as if it had stalled): another worker takes
    // the message and settles the step
    db.batch_execute("UPDATE pgmq.q_tasker_txn_queue SET vt = now()")
        .unwrap();
    let fast = start(
        options(&cluster, Duration::from_millis(50), Duration::from_secs(30)),
        registry,
    );
    wait_until(
        "step a settled by the second worker",
        Duration::from_secs(20),
        || {
            count(
            &mut db,
            "SELECT count(*) FROM tasker.workflow_steps WHERE name = 'a' AND state = 'complete'",
        ) == 1
        },
    );
    // the first one finishes now: its result is stale, its effect rolled back
    control.open();
    wait_until("the task complete", Duration::from_secs(20), || {
        count(
            &mut db,
            "SELECT count(*) FROM tasker.tasks WHERE state = 'complete'",
        ) == 1
    });
    let s1 = slow.stop();
    let s2 = fast.stop();
    assert_eq!(s1.ignored + s2.ignored, 1, "{s1:?} {s2:?}");
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM effects e JOIN tasker.workflow_steps s USING (step_uuid) WHERE s.name = 'a'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut db,
            "SELECT (results->>'read_ct')::bigint FROM tasker.workflow_steps WHERE name = 'a'"
        ),
        2
    );
}

#[test]
fn idle_workers_are_woken_by_notify_not_by_polling() {
    let (cluster, mut db) = setup("sdk_wake");
    let mut registry = Registry::new();
    registry.register("Effect", |_step: StepContext| async move {
        Outcome::success(json!({}))
    });
    // the fallback poll is far longer than the test waits
    let worker = start(
        options(&cluster, Duration::from_secs(60), Duration::from_secs(30)),
        registry,
    );
    wait_until(
        "the worker registered as idle",
        Duration::from_secs(20),
        || count(&mut db, "SELECT count(*) FROM tasker.worker_waits") == 1,
    );
    let started = Instant::now();
    create(&mut db, 1);
    wait_until("the task complete", Duration::from_secs(10), || {
        count(
            &mut db,
            "SELECT count(*) FROM tasker.tasks WHERE state = 'complete'",
        ) == 1
    });
    let took = started.elapsed();
    let stats = worker.stop();
    assert!(took < Duration::from_secs(5), "took {took:?}: {stats:?}");
    assert!(stats.notified >= 1, "{stats:?}");
    // a stopped worker is no longer registered
    assert_eq!(
        count(&mut db, "SELECT count(*) FROM tasker.worker_waits"),
        0
    );
}

/// Idle cost, test-visible: three idle workers with the default fallback
/// poll (5 s) make a read, register, read once more, then one exchange per
/// poll — not one per millisecond.
#[test]
fn idle_workers_stay_quiet() {
    let (cluster, _db) = setup("sdk_quiet");
    let mut registry = Registry::new();
    registry.register("Effect", |_step: StepContext| async move {
        Outcome::success(json!({}))
    });
    let workers: Vec<Running> = (0..3)
        .map(|i| {
            let mut o = WorkerOptions::new(cluster.url(), vec!["txn".into()]);
            o.worker_id = format!("quiet-{i}");
            assert_eq!(o.poll_interval, Duration::from_secs(5));
            start(o, registry.clone())
        })
        .collect();
    std::thread::sleep(Duration::from_secs(8));
    let stats: Vec<pg_tasker_worker::Stats> = workers.into_iter().map(Running::stop).collect();
    let exchanges: u64 = stats.iter().map(|s| s.exchanges).sum();
    assert!(exchanges >= 6, "{stats:?}");
    assert!(exchanges <= 12, "{stats:?}");
}

/// Invocations of a handler, per step.
#[derive(Clone, Default)]
struct Invocations(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl Invocations {
    fn record(&self, step: &StepContext) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(step.message.step_uuid.clone())
            .or_default() += 1;
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }

    /// Steps run more than once, with their counts.
    fn repeated(&self) -> Vec<(String, usize)> {
        let mut r: Vec<(String, usize)> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, n)| (s.clone(), *n))
            .collect();
        r.sort();
        r
    }
}

fn complete_tasks(db: &mut Client) -> i64 {
    count(
        db,
        "SELECT count(*) FROM tasker.tasks WHERE state = 'complete'",
    )
}

#[test]
fn a_blocked_statement_does_not_stall_the_other_handlers() {
    let (cluster, mut db) = setup("sdk_blocked");
    let blocked = create(&mut db, 1).remove(0);
    // the first step of `blocked` waits until the test has locked its task
    let (gate, control) = gate();
    let runs = Invocations::default();
    let mut registry = Registry::new();
    let (b, r) = (blocked.clone(), runs.clone());
    registry.register("Effect", move |step: StepContext| {
        let (gate, b, r) = (gate.clone(), b.clone(), r.clone());
        async move {
            r.record(&step);
            if step.message.task_uuid == b && step.message.step_name == "a" {
                gate.pass().await;
            }
            Outcome::success(json!({}))
        }
    });
    let o = busy_options(&cluster, Duration::from_secs(30), 4);
    let worker = start(o, registry);
    control.wait_arrival();
    // an operator's transaction holds the task: the result of its step waits
    let mut operator = Client::connect(&cluster.url(), NoTls).unwrap();
    let mut lock = operator.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM tasker.tasks WHERE task_uuid = $1::text::uuid FOR UPDATE",
        &[&blocked],
    )
    .unwrap();
    control.open();
    wait_until(
        "the worker's result waiting on the lock",
        Duration::from_secs(10),
        || {
            count(
                &mut db,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'pg-tasker-worker' AND wait_event_type = 'Lock'",
            ) >= 1
        },
    );
    // other tasks go on meanwhile
    create(&mut db, 5);
    wait_until(
        "the other tasks complete while one is locked",
        Duration::from_secs(20),
        || complete_tasks(&mut db) == 5,
    );
    assert_eq!(task_state(&mut db, &blocked), "steps_in_process");
    lock.rollback().unwrap();
    wait_until("the locked task complete", Duration::from_secs(20), || {
        complete_tasks(&mut db) == 6
    });
    let stats = worker.stop();
    assert_eq!(runs.total(), 12, "{stats:?}");
    assert_eq!(runs.repeated(), vec![], "{stats:?}");
}

#[test]
fn a_timed_out_handler_is_cancelled_and_its_step_retried() {
    let (cluster, mut db) = setup("sdk_timeout");
    let t = json!({"name": "slow", "namespace_name": "txn", "version": "1.0.0",
                   "steps": [{"name": "s", "handler": {"callable": "Slow"}, "timeout_seconds": 1,
                              "retry": {"max_attempts": 3, "backoff": "linear", "backoff_base_ms": 10}}]});
    db.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
    let task: String = db
        .query_one("SELECT tasker.create_task('txn', 'slow')::text", &[])
        .unwrap()
        .get(0);
    let late = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let l = late.clone();
    registry.register("Slow", move |step: StepContext| {
        let l = l.clone();
        async move {
            if step.message.attempt == 1 {
                // far beyond the step's timeout: must be cancelled
                tokio::time::sleep(Duration::from_secs(3)).await;
                l.fetch_add(1, Ordering::SeqCst);
            }
            Outcome::success(json!({"attempt": step.message.attempt}))
        }
    });
    let worker = start(
        options(
            &cluster,
            Duration::from_millis(100),
            Duration::from_secs(30),
        ),
        registry,
    );
    wait_until("the task complete", Duration::from_secs(20), || {
        task_state(&mut db, &task) == "complete"
    });
    // the cancelled attempt never gets to the end of its sleep
    std::thread::sleep(Duration::from_secs(4));
    let stats = worker.stop();
    assert_eq!(late.load(Ordering::SeqCst), 0, "{stats:?}");
    assert_eq!(stats.timed_out, 1, "{stats:?}");
    assert_eq!(
        count(
            &mut db,
            "SELECT (results->>'attempt')::bigint FROM tasker.workflow_steps WHERE name = 's'"
        ),
        2
    );
}

#[test]
fn shutdown_is_bounded_while_the_database_is_down() {
    let (cluster, mut db) = setup("sdk_down");
    create(&mut db, 1);
    let (gate, control) = gate();
    let mut registry = Registry::new();
    registry.register("Effect", move |_step: StepContext| {
        let gate = gate.clone();
        async move {
            gate.arrive();
            tokio::time::sleep(Duration::from_secs(60)).await;
            Outcome::success(json!({}))
        }
    });
    let mut o = options(
        &cluster,
        Duration::from_millis(100),
        Duration::from_secs(30),
    );
    o.shutdown_timeout = Duration::from_secs(3);
    let worker = start(o, registry);
    control.wait_arrival();
    drop(db);
    cluster.stop();
    let asked = Instant::now();
    let stats = worker.stop();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(4500),
        "shutdown took {took:?}: {stats:?}"
    );
    // nothing could be released: the lease will expire instead
    assert_eq!(stats.released, 0, "{stats:?}");
    cluster.start_again();
}

#[test]
fn a_fast_restart_under_load_loses_no_result_and_reruns_no_step() {
    let (cluster, mut db) = setup("sdk_restart");
    const TASKS: usize = 300;
    db.batch_execute(&format!(
        "SELECT tasker.create_task('txn', 'flow') FROM generate_series(1, {TASKS})"
    ))
    .unwrap();
    let runs = Invocations::default();
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register("Effect", move |step: StepContext| {
        let r = r.clone();
        async move {
            r.record(&step);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Outcome::success(json!({}))
        }
    });
    let o = busy_options(&cluster, Duration::from_secs(15), 8);
    let worker = start(o, registry);
    wait_until("load under way", Duration::from_secs(30), || {
        runs.total() >= TASKS / 2
    });
    drop(db);
    cluster.restart_fast();
    let mut db = Client::connect(&cluster.url(), NoTls).unwrap();
    wait_until("every task complete", Duration::from_secs(120), || {
        complete_tasks(&mut db) == TASKS as i64
    });
    let stats = worker.stop();
    assert!(
        stats.retried + stats.reconnects >= 1,
        "the restart went unnoticed: {stats:?}"
    );
    assert_eq!(runs.repeated(), vec![], "{stats:?}");
    assert_eq!(runs.total(), 2 * TASKS, "{stats:?}");
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM tasker.workflow_steps WHERE state = 'complete'"
        ),
        2 * TASKS as i64
    );
}

/// A refusal (here 42501: the worker's role lost tasker_worker mid-run) is
/// not retried forever: the result is tried alone once, then dropped; its
/// lease expires and the step is delivered again once the role may work.
#[test]
fn a_refused_result_is_dropped_and_the_step_delivered_again() {
    let (cluster, mut db) = setup("sdk_refused");
    db.batch_execute("CREATE ROLE refused_worker LOGIN; GRANT tasker_worker TO refused_worker;")
        .unwrap();
    let task = create(&mut db, 1).remove(0);
    let (gate, control) = gate();
    let runs = Invocations::default();
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register("Effect", move |step: StepContext| {
        let (gate, r) = (gate.clone(), r.clone());
        async move {
            r.record(&step);
            if step.read_ct == 1 && step.message.step_name == "a" {
                gate.pass().await;
            }
            Outcome::success(json!({}))
        }
    });
    let mut o = options(&cluster, Duration::from_millis(200), Duration::from_secs(3));
    o.database_url = cluster
        .url()
        .replace("user=postgres", "user=refused_worker");
    let worker = start(o, registry);
    control.wait_arrival();
    db.batch_execute("REVOKE tasker_worker FROM refused_worker")
        .unwrap();
    control.open();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(task_state(&mut db, &task), "steps_in_process");
    db.batch_execute("GRANT tasker_worker TO refused_worker")
        .unwrap();
    wait_until("the task complete", Duration::from_secs(30), || {
        task_state(&mut db, &task) == "complete"
    });
    let stats = worker.stop();
    assert_eq!(stats.dropped, 1, "{stats:?}");
    // step a ran twice (the refused result, then its redelivery), b once
    assert_eq!(runs.total(), 3, "{stats:?}");
}

/// A worker whose role holds `worker` in one namespace only (issue #12)
/// runs that namespace's steps, and is refused at start-up, with the grant
/// it lacks, when asked to serve another.
#[test]
fn a_worker_granted_one_namespace_runs_it_and_is_refused_the_others() {
    let (cluster, mut db) = setup("sdk_tenant");
    let other = json!({"name": "flow", "namespace_name": "other", "version": "1.0.0",
                       "steps": [{"name": "a", "handler": {"callable": "Effect"}}]});
    db.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&other.to_string()],
    )
    .unwrap();
    db.batch_execute(
        "CREATE ROLE txn_worker LOGIN;
         SELECT tasker.grant_namespace('txn', 'txn_worker', 'worker');",
    )
    .unwrap();
    let tasks = create(&mut db, 5);
    let foreign: String = db
        .query_one("SELECT tasker.create_task('other', 'flow')::text", &[])
        .unwrap()
        .get(0);
    let url = cluster.url().replace("user=postgres", "user=txn_worker");
    let runs = Invocations::default();
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register("Effect", move |step: StepContext| {
        let r = r.clone();
        async move {
            r.record(&step);
            Outcome::success(json!({}))
        }
    });
    let mut o = options(
        &cluster,
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    o.database_url = url.clone();
    let worker = start(o, registry);
    wait_until(
        "its namespace's tasks complete",
        Duration::from_secs(30),
        || tasks.iter().all(|t| task_state(&mut db, t) == "complete"),
    );
    let stats = worker.stop();
    assert_eq!(runs.total(), 10, "{stats:?}");
    assert_eq!(task_state(&mut db, &foreign), "steps_in_process");

    // asked to serve "other" too: refused before it reads anything
    let mut o = options(
        &cluster,
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    o.database_url = url;
    o.namespaces = vec!["txn".into(), "other".into()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                pg_tasker_worker::run(o, Registry::new(), std::future::pending::<()>()),
            )
            .await
        })
        .expect("refused at start-up, not run")
        .unwrap_err();
    assert!(
        err.contains("may not work on namespace \"other\"")
            && err.contains("grant_namespace('other', 'txn_worker', 'worker')"),
        "{err}"
    );
    assert_eq!(task_state(&mut db, &foreign), "steps_in_process");
}

/// One HTTP/1.1 GET: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The worker web API (seed 002) of a running worker: /health with its
/// namespace's queue depth and rate, probes that follow the database,
/// /metrics that a Prometheus parser reads.
#[test]
fn the_web_api_reports_health_readiness_and_metrics() {
    let (cluster, mut db) = setup("sdk_web");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut registry = Registry::new();
    registry.register("Effect", |_step: StepContext| async {
        Outcome::success(json!({}))
    });
    let mut o = options(
        &cluster,
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    o.http = Some(addr);
    let worker_id = o.worker_id.clone();
    let worker = start(o, registry);
    let tasks = create(&mut db, 3);
    wait_until("the tasks complete", Duration::from_secs(30), || {
        tasks.iter().all(|t| task_state(&mut db, t) == "complete")
    });

    let (status, body) = http_get(addr, "/health");
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["worker_id"], worker_id.as_str(), "{h}");
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["namespaces"][0]["namespace"], "txn", "{h}");
    assert_eq!(h["namespaces"][0]["queue_depth"], 0, "{h}");
    assert!(
        h["namespaces"][0]["processing_rate_per_second"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{h}"
    );
    assert!(h["namespaces"][0]["last_processed_at_ms"].is_i64(), "{h}");
    assert_eq!(h["active_steps"], 0, "{h}");
    assert_eq!(http_get(addr, "/health/ready").0, 200);
    assert_eq!(http_get(addr, "/health/live").0, 200);
    assert_eq!(http_get(addr, "/nope").0, 404);

    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |metric: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{other:?}"),
            })
    };
    assert_eq!(
        value(
            "pg_tasker_worker_steps_total",
            &[("namespace", "txn"), ("outcome", "success")]
        ),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        value("pg_tasker_worker_in_flight", &[]),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.contains("pg_tasker_worker_handler_duration_seconds_count{namespace=\"txn\"} 6"),
        "{text}"
    );

    // the database goes away: not ready (still alive); back: ready again
    cluster.stop();
    wait_until("not ready", Duration::from_secs(15), || {
        http_get(addr, "/health/ready").0 == 503
    });
    assert_eq!(http_get(addr, "/health/live").0, 200);
    let (_, body) = http_get(addr, "/health");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["status"],
        "degraded"
    );
    cluster.start_again();
    wait_until("ready again", Duration::from_secs(30), || {
        http_get(addr, "/health/ready").0 == 200
    });
    worker.stop();
    // the server ends with the worker
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

/// A task created with a traceparent: its handler runs in a child span of
/// that trace (same trace id, the task's span as parent, a span id of its
/// own) and gets the header for the calls it makes.
#[test]
fn a_handler_continues_the_tasks_trace() {
    let (cluster, mut db) = setup("sdk_trace");
    let task: String = db
        .query_one(
            "SELECT tasker.create_task('txn', 'flow', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')::text",
            &[],
        )
        .unwrap()
        .get(0);
    let untraced = create(&mut db, 1).remove(0);
    let mut registry = Registry::new();
    registry.register("Effect", |step: StepContext| async move {
        Outcome::success(match &step.trace {
            Some(t) => {
                json!({"trace_id": t.trace_id, "parent_id": t.parent_id, "span_id": t.span_id,
                              "traceparent": t.traceparent()})
            }
            None => json!({"trace": null}),
        })
    });
    let worker = start(
        options(
            &cluster,
            Duration::from_millis(200),
            Duration::from_secs(30),
        ),
        registry,
    );
    wait_until("both complete", Duration::from_secs(30), || {
        task_state(&mut db, &task) == "complete" && task_state(&mut db, &untraced) == "complete"
    });
    worker.stop();
    let mut results = |t: &str| -> Vec<serde_json::Value> {
        db.query(
            "SELECT results::text FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid ORDER BY position",
            &[&t],
        )
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
    };
    let traced = results(&task);
    for r in &traced {
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{r}");
        assert_eq!(r["parent_id"], "00f067aa0ba902b7", "{r}");
        let span = r["span_id"].as_str().unwrap();
        assert_ne!(span, "00f067aa0ba902b7");
        assert_eq!(
            r["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")
        );
    }
    assert_ne!(
        traced[0]["span_id"], traced[1]["span_id"],
        "each attempt its own span"
    );
    assert!(results(&untraced).iter().all(|r| r["trace"].is_null()));
}
