//! The worker runtime: the batched protocol (`tasker.exchange`), wakeups,
//! concurrency, leases, transactional handlers, retries, shutdown.
//!
//! One loop decides when to exchange. Each exchange sends the results
//! finished since the last one and asks for as many messages as there are
//! free handler slots (at most `batch_size`): one round trip, one commit.
//! Exchanges run on connections of a small pool: normally one at a time, but
//! when one has been in flight for longer than [`STALLED`] (a result waiting
//! on a lock an operator holds, say) the next goes out beside it, so one
//! blocked statement does not stall the other handlers. Lease extensions
//! have a connection of their own, and so do wakeups (LISTEN,
//! `tasker.worker_idle`). A failed exchange is classified
//! ([`crate::connection::classify`]): transient failures keep their results
//! and are retried with backoff on a fresh connection; a refusal is logged
//! with its SQLSTATE and its results are tried alone once, then dropped
//! (their leases expire and the steps follow their retry policy).
//!
//! With nothing to do the loop registers as idle (`tasker.worker_idle`) and
//! waits for a NOTIFY on its namespaces' channels, a finished handler, or
//! `poll_interval` (the fallback when a notification is missed).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pg_tasker_core::config::WorkerConfig;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify, RwLock, Semaphore};
use tokio::task::AbortHandle;
use tokio_postgres::{AsyncMessage, Client};
use tracing::Instrument;

use crate::connection::{classify_error, explain, next_backoff, ErrorClass};
use crate::handler::{Handler, Outcome, Registry, StepContext, StepMessage, Tx};

/// An exchange in flight for longer than this is taken as blocked: the next
/// one goes out beside it, on another connection.
pub const STALLED: Duration = Duration::from_millis(100);
/// Exchanges in flight at once, at most (never more than `concurrency`).
const MAX_EXCHANGES: usize = 4;

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
    /// Where to serve the worker web API (`/health`, `/health/ready`,
    /// `/health/live`, `/metrics`: [`crate::web`]); None: not served.
    pub http: Option<std::net::SocketAddr>,
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
            http: w
                .web
                .enabled
                .then(|| w.web.bind_address.parse().ok())
                .flatten(),
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
    /// Results the database took (applied, or ignored as late, duplicate or
    /// stale), plus transactional successes committed.
    pub processed: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Messages of unfinished handlers handed back at shutdown (visible
    /// again at once, for another worker).
    pub released: u64,
    /// Connections re-established after one was lost.
    pub reconnects: u64,
    /// Results the database ignored (late, duplicate, stale attempt) or
    /// rejected.
    pub ignored: u64,
    /// Results the database refused for good (logged with the SQLSTATE);
    /// their leases expire and the steps follow their retry policy.
    pub dropped: u64,
    /// Exchanges that failed transiently and were retried.
    pub retried: u64,
    /// Handlers cancelled at their step's `timeout_seconds`.
    pub timed_out: u64,
    /// Exchanges (round trips that submitted and/or read).
    pub exchanges: u64,
    /// Wakeups by NOTIFY.
    pub notified: u64,
}

/// A log line: a `tracing` event (with the step's span, trace id
/// included, when it is about a step) when the program installed a
/// subscriber (the CLI does: text or JSON), else a line on stderr.
fn log(msg: impl AsRef<str>) {
    if tracing::dispatcher::has_been_set() {
        tracing::info!(target: "pg_tasker_worker", "{}", msg.as_ref());
        return;
    }
    use std::io::Write;
    // (never panics: a closed stderr loses the line, not the worker)
    let _ = writeln!(std::io::stderr(), "[pg-tasker-worker] {}", msg.as_ref());
}

