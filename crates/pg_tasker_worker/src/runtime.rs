//! The worker runtime: polling, concurrency, leases, results, shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_tasker_core::config::WorkerConfig;
use serde_json::json;
use tokio::sync::{RwLock, Semaphore};
use tokio_postgres::{Client, NoTls};

use crate::handler::{Outcome, Registry, StepContext, StepMessage};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub database_url: String,
    pub namespaces: Vec<String>,
    pub worker_id: String,
    /// Messages read per poll.
    pub batch_size: u32,
    /// Handlers running at the same time.
    pub concurrency: u32,
    /// Longest pause between polls of empty queues (the poll backs off from
    /// 1 ms to this while queues stay empty, and resets when work appears).
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
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[pg-tasker-worker] {}", msg.as_ref());
}

/// A connection that is re-established when it breaks.
struct Db {
    url: String,
    client: RwLock<Option<Arc<Client>>>,
    stats: Arc<Mutex<Stats>>,
}

impl Db {
    async fn get(&self) -> Arc<Client> {
        if let Some(c) = self.client.read().await.as_ref().filter(|c| !c.is_closed()) {
            return c.clone();
        }
        let mut slot = self.client.write().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return c.clone();
        }
        let mut wait = Duration::from_millis(100);
        loop {
            match tokio_postgres::connect(&self.url, NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            log(format!("connection lost: {e}"));
                        }
                    });
                    let client = Arc::new(client);
                    if slot.is_some() {
                        self.stats.lock().unwrap().reconnects += 1;
                        log("reconnected");
                    }
                    *slot = Some(client.clone());
                    return client;
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

