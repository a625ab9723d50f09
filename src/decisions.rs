//! Pure decisions of pg_tasker_core, callable from the SQL layer: the retry
//! policy, the task status table, context validation against a template's
//! input_schema, canonical versions; and the settings the SQL layer needs.
//! Every argument is a scalar or text: user payloads never reach Rust as
//! anything but text that is parsed for validation only.

use std::cell::RefCell;
use std::collections::HashMap;

use pg_tasker_core::retry::{self, FailureOutcome};
use pg_tasker_core::status::{self, StepCounts};
use pg_tasker_core::template::{self, Backoff, RetryPolicy};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::errors::{from_core, internal, invalid, ApiResult};

fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// `tasker._retry_decision(...)`: what a failed attempt leads to
/// (pg_tasker_core::retry::on_failure). `attempts` counts the attempts of
/// the current retry budget, the failed one included.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(parallel_safe)]
fn _retry_decision(
    retryable: bool,
    max_attempts: i32,
    attempts: i32,
    backoff: &str,
    backoff_base_ms: i64,
    max_backoff_ms: i64,
    jitter: bool,
    error_retryable: bool,
    requested_delay_ms: Option<i64>,
) -> Result<
    TableIterator<
        'static,
        (
            name!(retry, bool),
            name!(delay_ms, i64),
            name!(exhausted, bool),
            name!(requested, bool),
        ),
    >,
    ErrorReport,
> {
    let policy = RetryPolicy {
        retryable,
        max_attempts: max_attempts.max(1) as u32,
        backoff: match backoff {
            "none" => Backoff::None,
            "linear" => Backoff::Linear,
            "exponential" => Backoff::Exponential,
            "fibonacci" => Backoff::Fibonacci,
            other => return Err(internal(format!("unknown backoff {other}"))),
        },
        backoff_base_ms: backoff_base_ms.max(0) as u64,
        max_backoff_ms: max_backoff_ms.max(0) as u64,
        jitter,
    };
    let row = match retry::on_failure(
        &policy,
        attempts.max(0) as u32,
        error_retryable,
        requested_delay_ms.map(|d| d.max(0) as u64),
        random_unit(),
    ) {
        FailureOutcome::Retry {
            delay_ms,
            requested,
        } => (true, delay_ms as i64, false, requested),
        FailureOutcome::Error { exhausted } => (false, 0, exhausted, false),
    };
    Ok(TableIterator::once(row))
}

