//! Shared memory between the background worker and backends: who the worker
//! is and how it is doing (for `tasker.health()`), and the latch wake-up that
//! backends send when they commit work the worker must act on.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic, PgLwLock, PgXactCallbackEvent};

pub static PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_tasker_worker_pid") };
pub static STATUS: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_tasker_worker_status") };
pub static TICKS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_tasker_worker_ticks") };
pub static LAST_TICK_MS: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"pg_tasker_worker_last_tick") };
pub static ERRORS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_tasker_worker_errors") };
/// The fallback interval the worker currently uses (from its configuration).
pub static CYCLE_INTERVAL_MS: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"pg_tasker_worker_interval") };
pub static LAST_ERROR: PgLwLock<ErrorText> =
    unsafe { PgLwLock::new(c"pg_tasker_worker_last_error") };
/// When the last error was recorded (ms since the epoch; 0: none yet).
pub static LAST_ERROR_MS: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"pg_tasker_worker_last_error_at") };
/// How long the last tick took, in microseconds.
pub static LAST_TICK_US: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"pg_tasker_worker_last_tick_us") };
/// State changes committed since the server started (tasker.metrics()).
pub static MOVES: PgLwLock<Moves> = unsafe { PgLwLock::new(c"pg_tasker_moves") };
/// Backends that may have workers registered as waiting
/// (tasker.worker_idle): each counts itself once, from before its first
/// registration until it has none left (at commit) or exits. Zero: nobody
/// waits anywhere, and an enqueue does not look for waiters
/// (tasker._anyone_waits).
pub static WAITING_BACKENDS: PgAtomic<AtomicU32> =
    unsafe { PgAtomic::new(c"pg_tasker_waiting_backends") };

/// Counts of committed moves into each state, by the states' SQL order
/// (pg_tasker_core::state::StepState::ALL / TaskState::ALL).
#[derive(Clone, Copy, Default)]
pub struct Moves {
    pub steps: [u64; 16],
    pub tasks: [u64; 16],
}

// SAFETY: plain numbers, no pointers.
unsafe impl PGRXSharedMemory for Moves {}

/// Set in `_PG_init` when loaded through shared_preload_libraries; backends
/// forked from the postmaster inherit it. Without it there is no shared
/// memory to touch.
static PRELOADED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    NotStarted = 0,
    WaitingForExtension = 1,
    VersionMismatch = 2,
    Disabled = 3,
    Running = 4,
    Stopped = 5,
}

impl Status {
    pub fn name(code: i32) -> &'static str {
        match code {
            1 => "waiting for CREATE EXTENSION",
            2 => "standing down: extension version mismatch",
            3 => "disabled (pg_tasker.enabled = off)",
            4 => "running",
            5 => "stopped",
            _ => "not started",
        }
    }
}

#[derive(Clone, Copy)]
pub struct ErrorText {
    len: usize,
    bytes: [u8; 512],
}

impl Default for ErrorText {
    fn default() -> Self {
        ErrorText {
            len: 0,
            bytes: [0; 512],
        }
    }
}

// SAFETY: plain bytes, no pointers.
unsafe impl PGRXSharedMemory for ErrorText {}

impl ErrorText {
    pub fn get(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..self.len]).into_owned()
    }
}

pub fn init_shmem() {
    pg_shmem_init!(PID);
    pg_shmem_init!(STATUS);
    pg_shmem_init!(TICKS);
    pg_shmem_init!(LAST_TICK_MS);
    pg_shmem_init!(ERRORS);
    pg_shmem_init!(CYCLE_INTERVAL_MS);
    pg_shmem_init!(LAST_ERROR);
    pg_shmem_init!(LAST_ERROR_MS);
    pg_shmem_init!(LAST_TICK_US);
    pg_shmem_init!(MOVES);
    pg_shmem_init!(WAITING_BACKENDS);
    pg_shmem_init!(TICK_WANTED);
    crate::relay::init_shmem();
    PRELOADED.store(true, Ordering::SeqCst);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::SeqCst)
}

