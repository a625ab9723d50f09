//! Time-driven upkeep run by the background worker (and by
//! `tasker.run_maintenance()`): lost-attempt recovery, staleness and the dead
//! letter queue, retention, and the task request queue.

use pg_tasker_core::config::{OrchestrationSection, RetentionPolicy};
use pg_tasker_core::{request, submission};
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::{err, from_core, internal, invalid, null_arg, ApiResult};
use crate::orchestration::{
    archive_message, close_task, fail_step, lock_step, refresh_task, stop_steps,
};
use crate::spi_util::{json_row, pg_uuid, run, scalar};
use crate::{subxact, tasks};

fn queue_names() -> ApiResult<Vec<String>> {
    Ok(json_row::<Vec<String>>(
        "SELECT coalesce(jsonb_agg(n.queue_name ORDER BY n.name), '[]')
           FROM tasker.namespaces n
          WHERE EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = n.queue_name)",
        &[],
    )?
    .unwrap_or_default())
}

// ---------------------------------------------------------------------------
// Lost attempts
// ---------------------------------------------------------------------------

/// Steps whose current message was delivered more than `max_attempts` times
/// and is visible again (no live lease) without a result: the attempt is
/// lost. It is failed as such (retryable) and follows the retry policy.
pub fn recover_lost_attempts(batch_size: i32) -> ApiResult<Value> {
    let mut recovered = Vec::new();
    let mut errors = Vec::new();
    for queue in queue_names()? {
        let q = spi::quote_identifier(format!("q_{queue}"));
        let lost = json_row::<Vec<(uuid::Uuid, i32)>>(
            &format!(
                "SELECT coalesce(jsonb_agg(jsonb_build_array(x.step_uuid, x.read_ct)), '[]') FROM (
                    SELECT s.step_uuid, q.read_ct
                      FROM tasker.workflow_steps s
                      JOIN pgmq.{q} q ON q.msg_id = s.queue_msg_id
                     WHERE s.state IN ('enqueued', 'in_progress')
                       AND q.read_ct > s.max_attempts
                       AND q.vt <= clock_timestamp()
                     LIMIT $1) x"
            ),
            &[batch_size.into()],
        )?
        .unwrap_or_default();
        for (step, deliveries) in lost {
            let outcome = subxact::run(move || {
                let locked = lock_step(pg_uuid(step))?;
                if !matches!(locked.state.as_str(), "enqueued" | "in_progress") {
                    return Ok(None); // a result arrived meanwhile
                }
                let message = format!(
                    "lost attempt: the step's message was delivered {deliveries} times without a result"
                );
                let sub = submission::parse(
                    "failure",
                    None,
                    Some(
                        json!({"message": message, "error_code": "LOST_ATTEMPT", "retryable": true,
                                "deliveries": deliveries}),
                    ),
                    None,
                )
                .map_err(from_core)?;
                archive_message(&locked)?;
                let state = fail_step(
                    &locked,
                    &sub,
                    json!({"attempt": locked.attempts, "recovered_by": "orchestrator"}),
                )?;
                Ok(Some(state))
            });
            match outcome {
                Ok(Some(state)) => recovered
                    .push(json!({"step_uuid": step, "deliveries": deliveries, "state": state})),
                Ok(None) => {}
                Err(f) => errors.push(json!({"step_uuid": step, "error": f.to_json()})),
            }
        }
    }
    Ok(json!({"recovered": recovered, "errors": errors}))
}

// ---------------------------------------------------------------------------
// Staleness and the DLQ
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct Stale {
    task_uuid: uuid::Uuid,
    state: String,
    reason: String,
    threshold: String,
}

/// Tasks that made no progress for longer than the threshold of their state
/// (template `lifecycle` overrides the configuration), or lived longer than
/// the maximum lifetime, are moved to the DLQ and/or to `error`.
pub fn detect_stale(o: &OrchestrationSection) -> ApiResult<Value> {
    let st = &o.staleness;
    let stale = json_row::<Vec<Stale>>(
        include_str!("../sql/queries/stale_tasks.sql"),
        &[
            st.steps_in_process_minutes.into(),
            st.waiting_for_dependencies_minutes.into(),
            st.waiting_for_retry_minutes.into(),
            st.blocked_by_failures_minutes.into(),
            st.task_max_lifetime_hours.into(),
            (st.batch_size as i32).into(),
        ],
    )?
    .unwrap_or_default();
    let (to_error, to_dlq) = (st.transition_to_error, st.move_to_dlq);
    let mut handled = Vec::new();
    let mut errors = Vec::new();
    for s in stale {
        let task = s.task_uuid;
        let (state, reason, threshold) = (s.state.clone(), s.reason.clone(), s.threshold.clone());
        let outcome =
            subxact::run(move || mark_stale(task, &state, &reason, &threshold, to_error, to_dlq));
        match outcome {
            Ok(Some(v)) => handled.push(v),
            Ok(None) => {}
            Err(f) => errors.push(json!({"task_uuid": task, "error": f.to_json()})),
        }
    }
    Ok(json!({"stale": handled, "errors": errors}))
}

