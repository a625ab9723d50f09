//! The orchestration core: results, retries, task evaluation, the
//! orchestration cycle and operator actions. Decisions come from
//! `pg_tasker_core` (retry, status); this module only moves rows.

use pg_tasker_core::retry::{self, FailureOutcome};
use pg_tasker_core::status::{self, ExecutionStatus, StepCounts};
use pg_tasker_core::submission::{self, Outcome, Submission};
use pg_tasker_core::template::{Backoff, RetryPolicy};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::{err, from_core, internal, invalid, null_arg, ApiResult};
use crate::spi_util::{json_row, pg_uuid, run, scalar};
use crate::subxact;

const TERMINAL_TASK_STATES: [&str; 4] = ["complete", "error", "cancelled", "resolved_manually"];

fn not_found(what: &str, id: impl std::fmt::Display) -> ErrorReport {
    err(
        PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
        format!("{what} {id} does not exist"),
    )
}

fn wrong_state(message: String) -> ErrorReport {
    err(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        message,
    )
}

/// A step row, locked, with what result handling needs.
#[derive(Deserialize)]
pub(crate) struct LockedStep {
    pub(crate) step_uuid: uuid::Uuid,
    pub(crate) task_uuid: uuid::Uuid,
    pub(crate) name: String,
    pub(crate) state: String,
    pub(crate) attempts: u32,
    pub(crate) max_attempts: u32,
    pub(crate) retryable: bool,
    pub(crate) backoff: Backoff,
    pub(crate) backoff_base_ms: u64,
    pub(crate) max_backoff_ms: u64,
    pub(crate) jitter: bool,
    pub(crate) queue_msg_id: Option<i64>,
    pub(crate) queue_name: String,
    pub(crate) ever_enqueued: bool,
    pub(crate) task_state: String,
}

impl LockedStep {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            retryable: self.retryable,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            backoff_base_ms: self.backoff_base_ms,
            max_backoff_ms: self.max_backoff_ms,
            jitter: self.jitter,
        }
    }
}

pub(crate) fn lock_step(step_uuid: pgrx::Uuid) -> ApiResult<LockedStep> {
    json_row::<LockedStep>(
        "SELECT to_jsonb(r) FROM (
            SELECT s.step_uuid, s.task_uuid, s.name, s.state, s.attempts, s.max_attempts, s.retryable,
                   s.backoff, s.backoff_base_ms, s.max_backoff_ms, s.jitter, s.queue_msg_id,
                   n.queue_name, s.enqueued_at IS NOT NULL AS ever_enqueued, t.state AS task_state
              FROM tasker.workflow_steps s
              JOIN tasker.tasks t USING (task_uuid)
              JOIN tasker.namespaces n ON n.name = t.namespace_name
             WHERE s.step_uuid = $1
               FOR NO KEY UPDATE OF s) r",
        &[step_uuid.into()],
    )?
    .ok_or_else(|| not_found("step", step_uuid))
}

pub(crate) fn archive_message(step: &LockedStep) -> ApiResult<()> {
    match step.queue_msg_id {
        Some(msg) => archive(&step.queue_name, msg),
        None => Ok(()),
    }
}

