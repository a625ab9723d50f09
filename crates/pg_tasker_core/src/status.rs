//! A task's execution status, decided from the counts of its steps by state.
//! One decision table serves `tasker.task_execution_context` and the task
//! state the orchestrator records.

/// Step counts of one task. `ready` counts steps that could be enqueued now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub total: i64,
    pub pending: i64,
    pub ready: i64,
    pub in_flight: i64,
    pub waiting_for_retry: i64,
    pub complete: i64,
    pub error: i64,
    pub cancelled: i64,
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

    /// The task state that reflects this status (for a task not cancelled).
    pub fn task_state(self) -> &'static str {
        match self {
            ExecutionStatus::AllComplete => "complete",
            ExecutionStatus::HasReadySteps | ExecutionStatus::Processing => "steps_in_process",
            ExecutionStatus::WaitingForRetry => "waiting_for_retry",
            ExecutionStatus::BlockedByFailures => "blocked_by_failures",
            ExecutionStatus::WaitingForDependencies => "waiting_for_dependencies",
        }
    }
}

/// First match wins. Unlike tasker-core, a failed step blocks the task only
/// once nothing else can make progress: independent branches run on.
pub fn execution_status(c: &StepCounts) -> ExecutionStatus {
    if c.total > 0 && c.complete == c.total {
        ExecutionStatus::AllComplete
    } else if c.ready > 0 {
        ExecutionStatus::HasReadySteps
    } else if c.in_flight > 0 {
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

/// Completed share of the steps, 0..=100, two decimals.
pub fn completion_percentage(c: &StepCounts) -> f64 {
    if c.total == 0 {
        return 0.0;
    }
    ((c.complete as f64 * 10_000.0) / c.total as f64).round() / 100.0
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
        assert_eq!(execution_status(&counts(|c| c.complete = 4)), AllComplete);
        assert_eq!(
            execution_status(&counts(|c| {
                c.ready = 1;
                c.error = 1
            })),
            HasReadySteps
        );
        assert_eq!(
            execution_status(&counts(|c| {
                c.in_flight = 1;
                c.error = 1
            })),
            Processing
        );
        assert_eq!(
            execution_status(&counts(|c| {
                c.waiting_for_retry = 1;
                c.complete = 3
            })),
            WaitingForRetry
        );
        assert_eq!(
            execution_status(&counts(|c| {
                c.error = 1;
                c.pending = 2;
                c.complete = 1
            })),
            BlockedByFailures
        );
        assert_eq!(
            execution_status(&counts(|c| c.pending = 4)),
            WaitingForDependencies
        );
        assert_eq!(BlockedByFailures.task_state(), "blocked_by_failures");
    }

    #[test]
    fn health_and_percentage() {
        assert_eq!(health(&counts(|c| c.in_flight = 4)), "healthy");
        assert_eq!(
            health(&counts(|c| {
                c.waiting_for_retry = 1;
                c.in_flight = 1
            })),
            "recovering"
        );
        assert_eq!(
            health(&counts(|c| {
                c.error = 1;
                c.in_flight = 1
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
        assert_eq!(
            completion_percentage(&StepCounts {
                total: 3,
                complete: 1,
                ..Default::default()
            }),
            33.33
        );
    }
}