/// `tasker._task_status(counters..., ready)`: what pg_tasker_core::status
/// decides from a task's step counters: its execution status, its health,
/// and the task state the status stands for.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(immutable, parallel_safe)]
fn _task_status(
    total: i32,
    pending: i32,
    out: i32,
    waiting: i32,
    done: i32,
    error: i32,
    cancelled: i32,
    ready: i32,
) -> TableIterator<
    'static,
    (
        name!(execution_status, &'static str),
        name!(health, &'static str),
        name!(task_state, &'static str),
    ),
> {
    let c = StepCounts {
        total: total.into(),
        pending: pending.into(),
        out: out.into(),
        waiting_for_retry: waiting.into(),
        done: done.into(),
        error: error.into(),
        cancelled: cancelled.into(),
        ready: ready.into(),
    };
    let status = status::execution_status(&c);
    TableIterator::once((
        status.as_str(),
        status::health(&c),
        status.task_state().as_str(),
    ))
}

thread_local! {
    /// Compiled input schemas by (template, updated_at).
    static SCHEMAS: RefCell<HashMap<(pgrx::Uuid, i64), template::ContextValidator>> =
        RefCell::new(HashMap::new());
}

/// `tasker._validate_context(template_uuid, updated_at, input_schema text,
/// context text)`: 22023 listing every violation of the template's
/// input_schema; 54000 / 22023 for a context that cannot be validated
/// (nested too deeply, numbers beyond a float's range).
#[pg_extern]
fn _validate_context(
    template_uuid: pgrx::Uuid,
    updated_at: pgrx::datum::TimestampWithTimeZone,
    input_schema: &str,
    context: &str,
) -> ApiResult<()> {
    let key = (template_uuid, updated_at.into_inner());
    let instance = template::parse_json_text(context, "the task context").map_err(from_core)?;
    SCHEMAS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !cache.contains_key(&key) {
            let schema =
                template::parse_json_text(input_schema, "input_schema").map_err(from_core)?;
            let v = template::ContextValidator::new(&schema).map_err(from_core)?;
            if cache.len() > 256 {
                cache.clear();
            }
            cache.insert(key, v);
        }
        cache[&key].validate(&instance).map_err(from_core)
    })
}

/// `tasker._canonical_version(version) RETURNS text`: `1.2` is `1.2.0`;
/// 22023 for what is not a semantic version.
#[pg_extern(immutable, parallel_safe)]
fn _canonical_version(version: &str) -> ApiResult<String> {
    pg_tasker_core::version::parse(version)
        .map(|v| v.to_string())
        .map_err(from_core)
}

/// `tasker._setting(key) RETURNS bigint`: a number from the configuration
/// in force, for the SQL layer.
#[pg_extern(stable, parallel_safe)]
fn _setting(key: &str) -> ApiResult<i64> {
    crate::settings::with_current(|c| match key {
        "queues.default_visibility_timeout_seconds" => {
            Ok(c.queues.default_visibility_timeout_seconds.into())
        }
        "orchestration.failed_task_backoff_seconds" => {
            Ok(c.orchestration.failed_task_backoff_seconds.into())
        }
        "limits.max_context_bytes" => Ok(c.limits.max_context_bytes as i64),
        "limits.max_result_bytes" => Ok(c.limits.max_result_bytes as i64),
        "limits.max_map_elements" => Ok(c.limits.max_map_elements.into()),
        other => Err(invalid(format!("unknown setting \"{other}\""))),
    })
}

/// `tasker._request_queue() RETURNS text`: the task request queue
/// (orchestration.task_requests.queue), NULL when task requests are off.
#[pg_extern(stable, parallel_safe)]
fn _request_queue() -> Option<String> {
    crate::settings::with_current(|c| {
        let r = &c.orchestration.task_requests;
        r.enabled.then(|| r.queue.clone())
    })
}

/// `tasker._environment() RETURNS text`: pg_tasker.environment.
#[pg_extern(stable, parallel_safe)]
fn _environment() -> String {
    crate::guc::environment()
}

/// `tasker._wake_orchestrator()`: the background worker recomputes its
/// sleep when the current transaction commits.
#[pg_extern]
fn _wake_orchestrator() {
    crate::relay::tick_on_commit();
}

/// `tasker._notify(channel, payload)`: pg_notify, sent at commit by the
/// orchestrator when it runs in this database, so that a committing
/// transaction does not wait for the cluster-wide NOTIFY lock (crate::relay).
#[pg_extern(parallel_unsafe)]
fn _notify(channel: &str, payload: &str) {
    crate::relay::notify(channel, payload);
}

/// `tasker._set_waiting(waiting) RETURNS boolean`: whether this backend
/// may have workers registered as waiting (tasker.worker_idle); returns
/// `waiting`. See worker_state::set_waiting.
#[pg_extern(parallel_unsafe)]
fn _set_waiting(waiting: bool) -> bool {
    crate::worker_state::set_waiting(waiting);
    waiting
}

/// `tasker._anyone_waits() RETURNS boolean`: false when no backend has
/// workers registered as waiting, so an enqueue need not look in
/// tasker.worker_waits (true without shared_preload_libraries).
#[pg_extern(parallel_unsafe)]
fn _anyone_waits() -> bool {
    crate::worker_state::anyone_waits()
}

fn row_check(what: &str, problem: Option<String>) -> ApiResult<bool> {
    match problem {
        None => Ok(true),
        Some(p) => Err(crate::errors::err(
            PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
            format!("pg_tasker invariant violated by a {what} row: {p}"),
        )),
    }
}

/// `tasker._step_row_check(...)`: the invariants of a workflow_steps row
/// (pg_tasker_core::StepRow::problem), the table's one CHECK. Raises 23514
/// naming the broken invariant. (One C-language CHECK per table: each CHECK
/// costs every UPDATE statement its own preparation.)
#[allow(clippy::too_many_arguments)]
#[pg_extern(immutable, parallel_safe)]
fn _step_row_check(
    state: &str,
    attempts: i32,
    budget_offset: i32,
    max_attempts: i32,
    pending_parents: i32,
    total_parents: i32,
    transitions: i32,
    has_message: bool,
    has_started_at: bool,
    has_next_retry_at: bool,
    has_completed_at: bool,
) -> ApiResult<bool> {
    let state = pg_tasker_core::StepState::parse(state)
        .ok_or_else(|| internal(format!("unknown step state {state}")))?;
    let row = pg_tasker_core::StepRow {
        state,
        attempts,
        budget_offset,
        max_attempts,
        pending_parents,
        total_parents,
        transitions,
        has_message,
        has_started_at,
        has_next_retry_at,
        has_completed_at,
    };
    row_check("workflow_steps", row.problem())
}

/// `tasker._task_row_check(...)`: the invariants of a tasks row
/// (pg_tasker_core::TaskRow::problem), the table's one CHECK; 23514.
#[allow(clippy::too_many_arguments)]
#[pg_extern(immutable, parallel_safe)]
fn _task_row_check(
    state: &str,
    steps_total: i32,
    steps_pending: i32,
    steps_out: i32,
    steps_waiting: i32,
    steps_done: i32,
    steps_error: i32,
    steps_cancelled: i32,
    transitions: i32,
    priority: i32,
    context_is_object: bool,
    has_completed_at: bool,
    has_next_action_at: bool,
    has_claimed_by: bool,
    has_claim_expires_at: bool,
) -> ApiResult<bool> {
    let state = pg_tasker_core::TaskState::parse(state)
        .ok_or_else(|| internal(format!("unknown task state {state}")))?;
    let row = pg_tasker_core::TaskRow {
        state,
        steps_total,
        steps_pending,
        steps_out,
        steps_waiting,
        steps_done,
        steps_error,
        steps_cancelled,
        transitions,
        priority,
        context_is_object,
        has_completed_at,
        has_next_action_at,
        has_claimed_by,
        has_claim_expires_at,
    };
    row_check("tasks", row.problem())
}

/// `tasker._submission_fields(status, error, metadata) RETURNS
/// tasker.submission`: a worker's submission checked, and the fields read
/// from it (pg_tasker_core::submission). `error` and `metadata` are the text
/// of their jsonb (`p_error::text`); with a problem, the other fields are
/// NULL. (pgrx resolves a composite return type only outside a Result, so
/// errors are raised here.)
#[pg_extern(immutable, parallel_safe, requires = ["payloads"])]
fn _submission_fields(
    status: Option<&str>,
    error: Option<&str>,
    metadata: Option<&str>,
) -> pgrx::composite_type!('static, "submission") {
    submission_row(status, error, metadata).unwrap_or_else(|e| {
        e.report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
    })
}

fn submission_row(
    status: Option<&str>,
    error: Option<&str>,
    metadata: Option<&str>,
) -> ApiResult<PgHeapTuple<'static, pgrx::AllocatedByRust>> {
    let s = pg_tasker_core::submission::check(status, error, metadata).map_err(internal)?;
    let execution_time_ms = s
        .execution_time_ms
        .map(|t| t.parse::<AnyNumeric>().map_err(internal))
        .transpose()?;
    tasker_row(
        "submission",
        [
            ("problem", s.problem.into_datum(), pg_sys::TEXTOID),
            ("success", s.success.into_datum(), pg_sys::BOOLOID),
            ("attempt", s.attempt.into_datum(), pg_sys::INT4OID),
            ("worker_id", s.worker_id.into_datum(), pg_sys::TEXTOID),
            (
                "execution_time_ms",
                execution_time_ms.into_datum(),
                pg_sys::NUMERICOID,
            ),
            ("message", s.message.into_datum(), pg_sys::TEXTOID),
            ("error_code", s.error_code.into_datum(), pg_sys::TEXTOID),
            ("retryable", s.retryable.into_datum(), pg_sys::BOOLOID),
            (
                "requested_delay_ms",
                s.requested_delay_ms.into_datum(),
                pg_sys::INT8OID,
            ),
        ],
    )
}

