//! Worker SDK for pg_tasker.
//!
//! A worker reads step messages from its namespaces' pgmq queues, runs the
//! handler named by each message's `handler.callable`, and reports the
//! outcome. This crate speaks the batched protocol (docs/worker-protocol.md):
//! one `tasker.exchange` call sends the finished results and takes the next
//! messages, one round trip and one commit per batch; idle workers wait for
//! a NOTIFY instead of polling. It adds concurrency, lease extension,
//! timeouts, transactional handlers (database writes committed with the
//! result, exactly once), reconnection and graceful shutdown.
//!
//! ```no_run
//! use pg_tasker_worker::{Outcome, Registry, StepContext, WorkerOptions};
//! # async fn demo() {
//! let mut registry = Registry::new();
//! registry.register("Shop::ValidateCart", |step: StepContext| async move {
//!     let items = step.message.task_context["cart_items"].as_array().map_or(0, |a| a.len());
//!     Outcome::success(serde_json::json!({"items": items}))
//! });
//! let options = WorkerOptions::new("postgresql://postgres@localhost/postgres", vec!["shop".into()]);
//! pg_tasker_worker::run(options, registry, async { let _ = tokio::signal::ctrl_c().await; }).await.unwrap();
//! # }
//! ```

pub mod connection;
pub mod events;
pub mod examples;
mod handler;
mod runtime;
pub mod telemetry;
pub mod testing;
pub mod tls;
pub mod trace;
pub mod web;

pub use events::wait_for_task;
pub use handler::{
    create_batches, Checkpoints, Handler, HandlerFuture, Outcome, Registry, StepContext,
    StepHandler, StepMessage, Tx, TxStepHandler,
};
pub use runtime::{run, Stats, WorkerOptions};
