//! Worker SDK for pg_tasker.
//!
//! A worker reads step messages from its namespaces' pgmq queues, runs the
//! handler named by each message's `handler.callable`, and reports the
//! outcome with `tasker.submit_result`. That is the whole protocol
//! (docs/worker-protocol.md); this crate adds concurrency, lease extension,
//! timeouts, reconnection and graceful shutdown.
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

pub mod examples;
mod handler;
mod runtime;
pub mod testing;

pub use handler::{HandlerFuture, Outcome, Registry, StepContext, StepHandler, StepMessage};
pub use runtime::{run, Stats, WorkerOptions};