/// The span a step attempt runs in: its ids, and its trace when the task
/// has one.
fn step_span(ctx: &StepContext) -> tracing::Span {
    let m = &ctx.message;
    let span = tracing::info_span!(
        "step",
        step_uuid = %m.step_uuid,
        task_uuid = %m.task_uuid,
        namespace = %m.namespace,
        step_name = %m.step_name,
        attempt = m.attempt,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    if let Some(t) = &ctx.trace {
        span.record("trace_id", t.trace_id.as_str());
        span.record("span_id", t.span_id.as_str());
        span.record("parent_span_id", t.parent_id.as_str());
    }
    span
}

/// Opens a connection whose notifications set `wake` and whose notices are
/// logged.
async fn connect(
    cfg: &crate::connection::Database,
    wake: Option<Arc<Notify>>,
) -> Result<Client, tokio_postgres::Error> {
    let (client, mut connection) = cfg.connect().await?;
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

/// One connection that is re-established when it breaks (waiting, with
/// backoff, while the server is unreachable).
struct Db {
    name: &'static str,
    cfg: crate::connection::Database,
    client: RwLock<Option<Arc<Client>>>,
    reconnects: Arc<AtomicU64>,
    /// Set by notifications on this connection.
    wake: Arc<Notify>,
}

impl Db {
    fn new(name: &'static str, cfg: crate::connection::Database, reconnects: Arc<AtomicU64>) -> Db {
        Db {
            name,
            cfg,
            client: RwLock::new(None),
            reconnects,
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
        let mut wait = next_backoff(Duration::ZERO);
        loop {
            match connect(&self.cfg, Some(self.wake.clone())).await {
                Ok(client) => {
                    let client = Arc::new(client);
                    if slot.is_some() {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        log(format!("{} connection re-established", self.name));
                    }
                    *slot = Some(client.clone());
                    return (client, true);
                }
                Err(e) => {
                    log(format!(
                        "{} connection: cannot connect ({}); retrying in {wait:?}",
                        self.name,
                        explain(&e)
                    ));
                    tokio::time::sleep(wait).await;
                    wait = next_backoff(wait);
                }
            }
        }
    }
}

/// A pooled connection, with the exchange statement prepared on it (once
/// per connection, not once per call: one round trip per exchange).
struct Conn {
    client: Client,
    exchange: Option<tokio_postgres::Statement>,
}

const EXCHANGE_SQL: &str = "SELECT namespace, msg_id, read_ct, message::text
   FROM tasker.exchange($1, $2, $3::text::jsonb, $4, $5)";

/// Connections taken one at a time (an exchange, a transactional handler)
/// and given back when still open; opened on demand.
struct Pool {
    cfg: crate::connection::Database,
    idle: Mutex<Vec<Conn>>,
    reconnects: Arc<AtomicU64>,
    /// A connection of this pool was found closed: the next one opened is a
    /// reconnect.
    lost: AtomicBool,
}

impl Pool {
    fn new(cfg: crate::connection::Database, reconnects: Arc<AtomicU64>) -> Pool {
        Pool {
            cfg,
            idle: Mutex::new(Vec::new()),
            reconnects,
            lost: AtomicBool::new(false),
        }
    }

    async fn take(&self) -> Result<Conn, tokio_postgres::Error> {
        loop {
            let c = self.idle.lock().unwrap().pop();
            match c {
                Some(c) if !c.client.is_closed() => return Ok(c),
                Some(_) => self.lost.store(true, Ordering::Relaxed),
                None => {
                    let client = connect(&self.cfg, None).await?;
                    if self.lost.swap(false, Ordering::Relaxed) {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        log("reconnected");
                    }
                    return Ok(Conn {
                        client,
                        exchange: None,
                    });
                }
            }
        }
    }

    fn give_back(&self, c: Conn) {
        if c.client.is_closed() {
            self.lost.store(true, Ordering::Relaxed);
        } else {
            self.idle.lock().unwrap().push(c);
        }
    }
}

/// Aborts a task when dropped (a lease extender outlives nothing).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A finished attempt, waiting to be sent.
#[derive(Debug, Clone)]
struct Finished {
    /// As tasker.exchange takes it.
    json: Value,
    ok: bool,
}

impl Finished {
    fn new(step_uuid: &str, outcome: &Outcome, metadata: Value) -> Finished {
        let (status, result, error) = outcome.to_submission();
        let mut r = json!({"step_uuid": step_uuid, "status": status, "metadata": metadata});
        if let Some(v) = result {
            r["result"] = v;
        }
        if let Some(v) = error {
            r["error"] = v;
        }
        Finished {
            json: r,
            ok: matches!(outcome, Outcome::Success { .. }),
        }
    }
}

fn as_json_array(results: &[Finished]) -> String {
    Value::from(results.iter().map(|r| r.json.clone()).collect::<Vec<_>>()).to_string()
}

/// Messages being handled, by (queue, msg_id): msg ids are per queue, two
/// namespaces share them.
type Running = HashMap<(String, i64), AbortHandle>;

struct Shared {
    options: WorkerOptions,
    registry: Registry,
    stats: Arc<Mutex<Stats>>,
    queues: HashMap<String, String>,
    /// LISTEN, tasker.worker_idle, releases.
    control: Db,
    /// tasker.extend_lease only.
    leases: Db,
    exchanges: Pool,
    txs: Pool,
    results: mpsc::UnboundedSender<Finished>,
    /// What the web API reports.
    telemetry: Arc<crate::telemetry::Telemetry>,
    /// A handler finished: a slot is free.
    finished: Notify,
    running: Mutex<Running>,
    /// Shutdown began: messages read from now on are released, not run.
    stopping: AtomicBool,
}

/// How an exchange ended.
struct Exchanged {
    id: u64,
    asked: usize,
    /// Ok: messages read. Err: why, and how to go on.
    outcome: Result<usize, (ErrorClass, String)>,
    /// Results the database took.
    taken: Vec<Finished>,
    /// Results to send again (the exchange failed transiently).
    again: Vec<Finished>,
}

/// One exchange on a pooled connection: the results, then up to `asked`
/// messages, each started when a handler slot (of `permits`) is free. That
/// is at once, unless this exchange ran beside one taken for blocked whose
/// messages came after all: then a message waits for a slot, under its
/// lease.
async fn exchange(
    shared: Arc<Shared>,
    id: u64,
    results: Vec<Finished>,
    asked: usize,
    permits: Arc<Semaphore>,
) -> Exchanged {
    let o = &shared.options;
    let failed = |results: Vec<Finished>, class, why| Exchanged {
        id,
        asked,
        outcome: Err((class, why)),
        taken: Vec::new(),
        again: results,
    };
    let mut conn = match shared.exchanges.take().await {
        Ok(c) => c,
        Err(e) => {
            let why = format!("cannot connect: {}", explain(&e));
            return failed(results, classify_error(&e), why);
        }
    };
    let body = (!results.is_empty()).then(|| as_json_array(&results));
    let statement = match conn.exchange.take() {
        Some(s) => Ok(s),
        None => conn.client.prepare(EXCHANGE_SQL).await,
    };
    // kept for the next exchange on this connection unless it failed (an
    // upgraded extension may need it prepared again)
    let rows = match statement {
        Ok(statement) => {
            let rows = conn
                .client
                .query(
                    &statement,
                    &[
                        &o.namespaces,
                        &o.worker_id,
                        &body,
                        &(asked as i32),
                        &(o.visibility_timeout.as_secs().max(1) as i32),
                    ],
                )
                .await;
            if rows.is_ok() {
                conn.exchange = Some(statement);
            }
            rows
        }
        Err(e) => Err(e),
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            let class = classify_error(&e);
            let why = explain(&e);
            if class == ErrorClass::Retry || results.is_empty() {
                shared.exchanges.give_back(conn);
                return failed(results, class, why);
            }
            // refused as a whole (e.g. a namespace dropped since start-up):
            // the results alone, once
            let alone = conn
                .client
                .query(
                    "SELECT outcome FROM tasker.submit_results($1::text::jsonb)",
                    &[&body],
                )
                .await;
            shared.exchanges.give_back(conn);
            return match alone {
                Ok(_) => Exchanged {
                    taken: results,
                    ..failed(Vec::new(), class, why)
                },
                Err(e2) if classify_error(&e2) == ErrorClass::Retry => failed(results, class, why),
                Err(e2) => {
                    let steps: Vec<&str> = results
                        .iter()
                        .filter_map(|r| r.json["step_uuid"].as_str())
                        .collect();
                    log(format!(
                        "results refused ({}); dropping the results of steps {steps:?}: their leases expire and they follow their retry policy",
                        explain(&e2)
                    ));
                    shared.stats.lock().unwrap().dropped += results.len() as u64;
                    failed(Vec::new(), class, why)
                }
            };
        }
    };
    shared.exchanges.give_back(conn);
    let got = rows.len();
    for row in rows {
        let ns: String = row.get(0);
        let msg_id: i64 = row.get(1);
        let read_ct: i32 = row.get(2);
        let text: &str = row.get(3);
        let queue = shared.queues.get(&ns).cloned().unwrap_or_default();
        let message: StepMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                log(format!(
                    "unreadable message {msg_id} in {ns}: {e}; leaving it for its lease to expire"
                ));
                continue;
            }
        };
        let permit = permits.clone().acquire_owned().await.ok();
        // (shutdown began: another worker takes it)
        let Some(permit) = permit.filter(|_| !shared.stopping.load(Ordering::SeqCst)) else {
            release(&shared, &queue, msg_id).await;
            continue;
        };
        let trace = message
            .traceparent
            .as_deref()
            .and_then(crate::trace::TraceContext::child_of);
        let checkpoints = {
            let (shared, step, attempt) = (
                shared.clone(),
                message.step_uuid.clone(),
                message.attempt as i32,
            );
            crate::handler::Checkpoints::new(Arc::new(move |checkpoint: Value| {
                let (shared, step) = (shared.clone(), step.clone());
                Box::pin(async move {
                    let (client, _) = shared.leases.get().await;
                    client
                        .query_one(
                            "SELECT tasker.checkpoint($1::text::uuid, $2::text::jsonb, $3::integer)",
                            &[&step, &checkpoint.to_string(), &attempt],
                        )
                        .await
                        .map(|row| row.get::<_, bool>(0))
                        .map_err(|e| explain(&e))
                })
            }))
        };
        let ctx = StepContext {
            message,
            msg_id,
            read_ct,
            worker_id: o.worker_id.clone(),
            trace,
            checkpoints,
        };
        let key = (queue, msg_id);
        let s = shared.clone();
        // (spawned under the lock, so the task's removal comes after the
        // insertion)
        let mut running = shared.running.lock().unwrap();
        let k = key.clone();
        let span = step_span(&ctx);
        let task = tokio::spawn(async move {
            process(&s, ctx).instrument(span).await;
            s.running.lock().unwrap().remove(&k);
            drop(permit);
            s.finished.notify_one();
        });
        running.insert(key, task.abort_handle());
    }
    Exchanged {
        id,
        asked,
        outcome: Ok(got),
        taken: results,
        again: Vec::new(),
    }
}