thread_local! {
    /// Kept plans of the archive statement, by queue.
    static ARCHIVE_PLANS: std::cell::RefCell<std::collections::HashMap<String, pgrx::spi::OwnedPreparedStatement>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// What `pgmq.archive(queue, msg_id)` does (same statement, same columns),
/// with a plan prepared once per queue and kept for the session instead of
/// pgmq's dynamic SQL, which is planned again on every call. It runs for
/// every step result.
pub(crate) fn archive(queue: &str, msg_id: i64) -> ApiResult<()> {
    ARCHIVE_PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if !plans.contains_key(queue) {
            let (q, a) = (spi::quote_identifier(format!("q_{queue}")), spi::quote_identifier(format!("a_{queue}")));
            let sql = format!(
                "WITH archived AS (
                    DELETE FROM pgmq.{q} WHERE msg_id = $1
                    RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
                 INSERT INTO pgmq.{a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
                 SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM archived"
            );
            let plan = Spi::connect(|c| c.prepare_mut(sql.as_str(), &[pgrx::PgBuiltInOids::INT8OID.oid()]).map(|p| p.keep()))
                .map_err(internal)?;
            plans.insert(queue.to_string(), plan);
        }
        let plan = plans.get(queue).expect("just prepared");
        Spi::connect_mut(|c| c.update(plan, None, &[msg_id.into()]).map(|_| ())).map_err(internal)
    })
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// `tasker.submit_result(step_uuid, status, result, error, metadata) RETURNS text`
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn submit_result(
    step_uuid: Option<pgrx::Uuid>,
    status: Option<&str>,
    result: default!(Option<JsonB>, "NULL"),
    error: default!(Option<JsonB>, "NULL"),
    metadata: default!(Option<JsonB>, "NULL"),
) -> ApiResult<String> {
    let step_uuid = step_uuid.ok_or_else(|| null_arg("step_uuid"))?;
    let status = status.ok_or_else(|| null_arg("status"))?;
    let sub = submission::parse(
        status,
        result.map(|j| j.0),
        error.map(|j| j.0),
        metadata.map(|j| j.0),
    )
    .map_err(from_core)?;

    let step = lock_step(step_uuid)?;
    match step.state.as_str() {
        "enqueued" | "in_progress" => {}
        "pending" | "waiting_for_retry" if !step.ever_enqueued => {
            return Err(wrong_state(format!(
                "step \"{}\" ({step_uuid}) has never been enqueued; there is no attempt to report on",
                step.name
            )))
        }
        other => {
            notice!(
                "pg_tasker: result for step \"{}\" ({step_uuid}) ignored: the step is {other}, attempt {} is already settled",
                step.name,
                step.attempts
            );
            return Ok(other.to_string());
        }
    }
    if TERMINAL_TASK_STATES.contains(&step.task_state.as_str()) {
        notice!(
            "pg_tasker: result for step \"{}\" ({step_uuid}) ignored: its task is {}",
            step.name,
            step.task_state
        );
        return Ok(step.state);
    }
    if let Some(a) = sub.metadata.attempt {
        if a != step.attempts {
            notice!(
                "pg_tasker: result for attempt {a} of step \"{}\" ({step_uuid}) ignored: the current attempt is {}",
                step.name,
                step.attempts
            );
            return Ok(step.state);
        }
    }

    archive_message(&step)?;
    let audit = json!({
        "attempt": step.attempts,
        "worker_id": sub.metadata.worker_id,
        "execution_time_ms": sub.metadata.execution_time_ms,
        "metadata": sub.metadata.raw,
    });
    match &sub.outcome {
        Outcome::Success { result } => {
            complete_step(
                &step,
                result.clone(),
                "complete",
                "completed by worker",
                audit,
            )?;
            Ok("complete".into())
        }
        Outcome::Failure { .. } => fail_step(&step, &sub, audit),
    }
}

/// Marks a step complete (or resolved_manually), releases its children and
/// enqueues those that became ready; a step without children may finish the
/// task, so the task is re-evaluated.
fn complete_step(
    step: &LockedStep,
    result: Value,
    to_state: &str,
    reason: &str,
    audit: Value,
) -> ApiResult<()> {
    run(
        "UPDATE tasker.workflow_steps
            SET state = $2, results = $3, completed_at = now(), next_retry_at = NULL, updated_at = now()
          WHERE step_uuid = $1",
        &[pg_uuid(step.step_uuid).into(), to_state.into(), JsonB(result).into()],
    )?;
    run(
        "SELECT tasker._step_transition(ARRAY[$1], $2, $3, $4)",
        &[
            pg_uuid(step.step_uuid).into(),
            to_state.into(),
            reason.into(),
            JsonB(audit).into(),
        ],
    )?;
    // Children are locked in uuid order, so concurrent parents of a fan-in
    // serialize on them instead of deadlocking; exactly one of them sees the
    // counter reach zero and enqueues the child.
    let released = json_row::<ChildRelease>(
        "WITH kids AS (
            SELECT c.step_uuid
              FROM tasker.step_edges e
              JOIN tasker.workflow_steps c ON c.step_uuid = e.to_step_uuid
             WHERE e.from_step_uuid = $1
             ORDER BY c.step_uuid
               FOR NO KEY UPDATE OF c
         ), dec AS (
            UPDATE tasker.workflow_steps c
               SET pending_parents = c.pending_parents - 1, updated_at = now()
              FROM kids
             WHERE c.step_uuid = kids.step_uuid
            RETURNING c.step_uuid, c.pending_parents
         )
         SELECT jsonb_build_object(
                  'children', count(*),
                  'ready', coalesce(jsonb_agg(step_uuid) FILTER (WHERE pending_parents = 0), '[]'))
           FROM dec",
        &[pg_uuid(step.step_uuid).into()],
    )?
    .unwrap_or_default();
    if released.children == 0 {
        refresh_task(step.task_uuid, reason)?;
    } else if !released.ready.is_empty() {
        enqueue_ready(
            step.task_uuid,
            Some(&released.ready),
            Some(&step.queue_name),
        )?;
    }
    Ok(())
}

