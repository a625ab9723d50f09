//! pgmq behind one adapter, Rust side: the statements on the hot path —
//! sending step messages, reading them, archiving them — as plans kept per
//! queue for the session (pgmq.send, pgmq.read and pgmq.archive run dynamic
//! SQL that is planned again on every call). The column lists are pgmq's; the table names come
//! from `tasker._pgmq_table` (sql/01_pgmq.sql, pgmq's own naming helper).
//! Messages pass through as the jsonb datums they are: never parsed here.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{AnyArray, PgBuiltInOids};

use crate::errors::{internal, ApiResult};

struct QueuePlans {
    send: OwnedPreparedStatement,
    archive: OwnedPreparedStatement,
    read: OwnedPreparedStatement,
    /// the read from a msg_id on (`msg_id >= $3`): see [`ReadFloor`]
    read_from: OwnedPreparedStatement,
    floor: Cell<ReadFloor>,
}

/// Where this session's next read of a queue starts.
///
/// A queue table's primary-key index holds, below its live messages, the
/// entries of messages archived (deleted) and read (updated: `vt` is
/// indexed, so no HOT update) while some transaction's snapshot could still
/// see them; until that snapshot ends they cannot be marked dead, and a read
/// in msg_id order from the start visits every one (one heap fetch each).
/// Under a backlog with a long transaction beside the workers (a batch of
/// create_task calls), that prefix grows to thousands of entries per read,
/// the reads' CPU slows the long transaction further, and throughput
/// collapses (docs/benchmarks.md, "Sustained"). So a read starts at the
/// lowest msg_id this session's previous read returned, and reads the whole
/// queue only when that finds nothing, when it has no floor yet, and at
/// least every [`FULL_READ_EVERY`]: a message below the floor that becomes
/// visible (a commit that took its msg_id earlier; a lease that ran out)
/// waits that long at most, never forever.
#[derive(Clone, Copy, Default)]
struct ReadFloor {
    msg_id: Option<i64>,
    full_read_at: Option<Instant>,
}

const FULL_READ_EVERY: Duration = Duration::from_millis(200);

impl ReadFloor {
    /// The msg_id to read from, or None: read the whole queue.
    fn start(&self, now: Instant) -> Option<i64> {
        match self.full_read_at {
            Some(t) if now.duration_since(t) < FULL_READ_EVERY => self.msg_id,
            _ => None,
        }
    }
}

thread_local! {
    static PLANS: RefCell<HashMap<String, QueuePlans>> = RefCell::new(HashMap::new());
}

fn prepare(sql: &str, types: &[PgBuiltInOids]) -> ApiResult<OwnedPreparedStatement> {
    let oids: Vec<pgrx::PgOid> = types.iter().map(|t| t.oid()).collect();
    Spi::connect(|c| c.prepare_mut(sql, &oids).map(|p| p.keep())).map_err(internal)
}

fn with_plans<R>(queue: &str, f: impl FnOnce(&QueuePlans) -> ApiResult<R>) -> ApiResult<R> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if !plans.contains_key(queue) {
            let (q, a) = Spi::get_two_with_args::<String, String>(
                "SELECT tasker._pgmq_table($1, 'q'), tasker._pgmq_table($1, 'a')",
                &[queue.into()],
            )
            .map_err(internal)?;
            let (q, a) = (
                q.ok_or_else(|| internal("no queue table name"))?,
                a.ok_or_else(|| internal("no archive table name"))?,
            );
            let send = prepare(
                &format!(
                    "INSERT INTO {q} (msg_id, vt, message) OVERRIDING SYSTEM VALUE
                     SELECT m.id, clock_timestamp(), m.msg FROM unnest($1::bigint[], $2::jsonb[]) AS m(id, msg)"
                ),
                &[PgBuiltInOids::INT8ARRAYOID, PgBuiltInOids::JSONBARRAYOID],
            )?;
            let archive = prepare(
                &format!(
                    "WITH archived AS (
                        DELETE FROM {q} WHERE msg_id = ANY ($1)
                        RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
                     INSERT INTO {a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
                     SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM archived"
                ),
                &[PgBuiltInOids::INT8ARRAYOID],
            )?;
            // pgmq.read's statement (without its conditional filter), from
            // the start of the queue or from a msg_id on; it also returns
            // the lowest msg_id read (the next read's floor). The messages
            // read are updated by key (`= ANY`), not joined: the plan is
            // kept for the session, and one made while the queue's
            // statistics said it was empty joined the read rows against a
            // walk of the whole queue, on every read thereafter.
            let read_statement = |from: &str| {
                format!(
                    "WITH cte AS (
                        SELECT msg_id FROM {q}
                        WHERE vt <= clock_timestamp(){from}
                        ORDER BY msg_id ASC
                        LIMIT $1
                        FOR UPDATE SKIP LOCKED
                     ), r AS (
                     UPDATE {q} m
                     SET last_read_at = clock_timestamp(),
                         vt = clock_timestamp() + make_interval(secs => $2),
                         read_ct = read_ct + 1
                     WHERE m.msg_id = ANY (ARRAY(SELECT cte.msg_id FROM cte))
                     RETURNING m.msg_id, m.read_ct, m.message)
                     SELECT array_agg(jsonb_build_object('msg_id', r.msg_id, 'read_ct', r.read_ct,
                                                         'message', r.message) ORDER BY r.msg_id),
                            min(r.msg_id)
                     FROM r"
                )
            };
            let read = prepare(
                &read_statement(""),
                &[PgBuiltInOids::INT4OID, PgBuiltInOids::INT4OID],
            )?;
            let read_from = prepare(
                &read_statement(" AND msg_id >= $3"),
                &[PgBuiltInOids::INT4OID, PgBuiltInOids::INT4OID, PgBuiltInOids::INT8OID],
            )?;
            plans.insert(
                queue.to_string(),
                QueuePlans { send, archive, read, read_from, floor: Cell::default() },
            );
        }
        f(plans.get(queue).expect("just prepared"))
    })
}

