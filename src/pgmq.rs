//! pgmq behind one adapter, Rust side: the statements on the hot path —
//! sending step messages, reading them, archiving them — as plans kept per
//! queue for the session (pgmq.send, pgmq.read and pgmq.archive run dynamic
//! SQL that is planned again on every call). The column lists are pgmq's; the table names come
//! from `tasker._pgmq_table` (sql/01_pgmq.sql, pgmq's own naming helper).
//! Messages pass through as the jsonb datums they are: never parsed here.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{AnyArray, PgBuiltInOids};

use crate::errors::{internal, ApiResult};

struct QueuePlans {
    send: OwnedPreparedStatement,
    archive: OwnedPreparedStatement,
    read: OwnedPreparedStatement,
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
            // pgmq.read's statement (without its conditional filter)
            let read = prepare(
                &format!(
                    "WITH cte AS (
                        SELECT msg_id FROM {q}
                        WHERE vt <= clock_timestamp()
                        ORDER BY msg_id ASC
                        LIMIT $1
                        FOR UPDATE SKIP LOCKED
                     ), r AS (
                     UPDATE {q} m
                     SET last_read_at = clock_timestamp(),
                         vt = clock_timestamp() + make_interval(secs => $2),
                         read_ct = read_ct + 1
                     FROM cte
                     WHERE m.msg_id = cte.msg_id
                     RETURNING m.msg_id, m.read_ct, m.message)
                     SELECT array_agg(jsonb_build_object('msg_id', r.msg_id, 'read_ct', r.read_ct,
                                                         'message', r.message) ORDER BY r.msg_id)
                     FROM r"
                ),
                &[PgBuiltInOids::INT4OID, PgBuiltInOids::INT4OID],
            )?;
            plans.insert(queue.to_string(), QueuePlans { send, archive, read });
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
        Spi::connect_mut(|c| {
            let table = c.update(&p.read, None, &[qty.into(), vt.into()])?;
            let Some(row) = table.into_iter().next() else {
                return Ok::<_, pgrx::spi::Error>(None);
            };
            let Some(array) = row.get_datum_by_ordinal(1)?.value::<AnyArray>()? else {
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
                Ok(AnyArray::from_polymorphic_datum(
                    copy,
                    false,
                    pg_sys::JSONBARRAYOID,
                ))
            }
        })
        .map_err(internal)
    })
}
