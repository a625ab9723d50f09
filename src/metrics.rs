//! `tasker.metrics()`: Prometheus text for a scraper, from what
//! `tasker.health()` reads (no history is scanned) and the state changes
//! counted in shared memory (`tasker._count_moves`).

use pg_tasker_core::metrics::{exposition, Orchestrator, Queue, Snapshot};
use pg_tasker_core::state::{StepState, TaskState};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::errors::{internal, ApiResult};
use crate::worker_state;

/// `tasker._count_moves(kind, state, n)`: n moves of steps (kind 'step')
/// or tasks ('task') into `state`, counted when the transaction commits
/// (tasker._settle_tasks calls it).
#[pg_extern(parallel_unsafe)]
fn _count_moves(kind: &str, state: &str, n: i64) -> ApiResult<()> {
    let index = match kind {
        "step" => StepState::ALL.iter().position(|s| s.as_str() == state),
        "task" => TaskState::ALL.iter().position(|s| s.as_str() == state),
        _ => None,
    }
    .ok_or_else(|| internal(format!("cannot count a move of a {kind} into {state}")))?;
    worker_state::count_moves_on_commit(kind == "task", index, n.max(0) as u64);
    Ok(())
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// `tasker.metrics() RETURNS text`: active tasks by namespace and state,
/// due tasks, queue depth and oldest message age per namespace, DLQ entries
/// pending by reason, the orchestrator (up, ticks, errors, last tick's age
/// and duration, last error's age) and committed step and task state
/// changes since the server started. Namespaced series cover the
/// namespaces the caller holds a privilege in; the DLQ and the state
/// changes are shown to those who see every namespace.
#[pg_extern(stable, security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn metrics() -> ApiResult<String> {
    let data = crate::read::one::<JsonB>("SELECT tasker._health_data()", &[])?
        .map(|j| j.0)
        .unwrap_or_default();
    let sees_all = crate::caller::holds_all(pg_tasker_core::privilege::Need::Any)?;
    let rows = |key: &str| data[key].as_array().cloned().unwrap_or_default();
    let now_ms = worker_state::now_ms();
    let age = |ms: &Value| ms.as_i64().map(|t| (now_ms - t).max(0) as f64 / 1000.0);
    let o = crate::health::orchestrator();
    let orchestrator = (o["serves_database"].is_string()).then(|| Orchestrator {
        running: o["running"].as_bool().unwrap_or(false),
        ticks: o["ticks"].as_u64().unwrap_or(0),
        errors: o["errors"].as_u64().unwrap_or(0),
        relayed_notifications: o["relayed_notifications"].as_u64().unwrap_or(0),
        last_tick_age_seconds: age(&o["last_tick_at"]),
        last_tick_duration_seconds: o["last_tick_duration_us"].as_u64().unwrap_or(0) as f64 / 1e6,
        last_error_age_seconds: age(&o["last_error_at"]),
    });
    let counted = (sees_all && worker_state::preloaded()).then(|| *worker_state::MOVES.share());
    let snapshot = Snapshot {
        active_tasks: rows("active_tasks")
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                (s("namespace"), s("state"), int(&r["tasks"]))
            })
            .collect(),
        due_tasks: int(&data["due_tasks"]),
        queues: rows("queues")
            .iter()
            .map(|q| Queue {
                namespace: q["namespace"].as_str().unwrap_or_default().to_string(),
                depth: int(&q["depth"]),
                visible: int(&q["visible"]),
                oldest_message_age_seconds: q["oldest_message_age_seconds"].as_i64(),
            })
            .collect(),
        dlq_pending: data["dlq_pending_by_reason"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), int(v))).collect())
            .unwrap_or_default(),
        orchestrator,
        step_moves: counted.map(|m| {
            StepState::ALL
                .iter()
                .zip(m.steps)
                .map(|(s, n)| (s.as_str(), n))
                .collect()
        }),
        task_moves: counted.map(|m| {
            TaskState::ALL
                .iter()
                .zip(m.tasks)
                .map(|(s, n)| (s.as_str(), n))
                .collect()
        }),
    };
    Ok(exposition(&snapshot))
}