fn mark_stale(
    task: uuid::Uuid,
    seen_state: &str,
    reason: &str,
    threshold: &str,
    to_error: bool,
    to_dlq: bool,
) -> ApiResult<Option<Value>> {
    let t = pg_uuid(task);
    let state = scalar::<String>(
        "SELECT state FROM tasker.tasks WHERE task_uuid = $1 FOR NO KEY UPDATE",
        &[t.into()],
    )?;
    if state.as_deref() != Some(seen_state) {
        return Ok(None); // it moved on meanwhile
    }
    let error = json!({"message": format!("task stale: {threshold}"), "error_code": "TASK_STALE", "state": seen_state});
    let mut dlq_uuid: Option<pgrx::Uuid> = None;
    if to_dlq {
        dlq_uuid = scalar::<pgrx::Uuid>(
            "INSERT INTO tasker.dlq (task_uuid, reason, original_state, error, snapshot)
             VALUES ($1, $2, $3, $4, tasker._task_snapshot($1))
             ON CONFLICT (task_uuid) WHERE resolution_status = 'pending' AND task_uuid IS NOT NULL DO NOTHING
             RETURNING dlq_uuid",
            &[t.into(), reason.into(), seen_state.into(), JsonB(error.clone()).into()],
        )?;
    }
    if to_error {
        // Steps out with workers are stopped: their messages archived, the
        // steps put in error (a DLQ requeue retries them).
        stop_steps(
            t,
            &["enqueued", "in_progress"],
            "error",
            "task stale",
            Some(error.clone()),
        )?;
        close_task(t, "error", &format!("stale: {threshold}"), error)?;
    }
    Ok(Some(
        json!({"task_uuid": task, "state": seen_state, "reason": reason, "dlq_uuid": dlq_uuid.map(|u| u.to_string()), "to_error": to_error}),
    ))
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// Deletes (or archives, then deletes) one batch of finished tasks older
/// than the retention period, and prunes old pgmq archive rows of
/// pg_tasker's queues. `more` says a full batch was removed.
pub fn apply_retention(o: &OrchestrationSection) -> ApiResult<Value> {
    let r = &o.retention;
    let archive = r.policy == RetentionPolicy::Archive;
    let removed = scalar::<i64>(
        "WITH victims AS (
            SELECT t.task_uuid FROM tasker.tasks t
             WHERE t.state = ANY ($1)
               AND t.completed_at < now() - make_interval(secs => $2 * 86400)
               AND NOT EXISTS (SELECT 1 FROM tasker.dlq d WHERE d.task_uuid = t.task_uuid AND d.resolution_status = 'pending')
             ORDER BY t.completed_at
             LIMIT $3
               FOR UPDATE SKIP LOCKED
         ), archived AS (
            INSERT INTO tasker.task_archive (task_uuid, namespace_name, task_name, task_version, state, created_at, completed_at, snapshot)
            SELECT t.task_uuid, t.namespace_name, t.task_name, t.task_version, t.state, t.created_at, t.completed_at,
                   tasker._task_snapshot(t.task_uuid)
              FROM tasker.tasks t JOIN victims v USING (task_uuid)
             WHERE $4
            ON CONFLICT (task_uuid) DO NOTHING
            RETURNING 1
         ), gone AS (
            DELETE FROM tasker.tasks t USING victims v
             WHERE t.task_uuid = v.task_uuid AND (NOT $4 OR (SELECT count(*) FROM archived) >= 0)
            RETURNING 1
         )
         SELECT count(*) FROM gone",
        &[r.states.clone().into(), r.retention_days.into(), (r.batch_size as i64).into(), archive.into()],
    )?
    .unwrap_or(0);

    let mut pruned = 0i64;
    let mut queues = queue_names()?;
    queues.push(o.task_requests.queue.clone());
    for queue in queues {
        let exists = scalar::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1)",
            &[queue.as_str().into()],
        )?
        .unwrap_or(false);
        if !exists {
            continue;
        }
        let a = spi::quote_identifier(format!("a_{queue}"));
        pruned += scalar::<i64>(
            &format!(
                "WITH gone AS (
                    DELETE FROM pgmq.{a} WHERE msg_id IN (
                        SELECT msg_id FROM pgmq.{a}
                         WHERE archived_at < now() - make_interval(secs => $1 * 86400)
                         ORDER BY msg_id LIMIT $2)
                    RETURNING 1)
                 SELECT count(*) FROM gone"
            ),
            &[
                r.queue_archive_retention_days.into(),
                (r.batch_size as i64).into(),
            ],
        )?
        .unwrap_or(0);
    }
    Ok(json!({
        "tasks_removed": removed,
        "policy": if archive { "archive" } else { "delete" },
        "queue_archive_rows_pruned": pruned,
        "more": removed >= r.batch_size as i64,
    }))
}