#[derive(Deserialize, Default)]
struct ChildRelease {
    children: i64,
    ready: Vec<uuid::Uuid>,
}

fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

pub(crate) fn fail_step(step: &LockedStep, sub: &Submission, audit: Value) -> ApiResult<String> {
    let Outcome::Failure { error } = &sub.outcome else {
        unreachable!("fail_step takes failures")
    };
    let mut last_error = Value::Object(error.raw.clone());
    last_error["attempt"] = json!(step.attempts);
    let decision = retry::on_failure(
        &step.policy(),
        step.attempts,
        error.retryable,
        sub.requested_delay_ms(),
        random_unit(),
    );
    let mut audit = audit;
    audit["error"] = last_error.clone();
    let new_state = match decision {
        FailureOutcome::Retry {
            delay_ms,
            requested,
        } => {
            audit["retry_in_ms"] = json!(delay_ms);
            audit["delay_requested_by_handler"] = json!(requested);
            run(
                "UPDATE tasker.workflow_steps
                    SET state = 'waiting_for_retry', last_error = $2,
                        next_retry_at = now() + make_interval(secs => $3::double precision / 1000),
                        backoff_request_seconds = CASE WHEN $4 THEN ceil($3::numeric / 1000)::integer END,
                        updated_at = now()
                  WHERE step_uuid = $1",
                &[pg_uuid(step.step_uuid).into(), JsonB(last_error).into(), (delay_ms as i64).into(), requested.into()],
            )?;
            "waiting_for_retry"
        }
        FailureOutcome::Error { exhausted } => {
            last_error["attempts_exhausted"] = json!(exhausted);
            run(
                "UPDATE tasker.workflow_steps SET state = 'error', last_error = $2, updated_at = now()
                  WHERE step_uuid = $1",
                &[pg_uuid(step.step_uuid).into(), JsonB(last_error).into()],
            )?;
            "error"
        }
    };
    run(
        "SELECT tasker._step_transition(ARRAY[$1], $2, $3, $4)",
        &[
            pg_uuid(step.step_uuid).into(),
            new_state.into(),
            error.message.as_str().into(),
            JsonB(audit).into(),
        ],
    )?;
    refresh_task(step.task_uuid, "step failed")?;
    // A retry that is due at once (no backoff) was enqueued again by the
    // refresh: report where the step really is.
    current_step_state(step.step_uuid)
}

fn current_step_state(step: uuid::Uuid) -> ApiResult<String> {
    scalar::<String>(
        "SELECT state FROM tasker.workflow_steps WHERE step_uuid = $1",
        &[pg_uuid(step).into()],
    )?
    .ok_or_else(|| internal("step vanished"))
}

// ---------------------------------------------------------------------------
// Enqueueing
// ---------------------------------------------------------------------------

struct QueuePlans {
    /// The queue table's msg_id sequence, for the enqueue statement.
    sequence: String,
    /// INSERT of pre-numbered messages into the queue table.
    insert: pgrx::spi::OwnedPreparedStatement,
}

