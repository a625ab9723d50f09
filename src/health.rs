//! `tasker.health()` and `tasker.config()`.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::errors::ApiResult;
use crate::worker_state::{self, Status};
use crate::{guc, settings};

fn current_database() -> String {
    // SAFETY: the name of the database this backend is connected to.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns a pointer
    // into shared memory or NULL; only the NULL test is used.
    pid > 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

pub(crate) fn orchestrator() -> Value {
    if !worker_state::preloaded() {
        return json!({"preloaded": false, "running": false,
                      "status": "pg_tasker is not in shared_preload_libraries: no background worker"});
    }
    let serves = guc::database();
    if serves != current_database() {
        return json!({"preloaded": true, "running": false, "serves_database": serves,
                      "status": format!("no orchestrator serves this database (pg_tasker.database = {serves})")});
    }
    let pid = worker_state::PID.get().load(Ordering::SeqCst);
    let alive = process_alive(pid);
    let last_tick_ms = worker_state::LAST_TICK_MS.get().load(Ordering::SeqCst);
    let mut o = json!({
        "preloaded": true,
        "running": alive,
        "serves_database": serves,
        "pid": if alive { Some(pid) } else { None },
        "status": if alive { Status::name(worker_state::STATUS.get().load(Ordering::SeqCst)) } else { "not running" },
        "enabled": guc::ENABLED.get(),
        "ticks": worker_state::TICKS.get().load(Ordering::SeqCst),
        "cycle_interval_ms": worker_state::CYCLE_INTERVAL_MS.get().load(Ordering::SeqCst),
        "last_tick_at": if last_tick_ms > 0 { Some(last_tick_ms) } else { None },
        "errors": worker_state::ERRORS.get().load(Ordering::SeqCst),
        "relays_notifications": alive && crate::relay::relays_this_database(),
        "relayed_notifications": crate::relay::relayed(),
        "last_tick_duration_us": worker_state::LAST_TICK_US.get().load(Ordering::SeqCst),
        "last_error_at": Some(worker_state::LAST_ERROR_MS.get().load(Ordering::SeqCst)).filter(|&ms| ms > 0),
    });
    if crate::caller::is_admin() {
        o["last_error"] =
            json!(Some(worker_state::LAST_ERROR.share().get()).filter(|e| !e.is_empty()));
    }
    o
}

/// `tasker.health() RETURNS jsonb`: the orchestrator serving this database
/// (running, pid, status, ticks, last tick, errors; the last error for
/// tasker_admin only), the configuration in force, queue depths per
/// namespace, active tasks by state and the number of due tasks. Cheap and
/// side-effect free: no file is read, no finished task is counted.
#[pg_extern(stable, security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn health() -> ApiResult<JsonB> {
    let cfg = settings::describe();
    let data = crate::read::one::<JsonB>("SELECT tasker._health_data()", &[])?
        .map(|j| j.0)
        .unwrap_or_default();
    Ok(JsonB(json!({
        "orchestrator": orchestrator(),
        "config": {"environment": cfg["environment"], "files": cfg["files"], "valid": cfg["valid"], "error": cfg["error"]},
        "queues": data["queues"],
        "active_tasks_by_state": data["active_tasks_by_state"],
        "due_tasks": data["due_tasks"],
        "dlq_pending_by_reason": data["dlq_pending_by_reason"],
    })))
}

/// `tasker.config() RETURNS jsonb`: the orchestration configuration the
/// files give now (secrets redacted), the files it came from, the file each
/// key came from, and the error of a file that failed to load, if any.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn config() -> JsonB {
    JsonB(settings::describe_fresh())
}
