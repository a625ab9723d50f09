//! The orchestrator: a background worker inside PostgreSQL.
//!
//! Registered when pg_tasker is in shared_preload_libraries. It connects to
//! `pg_tasker.database`, waits until the extension exists there (standing
//! down while the installed version differs from this library), and then
//! runs the orchestration cycle, one transaction per tick. It sleeps on its
//! latch until the earliest due task (bounded by `cycle_interval_ms`);
//! backends that schedule future work wake it at commit. SIGHUP reloads
//! settings and configuration (an invalid file keeps the last good one);
//! SIGTERM stops it between ticks.

use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;

use crate::worker_state::{self, Status};
use crate::{guc, relay, settings};

pub const ORCHESTRATOR_ID: &str = "pg_tasker-bgworker";

pub fn register() {
    BackgroundWorkerBuilder::new("pg_tasker orchestrator")
        .set_type("pg_tasker")
        .set_library("pg_tasker")
        .set_function("pg_tasker_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn message_of(cause: &CaughtError) -> String {
    match cause {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Runs `f` in its own transaction: committed when it returns, rolled back
/// (and the error returned) when it raises. Unlike
/// `BackgroundWorker::transaction`, an error never commits.
fn in_transaction<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
    // SAFETY: the standard background-worker transaction sequence.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // (the commit inside the try: what fails at commit, e.g. a full
    // NOTIFY queue for the relay, is an error of this transaction too)
    PgTryBuilder::new(move || {
        let r = f();
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(r)
    })
    .catch_others(|cause| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(message_of(&cause))
    })
    .execute()
}

/// Sends the notifications backends committed for the orchestrator to
/// relay (crate::relay), in one transaction. Notifications are not
/// durable, so its commit does not wait for the disk.
fn relay_waiting() {
    if !relay::waiting() {
        return;
    }
    let sent = in_transaction(|| {
        Spi::run("SET LOCAL synchronous_commit = off").map_err(|e| e.to_string())?;
        Ok::<usize, String>(relay::send_waiting())
    })
    .and_then(|r| r);
    match sent {
        Ok(n) => relay::count_relayed(n),
        Err(message) => {
            let text = format!("pg_tasker: relaying notifications failed: {message}");
            pgrx::warning!("{text}");
            worker_state::record_error(&text);
        }
    }
}

enum Tick {
    WaitingForExtension,
    VersionMismatch(String),
    Ran {
        claimed: i64,
        next_due_ms: Option<i64>,
    },
}

/// When each maintenance job last ran in this worker.
#[derive(Default)]
struct JobClock {
    last: std::collections::HashMap<&'static str, std::time::Instant>,
    again: std::collections::HashSet<&'static str>,
}

impl JobClock {
    fn due(&self, job: &'static str, every: Duration) -> bool {
        self.again.contains(job) || self.last.get(job).is_none_or(|t| t.elapsed() >= every)
    }
}

/// The maintenance jobs that are due, each in its own subtransaction.
fn maintenance(o: &pg_tasker_core::config::OrchestrationSection, clock: &mut JobClock) {
    let secs = |s: u32| Duration::from_secs(s as u64);
    let jobs: [(&'static str, bool, Duration); 4] = [
        ("task_requests", o.task_requests.enabled, Duration::ZERO),
        (
            "recovery",
            o.recovery.enabled,
            secs(o.recovery.interval_seconds),
        ),
        (
            "staleness",
            o.staleness.enabled,
            secs(o.staleness.interval_seconds),
        ),
        (
            "retention",
            o.retention.enabled,
            secs(o.retention.interval_seconds),
        ),
    ];
    for (job, enabled, every) in jobs {
        if !enabled || !clock.due(job, every) {
            continue;
        }
        let o2 = o.clone();
        match crate::subxact::run(move || crate::maintenance::run_job(job, &o2)) {
            Ok(v) => {
                clock.last.insert(job, std::time::Instant::now());
                if v["more"] == true {
                    clock.again.insert(job);
                } else {
                    clock.again.remove(job);
                }
                let errors: usize = ["errors", "rejected"]
                    .iter()
                    .filter_map(|k| v[*k].as_array())
                    .map(|a| a.len())
                    .sum();
                if errors > 0 {
                    let text = format!("pg_tasker {job}: {v}");
                    pgrx::warning!("{text}");
                    worker_state::record_error(&text);
                }
            }
            Err(f) => {
                clock.last.insert(job, std::time::Instant::now());
                let text = format!("pg_tasker maintenance job {job} failed: {f}");
                pgrx::warning!("{text}");
                worker_state::record_error(&text);
            }
        }
    }
}

fn tick(
    o: &pg_tasker_core::config::OrchestrationSection,
    clock: &mut JobClock,
) -> Result<Tick, String> {
    let (batch_size, failed_backoff) = (o.batch_size as i32, o.failed_task_backoff_seconds as i32);
    let clock = std::panic::AssertUnwindSafe(clock);
    in_transaction(move || {
        let clock = clock;
        let version = Spi::get_one::<String>("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_tasker'");
        let version = match version {
            Ok(Some(v)) => v,
            Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => return Ok(Tick::WaitingForExtension),
            Err(e) => return Err(e.to_string()),
        };
        if version != env!("CARGO_PKG_VERSION") {
            return Ok(Tick::VersionMismatch(version));
        }
        // a row a client holds (a worker may lock its queue's messages) makes
        // a job give up after a while (each job is a subtransaction), not
        // stall every namespace's orchestration
        Spi::run("SET LOCAL lock_timeout = '5s'").map_err(|e| e.to_string())?;
        maintenance(o, clock.0);
        let summary = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT tasker._run_cycle($1, $2, $3)",
            &[ORCHESTRATOR_ID.into(), batch_size.into(), failed_backoff.into()],
        )
        .map_err(|e| e.to_string())?
        .map(|j| j.0)
        .unwrap_or_default();
        if let Some(errors) = summary["errors"].as_array().filter(|e| !e.is_empty()) {
            let text = format!("pg_tasker: {} task(s) failed in the orchestration cycle: {}", errors.len(), serde_json::Value::from(errors.clone()));
            pgrx::warning!("{text}");
            worker_state::record_error(&text);
        }
        // When is the next task due? Tasks claimed by someone else count from
        // the end of their claim.
        let next_due_ms = Spi::get_one::<i64>(
            "SELECT (extract(epoch FROM min(CASE WHEN t.claimed_by IS NOT NULL AND t.claim_expires_at > now()
                                                  THEN greatest(t.next_action_at, t.claim_expires_at)
                                                  ELSE t.next_action_at END) - clock_timestamp()) * 1000)::bigint
               FROM tasker.tasks t WHERE t.next_action_at IS NOT NULL",
        )
        .map_err(|e| e.to_string())?;
        Ok(Tick::Ran { claimed: summary["tasks_claimed"].as_i64().unwrap_or(0), next_due_ms })
    })
    .and_then(|r| r)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tasker_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    worker_state::PID.get().store(
        unsafe { pg_sys::MyProcPid },
        std::sync::atomic::Ordering::SeqCst,
    );
    worker_state::set_status(Status::NotStarted);
    log!("pg_tasker orchestrator started in database \"{database}\"");
    if let Some(e) = settings::reload() {
        let text = format!("pg_tasker: invalid configuration, using the compiled-in defaults: {e}");
        pgrx::warning!("{text}");
        worker_state::record_error(&text);
    }

    let mut clock = JobClock::default();
    let mut reported: Option<String> = None;
    let mut report_once = |what: String| {
        if reported.as_deref() != Some(what.as_str()) {
            log!("{what}");
            reported = Some(what);
        }
    };
    relay::start_relaying();
    let mut next_tick = std::time::Instant::now();
    loop {
        let mut due = false;
        if BackgroundWorker::sighup_received() {
            due = true;
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            match settings::reload() {
                None => log!("pg_tasker: configuration reloaded"),
                Some(e) => {
                    let text =
                        format!("pg_tasker: invalid configuration, keeping the previous one: {e}");
                    pgrx::warning!("{text}");
                    worker_state::record_error(&text);
                }
            }
        }
        relay_waiting();
        due |= worker_state::TICK_WANTED
            .get()
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if !due && std::time::Instant::now() < next_tick {
            // woken only to relay notifications
            if !BackgroundWorker::wait_latch(Some(
                next_tick.saturating_duration_since(std::time::Instant::now()),
            )) {
                break;
            }
            continue;
        }
        let cfg = settings::current();
        let interval = Duration::from_millis(cfg.orchestration.cycle_interval_ms);
        worker_state::CYCLE_INTERVAL_MS.get().store(
            cfg.orchestration.cycle_interval_ms,
            std::sync::atomic::Ordering::SeqCst,
        );
        let mut sleep = interval;
        if !guc::ENABLED.get() {
            worker_state::set_status(Status::Disabled);
            report_once("pg_tasker orchestrator disabled (pg_tasker.enabled = off)".into());
        } else {
            let o = &cfg.orchestration;
            let tick_started = std::time::Instant::now();
            match tick(o, &mut clock) {
                Ok(Tick::WaitingForExtension) => {
                    worker_state::set_status(Status::WaitingForExtension);
                    report_once(format!("pg_tasker orchestrator waiting for CREATE EXTENSION pg_tasker in database \"{database}\""));
                }
                Ok(Tick::VersionMismatch(v)) => {
                    worker_state::set_status(Status::VersionMismatch);
                    report_once(format!(
                        "pg_tasker orchestrator standing down: the extension installed in \"{database}\" is version {v}, this library is {}; run ALTER EXTENSION pg_tasker UPDATE",
                        env!("CARGO_PKG_VERSION")
                    ));
                }
                Ok(Tick::Ran {
                    claimed,
                    next_due_ms,
                }) => {
                    worker_state::set_status(Status::Running);
                    report_once("pg_tasker orchestrator running".into());
                    sleep = if claimed >= o.batch_size as i64 {
                        Duration::ZERO // more due work than one batch
                    } else {
                        match next_due_ms {
                            // due now but nothing claimable: someone else holds it
                            Some(ms) if ms <= 0 => interval.min(Duration::from_millis(50)),
                            Some(ms) => interval.min(Duration::from_millis(ms as u64)),
                            None => interval,
                        }
                    };
                }
                Err(message) => {
                    let text = format!("pg_tasker orchestration tick failed: {message}");
                    pgrx::warning!("{text}");
                    worker_state::record_error(&text);
                }
            }
            worker_state::TICKS
                .get()
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            worker_state::LAST_TICK_MS
                .get()
                .store(worker_state::now_ms(), std::sync::atomic::Ordering::SeqCst);
            worker_state::LAST_TICK_US.get().store(
                tick_started.elapsed().as_micros() as u64,
                std::sync::atomic::Ordering::SeqCst,
            );
        }
        relay_waiting();
        next_tick = std::time::Instant::now() + sleep;
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
    }
    relay::stop_relaying();
    relay_waiting();
    worker_state::set_status(Status::Stopped);
    worker_state::PID
        .get()
        .store(0, std::sync::atomic::Ordering::SeqCst);
    log!("pg_tasker orchestrator stopped");
}
