//! Handlers and their outcomes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A step message as enqueued by pg_tasker (message_version 1).
#[derive(Debug, Clone, Deserialize)]
pub struct StepMessage {
    pub message_version: u32,
    pub task_uuid: String,
    pub step_uuid: String,
    pub namespace: String,
    pub task_name: String,
    pub task_version: String,
    pub step_name: String,
    pub handler: HandlerSpec,
    pub task_context: Value,
    pub dependency_results: Map<String, Value>,
    /// The attempt's number: only grows, fences the result.
    pub attempt: u32,
    /// The attempt's place in its retry budget (1..=max_attempts); an
    /// operator's retry starts a new budget.
    #[serde(default)]
    pub budget_attempt: Option<u32>,
    pub max_attempts: u32,
    pub timeout_seconds: Option<u64>,
    pub correlation_id: String,
    /// The W3C trace context the task was created with.
    #[serde(default)]
    pub traceparent: Option<String>,
    pub enqueued_at: String,
    /// Map elements: the element's index and item.
    #[serde(default)]
    pub map_index: Option<u64>,
    #[serde(default)]
    pub map_item: Option<Value>,
    /// The latest checkpoint saved for this step ([`StepContext::checkpoint`]),
    /// when it is being resumed.
    #[serde(default)]
    pub checkpoint: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HandlerSpec {
    pub callable: String,
    pub method: Option<String>,
    #[serde(default)]
    pub initialization: Map<String, Value>,
}

/// What a handler gets: the message, and the raw pgmq envelope facts.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub message: StepMessage,
    pub msg_id: i64,
    /// How many times pgmq delivered this message (1 on first delivery).
    pub read_ct: i32,
    pub worker_id: String,
    /// The span this attempt runs in, when the task carries a trace
    /// context; `trace.traceparent()` is the header for calls it makes.
    pub trace: Option<crate::trace::TraceContext>,
    /// Saves checkpoints of this attempt (the runtime's connection).
    pub checkpoints: Checkpoints,
}

type CheckpointFn =
    dyn Fn(Value) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send>> + Send + Sync;

/// How a handler saves its progress: `tasker.checkpoint` for the current
/// attempt, on a connection of the runtime's.
#[derive(Clone, Default)]
pub struct Checkpoints(Option<Arc<CheckpointFn>>);

impl Checkpoints {
    pub(crate) fn new(f: Arc<CheckpointFn>) -> Self {
        Checkpoints(Some(f))
    }
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Checkpoints"
        } else {
            "Checkpoints(none)"
        })
    }
}

impl StepContext {
    /// Saves the progress of this attempt: the step's next delivery (after
    /// a crash or an expired lease, or a retry) carries it as
    /// `message.checkpoint`. Ok(false): not saved (the attempt is no
    /// longer the current one).
    pub async fn checkpoint(&self, checkpoint: Value) -> Result<bool, String> {
        match &self.checkpoints.0 {
            Some(f) => f(checkpoint).await,
            None => Err("this step context cannot save checkpoints".into()),
        }
    }

    /// Map elements: the item this attempt works on.
    pub fn map_item(&self) -> Option<&Value> {
        self.message.map_item.as_ref()
    }

    /// The result of a dependency, by step name.
    pub fn dependency(&self, step: &str) -> Option<&Value> {
        self.message.dependency_results.get(step)
    }

    /// A handler setting from the template's `handler.initialization`.
    pub fn setting(&self, key: &str) -> Option<&Value> {
        self.message.handler.initialization.get(key)
    }
}

/// How a step attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success {
        result: Value,
        metadata: Value,
    },
    /// Try again (per the step's retry policy); `retry_after` overrides the
    /// computed backoff.
    Retryable {
        message: String,
        error_code: Option<String>,
        retry_after: Option<Duration>,
    },
    /// Do not try again: the step goes to `error`.
    Permanent {
        message: String,
        error_code: Option<String>,
    },
}

impl Outcome {
    pub fn success(result: Value) -> Self {
        Outcome::Success {
            result,
            metadata: json!({}),
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Outcome::Retryable {
            message: message.into(),
            error_code: None,
            retry_after: None,
        }
    }

    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Outcome::Retryable {
            message: message.into(),
            error_code: None,
            retry_after: Some(after),
        }
    }

    pub fn permanent(message: impl Into<String>, code: impl Into<String>) -> Self {
        Outcome::Permanent {
            message: message.into(),
            error_code: Some(code.into()),
        }
    }

    /// A decision step's success that creates the named steps of its
    /// segment (`decision_point_outcome` `create_steps`).
    pub fn decision<S: AsRef<str>>(steps: &[S]) -> Self {
        let names: Vec<&str> = steps.iter().map(AsRef::as_ref).collect();
        Outcome::success(
            json!({"decision_point_outcome": {"type": "create_steps", "step_names": names}}),
        )
    }

    /// A decision step's success that creates nothing.
    pub fn no_branches() -> Self {
        Outcome::success(json!({"decision_point_outcome": {"type": "no_branches"}}))
    }

    /// A batchable step's success that splits `total` items among
    /// `workers` workers of `worker_template` ([`create_batches`]).
    pub fn batches(worker_template: &str, total: u64, workers: u64) -> Self {
        if total == 0 || workers == 0 {
            return Self::no_batches();
        }
        Outcome::success(create_batches(worker_template, total, workers))
    }

