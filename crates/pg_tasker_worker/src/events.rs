//! Task events: wait for a task to finish without polling.
//!
//! Every time a task finishes (complete, error, cancelled,
//! resolved_manually) or becomes blocked_by_failures, the transaction that
//! moved it NOTIFYs `tasker.events_channel()` (`tasker_events`) with
//! `{"task_uuid", "namespace", "state", "from_state"}` when it commits. Any
//! client can LISTEN; [`wait_for_task`] does it for one task.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::connection::{database_config, explain};

/// Waits until the task is in an event state (`tasker.task_state_is_event`:
/// finished, or blocked by failures) and returns that state; `Ok(None)`
/// when `timeout` passes first. LISTENs before it looks, so an event
/// between the look and the wait is not missed. Errors: the database is
/// unreachable, the task does not exist (or the role may not see it).
pub async fn wait_for_task(
    database_url: &str,
    task_uuid: &str,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let cfg = database_config(database_url)?;
    let (client, mut connection) = cfg
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {}", explain(&e)))?;
    let (tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = m {
                if tx.send(n.payload().to_string()).is_err() {
                    break;
                }
            }
        }
    });
    let channel: String = client
        .query_one("SELECT tasker.events_channel()", &[])
        .await
        .map_err(|e| explain(&e))?
        .get(0);
    client
        .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
        .await
        .map_err(|e| explain(&e))?;
    let now = client
        .query_opt(
            "SELECT state::text, tasker.task_state_is_event(state) FROM tasker.task_status
             WHERE task_uuid = $1::text::uuid",
            &[&task_uuid],
        )
        .await
        .map_err(|e| explain(&e))?
        .ok_or_else(|| format!("task {task_uuid} does not exist (or this role may not see it)"))?;
    if now.get::<_, bool>(1) {
        return Ok(Some(now.get(0)));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let payload = match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err("the connection was lost while waiting".into()),
            Ok(Some(p)) => p,
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&payload) else {
            continue;
        };
        if event["task_uuid"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case(task_uuid))
        {
            if let Some(state) = event["state"].as_str() {
                return Ok(Some(state.to_string()));
            }
        }
    }
}
