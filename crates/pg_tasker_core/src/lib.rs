//! Plain-Rust domain logic of pg_tasker.
//!
//! Nothing here depends on PostgreSQL or pgrx: the extension calls into this
//! crate and maps [`Error`] to SQLSTATEs, so every rule is unit-testable with
//! `cargo test -p pg_tasker_core` in a second.

pub mod config;
pub mod dynamic;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod naming;
pub mod privilege;
pub mod retry;
pub mod state;
pub mod status;
pub mod submission;
pub mod template;
pub mod version;

pub use error::{Error, ErrorKind};
pub use state::{StepRow, StepState, TaskRow, TaskState};
pub use template::{Backoff, Handler, RetryPolicy, StepTemplate, StepType, TaskTemplate};