/// Runs until `shutdown` completes: reads the namespaces' queues, runs
/// handlers concurrently, reports results. Connection errors are retried,
/// never fatal. At shutdown, in-flight handlers get `shutdown_timeout` to
/// finish; the messages of those that do not are released.
pub async fn run(
    options: WorkerOptions,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<Stats, String> {
    if options.namespaces.is_empty() {
        return Err("no namespace to serve".into());
    }
    let queues: Vec<(String, String)> = options
        .namespaces
        .iter()
        .map(|ns| {
            pg_tasker_core::naming::queue_name(ns)
                .map(|q| (ns.clone(), q))
                .map_err(|e| e.message)
        })
        .collect::<Result<_, _>>()?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let db = Arc::new(Db {
        url: options.database_url.clone(),
        client: RwLock::new(None),
        stats: stats.clone(),
    });
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1) as usize));
    let in_flight: Arc<Mutex<HashMap<i64, String>>> = Arc::default();
    let registry = Arc::new(registry);
    let options = Arc::new(options);
    log(format!(
        "worker {} serving {:?} (concurrency {}, batch {}, lease {:?})",
        options.worker_id,
        options.namespaces,
        options.concurrency,
        options.batch_size,
        options.visibility_timeout
    ));

    tokio::pin!(shutdown);
    let mut idle_wait = Duration::from_millis(1);
    'poll: loop {
        // wait for a free handler slot (or shutdown)
        if permits.available_permits() == 0 {
            tokio::select! {
                _ = &mut shutdown => break 'poll,
                p = permits.clone().acquire_owned() => drop(p),
            }
        }
        let mut got = 0usize;
        for (ns, queue) in &queues {
            let free = permits.available_permits().min(options.batch_size as usize);
            if free == 0 {
                break;
            }
            let client = tokio::select! {
                _ = &mut shutdown => break 'poll,
                c = db.get() => c,
            };
            let rows = client
                .query(
                    "SELECT msg_id, read_ct, message::text FROM tasker.read_steps($1, $2, $3, $4)",
                    &[
                        ns,
                        &options.worker_id,
                        &(free as i32),
                        &(options.visibility_timeout.as_secs().max(1) as i32),
                    ],
                )
                .await;
            let rows = match rows {
                Ok(r) => r,
                Err(e) => {
                    log(format!("reading {queue}: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            for row in rows {
                let msg_id: i64 = row.get(0);
                let read_ct: i32 = row.get(1);
                let text: &str = row.get(2);
                let message: StepMessage = match serde_json::from_str(text) {
                    Ok(m) => m,
                    Err(e) => {
                        log(format!("unreadable message {msg_id} in {queue}: {e}; leaving it for its lease to expire"));
                        continue;
                    }
                };
                got += 1;
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                in_flight.lock().unwrap().insert(msg_id, queue.clone());
                let ctx = StepContext {
                    message,
                    msg_id,
                    read_ct,
                    worker_id: options.worker_id.clone(),
                };
                let (db, registry, options, stats, in_flight) = (
                    db.clone(),
                    registry.clone(),
                    options.clone(),
                    stats.clone(),
                    in_flight.clone(),
                );
                tokio::spawn(async move {
                    process(&db, &registry, &options, &stats, ctx).await;
                    in_flight.lock().unwrap().remove(&msg_id);
                    drop(permit);
                });
            }
        }
        if got > 0 {
            idle_wait = Duration::from_millis(1);
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => break 'poll,
            _ = tokio::time::sleep(idle_wait) => {}
        }
        idle_wait = (idle_wait * 2).min(options.poll_interval);
    }

    // graceful shutdown
    log("shutting down: finishing in-flight steps");
    let all = options.concurrency.max(1);
    let finished = tokio::time::timeout(options.shutdown_timeout, permits.acquire_many(all))
        .await
        .is_ok();
    if !finished {
        let left: Vec<(i64, String)> = in_flight
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let client = db.get().await;
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

async fn process(
    db: &Db,
    registry: &Registry,
    options: &WorkerOptions,
    stats: &Mutex<Stats>,
    ctx: StepContext,
) {
    let started = Instant::now();
    let msg_id = ctx.msg_id;
    let step_uuid = ctx.message.step_uuid.clone();
    let attempt = ctx.message.attempt;
    let callable = ctx.message.handler.callable.clone();
    let timeout = ctx.message.timeout_seconds.map(Duration::from_secs);

    // keep the lease while the handler runs (tasker.extend_lease: for this
    // attempt only, never beyond the step's timeout_seconds)
    let lease = {
        let client = db.get().await;
        let (step, vt) = (step_uuid.clone(), options.visibility_timeout);
        tokio::spawn(async move {
            let every = (vt / 2).max(Duration::from_millis(500));
            loop {
                tokio::time::sleep(every).await;
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

    let outcome = match registry.get(&callable) {
        None => Outcome::permanent(
            format!("no handler registered for callable \"{callable}\""),
            "UNKNOWN_HANDLER",
        ),
        Some(handler) => {
            // its own task, so that a panic becomes a failure, not a crash
            let run = tokio::spawn(handler.handle(ctx));
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
        }
    };
    lease.abort();

    let (status, result, error) = outcome.to_submission();
    let metadata = json!({
        "attempt": attempt,
        "worker_id": options.worker_id,
        "execution_time_ms": started.elapsed().as_secs_f64() * 1000.0,
    });
    let metadata = match &outcome {
        Outcome::Success {
            metadata: extra, ..
        } if extra.as_object().is_some_and(|m| !m.is_empty()) => {
            let mut m = metadata;
            m["handler"] = extra.clone();
            m
        }
        _ => metadata,
    };
    let (result, error) = (result.map(|v| v.to_string()), error.map(|v| v.to_string()));
    let metadata = metadata.to_string();
    for attempt_no in 1..=5 {
        let client = db.get().await;
        let submitted = client
            .query_one(
                "SELECT tasker.submit_result($1::text::uuid, $2, $3::text::jsonb, $4::text::jsonb, $5::text::jsonb)",
                &[&step_uuid, &status, &result, &error, &metadata],
            )
            .await;
        match submitted {
            Ok(_) => {
                let mut s = stats.lock().unwrap();
                s.processed += 1;
                if status == "success" {
                    s.succeeded += 1;
                } else {
                    s.failed += 1;
                }
                return;
            }
            Err(e) if e.as_db_error().is_some() => {
                // the database refused it (e.g. the step is unknown): retrying will not help
                log(format!("submit_result for step {step_uuid} refused: {e}"));
                return;
            }
            Err(e) => {
                log(format!(
                    "submit_result for step {step_uuid} failed ({e}), try {attempt_no}/5"
                ));
                tokio::time::sleep(Duration::from_millis(200 * attempt_no)).await;
            }
        }
    }
    // given up: the lease expires and the step is delivered again
}