thread_local! {
    static ENQUEUE_PLAN: std::cell::RefCell<Option<pgrx::spi::OwnedPreparedStatement>> =
        const { std::cell::RefCell::new(None) };
    static QUEUE_PLANS: std::cell::RefCell<std::collections::HashMap<String, QueuePlans>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Enqueues a task's runnable steps (all, or only `only`) into `queue`, the
/// task's namespace queue (looked up when not given), in the current
/// transaction. Returns how many were enqueued.
///
/// Two kept plans do it: sql/queries/enqueue.sql locks and moves the steps
/// and builds their messages; a per-queue INSERT puts the messages in the
/// pgmq queue table with the msg_ids already recorded on the steps (pgmq's
/// own columns and defaults, like pgmq.send, without its dynamic SQL).
pub(crate) fn enqueue_ready(
    task: uuid::Uuid,
    only: Option<&[uuid::Uuid]>,
    queue: Option<&str>,
) -> ApiResult<i64> {
    let task = pg_uuid(task);
    let queue = match queue {
        Some(q) => q.to_string(),
        None => scalar::<String>(
            "SELECT n.queue_name FROM tasker.tasks t JOIN tasker.namespaces n ON n.name = t.namespace_name
              WHERE t.task_uuid = $1",
            &[task.into()],
        )?
        .ok_or_else(|| not_found("task", task))?,
    };
    QUEUE_PLANS.with(|plans| -> ApiResult<i64> {
        let mut plans = plans.borrow_mut();
        if !plans.contains_key(&queue) {
            let sequence = scalar::<String>(
                "SELECT pg_catalog.pg_get_serial_sequence(format('pgmq.%I', 'q_' || $1), 'msg_id')",
                &[queue.as_str().into()],
            )?
            .ok_or_else(|| internal(format!("queue {queue} has no msg_id sequence")))?;
            let q = spi::quote_identifier(format!("q_{queue}"));
            let sql = format!(
                "INSERT INTO pgmq.{q} (msg_id, vt, message) OVERRIDING SYSTEM VALUE
                 SELECT m.id, clock_timestamp(), m.msg FROM unnest($1::bigint[], $2::jsonb[]) AS m(id, msg)"
            );
            let insert = Spi::connect(|c| {
                c.prepare_mut(sql.as_str(), &[pgrx::PgBuiltInOids::INT8ARRAYOID.oid(), pgrx::PgBuiltInOids::JSONBARRAYOID.oid()])
                    .map(|p| p.keep())
            })
            .map_err(internal)?;
            plans.insert(queue.clone(), QueuePlans { sequence, insert });
        }
        let qp = plans.get(&queue).expect("just prepared");
        let ids: Option<Vec<pgrx::Uuid>> = only.map(|o| o.iter().map(|u| pg_uuid(*u)).collect());
        let (msg_ids, messages) = ENQUEUE_PLAN.with(|plan| -> ApiResult<(Vec<i64>, Vec<JsonB>)> {
            let mut plan = plan.borrow_mut();
            if plan.is_none() {
                let kept = Spi::connect(|c| {
                    c.prepare_mut(
                        include_str!("../sql/queries/enqueue.sql"),
                        &[pgrx::PgBuiltInOids::UUIDOID.oid(), pgrx::PgBuiltInOids::UUIDARRAYOID.oid(), pgrx::PgBuiltInOids::TEXTOID.oid()],
                    )
                    .map(|p| p.keep())
                })
                .map_err(internal)?;
                *plan = Some(kept);
            }
            let stmt = plan.as_ref().expect("just prepared");
            Spi::connect_mut(|c| {
                let rows = c.update(stmt, None, &[task.into(), ids.clone().into(), qp.sequence.as_str().into()])?;
                let mut out = (Vec::new(), Vec::new());
                for row in rows {
                    out.0.push(row.get::<i64>(1)?.expect("msg_id"));
                    out.1.push(row.get::<JsonB>(2)?.expect("message"));
                }
                Ok::<_, pgrx::spi::Error>(out)
            })
            .map_err(internal)
        })?;
        if msg_ids.is_empty() {
            return Ok(0);
        }
        let n = msg_ids.len() as i64;
        Spi::connect_mut(|c| c.update(&qp.insert, None, &[msg_ids.into(), messages.into()]).map(|_| ())).map_err(internal)?;
        Ok(n)
    })
}

// ---------------------------------------------------------------------------
// Task evaluation
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct Counts {
    total: i64,
    pending: i64,
    ready: i64,
    in_flight: i64,
    waiting_for_retry: i64,
    complete: i64,
    error: i64,
    cancelled: i64,
}

impl From<&Counts> for StepCounts {
    fn from(c: &Counts) -> Self {
        StepCounts {
            total: c.total,
            pending: c.pending,
            ready: c.ready,
            in_flight: c.in_flight,
            waiting_for_retry: c.waiting_for_retry,
            complete: c.complete,
            error: c.error,
            cancelled: c.cancelled,
        }
    }
}

fn step_counts(task: pgrx::Uuid) -> ApiResult<Counts> {
    json_row::<Counts>(
        "SELECT to_jsonb(c) FROM tasker._step_counts($1) c",
        &[task.into()],
    )?
    .ok_or_else(|| internal("step counts missing"))
}

/// What an evaluation did.
#[derive(Debug, Default, Clone)]
pub struct Refreshed {
    pub state: String,
    pub enqueued: i64,
    pub changed: bool,
}

/// Locks the task, enqueues its runnable steps, and records the task state
/// and the time the orchestrator must look at it again (`next_action_at`:
/// the earliest retry, or NULL when nothing is due). Terminal tasks are left
/// alone.
pub fn refresh_task(task: uuid::Uuid, reason: &str) -> ApiResult<Refreshed> {
    let task = pg_uuid(task);
    let state = scalar::<String>(
        "SELECT state FROM tasker.tasks WHERE task_uuid = $1 FOR NO KEY UPDATE",
        &[task.into()],
    )?
    .ok_or_else(|| not_found("task", task))?;
    if TERMINAL_TASK_STATES.contains(&state.as_str()) {
        return Ok(Refreshed {
            state,
            ..Default::default()
        });
    }
    let enqueued = enqueue_ready(uuid::Uuid::from_bytes(*task.as_bytes()), None, None)?;
    let counts = step_counts(task)?;
    let exec = status::execution_status(&StepCounts::from(&counts));
    let new_state = exec.task_state();
    let scheduled = scalar::<bool>(
        "UPDATE tasker.tasks
            SET state = $2,
                next_action_at = CASE WHEN $3 THEN now()
                                      ELSE (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s
                                             WHERE s.task_uuid = $1 AND s.state = 'waiting_for_retry') END,
                completed_at = CASE WHEN $2 = 'complete' THEN now() ELSE completed_at END,
                updated_at = now()
          WHERE task_uuid = $1
        RETURNING next_action_at IS NOT NULL",
        &[task.into(), new_state.into(), (exec == ExecutionStatus::HasReadySteps).into()],
    )?
    .unwrap_or(false);
    if scheduled {
        // the orchestrator must recompute when to wake up
        crate::worker_state::wake_on_commit();
    }
    let changed = new_state != state;
    if changed {
        run(
            "SELECT tasker._task_transition($1, $2, $3, $4)",
            &[
                task.into(),
                new_state.into(),
                reason.into(),
                JsonB(json!({"execution_status": exec.as_str()})).into(),
            ],
        )?;
    }
    Ok(Refreshed {
        state: new_state.to_string(),
        enqueued,
        changed,
    })
}

/// `tasker.task_execution_context(task_uuid)`: the task's execution status
/// and step counts (tasker-core's get_task_execution_context).
#[pg_extern(stable, security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn task_execution_context(
    task_uuid: pgrx::Uuid,
) -> Result<
    TableIterator<
        'static,
        (
            name!(task_uuid, pgrx::Uuid),
            name!(state, String),
            name!(execution_status, String),
            name!(health, String),
            name!(total_steps, i64),
            name!(pending_steps, i64),
            name!(ready_steps, i64),
            name!(in_progress_steps, i64),
            name!(waiting_for_retry_steps, i64),
            name!(completed_steps, i64),
            name!(failed_steps, i64),
            name!(cancelled_steps, i64),
            name!(completion_percentage, f64),
        ),
    >,
    ErrorReport,