// ---------------------------------------------------------------------------
// Task request queue
// ---------------------------------------------------------------------------

/// Creates the task request queue (once), and lets tasker_app send to it.
/// The orchestrator reads it on every tick (at least every
/// cycle_interval_ms). A trigger to wake it on send is not possible: the
/// queue table belongs to pgmq, and a dependency on pg_tasker would block
/// DROP EXTENSION.
pub fn ensure_request_queue(queue: &str) -> ApiResult<()> {
    let exists = scalar::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1)",
        &[queue.into()],
    )?
    .unwrap_or(false);
    if exists {
        return Ok(());
    }
    let q = spi::quote_identifier(format!("q_{queue}"));
    run("SELECT pgmq.create($1)", &[queue.into()])?;
    run(
        &format!(
            "GRANT USAGE ON SCHEMA pgmq TO tasker_app;
             GRANT SELECT, INSERT ON pgmq.{q} TO tasker_app"
        ),
        &[],
    )
}

/// Turns queued task requests into tasks, with create_task's validation.
/// A request that fails goes to the DLQ with its error; either way its
/// message is archived, so nothing is dropped silently or retried forever.
pub fn ingest_requests(o: &OrchestrationSection) -> ApiResult<Value> {
    let cfg = &o.task_requests;
    ensure_request_queue(&cfg.queue)?;
    #[derive(Deserialize)]
    struct Msg {
        msg_id: i64,
        message: Value,
    }
    let msgs = json_row::<Vec<Msg>>(
        "SELECT coalesce(jsonb_agg(jsonb_build_object('msg_id', r.msg_id, 'message', r.message) ORDER BY r.msg_id), '[]')
           FROM pgmq.read($1, $2, $3) r",
        &[cfg.queue.as_str().into(), (cfg.visibility_timeout_seconds as i32).into(), (cfg.batch_size as i32).into()],
    )?
    .unwrap_or_default();
    let (mut created, mut rejected) = (Vec::new(), Vec::new());
    for m in msgs {
        let message = m.message.clone();
        let outcome = subxact::run(move || {
            let req = request::parse(message).map_err(from_core)?;
            tasks::create(&req)
        });
        match outcome {
            Ok(task) => created.push(json!({"msg_id": m.msg_id, "task_uuid": task.to_string()})),
            Err(f) => {
                let dlq = scalar::<pgrx::Uuid>(
                    "INSERT INTO tasker.dlq (reason, error, snapshot)
                     VALUES ('invalid_task_request', $1, jsonb_build_object('queue', $2::text, 'msg_id', $3, 'request', $4))
                     RETURNING dlq_uuid",
                    &[JsonB(f.to_json()).into(), cfg.queue.as_str().into(), m.msg_id.into(), JsonB(m.message.clone()).into()],
                )?;
                rejected.push(json!({"msg_id": m.msg_id, "error": f.to_json(), "dlq_uuid": dlq.map(|u| u.to_string())}));
            }
        }
        run(
            "SELECT pgmq.archive($1, $2)",
            &[cfg.queue.as_str().into(), m.msg_id.into()],
        )?;
    }
    Ok(json!({"created": created, "rejected": rejected}))
}

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

pub const JOBS: [&str; 4] = ["recovery", "staleness", "retention", "task_requests"];

/// Runs one job now, regardless of its `enabled` flag and interval.
pub fn run_job(job: &str, o: &OrchestrationSection) -> ApiResult<Value> {
    match job {
        "recovery" => recover_lost_attempts(o.recovery.batch_size as i32),
        "staleness" => detect_stale(o),
        "retention" => apply_retention(o),
        "task_requests" => ingest_requests(o),
        other => Err(invalid(format!("unknown maintenance job \"{other}\""))
            .set_hint(format!("jobs: {}", JOBS.join(", ")))),
    }
}

/// `tasker.run_maintenance(jobs text[] DEFAULT NULL) RETURNS jsonb`: runs the
/// given maintenance jobs (all when NULL) now, with the configuration in
/// force; what the background worker does on its own schedule.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn run_maintenance(jobs: default!(Option<Vec<Option<String>>>, "NULL")) -> ApiResult<JsonB> {
    let o = crate::settings::current().orchestration;
    let jobs: Vec<String> = match jobs {
        None => JOBS.iter().map(|s| s.to_string()).collect(),
        Some(list) => list
            .into_iter()
            .map(|j| j.ok_or_else(|| null_arg("a job name")))
            .collect::<ApiResult<_>>()?,
    };
    let mut out = serde_json::Map::new();
    for job in jobs {
        let v = run_job(&job, &o)?;
        out.insert(job, v);
    }
    Ok(JsonB(Value::Object(out)))
}