pub fn set_status(s: Status) {
    STATUS.get().store(s as i32, Ordering::SeqCst);
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn record_error(message: &str) {
    ERRORS.get().fetch_add(1, Ordering::SeqCst);
    LAST_ERROR_MS.get().store(now_ms(), Ordering::SeqCst);
    let mut slot = LAST_ERROR.exclusive();
    let mut end = message.len().min(slot.bytes.len());
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    slot.bytes[..end].copy_from_slice(&message.as_bytes()[..end]);
    slot.len = end;
}

/// Sets the worker's latch now.
pub fn wake_now() {
    if !preloaded() {
        return;
    }
    let pid = PID.get().load(Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns a pointer
    // into shared memory (or NULL); SetLatch on a PGPROC's latch is how
    // Postgres itself wakes other processes.
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

/// Whether this backend counts itself in WAITING_BACKENDS.
static COUNTED_WAITING: AtomicBool = AtomicBool::new(false);
static EXIT_HOOK: AtomicBool = AtomicBool::new(false);
/// This transaction asked to uncount this backend when it commits.
static CLEAR_PENDING: AtomicBool = AtomicBool::new(false);

unsafe extern "C-unwind" fn stop_waiting_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    if COUNTED_WAITING.swap(false, Ordering::SeqCst) {
        WAITING_BACKENDS.get().fetch_sub(1, Ordering::SeqCst);
    }
}

/// This backend may have waiting workers registered (`true`: counted at
/// once, before its registration is visible to anyone) or has none left
/// (`false`: uncounted when the transaction commits, so a rollback that
/// keeps the registrations keeps the count). Conservative: a count that is
/// too high only makes enqueues look in tasker.worker_waits.
pub fn set_waiting(waiting: bool) {
    if !preloaded() {
        return;
    }
    if waiting {
        // (cancels an uncount this transaction asked for earlier)
        CLEAR_PENDING.store(false, Ordering::SeqCst);
        if !COUNTED_WAITING.swap(true, Ordering::SeqCst) {
            WAITING_BACKENDS.get().fetch_add(1, Ordering::SeqCst);
        }
        if !EXIT_HOOK.swap(true, Ordering::SeqCst) {
            // SAFETY: registers a plain function to run at backend exit,
            // as extensions do; it only touches atomics.
            unsafe {
                pg_sys::before_shmem_exit(Some(stop_waiting_at_exit), pg_sys::Datum::from(0))
            };
        }
    } else if COUNTED_WAITING.load(Ordering::SeqCst) && !CLEAR_PENDING.swap(true, Ordering::SeqCst)
    {
        pgrx::register_xact_callback(PgXactCallbackEvent::Commit, || {
            if CLEAR_PENDING.swap(false, Ordering::SeqCst)
                && COUNTED_WAITING.swap(false, Ordering::SeqCst)
            {
                WAITING_BACKENDS.get().fetch_sub(1, Ordering::SeqCst);
            }
        });
        pgrx::register_xact_callback(PgXactCallbackEvent::Abort, || {
            CLEAR_PENDING.store(false, Ordering::SeqCst);
        });
    }
}

/// Whether any backend may have waiting workers; always true without
/// shared memory (then tasker.worker_waits is the only record).
pub fn anyone_waits() -> bool {
    !preloaded() || WAITING_BACKENDS.get().load(Ordering::SeqCst) > 0
}

/// A committed transaction asked the worker for a tick
/// (crate::relay::tick_on_commit); a wake-up without it only relays
/// notifications.
pub static TICK_WANTED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_tasker_tick_wanted") };

thread_local! {
    /// This transaction's moves, added to MOVES when it commits.
    static PENDING: std::cell::RefCell<Option<Moves>> = const { std::cell::RefCell::new(None) };
}

/// Counts `n` moves into a step or task state (its index in the states'
/// SQL order), in shared memory when the current transaction commits; a
/// rollback forgets them. Without shared_preload_libraries nothing is kept.
pub fn count_moves_on_commit(task: bool, index: usize, n: u64) {
    if !preloaded() {
        return;
    }
    let first = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let first = p.is_none();
        let m = p.get_or_insert_with(Moves::default);
        let slots = if task { &mut m.tasks } else { &mut m.steps };
        if let Some(slot) = slots.get_mut(index) {
            *slot += n;
        }
        first
    });
    if first {
        pgrx::register_xact_callback(PgXactCallbackEvent::Commit, || {
            if let Some(m) = PENDING.with(|p| p.borrow_mut().take()) {
                let mut total = MOVES.exclusive();
                for (t, a) in total.steps.iter_mut().zip(m.steps) {
                    *t += a;
                }
                for (t, a) in total.tasks.iter_mut().zip(m.tasks) {
                    *t += a;
                }
            }
        });
        pgrx::register_xact_callback(PgXactCallbackEvent::Abort, || {
            PENDING.with(|p| p.borrow_mut().take());
        });
    }
}