> {
    let state = scalar::<String>(
        "SELECT state FROM tasker.tasks WHERE task_uuid = $1",
        &[task_uuid.into()],
    )?
    .ok_or_else(|| not_found("task", task_uuid))?;
    let c = step_counts(task_uuid)?;
    let sc = StepCounts::from(&c);
    let exec = status::execution_status(&sc);
    Ok(TableIterator::once((
        task_uuid,
        state,
        exec.as_str().to_string(),
        status::health(&sc).to_string(),
        c.total,
        c.pending,
        c.ready,
        c.in_flight,
        c.waiting_for_retry,
        c.complete,
        c.error,
        c.cancelled,
        status::completion_percentage(&sc),
    )))
}

// ---------------------------------------------------------------------------
// Orchestration cycle
// ---------------------------------------------------------------------------

/// `tasker.run_orchestration_cycle(orchestrator_id, max_tasks) RETURNS jsonb`:
/// claims due tasks, enqueues their runnable steps (due retries included),
/// re-evaluates and releases them. Each task runs in its own subtransaction:
/// an error in one is reported and postponed, the others go on.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn run_orchestration_cycle(
    orchestrator_id: default!(Option<&str>, "'manual'"),
    max_tasks: default!(Option<i32>, 100),
) -> ApiResult<JsonB> {
    let orchestrator = orchestrator_id.ok_or_else(|| null_arg("orchestrator_id"))?;
    let max_tasks = max_tasks.ok_or_else(|| null_arg("max_tasks"))?;
    if max_tasks < 1 {
        return Err(invalid(format!(
            "max_tasks must be at least 1, got {max_tasks}"
        )));
    }
    let o = crate::settings::current().orchestration;
    cycle(
        orchestrator,
        max_tasks,
        o.claim_timeout_seconds as i32,
        o.failed_task_backoff_seconds as i32,
    )
    .map(JsonB)
}

