//! pgmq behind one adapter, Rust side: the two statements on the hot path,
//! sending step messages and archiving them, as plans kept per queue for
//! the session (pgmq.send and pgmq.archive run dynamic SQL that is planned
//! again on every call). The column lists are pgmq's; the table names come
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
            plans.insert(queue.to_string(), QueuePlans { send, archive });
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