/// Makes a message visible again at once (another worker takes it).
async fn release(shared: &Shared, queue: &str, msg_id: i64) -> bool {
    let (client, _) = shared.control.get().await;
    match client
        .execute(
            "SELECT pgmq.set_vt($1::text, $2::bigint, 0)",
            &[&queue, &msg_id],
        )
        .await
    {
        Ok(_) => true,
        Err(e) => {
            log(format!(
                "could not release message {msg_id} of {queue}: {}",
                explain(&e)
            ));
            false
        }
    }
}

/// The exchange loop's state.
struct Loop {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    pending: Vec<Finished>,
    /// Exchanges in flight, with their start.
    in_flight: HashMap<u64, Instant>,
    next_id: u64,
    /// Messages may be waiting: ask for them.
    want_read: bool,
    /// The last read found nothing.
    empty_read: bool,
    /// Registered with tasker.worker_idle.
    idle: bool,
    /// Unregister at the next turn (a read found work).
    unregister: bool,
    listening: bool,
    backoff: Duration,
    retry_at: Instant,
    next_poll: Option<Instant>,
}

impl Loop {
    fn on_done(&mut self, d: Exchanged) {
        self.in_flight.remove(&d.id);
        {
            let mut s = self.shared.stats.lock().unwrap();
            for r in &d.taken {
                s.processed += 1;
                if r.ok {
                    s.succeeded += 1;
                } else {
                    s.failed += 1;
                }
            }
        }
        match d.outcome {
            Ok(got) => {
                self.shared.telemetry.set_connected(true);
                self.shared.stats.lock().unwrap().exchanges += 1;
                self.backoff = Duration::ZERO;
                if d.asked > 0 {
                    if got == 0 {
                        self.empty_read = true;
                    } else {
                        self.empty_read = false;
                        self.want_read = true;
                        self.unregister |= self.idle;
                    }
                }
            }
            Err((class, why)) => {
                self.shared
                    .telemetry
                    .set_connected(matches!(class, ErrorClass::Final));
                self.backoff = next_backoff(self.backoff);
                self.retry_at = Instant::now() + self.backoff;
                let kept = d.again.len();
                self.pending.extend(d.again);
                match class {
                    ErrorClass::Retry => {
                        self.shared.stats.lock().unwrap().retried += 1;
                        log(format!(
                            "exchange failed ({why}); {kept} results kept, retrying in {:?}",
                            self.backoff
                        ));
                    }
                    ErrorClass::Final => log(format!(
                        "exchange refused ({why}); trying again in {:?}",
                        self.backoff
                    )),
                }
            }
        }
    }