/// A value of the composite type `tasker.<type_name>` from its fields, in
/// the type's order, each named with its type (checked against the type:
/// a mismatch is an internal error, never a wrong datum). The type is found
/// through the catalog caches (`PgHeapTuple::new_composite_type` parses
/// its name with the SQL parser, and `set_by_name` forms the tuple again
/// for every field: ≈ 10 µs per row, measured).
fn tasker_row<const N: usize>(
    type_name: &str,
    fields: [(&str, Option<pg_sys::Datum>, pg_sys::Oid); N],
) -> ApiResult<PgHeapTuple<'static, pgrx::AllocatedByRust>> {
    let name = std::ffi::CString::new(type_name).map_err(internal)?;
    // SAFETY: catalog cache lookups by name; both return InvalidOid when
    // there is no such object (missing_ok)
    let typoid = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"tasker".as_ptr(), true);
        pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
            pg_sys::Anum_pg_type_oid as i16,
            pg_sys::Datum::from(name.as_ptr()),
            pg_sys::Datum::from(nsp),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    };
    let tupdesc = pgrx::PgTupleDesc::for_composite_type_by_oid(typoid)
        .ok_or_else(|| internal(format!("no composite type tasker.{type_name}")))?;
    let matches = tupdesc.len() == N
        && tupdesc
            .iter()
            .zip(fields.iter())
            .all(|(att, (field, _, oid))| att.name() == *field && att.type_oid().value() == *oid);
    if !matches {
        return Err(internal(format!(
            "tasker.{type_name} does not have the fields {:?}",
            fields.map(|f| f.0)
        )));
    }
    // SAFETY: each datum is of its attribute's type (checked above)
    unsafe { PgHeapTuple::from_datums(tupdesc, fields.map(|f| f.1)) }.map_err(internal)
}