    /// A batchable step's success with nothing to do (one no-op worker).
    pub fn no_batches() -> Self {
        Outcome::success(json!({"batch_processing_outcome": {"type": "no_batches"}}))
    }

    /// `(status, result, error)` for `tasker.submit_result`.
    pub fn to_submission(&self) -> (&'static str, Option<Value>, Option<Value>) {
        match self {
            Outcome::Success { result, .. } => ("success", Some(result.clone()), None),
            Outcome::Retryable {
                message,
                error_code,
                retry_after,
            } => (
                "failure",
                None,
                Some(
                    json!({"message": message, "error_code": error_code, "retryable": true,
                            "retry_after_seconds": retry_after.map(|d| d.as_secs_f64())}),
                ),
            ),
            Outcome::Permanent {
                message,
                error_code,
            } => (
                "failure",
                None,
                Some(json!({"message": message, "error_code": error_code, "retryable": false})),
            ),
        }
    }
}

/// A batchable step's `batch_processing_outcome` for `total` items in
/// `workers` batches, with tasker-core's cursor split (ceiling division,
/// 0-indexed, end exclusive, batch ids `001`, `002`, ...).
pub fn create_batches(worker_template: &str, total: u64, workers: u64) -> Value {
    let cursors: Vec<Value> = pg_tasker_core::dynamic::split_cursors(total, workers)
        .into_iter()
        .map(|(batch_id, start, end)| {
            json!({"batch_id": batch_id, "start_cursor": start, "end_cursor": end,
                   "batch_size": end - start})
        })
        .collect();
    json!({"batch_processing_outcome": {
        "type": "create_batches", "worker_template_name": worker_template,
        "worker_count": cursors.len(), "cursor_configs": cursors, "total_items": total}})
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// An asynchronous step handler. Closures `Fn(StepContext) -> impl Future<Output = Outcome>`
/// implement it.
pub trait StepHandler: Send + Sync + 'static {
    fn handle(&self, step: StepContext) -> HandlerFuture;
}

impl<F, Fut> StepHandler for F
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn handle(&self, step: StepContext) -> HandlerFuture {
        Box::pin(self(step))
    }
}

/// A connection inside the transaction a transactional handler runs in
/// (see [`Registry::register_transactional`]). Its statements commit
/// together with the step's result, or not at all.
#[derive(Clone)]
pub struct Tx {
    client: Arc<tokio_postgres::Client>,
}

impl Tx {
    pub(crate) fn new(client: Arc<tokio_postgres::Client>) -> Self {
        Tx { client }
    }

    /// The connection; do not COMMIT or ROLLBACK on it (the runtime does).
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// A step handler whose database writes commit in one transaction with the
/// step's result. Closures `Fn(StepContext, Tx) -> impl Future<Output =
/// Outcome>` implement it.
pub trait TxStepHandler: Send + Sync + 'static {
    fn handle(&self, step: StepContext, tx: Tx) -> HandlerFuture;
}

impl<F, Fut> TxStepHandler for F
where
    F: Fn(StepContext, Tx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn handle(&self, step: StepContext, tx: Tx) -> HandlerFuture {
        Box::pin(self(step, tx))
    }
}

/// A registered handler.
#[derive(Clone)]
pub enum Handler {
    Plain(Arc<dyn StepHandler>),
    Transactional(Arc<dyn TxStepHandler>),
}

/// Handlers by `handler.callable`.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(
        &mut self,
        callable: impl Into<String>,
        handler: impl StepHandler,
    ) -> &mut Self {
        self.handlers
            .insert(callable.into(), Handler::Plain(Arc::new(handler)));
        self
    }

    /// A handler that writes to the same database: it runs inside a
    /// transaction ([`Tx`]) in which the runtime also submits its success,
    /// and that commits only if the database applies the result. A crash
    /// before the commit leaves no effect and the step runs again; after
    /// the commit it never runs again; a late duplicate attempt (its lease
    /// expired and another worker settled the step) is rolled back. A
    /// failure rolls the handler's writes back and is reported as usual.
    pub fn register_transactional(
        &mut self,
        callable: impl Into<String>,
        handler: impl TxStepHandler,
    ) -> &mut Self {
        self.handlers
            .insert(callable.into(), Handler::Transactional(Arc::new(handler)));
        self
    }

    pub fn get(&self, callable: &str) -> Option<Handler> {
        self.handlers.get(callable).cloned()
    }

    pub fn callables(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    pub fn merge(&mut self, other: Registry) -> &mut Self {
        self.handlers.extend(other.handlers);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_outcomes_speak_tasker_cores_format() {
        let Outcome::Success { result, .. } = Outcome::decision(&["a", "b"]) else {
            panic!()
        };
        assert_eq!(
            result,
            json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["a", "b"]}})
        );
        let b = create_batches("w", 250, 3);
        let o = &b["batch_processing_outcome"];
        assert_eq!(o["worker_count"], 3);
        assert_eq!(
            o["cursor_configs"][2],
            json!({"batch_id": "003", "start_cursor": 168, "end_cursor": 250, "batch_size": 82})
        );
        assert_eq!(Outcome::batches("w", 0, 3), Outcome::no_batches());
        assert!(matches!(Outcome::no_branches(), Outcome::Success { .. }));
    }
}