    /// Starts an exchange when there is something to send or room to read,
    /// no exchange is in flight that is not [`STALLED`], and no backoff is
    /// running. The exchange is polled by the loop itself (no hop to another
    /// task and thread on the way to or from the database).
    fn maybe_start(&mut self) -> Option<impl Future<Output = Exchanged> + Send + 'static> {
        let now = Instant::now();
        if now < self.retry_at
            || self.in_flight.len() >= self.max_exchanges()
            || self.in_flight.values().any(|t| now - *t < STALLED)
        {
            return None;
        }
        // slots promised to exchanges in flight do not count while those
        // are blocked: their messages, if any come, wait for a slot
        let free = self.permits.available_permits();
        let reading = self.want_read && free > 0;
        if !reading && self.pending.is_empty() {
            return None;
        }
        let asked = if reading {
            free.min(self.shared.options.batch_size.max(1) as usize)
        } else {
            0
        };
        if asked > 0 {
            self.empty_read = false;
        }
        let results = std::mem::take(&mut self.pending);
        Some(self.launch(results, asked))
    }

    /// An exchange of `results` for up to `asked` messages, counted in
    /// flight until [`Loop::on_done`] takes its outcome.
    fn launch(
        &mut self,
        results: Vec<Finished>,
        asked: usize,
    ) -> impl Future<Output = Exchanged> + Send + 'static {
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(id, Instant::now());
        exchange(
            self.shared.clone(),
            id,
            results,
            asked,
            self.permits.clone(),
        )
    }

    fn max_exchanges(&self) -> usize {
        (self.shared.options.concurrency.max(1) as usize).min(MAX_EXCHANGES)
    }

    /// When the loop must look again without an event.
    fn wake_at(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut at: Vec<Instant> = Vec::new();
        if self.retry_at > now {
            at.push(self.retry_at);
        }
        if let Some(p) = self.next_poll {
            at.push(p);
        }
        if !self.pending.is_empty() || self.want_read {
            if let Some(youngest) = self.in_flight.values().max() {
                at.push(*youngest + STALLED);
            }
        }
        at.into_iter().min()
    }

    /// Nothing to read: register as idle and listen (then look once more:
    /// a message sent before the registration is not notified), or, once
    /// registered, wait for a notification or the fallback poll.
    async fn go_idle(&mut self) {
        let o = &self.shared.options;
        if self.idle {
            self.want_read = false;
            self.next_poll = Some(Instant::now() + o.poll_interval);
            return;
        }
        let (client, fresh) = self.shared.control.get().await;
        if fresh {
            self.listening = false;
        }
        if !self.listening {
            let mut sql = String::new();
            for ns in &o.namespaces {
                match client
                    .query_one("SELECT tasker.wake_channel($1)", &[ns])
                    .await
                {
                    Ok(r) => {
                        let ch: String = r.get(0);
                        sql.push_str(&format!("LISTEN \"{}\";", ch.replace('"', "\"\"")));
                    }
                    Err(e) => log(format!("no wake channel for {ns}: {}", explain(&e))),
                }
            }
            match client.batch_execute(&sql).await {
                Ok(()) => self.listening = true,
                Err(e) => log(format!(
                    "cannot LISTEN ({}); polling every {:?}",
                    explain(&e),
                    o.poll_interval
                )),
            }
        }
        match self.worker_idle(&client, true).await {
            Ok(_) => {
                self.idle = true;
                self.want_read = true;
            }
            Err(e) => {
                log(format!(
                    "could not register as idle ({}); polling",
                    explain(&e)
                ));
                self.want_read = false;
                self.next_poll = Some(Instant::now() + o.poll_interval);
            }
        }
    }

    async fn set_busy(&mut self) {
        self.unregister = false;
        if !self.idle {
            return;
        }
        self.idle = false;
        let (client, _) = self.shared.control.get().await;
        if let Err(e) = self.worker_idle(&client, false).await {
            log(format!("could not unregister as idle: {}", explain(&e)));
        }
    }

    /// tasker.worker_idle for this worker's namespaces.
    async fn worker_idle(&self, client: &Client, idle: bool) -> Result<u64, tokio_postgres::Error> {
        let o = &self.shared.options;
        client
            .execute(
                "SELECT tasker.worker_idle($1, $2, $3)",
                &[&o.namespaces, &o.worker_id, &idle],
            )
            .await
    }
}

