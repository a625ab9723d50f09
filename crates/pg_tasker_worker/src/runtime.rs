//! The worker runtime: the batched protocol (`tasker.exchange`), wakeups,
//! concurrency, leases, transactional handlers, shutdown.
//!
//! One loop owns the exchange connection. Each turn it sends the results
//! finished since the last turn and asks for as many messages as there are
//! free handler slots (at most `batch_size`): one round trip, one commit.
//! With nothing to do it registers as idle (`tasker.worker_idle`) and waits
//! for a NOTIFY on its namespaces' channels, a finished handler, or
//! `poll_interval` (the fallback when a notification is missed).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_tasker_core::config::WorkerConfig;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify, RwLock, Semaphore};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::handler::{Handler, Outcome, Registry, StepContext, StepMessage, Tx};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub database_url: String,
    pub namespaces: Vec<String>,
    pub worker_id: String,
    /// Messages asked for per exchange, at most.
    pub batch_size: u32,
    /// Handlers running at the same time.
    pub concurrency: u32,
    /// Longest wait for work without a notification (the fallback poll).
    pub poll_interval: Duration,
    /// Lease on a message; extended every half lease while its handler runs.
    pub visibility_timeout: Duration,
    /// On shutdown, how long in-flight handlers may take before their
    /// messages are released for other workers.
    pub shutdown_timeout: Duration,
}

impl WorkerOptions {
    /// Options from the `worker` context of the configuration.
    pub fn from_config(cfg: &WorkerConfig) -> Self {
        let w = &cfg.worker;
        WorkerOptions {
            database_url: cfg.database.url.clone(),
            namespaces: w.namespaces.clone(),
            worker_id: default_worker_id(),
            batch_size: w.batch_size,
            concurrency: w.concurrency,
            poll_interval: Duration::from_millis(w.poll_interval_ms),
            visibility_timeout: Duration::from_secs(w.visibility_timeout_seconds as u64),
            shutdown_timeout: Duration::from_secs(w.shutdown_timeout_seconds as u64),
        }
    }

    /// The compiled-in worker defaults, with a database and namespaces.
    pub fn new(database_url: impl Into<String>, namespaces: Vec<String>) -> Self {
        let cfg = pg_tasker_core::config::load_worker(
            &pg_tasker_core::config::Location::Embedded,
            "development",
            &|_| None,
        )
        .expect("compiled-in worker configuration is valid");
        WorkerOptions {
            database_url: database_url.into(),
            namespaces,
            ..Self::from_config(&cfg.config)
        }
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!(
        "{}-{}",
        host.trim().chars().take(32).collect::<String>(),
        std::process::id()
    )
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub processed: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Messages handed back at shutdown (visible again at once).
    pub released: u64,
    pub reconnects: u64,
    /// Results the database ignored (late, duplicate, stale attempt) or
    /// rejected.
    pub ignored: u64,
    /// Exchanges (round trips that submitted and/or read).
    pub exchanges: u64,
    /// Wakeups by NOTIFY.
    pub notified: u64,
}

fn log(msg: impl AsRef<str>) {
    use std::io::Write;
    // (never panics: a closed stderr loses the line, not the worker)
    let _ = writeln!(std::io::stderr(), "[pg-tasker-worker] {}", msg.as_ref());
}

/// Opens a connection whose notifications set `wake` and whose notices are
/// logged.
async fn connect(
    cfg: &tokio_postgres::Config,
    wake: Option<Arc<Notify>>,
) -> Result<Client, tokio_postgres::Error> {
    let (client, mut connection) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if let Some(w) = &wake {
                        w.notify_one();
                    }
                }
                Some(Ok(AsyncMessage::Notice(n))) => log(n.message()),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    log(format!("connection lost: {e}"));
                    break;
                }
                None => break,
            }
        }
    });
    Ok(client)
}

/// A connection that is re-established when it breaks.
struct Db {
    cfg: tokio_postgres::Config,
    client: RwLock<Option<Arc<Client>>>,
    stats: Arc<Mutex<Stats>>,
    /// Set by notifications on this connection.
    wake: Arc<Notify>,
}

impl Db {
    fn new(cfg: tokio_postgres::Config, stats: Arc<Mutex<Stats>>) -> Db {
        Db {
            cfg,
            client: RwLock::new(None),
            stats,
            wake: Arc::new(Notify::new()),
        }
    }