/// `tasker.dlq_requeue(dlq_uuid, note) RETURNS text`: gives a dead-lettered
/// task another chance: its failed steps go back to pending (attempts
/// reset), retries become due, and the task resumes. Returns the task state.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn dlq_requeue(
    dlq_uuid: Option<pgrx::Uuid>,
    note: default!(Option<&str>, "NULL"),
) -> ApiResult<String> {
    let id = dlq_uuid.ok_or_else(|| null_arg("dlq_uuid"))?;
    let (status, task) = open_entry(id)?;
    if status != "pending" {
        return Err(err(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("DLQ entry {id} is already {status}"),
        ));
    }
    let Some(task) = task else {
        return Err(err(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "DLQ entry {id} has no task to requeue (a rejected request: send a corrected one)"
            ),
        ));
    };
    let t = pg_uuid(task);
    let note = note.unwrap_or("requeued from the DLQ");
    let state = scalar::<String>(
        "SELECT state FROM tasker.tasks WHERE task_uuid = $1 FOR NO KEY UPDATE",
        &[t.into()],
    )?
    .ok_or_else(|| internal("task of a pending DLQ entry vanished"))?;
    if matches!(
        state.as_str(),
        "complete" | "cancelled" | "resolved_manually"
    ) {
        return Err(err(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("task {task} is {state}; nothing to requeue"),
        ));
    }
    run(
        "WITH failed AS (
            SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1 AND state = 'error'
             ORDER BY step_uuid FOR NO KEY UPDATE
         ), upd AS (
            UPDATE tasker.workflow_steps s SET state = 'pending', attempts = 0, next_retry_at = NULL, updated_at = now()
              FROM failed WHERE s.step_uuid = failed.step_uuid RETURNING s.step_uuid
         )
         SELECT tasker._step_transition(array_agg(step_uuid), 'pending', $2) FROM upd HAVING count(*) > 0",
        &[t.into(), note.into()],
    )?;
    run(
        "UPDATE tasker.workflow_steps SET next_retry_at = now(), updated_at = now()
          WHERE task_uuid = $1 AND state = 'waiting_for_retry'",
        &[t.into()],
    )?;
    if state == "error" {
        run(
            "UPDATE tasker.tasks SET state = 'steps_in_process', completed_at = NULL, updated_at = now() WHERE task_uuid = $1",
            &[t.into()],
        )?;
        run(
            "SELECT tasker._task_transition($1, 'steps_in_process', $2)",
            &[t.into(), note.into()],
        )?;
    }
    let r = refresh_task(task, "requeued from the DLQ")?;
    close_entry(id, "requeued", note)?;
    Ok(r.state)
}

/// `tasker.dlq_resolve(dlq_uuid, note, status DEFAULT 'resolved') RETURNS text`:
/// closes a DLQ entry as resolved or discarded.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn dlq_resolve(
    dlq_uuid: Option<pgrx::Uuid>,
    note: default!(Option<&str>, "NULL"),
    status: default!(Option<&str>, "'resolved'"),
) -> ApiResult<String> {
    let id = dlq_uuid.ok_or_else(|| null_arg("dlq_uuid"))?;
    let status = status.unwrap_or("resolved");
    if !matches!(status, "resolved" | "discarded") {
        return Err(invalid(format!(
            "status must be 'resolved' or 'discarded', got \"{status}\""
        )));
    }
    let (current, _) = open_entry(id)?;
    if current != "pending" {
        return Err(err(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("DLQ entry {id} is already {current}"),
        ));
    }
    close_entry(id, status, note.unwrap_or(""))?;
    Ok(status.to_string())
}

fn open_entry(id: pgrx::Uuid) -> ApiResult<(String, Option<uuid::Uuid>)> {
    json_row::<(String, Option<uuid::Uuid>)>(
        "SELECT jsonb_build_array(resolution_status, task_uuid) FROM tasker.dlq WHERE dlq_uuid = $1 FOR UPDATE",
        &[id.into()],
    )?
    .ok_or_else(|| err(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND, format!("DLQ entry {id} does not exist")))
}

fn close_entry(id: pgrx::Uuid, status: &str, note: &str) -> ApiResult<()> {
    run(
        "UPDATE tasker.dlq SET resolution_status = $2, resolution_note = nullif($3, ''), resolved_by = session_user, resolved_at = now()
          WHERE dlq_uuid = $1",
        &[id.into(), status.into(), note.into()],
    )
}
