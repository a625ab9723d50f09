//! What a committing transaction hands the orchestrator: notifications
//! to send (`tasker._notify`) and a request for a tick
//! (`tasker._wake_orchestrator`), both at commit, one latch wake-up.
//!
//! A transaction that NOTIFYs takes a cluster-wide lock at commit and holds
//! it through its commit record's flush (PostgreSQL keeps the queue in commit
//! order that way): every notifying commit waits for the one before it, and
//! group commit among them is lost. A finished task NOTIFYs
//! `tasker_events`, so a cluster could finish at most about one task per
//! commit flush (pgbench here: 3,300-4,300 notifying commits/s against
//! 13,000-15,000 without; docs/benchmarks.md).
//!
//! So a backend of the orchestrator's database does not NOTIFY itself: its
//! notifications wait in backend memory (a rolled-back subtransaction drops
//! its own, as PostgreSQL does), reserve room in a ring in shared memory
//! just before commit, are written there when the commit is done, and the
//! orchestrator, woken by its latch, sends them all in one transaction of
//! its own. Listeners see the same channels and payloads, after the commit
//! as before, a little later (the orchestrator's wake-up), and nothing of a
//! rollback. Where the ring cannot take them (no orchestrator in this
//! database, it is gone, the ring is full, a notification longer than a
//! slot) the transaction NOTIFYs itself, as it did before.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic, PgLwLock};

use crate::worker_state;

/// Slots of the ring; a transaction with more notifications than are free
/// NOTIFYs itself.
const SLOTS: usize = 512;
/// Bytes of a slot: channel and payload.
const SLOT_BYTES: usize = 380;
/// Up to this many notifications, a repeat is found when it is made.
const SCAN: usize = 64;

#[derive(Clone, Copy)]
pub struct Slot {
    /// The database of the transaction that made it.
    db: u32,
    channel_len: u16,
    payload_len: u16,
    bytes: [u8; SLOT_BYTES],
}

const EMPTY: Slot = Slot {
    db: 0,
    channel_len: 0,
    payload_len: 0,
    bytes: [0; SLOT_BYTES],
};

/// Notifications committed and not yet sent: `len` of them from `head`;
/// `reserved` slots are promised to transactions committing now.
#[derive(Clone, Copy)]
pub struct Ring {
    head: usize,
    len: usize,
    reserved: usize,
    slots: [Slot; SLOTS],
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            head: 0,
            len: 0,
            reserved: 0,
            slots: [EMPTY; SLOTS],
        }
    }
}

// SAFETY: plain numbers and bytes, no pointers.
unsafe impl PGRXSharedMemory for Ring {}

static RING: PgLwLock<Ring> = unsafe { PgLwLock::new(c"pg_tasker_notify_ring") };
/// Notifications the orchestrator sent since the server started.
static RELAYED: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_tasker_relayed") };
/// The database whose notifications the orchestrator relays (0: none).
static RELAY_DB: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_tasker_relay_db") };

pub fn init_shmem() {
    pg_shmem_init!(RING);
    pg_shmem_init!(RELAY_DB);
    pg_shmem_init!(RELAYED);
}

/// Notifications the orchestrator sent for backends since the server started.
pub fn relayed() -> u64 {
    RELAYED.get().load(Ordering::SeqCst)
}

struct Pending {
    subxact: pg_sys::SubTransactionId,
    channel: String,
    payload: String,
}

thread_local! {
    /// This transaction's notifications, in the order made, without repeats.
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    /// Slots this transaction reserved before its commit.
    static RESERVED: Cell<usize> = const { Cell::new(0) };
    /// This transaction asks the orchestrator for a tick when it commits.
    static TICK: Cell<bool> = const { Cell::new(false) };
}
static CALLBACKS: AtomicBool = AtomicBool::new(false);

/// NOTIFY now, in this transaction (pg_notify's checks and errors).
fn notify_here(channel: &str, payload: &str) {
    // SAFETY: pg_notify is an ordinary fmgr function; the call is guarded.
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &[channel.into_datum(), payload.into_datum()],
        );
    }
}

/// Whether the orchestrator relays this database's notifications.
pub fn relays_this_database() -> bool {
    worker_state::preloaded()
        && RELAY_DB.get().load(Ordering::SeqCst) == unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Whether the orchestrator relays this backend's notifications.
fn relaying() -> bool {
    relays_this_database()
        && worker_state::PID.get().load(Ordering::SeqCst) != unsafe { pg_sys::MyProcPid }
}

fn register_callbacks() {
    if !CALLBACKS.swap(true, Ordering::SeqCst) {
        // SAFETY: registered once per backend, as extensions do.
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        }
    }
}

/// Wakes the orchestrator for a tick when the current transaction commits
/// (not before: it must see the work), after the transaction's
/// notifications are in the ring, so that it sends them before it ticks.
pub fn tick_on_commit() {
    if !worker_state::preloaded() {
        return;
    }
    register_callbacks();
    TICK.with(|t| t.set(true));
}

/// `pg_notify(channel, payload)`, sent at commit by the orchestrator when
/// it runs in this database (see the module's comment), by this
/// transaction otherwise. Repeats within a transaction are sent once.
pub fn notify(channel: &str, payload: &str) {
    // (a channel PostgreSQL refuses is refused here, in this transaction)
    if channel.is_empty()
        || channel.len() >= pg_sys::NAMEDATALEN as usize
        || channel.len() + payload.len() > SLOT_BYTES
        || !crate::guc::RELAY_NOTIFICATIONS.get()
        || !relaying()
    {
        return notify_here(channel, payload);
    }
    register_callbacks();
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        // (repeats among many are dropped before commit)
        if p.len() >= SCAN
            || !p
                .iter()
                .any(|e| e.channel == channel && e.payload == payload)
        {
            p.push(Pending {
                subxact,
                channel: channel.to_owned(),
                payload: payload.to_owned(),
            });
        }
    });
}