/// One orchestration pass (the body of `run_orchestration_cycle`, also run by
/// the background worker).
pub fn cycle(
    orchestrator: &str,
    max_tasks: i32,
    claim_timeout_seconds: i32,
    failed_task_backoff_seconds: i32,
) -> ApiResult<Value> {
    let claimed: Vec<uuid::Uuid> = json_row::<Vec<uuid::Uuid>>(
        "SELECT coalesce(jsonb_agg(c.task_uuid), '[]') FROM tasker.claim_ready_tasks($1, $2, NULL, $3) c",
        &[orchestrator.into(), max_tasks.into(), claim_timeout_seconds.into()],
    )?
    .unwrap_or_default();

    let (mut enqueued, mut completed, mut blocked, mut processed) = (0i64, 0i64, 0i64, 0i64);
    let mut errors = Vec::new();
    for task in &claimed {
        let task = *task;
        match subxact::run(move || refresh_task(task, "orchestration cycle")) {
            Ok(r) => {
                processed += 1;
                enqueued += r.enqueued;
                if r.changed && r.state == "complete" {
                    completed += 1;
                }
                if r.changed && r.state == "blocked_by_failures" {
                    blocked += 1;
                }
            }
            Err(failed) => {
                run(
                    "UPDATE tasker.tasks SET next_action_at = now() + make_interval(secs => $2) WHERE task_uuid = $1",
                    &[pg_uuid(task).into(), failed_task_backoff_seconds.into()],
                )?;
                errors.push(json!({"task_uuid": task, "error": failed.to_string()}));
            }
        }
        run(
            "SELECT tasker.release_task_claim($1, $2)",
            &[pg_uuid(task).into(), orchestrator.into()],
        )?;
    }
    Ok(json!({
        "orchestrator_id": orchestrator,
        "tasks_claimed": claimed.len(),
        "tasks_processed": processed,
        "steps_enqueued": enqueued,
        "tasks_completed": completed,
        "tasks_blocked": blocked,
        "errors": errors,
    }))
}

// ---------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------

/// `tasker.read_steps(namespace, worker_id, qty, visibility_timeout_seconds)`:
/// reads up to `qty` step messages of a namespace's queue and marks those
/// steps `in_progress`, atomically. Plain `pgmq.read` works as well; the
/// steps then stay `enqueued` until their result arrives.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn read_steps(
    namespace: Option<&str>,
    worker_id: Option<&str>,
    qty: default!(Option<i32>, 10),
    visibility_timeout_seconds: default!(Option<i32>, "NULL"),
) -> Result<
    TableIterator<
        'static,
        (
            name!(msg_id, i64),
            name!(read_ct, i32),
            name!(step_uuid, pgrx::Uuid),
            name!(message, JsonB),
        ),
    >,
    ErrorReport,