/// Runs until `shutdown` completes: exchanges results for messages, runs
/// handlers concurrently. Connection errors are retried, never fatal;
/// misconfiguration found at start-up ends it with the cause. At shutdown,
/// in-flight handlers get `shutdown_timeout` to finish and their results are
/// sent; those that do not finish are cancelled and their messages released.
/// The whole shutdown takes at most `shutdown_timeout`, even while the
/// database is down (what could not be sent then is redelivered when the
/// leases expire).
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
    let reconnects = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Finished>();
    let mut exchanges = FuturesUnordered::new();
    let telemetry = Arc::new(crate::telemetry::Telemetry::new(
        options.worker_id.clone(),
        options.namespaces.clone(),
        reconnects.clone(),
    ));
    telemetry.set_connected(true);
    let (web_stop, web_stopped) = tokio::sync::oneshot::channel::<()>();
    let web = match options.http {
        Some(addr) => Some(
            crate::web::serve(addr, telemetry.clone(), db_config.clone(), async {
                let _ = web_stopped.await;
            })
            .await?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        telemetry: telemetry.clone(),
        control: Db::new("wakeup", db_config.clone(), reconnects.clone()),
        leases: Db::new("lease", db_config.clone(), reconnects.clone()),
        exchanges: Pool::new(db_config.clone(), reconnects.clone()),
        txs: Pool::new(db_config.clone(), reconnects.clone()),
        queues,
        options,
        registry,
        stats: stats.clone(),
        results: tx,
        finished: Notify::new(),
        running: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
    });
    let o = &shared.options;
    let concurrency = o.concurrency.max(1);
    let mut lp = Loop {
        shared: shared.clone(),
        permits: Arc::new(Semaphore::new(concurrency as usize)),
        pending: Vec::new(),
        in_flight: HashMap::new(),
        next_id: 0,
        want_read: true,
        empty_read: false,
        idle: false,
        unregister: false,
        listening: false,
        backoff: Duration::ZERO,
        retry_at: Instant::now(),
        next_poll: None,
    };
    log(format!(
        "worker {} serving {:?} (concurrency {}, batch {}, lease {:?})",
        o.worker_id, o.namespaces, o.concurrency, o.batch_size, o.visibility_timeout
    ));

    loop {
        telemetry.beat();
        while let Ok(r) = rx.try_recv() {
            lp.pending.push(r);
        }
        if lp.unregister {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = lp.set_busy() => {}
            }
        }
        if lp.empty_read && lp.want_read && lp.in_flight.is_empty() && lp.pending.is_empty() {
            lp.empty_read = false;
            tokio::select! {
                _ = &mut shutdown => break,
                _ = lp.go_idle() => {}
            }
            continue;
        }
        if let Some(x) = lp.maybe_start() {
            exchanges.push(Box::pin(x));
            continue;
        }
        let wake_at = lp.wake_at();
        tokio::select! {
            _ = &mut shutdown => break,
            Some(r) = rx.recv() => lp.pending.push(r),
            Some(d) = exchanges.next(), if !exchanges.is_empty() => lp.on_done(d),
            _ = shared.finished.notified() => {}
            _ = shared.control.wake.notified() => {
                if lp.idle {
                    stats.lock().unwrap().notified += 1;
                }
                lp.want_read = true;
                lp.next_poll = None;
            }
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now).into()), if wake_at.is_some() => {
                if lp.next_poll.is_some_and(|p| p <= Instant::now()) {
                    lp.want_read = true;
                    lp.next_poll = None;
                }
            }
        }
    }

    // graceful shutdown, within shutdown_timeout: handlers finish (or are
    // cancelled and their messages released), their results are sent
    log("shutting down: finishing in-flight steps");
    shared.stopping.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + o.shutdown_timeout;
    let reserve = (o.shutdown_timeout / 4).min(Duration::from_secs(2));
    let finished = tokio::time::timeout_at(
        (deadline - reserve).into(),
        lp.permits.acquire_many(concurrency),
    )
    .await
    .is_ok();
    let unfinished: Vec<(String, i64)> = {
        let mut running = shared.running.lock().unwrap();
        for task in running.values() {
            task.abort();
        }
        running.drain().map(|(k, _)| k).collect()
    };
    if !finished {
        log(format!(
            "{} handlers did not finish in {:?}: cancelled",
            unfinished.len(),
            o.shutdown_timeout
        ));
    }
    let last = async {
        // exchanges still in flight, then the results left
        while let Some(d) = exchanges.next().await {
            lp.on_done(d);
        }
        loop {
            while let Ok(r) = rx.try_recv() {
                lp.pending.push(r);
            }
            if lp.pending.is_empty() {
                break;
            }
            let results = std::mem::take(&mut lp.pending);
            let d = lp.launch(results, 0).await;
            lp.on_done(d);
            if !lp.pending.is_empty() {
                tokio::time::sleep(lp.backoff).await;
            }
        }
        // unregistered whatever the loop believed: a registration whose
        // call the shutdown interrupted may have committed all the same
        lp.idle = true;
        lp.set_busy().await;
        for (queue, msg_id) in &unfinished {
            if release(&shared, queue, *msg_id).await {
                stats.lock().unwrap().released += 1;
            }
        }
    };
    if tokio::time::timeout_at(deadline.into(), last)
        .await
        .is_err()
    {
        log(format!(
            "database unreachable at shutdown: {} results not sent, unfinished messages not released; their leases expire and the steps are delivered again",
            lp.pending.len()
        ));
    }
    let _ = web_stop.send(());
    if let Some(w) = web {
        let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
    }
    let mut s = stats.lock().unwrap().clone();
    s.reconnects = reconnects.load(Ordering::Relaxed);
    log(format!("stopped: {s:?}"));
    Ok(s)
}

