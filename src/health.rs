//! `tasker.health()` and `tasker.config()`.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::errors::ApiResult;
use crate::spi_util::json_row;
use crate::worker_state::{self, Status};
use crate::{guc, settings};

/// `tasker.health() RETURNS jsonb`: the orchestrator (running, pid, last
/// tick, ticks, errors, last error), the configuration in force, queue depths
/// per namespace and tasks by state.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn health() -> ApiResult<JsonB> {
    let orchestrator = if worker_state::preloaded() {
        let pid = worker_state::PID.get().load(Ordering::SeqCst);
        let status = worker_state::STATUS.get().load(Ordering::SeqCst);
        let last_tick_ms = worker_state::LAST_TICK_MS.get().load(Ordering::SeqCst);
        let alive = pid > 0
            && crate::spi_util::scalar::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = $1)",
                &[pid.into()],
            )?
            .unwrap_or(false);
        json!({
            "preloaded": true,
            "running": alive,
            "pid": if alive { Some(pid) } else { None },
            "status": Status::name(status),
            "enabled": guc::ENABLED.get(),
            "database": guc::database(),
            "ticks": worker_state::TICKS.get().load(Ordering::SeqCst),
            "cycle_interval_ms": worker_state::CYCLE_INTERVAL_MS.get().load(Ordering::SeqCst),
            "last_tick_at": if last_tick_ms > 0 { Some(last_tick_ms) } else { None },
            "errors": worker_state::ERRORS.get().load(Ordering::SeqCst),
            "last_error": Some(worker_state::LAST_ERROR.share().get()).filter(|e| !e.is_empty()),
        })
    } else {
        json!({"preloaded": false, "running": false,
               "status": "pg_tasker is not in shared_preload_libraries: no background worker"})
    };
    let cfg = settings::describe();
    let data = json_row::<Value>(
        "SELECT jsonb_build_object(
            'queues', coalesce((SELECT jsonb_agg(jsonb_build_object(
                          'namespace', n.name, 'queue', n.queue_name,
                          'depth', m.queue_length, 'visible', m.queue_visible_length,
                          'oldest_message_age_seconds', m.oldest_msg_age_sec,
                          'total_messages', m.total_messages) ORDER BY n.name)
                        FROM tasker.namespaces n
                        CROSS JOIN LATERAL pgmq.metrics(n.queue_name) m
                        WHERE EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = n.queue_name)), '[]'),
            'tasks_by_state', coalesce((SELECT jsonb_object_agg(state, n)
                        FROM (SELECT state, count(*) AS n FROM tasker.tasks GROUP BY state) s), '{}'),
            'due_tasks', (SELECT count(*) FROM tasker.ready_tasks))",
        &[],
    )?
    .unwrap_or_default();
    Ok(JsonB(json!({
        "orchestrator": orchestrator,
        "config": {"environment": cfg["environment"], "files": cfg["files"], "valid": cfg["valid"], "error": cfg["error"]},
        "queues": data["queues"],
        "tasks_by_state": data["tasks_by_state"],
        "due_tasks": data["due_tasks"],
    })))
}

/// `tasker.config() RETURNS jsonb`: the effective orchestration
/// configuration (secrets redacted), the files it came from, the file each
/// key came from, and the error of a file that failed to load, if any.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn config() -> JsonB {
    JsonB(settings::describe())
}