    /// The live connection and whether it is a new one.
    async fn get(&self) -> (Arc<Client>, bool) {
        if let Some(c) = self.client.read().await.as_ref().filter(|c| !c.is_closed()) {
            return (c.clone(), false);
        }
        let mut slot = self.client.write().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return (c.clone(), false);
        }
        let mut wait = Duration::from_millis(100);
        loop {
            match connect(&self.cfg, Some(self.wake.clone())).await {
                Ok(client) => {
                    let client = Arc::new(client);
                    if slot.is_some() {
                        self.stats.lock().unwrap().reconnects += 1;
                        log("reconnected");
                    }
                    *slot = Some(client.clone());
                    return (client, true);
                }
                Err(e) => {
                    log(format!("cannot connect ({e}); retrying in {wait:?}"));
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Connections for transactional handlers, one per handler at a time.
struct TxPool {
    cfg: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
}

impl TxPool {
    async fn take(&self) -> Result<Client, tokio_postgres::Error> {
        loop {
            let c = self.idle.lock().unwrap().pop();
            match c {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => return connect(&self.cfg, None).await,
            }
        }
    }

    fn give_back(&self, c: Client) {
        if !c.is_closed() {
            self.idle.lock().unwrap().push(c);
        }
    }
}

/// A finished attempt, as tasker.exchange takes it.
fn result_json(ctx_step: &str, outcome: &Outcome, metadata: Value) -> Value {
    let (status, result, error) = outcome.to_submission();
    let mut r = json!({"step_uuid": ctx_step, "status": status, "metadata": metadata});
    if let Some(v) = result {
        r["result"] = v;
    }
    if let Some(v) = error {
        r["error"] = v;
    }
    r
}

struct Shared {
    options: WorkerOptions,
    registry: Registry,
    stats: Arc<Mutex<Stats>>,
    db: Db,
    txs: TxPool,
    results: mpsc::UnboundedSender<(Value, bool)>,
    /// A handler finished: the loop may have results to send.
    finished: Notify,
}

/// Runs until `shutdown` completes: exchanges results for messages, runs
/// handlers concurrently. Connection errors are retried, never fatal. At
/// shutdown, in-flight handlers get `shutdown_timeout` to finish and their
/// results are sent; the messages of those that do not finish are released.
pub async fn run(
    options: WorkerOptions,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<Stats, String> {
    if options.namespaces.is_empty() {
        return Err("no namespace to serve".into());
    }
    let queues: HashMap<String, String> = options
        .namespaces
        .iter()
        .map(|ns| {
            pg_tasker_core::naming::queue_name(ns)
                .map(|q| (ns.clone(), q))
                .map_err(|e| e.message)
        })
        .collect::<Result<_, _>>()?;
    // where, and whether this worker can serve at all: misconfiguration
    // ends it here with the cause; an unreachable server is waited for
    let db_config = crate::connection::database_config(&options.database_url)?;
    log(format!(
        "worker {} connecting to {}",
        options.worker_id,
        crate::connection::describe(&db_config)
    ));
    tokio::pin!(shutdown);
    tokio::select! {
        checked = crate::connection::check_startup(&db_config, &options.namespaces, &|m| log(m)) => checked?,
        _ = &mut shutdown => return Ok(Stats::default()),
    }
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Value, bool)>();
    let shared = Arc::new(Shared {
        db: Db::new(db_config.clone(), stats.clone()),
        txs: TxPool {
            cfg: db_config.clone(),
            idle: Mutex::new(Vec::new()),
        },
        options,
        registry,
        stats: stats.clone(),
        results: tx,
        finished: Notify::new(),
    });
    let options = &shared.options;
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1) as usize));
    let in_flight: Arc<Mutex<HashMap<i64, String>>> = Arc::default();
    log(format!(
        "worker {} serving {:?} (concurrency {}, batch {}, lease {:?})",
        options.worker_id,
        options.namespaces,
        options.concurrency,
        options.batch_size,
        options.visibility_timeout
    ));

    let mut pending: Vec<(Value, bool)> = Vec::new();
    let mut idle = false;
    let mut listening = false;
    'exchange: loop {
        while let Ok(r) = rx.try_recv() {
            pending.push(r);
        }
        let free = permits.available_permits().min(options.batch_size as usize);
        if pending.is_empty() && free == 0 {
            tokio::select! {
                _ = &mut shutdown => break 'exchange,
                _ = shared.finished.notified() => {}
            }
            continue;
        }
        let (client, fresh) = tokio::select! {
            _ = &mut shutdown => break 'exchange,
            c = shared.db.get() => c,
        };
        if fresh {
            listening = false;
            idle = false;
        }
        let results = Value::from(pending.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>());
        let rows = client
            .query(
                "SELECT namespace, msg_id, read_ct, message::text
                   FROM tasker.exchange($1, $2, $3::text::jsonb, $4, $5)",
                &[
                    &options.namespaces,
                    &options.worker_id,
                    &results.to_string(),
                    &(free as i32),
                    &(options.visibility_timeout.as_secs().max(1) as i32),
                ],
            )
            .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) if e.as_db_error().is_some() => {
                // refused as a whole (e.g. an unknown namespace): retrying
                // the same call would fail again
                log(format!("exchange refused: {e}"));
                tokio::select! {
                    _ = &mut shutdown => break 'exchange,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            Err(e) => {
                log(format!("exchange failed: {e}; retrying"));
                tokio::select! {
                    _ = &mut shutdown => break 'exchange,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
        };
        {
            let mut s = stats.lock().unwrap();
            s.exchanges += 1;
            for (_, ok) in pending.drain(..) {
                s.processed += 1;
                if ok {
                    s.succeeded += 1;
                } else {
                    s.failed += 1;
                }
            }
        }
        let got = rows.len();
        for row in rows {
            let ns: String = row.get(0);
            let msg_id: i64 = row.get(1);
            let read_ct: i32 = row.get(2);
            let text: &str = row.get(3);
            let message: StepMessage = match serde_json::from_str(text) {
                Ok(m) => m,
                Err(e) => {
                    log(format!("unreadable message {msg_id} in {ns}: {e}; leaving it for its lease to expire"));
                    continue;
                }
            };
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let queue = queues.get(&ns).cloned().unwrap_or_default();
            in_flight.lock().unwrap().insert(msg_id, queue);
            let ctx = StepContext {
                message,
                msg_id,
                read_ct,
                worker_id: options.worker_id.clone(),
            };
            let (shared, in_flight) = (shared.clone(), in_flight.clone());
            tokio::spawn(async move {
                process(&shared, ctx).await;
                in_flight.lock().unwrap().remove(&msg_id);
                drop(permit);
                shared.finished.notify_one();
            });
        }
        if got > 0 || !rx.is_empty() {
            if idle {
                idle = false;
                let _ = client
                    .execute(
                        "SELECT tasker.worker_idle($1, $2, false)",
                        &[&options.namespaces, &options.worker_id],
                    )
                    .await;
            }
            continue;
        }
        if free == 0 {
            // busy: results went out, wait for a slot
            continue;
        }
        if !idle {
            // nothing to do: register, listen, and look once more (a
            // message sent before the registration would not be notified)
            if !listening {
                let mut sql = String::new();
                for ns in &options.namespaces {
                    let ch: String = match client
                        .query_one("SELECT tasker.wake_channel($1)", &[ns])
                        .await
                    {
                        Ok(r) => r.get(0),
                        Err(e) => {
                            log(format!("no wake channel for {ns}: {e}"));
                            continue;
                        }
                    };
                    sql.push_str(&format!("LISTEN \"{}\";", ch.replace('"', "\"\"")));
                }
                match client.batch_execute(&sql).await {
                    Ok(()) => listening = true,
                    Err(e) => log(format!(
                        "cannot LISTEN ({e}); polling every {:?}",
                        options.poll_interval
                    )),
                }
            }
            match client
                .execute(
                    "SELECT tasker.worker_idle($1, $2, true)",
                    &[&options.namespaces, &options.worker_id],
                )
                .await
            {
                Ok(_) => idle = true,
                Err(e) => {
                    log(format!("could not register as idle ({e}); polling"));
                    tokio::select! {
                        _ = &mut shutdown => break 'exchange,
                        _ = shared.finished.notified() => {}
                        _ = tokio::time::sleep(options.poll_interval) => {}
                    }
                }
            }
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => break 'exchange,
            _ = shared.db.wake.notified() => stats.lock().unwrap().notified += 1,
            _ = shared.finished.notified() => {}
            _ = tokio::time::sleep(options.poll_interval) => {}
        }
    }

    // graceful shutdown: let handlers finish, send their results
    log("shutting down: finishing in-flight steps");
    let all = options.concurrency.max(1);
    let finished = tokio::time::timeout(options.shutdown_timeout, permits.acquire_many(all))
        .await
        .is_ok();
    while let Ok(r) = rx.try_recv() {
        pending.push(r);
    }
    let (client, _) = shared.db.get().await;
    if !pending.is_empty() {
        let results = Value::from(pending.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>());
        match client
            .query(
                "SELECT outcome FROM tasker.submit_results($1::text::jsonb)",
                &[&results.to_string()],
            )
            .await
        {
            Ok(rows) => {
                let mut s = stats.lock().unwrap();
                for (row, (_, ok)) in rows.iter().zip(&pending) {
                    s.processed += 1;
                    if *ok {
                        s.succeeded += 1;
                    } else {
                        s.failed += 1;
                    }
                    if row.get::<_, &str>(0) != "applied" {
                        s.ignored += 1;
                    }
                }
            }
            Err(e) => log(format!("could not submit the last results: {e}")),
        }
    }
    let _ = client
        .execute(
            "SELECT tasker.worker_idle($1, $2, false)",
            &[&options.namespaces, &options.worker_id],
        )
        .await;
    if !finished {
        let left: Vec<(i64, String)> = in_flight
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (msg_id, queue) in left {
            // visible again now: another worker takes it
            match client
                .execute(
                    "SELECT pgmq.set_vt($1::text, $2::bigint, 0)",
                    &[&queue, &msg_id],
                )
                .await
            {
                Ok(_) => stats.lock().unwrap().released += 1,
                Err(e) => log(format!(
                    "could not release message {msg_id} of {queue}: {e}"
                )),
            }
        }
    }
    let s = stats.lock().unwrap().clone();
    log(format!("stopped: {s:?}"));
    Ok(s)
}

/// Runs one attempt: keeps its lease, runs its handler with the step's
/// timeout, and hands the result to the exchange loop (a transactional
/// handler's success is submitted in the handler's own transaction).
async fn process(shared: &Arc<Shared>, ctx: StepContext) {
    let options = &shared.options;
    let started = Instant::now();
    let msg_id = ctx.msg_id;
    let step_uuid = ctx.message.step_uuid.clone();
    let attempt = ctx.message.attempt;
    let callable = ctx.message.handler.callable.clone();
    let timeout = ctx.message.timeout_seconds.map(Duration::from_secs);

    // keep the lease while the handler runs (tasker.extend_lease: for this
    // attempt only, never beyond the step's timeout_seconds)
    let lease = {
        let (step, vt, shared) = (
            step_uuid.clone(),
            options.visibility_timeout,
            shared.clone(),
        );
        tokio::spawn(async move {
            let every = (vt / 2).max(Duration::from_millis(500));
            loop {
                tokio::time::sleep(every).await;
                // the live connection each time: a reconnect does not end
                // the lease
                let (client, _) = shared.db.get().await;
                let extended = client
                    .execute(
                        "SELECT tasker.extend_lease($1::text::uuid, $2::integer, $3::integer)",
                        &[&step, &(attempt as i32), &(vt.as_secs().max(1) as i32)],
                    )
                    .await;
                if let Err(e) = extended {
                    log(format!(
                        "could not extend the lease of message {msg_id}: {e}"
                    ));
                }
            }
        })
    };
    let metadata = |outcome: &Outcome| {
        let mut m = json!({
            "attempt": attempt,
            "worker_id": options.worker_id,
            "execution_time_ms": started.elapsed().as_secs_f64() * 1000.0,
        });
        if let Outcome::Success {
            metadata: extra, ..
        } = outcome
        {
            if extra.as_object().is_some_and(|x| !x.is_empty()) {
                m["handler"] = extra.clone();
            }
        }
        m
    };
    let guarded = |run: tokio::task::JoinHandle<Outcome>| async move {
        // its own task, so that a panic becomes a failure, not a crash
        let joined = match timeout {
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(j) => j,
                Err(_) => Ok(Outcome::retryable(format!(
                    "step timed out after {}s",
                    t.as_secs()
                ))),
            },
            None => run.await,
        };
        joined.unwrap_or_else(|e| Outcome::retryable(format!("handler panicked: {e}")))
    };