/// `tasker._pgmq_send(queue, msg_ids bigint[], messages jsonb[]) RETURNS
/// bigint`: inserts the messages with the given ids (taken from the queue's
/// sequence by tasker._enqueue_steps), visible at once; returns how many.
#[pg_extern]
fn _pgmq_send(queue: &str, msg_ids: Vec<i64>, messages: AnyArray) -> ApiResult<i64> {
    if messages.oid() != pg_sys::JSONBARRAYOID {
        return Err(internal("_pgmq_send takes jsonb[] messages"));
    }
    with_plans(queue, |p| {
        // SAFETY: the datum is a jsonb[] (checked above) owned by the caller
        // for the duration of this call.
        let messages = unsafe { DatumWithOid::new(messages, pg_sys::JSONBARRAYOID) };
        Spi::connect_mut(|c| {
            c.update(&p.send, None, &[msg_ids.into(), messages])
                .map(|t| t.len() as i64)
        })
        .map_err(internal)
    })
}

/// `tasker._pgmq_archive(queue, msg_ids bigint[]) RETURNS bigint`: moves the
/// messages to the queue's archive (what pgmq.archive does); returns how
/// many were still there.
#[pg_extern]
fn _pgmq_archive(queue: &str, msg_ids: Vec<i64>) -> ApiResult<i64> {
    with_plans(queue, |p| {
        Spi::connect_mut(|c| {
            c.update(&p.archive, None, &[msg_ids.into()])
                .map(|t| t.len() as i64)
        })
        .map_err(internal)
    })
}

/// `tasker._pgmq_read(queue, vt, qty) RETURNS jsonb[]`: reads up to qty
/// visible messages in msg_id order, leasing each for vt seconds (what
/// pgmq.read does), through a kept plan. Each element is
/// {"msg_id", "read_ct", "message"}, the message as the jsonb it is (never
/// parsed here).
#[pg_extern(sql = r#"
CREATE FUNCTION tasker."_pgmq_read"(queue text, vt integer, qty integer) RETURNS jsonb[]
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn _pgmq_read(queue: &str, vt: i32, qty: i32) -> ApiResult<Option<AnyArray>> {
    // the caller's memory context: the array is copied there, out of SPI's
    let outer = unsafe { pg_sys::CurrentMemoryContext };
    with_plans(queue, |p| {
        let now = Instant::now();
        let mut floor = p.floor.get();
        let mut read = match floor.start(now) {
            Some(from) => read_with(&p.read_from, &[qty.into(), vt.into(), from.into()], outer)?,
            None => None,
        };
        if read.is_none() {
            // no floor, a floor above every visible message, or time for
            // a read of the whole queue
            read = read_with(&p.read, &[qty.into(), vt.into()], outer)?;
            floor.full_read_at = Some(now);
        }
        floor.msg_id = read.as_ref().map(|(_, lowest)| *lowest);
        p.floor.set(floor);
        Ok(read.map(|(messages, _)| messages))
    })
}

/// Runs one of the read plans: the messages read (a jsonb[] copied into
/// `outer`) and the lowest msg_id among them; None when none was visible.
fn read_with(
    plan: &OwnedPreparedStatement,
    args: &[DatumWithOid],
    outer: pg_sys::MemoryContext,
) -> ApiResult<Option<(AnyArray, i64)>> {
    Spi::connect_mut(|c| {
        let table = c.update(plan, None, args)?;
        let Some(row) = table.into_iter().next() else {
            return Ok::<_, pgrx::spi::Error>(None);
        };
        let (Some(array), Some(lowest)) = (
            row.get_datum_by_ordinal(1)?.value::<AnyArray>()?,
            row.get_datum_by_ordinal(2)?.value::<i64>()?,
        ) else {
            return Ok(None);
        };
        let datum = array.datum();
        // SAFETY: a jsonb[] (varlena) datum of the row just read, copied
        // into the caller's context, which outlives this call
        unsafe {
            let copy = pgrx::PgMemoryContexts::For(outer).switch_to(|_| {
                pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(
                    datum.cast_mut_ptr::<pg_sys::varlena>(),
                ))
            });
            Ok(Some((
                AnyArray::from_polymorphic_datum(copy, false, pg_sys::JSONBARRAYOID)
                    .ok_or(pgrx::spi::Error::InvalidPosition)?,
                lowest,
            )))
        }
    })
    .map_err(internal)
}