/// Runs one attempt: keeps its lease, runs its handler with the step's
/// timeout (cancelling it when the time is up), and hands the result to the
/// exchange loop (a transactional handler's success is submitted in the
/// handler's own transaction).
async fn process(shared: &Arc<Shared>, ctx: StepContext) {
    let options = &shared.options;
    let started = Instant::now();
    let msg_id = ctx.msg_id;
    let step_uuid = ctx.message.step_uuid.clone();
    let attempt = ctx.message.attempt;
    let callable = ctx.message.handler.callable.clone();
    let timeout = ctx.message.timeout_seconds.map(Duration::from_secs);

    // keep the lease while the handler runs (tasker.extend_lease: for this
    // attempt only, never beyond the step's timeout_seconds), on a
    // connection of its own; ends when this attempt ends, however it ends
    let _lease = {
        let (step, vt, shared) = (
            step_uuid.clone(),
            options.visibility_timeout,
            shared.clone(),
        );
        AbortOnDrop(tokio::spawn(async move {
            let every = (vt / 2).max(Duration::from_millis(500));
            loop {
                tokio::time::sleep(every).await;
                let (client, _) = shared.leases.get().await;
                let extended = client
                    .execute(
                        "SELECT tasker.extend_lease($1::text::uuid, $2::integer, $3::integer)",
                        &[&step, &(attempt as i32), &(vt.as_secs().max(1) as i32)],
                    )
                    .await;
                if let Err(e) = extended {
                    log(format!(
                        "could not extend the lease of message {msg_id}: {}",
                        explain(&e)
                    ));
                }
            }
        }))
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
    let step_ref = &step_uuid;
    let namespace = ctx.message.namespace.clone();
    let ns_ref = &namespace;
    let guarded = |run: tokio::task::JoinHandle<Outcome>| async move {
        // its own task, so that a panic becomes a failure, not a crash, and
        // a timeout cancels it (a detached handler would go on running
        // beside the retry)
        shared.telemetry.handler_started(ns_ref);
        let ran = Instant::now();
        let abort = run.abort_handle();
        let joined = match timeout {
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(j) => j,
                Err(_) => {
                    abort.abort();
                    shared.stats.lock().unwrap().timed_out += 1;
                    log(format!(
                        "step {step_ref} (attempt {attempt}) timed out after {}s: handler cancelled",
                        t.as_secs()
                    ));
                    Ok(Outcome::retryable(format!(
                        "step timed out after {}s",
                        t.as_secs()
                    )))
                }
            },
            None => run.await,
        };
        let outcome =
            joined.unwrap_or_else(|e| Outcome::retryable(format!("handler panicked: {e}")));
        shared
            .telemetry
            .handler_finished(ns_ref, &outcome, ran.elapsed());
        outcome
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
        Some(Handler::Plain(handler)) => {
            guarded(tokio::spawn(handler.handle(ctx).in_current_span())).await
        }
        Some(Handler::Transactional(handler)) => {
            match run_in_transaction(shared, &handler, ctx, &guarded, &metadata).await {
                // submitted (or ignored) in the handler's transaction
                None => return,
                Some(o) => o,
            }
        }
    };
    let _ = shared
        .results
        .send(Finished::new(&step_uuid, &outcome, metadata(&outcome)));
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
        Ok(c) => Arc::new(c.client),
        Err(e) => {
            return Some(Outcome::retryable(format!(
                "no database connection: {}",
                explain(&e)
            )))
        }
    };
    if let Err(e) = client.batch_execute("BEGIN").await {
        return Some(Outcome::retryable(format!(
            "cannot begin a transaction: {}",
            explain(&e)
        )));
    }
    let outcome = guarded(tokio::spawn(
        handler
            .handle(ctx, Tx::new(client.clone()))
            .in_current_span(),
    ))
    .await;
    let give_back = |client: Arc<Client>| {
        // (a cancelled handler may still hold it: then it is closed)
        if let Ok(client) = Arc::try_unwrap(client) {
            shared.txs.give_back(Conn {
                client,
                exchange: None,
            });
        }
    };
    if !matches!(outcome, Outcome::Success { .. }) {
        let _ = client.batch_execute("ROLLBACK").await;
        give_back(client);
        return Some(outcome);
    }
    let result = as_json_array(&[Finished::new(&step_uuid, &outcome, metadata(&outcome))]);
    let applied = client
        .query_one(
            "SELECT outcome, detail FROM tasker.submit_results($1::text::jsonb)",
            &[&result],
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
            log(format!(
                "transaction of step {step_uuid} failed: {}",
                explain(&e)
            ));
            let _ = client.batch_execute("ROLLBACK").await;
            None
        }
    }
}