> {
    let namespace = namespace.ok_or_else(|| null_arg("namespace"))?;
    let worker_id = worker_id.ok_or_else(|| null_arg("worker_id"))?;
    let qty = qty.unwrap_or(10);
    if !(1..=1000).contains(&qty) {
        return Err(invalid(format!(
            "qty must be between 1 and 1000, got {qty}"
        )));
    }
    let vt = visibility_timeout_seconds.unwrap_or(
        crate::settings::current()
            .queues
            .default_visibility_timeout_seconds as i32,
    );
    if vt < 1 {
        return Err(invalid(format!(
            "visibility_timeout_seconds must be at least 1, got {vt}"
        )));
    }
    let queue = scalar::<String>(
        "SELECT queue_name FROM tasker.namespaces WHERE name = $1",
        &[namespace.into()],
    )?
    .ok_or_else(|| crate::errors::undefined(format!("namespace \"{namespace}\" does not exist")))?;

    #[derive(Deserialize)]
    struct Msg {
        msg_id: i64,
        read_ct: i32,
        step_uuid: uuid::Uuid,
        message: Value,
    }
    let msgs: Vec<Msg> = json_row::<Vec<Msg>>(
        "WITH m AS (
            SELECT r.msg_id, r.read_ct, (r.message->>'step_uuid')::uuid AS step_uuid, r.message
              FROM pgmq.read($1, $2, $3) r
         ), started AS (
            UPDATE tasker.workflow_steps s SET state = 'in_progress', updated_at = now()
              FROM m
             WHERE s.step_uuid = m.step_uuid AND s.state = 'enqueued'
            RETURNING s.step_uuid
         ), tr AS (
            SELECT tasker._step_transition(array_agg(step_uuid), 'in_progress', 'read by worker',
                                           jsonb_build_object('worker_id', $4::text))
              FROM started HAVING count(*) > 0
         )
         SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.msg_id), '[]')
           FROM m LEFT JOIN (SELECT 1 FROM tr) t ON true",
        &[
            queue.as_str().into(),
            vt.into(),
            qty.into(),
            worker_id.into(),
        ],
    )?
    .unwrap_or_default();
    Ok(TableIterator::new(
        msgs.into_iter()
            .map(|m| (m.msg_id, m.read_ct, pg_uuid(m.step_uuid), JsonB(m.message)))
            .collect::<Vec<_>>(),
    ))
}

// ---------------------------------------------------------------------------
// Operator actions
// ---------------------------------------------------------------------------

/// `tasker.cancel_task(task_uuid, reason) RETURNS text`: cancels every
/// unfinished step (their queue messages are archived) and the task.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn cancel_task(
    task_uuid: Option<pgrx::Uuid>,
    reason: default!(Option<&str>, "NULL"),
) -> ApiResult<String> {
    let task = task_uuid.ok_or_else(|| null_arg("task_uuid"))?;
    let state = scalar::<String>(
        "SELECT state FROM tasker.tasks WHERE task_uuid = $1 FOR NO KEY UPDATE",
        &[task.into()],
    )?
    .ok_or_else(|| not_found("task", task))?;
    if TERMINAL_TASK_STATES.contains(&state.as_str()) {
        return Err(wrong_state(format!(
            "task {task} is already {state} and cannot be cancelled"
        )));
    }
    let reason = reason.unwrap_or("cancelled by operator");
    stop_steps(
        task,
        &[
            "pending",
            "enqueued",
            "in_progress",
            "waiting_for_retry",
            "enqueued_for_orchestration",
            "enqueued_as_error_for_orchestration",
        ],
        "cancelled",
        reason,
        None,
    )?;
    close_task(task, "cancelled", reason, json!({}))?;
    Ok("cancelled".into())
}

/// Stops a task's steps that are in one of `states`: their queue messages
/// are archived (so no worker picks them up), they move to `to` (with
/// `last_error` when given) and the transitions are recorded.
pub(crate) fn stop_steps(
    task: pgrx::Uuid,
    states: &[&str],
    to: &str,
    reason: &str,
    last_error: Option<Value>,
) -> ApiResult<()> {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    run(
        "WITH victims AS (
            SELECT s.step_uuid, s.queue_msg_id, s.state FROM tasker.workflow_steps s
             WHERE s.task_uuid = $1 AND s.state = ANY ($2)
             ORDER BY s.step_uuid FOR NO KEY UPDATE
         ), archived AS (
            SELECT pgmq.archive(n.queue_name, v.queue_msg_id)
              FROM victims v, tasker.tasks t JOIN tasker.namespaces n ON n.name = t.namespace_name
             WHERE t.task_uuid = $1 AND v.queue_msg_id IS NOT NULL AND v.state IN ('enqueued', 'in_progress')
         ), upd AS (
            UPDATE tasker.workflow_steps s
               SET state = $3, last_error = coalesce($5, s.last_error), next_retry_at = NULL, updated_at = now()
              FROM victims v WHERE s.step_uuid = v.step_uuid
            RETURNING s.step_uuid
         )
         SELECT tasker._step_transition(array_agg(upd.step_uuid), $3, $4, coalesce($5, '{}'))
           FROM upd, (SELECT count(*) FROM archived) a
         HAVING count(*) > 0",
        &[task.into(), states.into(), to.into(), reason.into(), last_error.map(JsonB).into()],
    )
}