    let outcome = match shared.registry.get(&callable) {
        None => {
            log(format!(
                "NO HANDLER for callable \"{callable}\" (step {} of task {}, namespace {}): failing the step permanently (UNKNOWN_HANDLER); registered: {:?}",
                ctx.message.step_name,
                ctx.message.task_uuid,
                ctx.message.namespace,
                shared.registry.callables().collect::<Vec<_>>()
            ));
            Outcome::permanent(
                format!("no handler registered for callable \"{callable}\""),
                "UNKNOWN_HANDLER",
            )
        }
        Some(Handler::Plain(handler)) => guarded(tokio::spawn(handler.handle(ctx))).await,
        Some(Handler::Transactional(handler)) => {
            match run_in_transaction(shared, &handler, ctx, &guarded, &metadata).await {
                // submitted (or ignored) in the handler's transaction
                None => {
                    lease.abort();
                    shared.finished.notify_one();
                    return;
                }
                Some(o) => o,
            }
        }
    };
    lease.abort();
    let ok = matches!(outcome, Outcome::Success { .. });
    let _ = shared
        .results
        .send((result_json(&step_uuid, &outcome, metadata(&outcome)), ok));
}

/// A transactional handler: BEGIN on a connection of its own, the
/// handler's statements, then — for a success — the result in the same
/// transaction and COMMIT only when the database applied it (an attempt
/// settled by someone else, or a crash before COMMIT, leaves no effect
/// behind). A failure rolls the handler's writes back and is returned, to
/// be reported like any other.
async fn run_in_transaction<G, F>(
    shared: &Shared,
    handler: &Arc<dyn crate::handler::TxStepHandler>,
    ctx: StepContext,
    guarded: &G,
    metadata: &(dyn Fn(&Outcome) -> Value + Sync),
) -> Option<Outcome>
where
    G: Fn(tokio::task::JoinHandle<Outcome>) -> F,
    F: Future<Output = Outcome>,
{
    let step_uuid = ctx.message.step_uuid.clone();
    let client = match shared.txs.take().await {
        Ok(c) => Arc::new(c),
        Err(e) => return Some(Outcome::retryable(format!("no database connection: {e}"))),
    };
    if let Err(e) = client.batch_execute("BEGIN").await {
        return Some(Outcome::retryable(format!(
            "cannot begin a transaction: {e}"
        )));
    }
    let outcome = guarded(tokio::spawn(handler.handle(ctx, Tx::new(client.clone())))).await;
    let give_back = |client: Arc<Client>| {
        if let Ok(c) = Arc::try_unwrap(client) {
            shared.txs.give_back(c);
        }
    };
    if !matches!(outcome, Outcome::Success { .. }) {
        let _ = client.batch_execute("ROLLBACK").await;
        give_back(client);
        return Some(outcome);
    }
    let result = Value::from(vec![result_json(&step_uuid, &outcome, metadata(&outcome))]);
    let applied = client
        .query_one(
            "SELECT outcome, detail FROM tasker.submit_results($1::text::jsonb)",
            &[&result.to_string()],
        )
        .await;
    let commit = match applied {
        Ok(row) if row.get::<_, &str>(0) == "applied" => client.batch_execute("COMMIT").await,
        Ok(row) => {
            log(format!(
                "result for step {step_uuid} not applied ({}); its effects are rolled back",
                row.get::<_, Option<&str>>(1).unwrap_or("")
            ));
            shared.stats.lock().unwrap().ignored += 1;
            let _ = client.batch_execute("ROLLBACK").await;
            give_back(client);
            return None;
        }
        Err(e) => Err(e),
    };
    match commit {
        Ok(()) => {
            let mut s = shared.stats.lock().unwrap();
            s.processed += 1;
            s.succeeded += 1;
            drop(s);
            give_back(client);
            None
        }
        Err(e) => {
            // not committed: nothing happened; the lease expires and the
            // step is delivered again
            log(format!("transaction of step {step_uuid} failed: {e}"));
            let _ = client.batch_execute("ROLLBACK").await;
            None
        }
    }
}
