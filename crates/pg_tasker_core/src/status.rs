//! A task's execution status, decided from its step counters (the
//! `steps_<class>` columns of `tasker.tasks`). One decision table serves
//! the task state the orchestrator records and
//! `tasker.task_execution_context`.

use crate::state::TaskState;

/// Step counts of one task by class; `ready` counts steps that could be
/// enqueued now (after an evaluation it is 0: they were enqueued).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub total: i64,
    pub pending: i64,
    pub out: i64,
    pub waiting_for_retry: i64,
    pub done: i64,
    pub error: i64,
    pub cancelled: i64,
    pub ready: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionStatus {
    AllComplete,
    HasReadySteps,
    Processing,
    WaitingForRetry,
    BlockedByFailures,
    WaitingForDependencies,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 6] = [
        ExecutionStatus::AllComplete,
        ExecutionStatus::HasReadySteps,
        ExecutionStatus::Processing,
        ExecutionStatus::WaitingForRetry,
        ExecutionStatus::BlockedByFailures,
        ExecutionStatus::WaitingForDependencies,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::AllComplete => "all_complete",
            ExecutionStatus::HasReadySteps => "has_ready_steps",
            ExecutionStatus::Processing => "processing",
            ExecutionStatus::WaitingForRetry => "waiting_for_retry",
            ExecutionStatus::BlockedByFailures => "blocked_by_failures",
            ExecutionStatus::WaitingForDependencies => "waiting_for_dependencies",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The task state that reflects this status (for an active task).
    pub fn task_state(self) -> TaskState {
        match self {
            ExecutionStatus::AllComplete => TaskState::Complete,
            ExecutionStatus::HasReadySteps | ExecutionStatus::Processing => {
                TaskState::StepsInProcess
            }
            ExecutionStatus::WaitingForRetry => TaskState::WaitingForRetry,
            ExecutionStatus::BlockedByFailures => TaskState::BlockedByFailures,
            ExecutionStatus::WaitingForDependencies => TaskState::WaitingForDependencies,
        }
    }
}

/// First match wins. Unlike tasker-core, a failed step blocks the task only
/// once nothing else can make progress: independent branches run on.
pub fn execution_status(c: &StepCounts) -> ExecutionStatus {
    if c.total > 0 && c.done == c.total {
        ExecutionStatus::AllComplete
    } else if c.ready > 0 {
        ExecutionStatus::HasReadySteps
    } else if c.out > 0 {
        ExecutionStatus::Processing
    } else if c.waiting_for_retry > 0 {
        ExecutionStatus::WaitingForRetry
    } else if c.error > 0 {
        ExecutionStatus::BlockedByFailures
    } else {
        ExecutionStatus::WaitingForDependencies
    }
}

/// healthy (no failure seen), recovering (retries pending), degraded (a step
/// failed for good but others still run), blocked (failed and stuck).
pub fn health(c: &StepCounts) -> &'static str {
    match (c.error > 0, execution_status(c)) {
        (_, ExecutionStatus::BlockedByFailures) => "blocked",
        (true, _) => "degraded",
        (false, _) if c.waiting_for_retry > 0 => "recovering",
        _ => "healthy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(f: impl FnOnce(&mut StepCounts)) -> StepCounts {
        let mut c = StepCounts {
            total: 4,
            ..Default::default()
        };
        f(&mut c);
        c
    }

    #[test]
    fn decision_table() {
        use ExecutionStatus::*;
        assert_eq!(execution_status(&counts(|c| c.done = 4)), AllComplete);
        assert_eq!(
            execution_status(&counts(|c| {
                c.ready = 1;
                c.error = 1
            })),
            HasReadySteps
        );
        assert_eq!(
            execution_status(&counts(|c| {
                c.out = 1;
                c.error = 1
            })),
            Processing
        );
        assert_eq!(
            execution_status(&counts(|c| {
                c.waiting_for_retry = 1;
                c.done = 3
            })),
            WaitingForRetry
        );
        assert_eq!(
            execution_status(&counts(|c| {
                c.error = 1;
                c.pending = 2;
                c.done = 1
            })),
            BlockedByFailures
        );
        assert_eq!(
            execution_status(&counts(|c| c.pending = 4)),
            WaitingForDependencies
        );
        assert_eq!(BlockedByFailures.task_state(), TaskState::BlockedByFailures);
        assert_eq!(AllComplete.task_state(), TaskState::Complete);
        for s in ExecutionStatus::ALL {
            assert_eq!(ExecutionStatus::parse(s.as_str()), Some(s));
            assert!(!s.task_state().is_terminal() || s == AllComplete);
        }
    }

    #[test]
    fn health_classes() {
        assert_eq!(health(&counts(|c| c.out = 4)), "healthy");
        assert_eq!(
            health(&counts(|c| {
                c.waiting_for_retry = 1;
                c.out = 1
            })),
            "recovering"
        );
        assert_eq!(
            health(&counts(|c| {
                c.error = 1;
                c.out = 1
            })),
            "degraded"
        );
        assert_eq!(
            health(&counts(|c| {
                c.error = 1;
                c.pending = 3
            })),
            "blocked"
        );
    }
}