/// Ends a task in a terminal state: nothing due, no claim, a transition.
pub(crate) fn close_task(
    task: pgrx::Uuid,
    to: &str,
    reason: &str,
    metadata: Value,
) -> ApiResult<()> {
    run(
        "UPDATE tasker.tasks SET state = $2, next_action_at = NULL, completed_at = now(), updated_at = now(),
                claimed_by = NULL, claimed_at = NULL, claim_expires_at = NULL
          WHERE task_uuid = $1",
        &[task.into(), to.into()],
    )?;
    run(
        "SELECT tasker._task_transition($1, $2, $3, $4)",
        &[
            task.into(),
            to.into(),
            reason.into(),
            JsonB(metadata).into(),
        ],
    )
}

/// `tasker.retry_step(step_uuid, reason) RETURNS text`: puts a failed step
/// back to pending with its attempts reset, and resumes the task.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn retry_step(
    step_uuid: Option<pgrx::Uuid>,
    reason: default!(Option<&str>, "NULL"),
) -> ApiResult<String> {
    let step = lock_step(step_uuid.ok_or_else(|| null_arg("step_uuid"))?)?;
    if step.state != "error" {
        return Err(wrong_state(format!(
            "step \"{}\" is {}; only a step in error can be retried",
            step.name, step.state
        )));
    }
    reopen_task_if_blocked(&step)?;
    run(
        "UPDATE tasker.workflow_steps
            SET state = 'pending', attempts = 0, next_retry_at = NULL, updated_at = now()
          WHERE step_uuid = $1",
        &[pg_uuid(step.step_uuid).into()],
    )?;
    run(
        "SELECT tasker._step_transition(ARRAY[$1], 'pending', $2, jsonb_build_object('previous_attempts', $3))",
        &[pg_uuid(step.step_uuid).into(), reason.unwrap_or("retried by operator").into(), (step.attempts as i32).into()],
    )?;
    refresh_task(step.task_uuid, "step retried by operator")?;
    current_step_state(step.step_uuid)
}

/// `tasker.resolve_step_manually(step_uuid, result, reason) RETURNS text`:
/// marks a step resolved with the given result, which satisfies its
/// dependents as a completion would.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn resolve_step_manually(
    step_uuid: Option<pgrx::Uuid>,
    result: default!(Option<JsonB>, "NULL"),
    reason: default!(Option<&str>, "NULL"),
) -> ApiResult<String> {
    let step = lock_step(step_uuid.ok_or_else(|| null_arg("step_uuid"))?)?;
    if matches!(
        step.state.as_str(),
        "complete" | "resolved_manually" | "cancelled"
    ) {
        return Err(wrong_state(format!(
            "step \"{}\" is already {} and cannot be resolved manually",
            step.name, step.state
        )));
    }
    reopen_task_if_blocked(&step)?;
    if matches!(step.state.as_str(), "enqueued" | "in_progress") {
        archive_message(&step)?;
    }
    let reason = reason.unwrap_or("resolved manually by operator");
    complete_step(
        &step,
        result.map(|j| j.0).unwrap_or(Value::Null),
        "resolved_manually",
        reason,
        json!({}),
    )?;
    Ok("resolved_manually".into())
}

/// Operator actions on a step of a blocked task bring the task back into
/// play; on a finished or cancelled task they are refused.
fn reopen_task_if_blocked(step: &LockedStep) -> ApiResult<()> {
    if TERMINAL_TASK_STATES.contains(&step.task_state.as_str()) {
        return Err(wrong_state(format!(
            "task {} is {}; its steps cannot change",
            step.task_uuid, step.task_state
        )));
    }
    Ok(())
}