/// The orchestrator's process, if it still runs.
fn orchestrator_alive() -> bool {
    let pid = worker_state::PID.get().load(Ordering::SeqCst);
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns a pointer
    // into shared memory or NULL; only compared with NULL here.
    pid > 0 && !unsafe { pg_sys::BackendPidGetProc(pid) }.is_null()
}

fn send_pending_here() {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for e in pending {
        notify_here(&e.channel, &e.payload);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => {
            let n = PENDING.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() > SCAN {
                    let mut seen = std::collections::HashSet::new();
                    p.retain(|e| seen.insert((e.channel.clone(), e.payload.clone())));
                }
                p.len()
            });
            if n == 0 {
                return;
            }
            // (relaying() under the ring's lock: once stop_relaying() has
            // taken it, nobody reserves any more)
            let reserved = orchestrator_alive() && {
                let mut ring = RING.exclusive();
                if relaying() && ring.len + ring.reserved + n <= SLOTS {
                    ring.reserved += n;
                    true
                } else {
                    false
                }
            };
            if reserved {
                RESERVED.with(|r| r.set(n));
            } else {
                // (PostgreSQL queues them after these callbacks)
                send_pending_here();
            }
        }
        XACT_EVENT_PREPARE => TICK.with(|t| t.set(false)),
        XACT_EVENT_PRE_PREPARE => {
            // PREPARE TRANSACTION refuses a transaction that NOTIFYs, as
            // it would have without the relay
            send_pending_here();
        }
        XACT_EVENT_COMMIT => {
            let n = RESERVED.with(|r| r.replace(0));
            let tick = TICK.with(|t| t.replace(false));
            if tick {
                worker_state::TICK_WANTED
                    .get()
                    .store(true, Ordering::SeqCst);
            }
            if n == 0 {
                if tick {
                    worker_state::wake_now();
                }
                return;
            }
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
            {
                let mut ring = RING.exclusive();
                ring.reserved -= n;
                for e in &pending {
                    let at = (ring.head + ring.len) % SLOTS;
                    let slot = &mut ring.slots[at];
                    let (c, p) = (e.channel.as_bytes(), e.payload.as_bytes());
                    slot.bytes[..c.len()].copy_from_slice(c);
                    slot.bytes[c.len()..c.len() + p.len()].copy_from_slice(p);
                    slot.db = db;
                    slot.channel_len = c.len() as u16;
                    slot.payload_len = p.len() as u16;
                    ring.len += 1;
                }
            }
            worker_state::wake_now();
        }
        XACT_EVENT_ABORT => {
            TICK.with(|t| t.set(false));
            PENDING.with(|p| p.borrow_mut().clear());
            let n = RESERVED.with(|r| r.replace(0));
            if n > 0 {
                RING.exclusive().reserved -= n;
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        match event {
            SUBXACT_EVENT_ABORT_SUB => p.retain(|e| e.subxact != my),
            SUBXACT_EVENT_COMMIT_SUB => p
                .iter_mut()
                .filter(|e| e.subxact == my)
                .for_each(|e| e.subxact = parent),
            _ => {}
        }
    });
}

/// The orchestrator relays this database's notifications from now on.
pub fn start_relaying() {
    let _ring = RING.exclusive();
    RELAY_DB
        .get()
        .store(unsafe { pg_sys::MyDatabaseId }.to_u32(), Ordering::SeqCst);
}

/// The orchestrator relays no longer (backends NOTIFY themselves again);
/// returns when the transactions that reserved room before have written
/// their notifications into the ring (their commit records are being
/// flushed; at most 5 s, for a commit that waits on a synchronous standby),
/// so that the orchestrator's last relay sends them.
pub fn stop_relaying() {
    {
        let _ring = RING.exclusive();
        RELAY_DB.get().store(0, Ordering::SeqCst);
    }
    let started = std::time::Instant::now();
    while RING.share().reserved > 0 && started.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Takes the committed notifications out of the ring: those of this
/// database (a notification is seen in its own database only; others are
/// left from a transaction that committed as the orchestrator moved to
/// another database: it is dropped, as LISTEN there could not hear it).
fn take() -> Vec<(String, String)> {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut ring = RING.exclusive();
    let mut out = Vec::with_capacity(ring.len);
    for k in 0..ring.len {
        let slot = &ring.slots[(ring.head + k) % SLOTS];
        if slot.db != db {
            continue;
        }
        let (c, p) = (slot.channel_len as usize, slot.payload_len as usize);
        out.push((
            String::from_utf8_lossy(&slot.bytes[..c]).into_owned(),
            String::from_utf8_lossy(&slot.bytes[c..c + p]).into_owned(),
        ));
    }
    ring.head = (ring.head + ring.len) % SLOTS;
    ring.len = 0;
    out
}

/// The orchestrator committed `n` more notifications it relayed.
pub fn count_relayed(n: usize) {
    RELAYED.get().fetch_add(n as u64, Ordering::SeqCst);
}

/// Whether committed notifications wait in the ring.
pub fn waiting() -> bool {
    RING.share().len > 0
}

/// The orchestrator sends what waits in the ring, in the current
/// transaction (the caller's, which it commits); how many.
pub fn send_waiting() -> usize {
    let events = take();
    for (channel, payload) in &events {
        notify_here(channel, payload);
    }
    events.len()
}
