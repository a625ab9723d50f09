//! Task and step states: the Rust mirror of the SQL types `tasker.task_state`
//! and `tasker.step_state` (sql/00_states.sql, their one definition). The
//! extension's tests compare the two value by value, and the classes below
//! with `tasker.task_state_is_terminal` / `tasker.step_state_class`.

macro_rules! states {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every value, in the SQL enum's order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

states!(
    /// `tasker.task_state`.
    TaskState {
        Pending = "pending",
        StepsInProcess = "steps_in_process",
        WaitingForDependencies = "waiting_for_dependencies",
        WaitingForRetry = "waiting_for_retry",
        BlockedByFailures = "blocked_by_failures",
        Complete = "complete",
        Error = "error",
        Cancelled = "cancelled",
        ResolvedManually = "resolved_manually",
    }
);

states!(
    /// `tasker.step_state`.
    StepState {
        Pending = "pending",
        Enqueued = "enqueued",
        InProgress = "in_progress",
        WaitingForRetry = "waiting_for_retry",
        Complete = "complete",
        Error = "error",
        Cancelled = "cancelled",
        ResolvedManually = "resolved_manually",
    }
);

impl TaskState {
    /// Mirrors `tasker.task_state_is_terminal`: a finished task never changes.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Complete
                | TaskState::Error
                | TaskState::Cancelled
                | TaskState::ResolvedManually
        )
    }
}

impl StepState {
    /// Mirrors `tasker.step_state_class`: the counter a step in this state
    /// adds to on its task row.
    pub fn class(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Enqueued | StepState::InProgress => "out",
            StepState::WaitingForRetry => "waiting",
            StepState::Complete | StepState::ResolvedManually => "done",
            StepState::Error => "error",
            StepState::Cancelled => "cancelled",
        }
    }
}

/// The facts of a `tasker.workflow_steps` row that its invariants are
/// about (the row's one CHECK calls [`StepRow::problem`] through
/// `tasker._step_row_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRow {
    pub state: StepState,
    pub attempts: i32,
    pub budget_offset: i32,
    pub max_attempts: i32,
    pub pending_parents: i32,
    pub total_parents: i32,
    pub transitions: i32,
    /// queue_msg_id and enqueued_at are set
    pub has_message: bool,
    pub has_started_at: bool,
    pub has_next_retry_at: bool,
    pub has_completed_at: bool,
}

impl StepRow {
    /// The first invariant the row breaks, if any.
    pub fn problem(&self) -> Option<String> {
        let s = self.state;
        if !(0..=self.total_parents).contains(&self.pending_parents) {
            return Some(format!(
                "pending_parents {} is outside 0..={}",
                self.pending_parents, self.total_parents
            ));
        }
        if self.transitions < 1 {
            return Some(format!("transitions is {}", self.transitions));
        }
        if !(0..=self.attempts).contains(&self.budget_offset) {
            return Some(format!(
                "budget_offset {} is outside 0..={} (attempts)",
                self.budget_offset, self.attempts
            ));
        }
        if self.attempts - self.budget_offset > self.max_attempts {
            return Some(format!(
                "attempt {} of the budget exceeds max_attempts {}",
                self.attempts - self.budget_offset,
                self.max_attempts
            ));
        }
        if s.class() == "out" && !self.has_message {
            return Some(format!("a step {s} has no queue message"));
        }
        if s == StepState::InProgress && !self.has_started_at {
            return Some("a step in_progress has no started_at".into());
        }
        if (s == StepState::WaitingForRetry) != self.has_next_retry_at {
            return Some(format!(
                "a step {s} {} next_retry_at",
                if self.has_next_retry_at {
                    "has a"
                } else {
                    "has no"
                }
            ));
        }
        if (s.class() == "done") != self.has_completed_at {
            return Some(format!(
                "a step {s} {} completed_at",
                if self.has_completed_at {
                    "has a"
                } else {
                    "has no"
                }
            ));
        }
        if self.attempts == 0
            && !matches!(
                s,
                StepState::Pending | StepState::Cancelled | StepState::ResolvedManually
            )
        {
            return Some(format!("a step {s} was never attempted"));
        }
        None
    }
}

/// The facts of a `tasker.tasks` row that its invariants are about (the
/// row's one CHECK calls [`TaskRow::problem`] through
/// `tasker._task_row_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRow {
    pub state: TaskState,
    pub steps_total: i32,
    pub steps_pending: i32,
    pub steps_out: i32,
    pub steps_waiting: i32,
    pub steps_done: i32,
    pub steps_error: i32,
    pub steps_cancelled: i32,
    pub transitions: i32,
    pub priority: i32,
    pub context_is_object: bool,
    pub has_completed_at: bool,
    pub has_next_action_at: bool,
    pub has_claimed_by: bool,
    pub has_claim_expires_at: bool,
}

/// The bounds of `tasks.priority`.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;

impl TaskRow {
    /// The first invariant the row breaks, if any.
    pub fn problem(&self) -> Option<String> {
        let counters = [
            self.steps_pending,
            self.steps_out,
            self.steps_waiting,
            self.steps_done,
            self.steps_error,
            self.steps_cancelled,
        ];
        if counters.iter().any(|&c| c < 0) {
            return Some(format!("a step counter is negative: {counters:?}"));
        }
        let sum: i64 = counters.iter().map(|&c| i64::from(c)).sum();
        if sum != i64::from(self.steps_total) {
            return Some(format!(
                "step counters add up to {sum}, not steps_total {}",
                self.steps_total
            ));
        }
        if self.transitions < 1 {
            return Some(format!("transitions is {}", self.transitions));
        }
        if !PRIORITY_RANGE.contains(&self.priority) {
            return Some(format!("priority {} is outside -100..=100", self.priority));
        }
        if !self.context_is_object {
            return Some("context is not a JSON object".into());
        }
        let s = self.state;
        if s == TaskState::Complete && self.steps_done != self.steps_total {
            return Some(format!(
                "a complete task has {} of {} steps done",
                self.steps_done, self.steps_total
            ));
        }
        if s.is_terminal() != self.has_completed_at {
            return Some(format!(
                "a task {s} {} completed_at",
                if self.has_completed_at {
                    "has a"
                } else {
                    "has no"
                }
            ));
        }
        if s.is_terminal() && (self.has_next_action_at || self.has_claimed_by) {
            return Some(format!("a task {s} still has work due or a claim"));
        }
        if self.has_claimed_by != self.has_claim_expires_at {
            return Some("claimed_by and claim_expires_at are set together".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(*s));
        }
        for s in StepState::ALL {
            assert_eq!(StepState::parse(s.as_str()), Some(*s));
        }
        assert_eq!(TaskState::parse("initializing"), None);
    }

    fn step_row(state: StepState) -> StepRow {
        StepRow {
            state,
            attempts: 1,
            budget_offset: 0,
            max_attempts: 3,
            pending_parents: 0,
            total_parents: 1,
            transitions: 2,
            has_message: true,
            has_started_at: false,
            has_next_retry_at: false,
            has_completed_at: false,
        }
    }

    #[test]
    fn step_row_invariants() {
        assert_eq!(step_row(StepState::Enqueued).problem(), None);
        let broken = [
            StepRow {
                pending_parents: 2,
                ..step_row(StepState::Pending)
            },
            StepRow {
                pending_parents: -1,
                ..step_row(StepState::Pending)
            },
            StepRow {
                transitions: 0,
                ..step_row(StepState::Pending)
            },
            StepRow {
                budget_offset: 2,
                ..step_row(StepState::Pending)
            },
            StepRow {
                attempts: 5,
                ..step_row(StepState::Enqueued)
            },
            StepRow {
                has_message: false,
                ..step_row(StepState::InProgress)
            },
            step_row(StepState::InProgress),
            step_row(StepState::WaitingForRetry),
            StepRow {
                has_next_retry_at: true,
                ..step_row(StepState::Enqueued)
            },
            step_row(StepState::Complete),
            StepRow {
                has_completed_at: true,
                ..step_row(StepState::Error)
            },
            StepRow {
                attempts: 0,
                ..step_row(StepState::Error)
            },
        ];
        for row in broken {
            assert!(row.problem().is_some(), "{row:?}");
        }
        let fine = [
            StepRow {
                has_started_at: true,
                ..step_row(StepState::InProgress)
            },
            StepRow {
                has_next_retry_at: true,
                ..step_row(StepState::WaitingForRetry)
            },
            StepRow {
                has_completed_at: true,
                ..step_row(StepState::Complete)
            },
            StepRow {
                attempts: 0,
                has_message: false,
                ..step_row(StepState::Pending)
            },
            StepRow {
                attempts: 0,
                has_completed_at: true,
                ..step_row(StepState::ResolvedManually)
            },
        ];
        for row in fine {
            assert_eq!(row.problem(), None, "{row:?}");
        }
    }

    fn task_row(state: TaskState) -> TaskRow {
        TaskRow {
            state,
            steps_total: 3,
            steps_pending: 1,
            steps_out: 1,
            steps_waiting: 0,
            steps_done: 1,
            steps_error: 0,
            steps_cancelled: 0,
            transitions: 2,
            priority: 0,
            context_is_object: true,
            has_completed_at: false,
            has_next_action_at: false,
            has_claimed_by: false,
            has_claim_expires_at: false,
        }
    }

    #[test]
    fn task_row_invariants() {
        assert_eq!(task_row(TaskState::StepsInProcess).problem(), None);
        let done = TaskRow {
            steps_pending: 0,
            steps_out: 0,
            steps_done: 3,
            has_completed_at: true,
            ..task_row(TaskState::Complete)
        };
        assert_eq!(done.problem(), None);
        let broken = [
            TaskRow {
                steps_out: -1,
                steps_pending: 3,
                ..task_row(TaskState::StepsInProcess)
            },
            TaskRow {
                steps_out: 2,
                ..task_row(TaskState::StepsInProcess)
            },
            TaskRow {
                transitions: 0,
                ..task_row(TaskState::StepsInProcess)
            },
            TaskRow {
                priority: 101,
                ..task_row(TaskState::StepsInProcess)
            },
            TaskRow {
                context_is_object: false,
                ..task_row(TaskState::StepsInProcess)
            },
            TaskRow {
                has_completed_at: true,
                ..task_row(TaskState::Complete)
            },
            task_row(TaskState::Cancelled),
            TaskRow {
                has_completed_at: true,
                ..task_row(TaskState::StepsInProcess)
            },
            TaskRow {
                has_next_action_at: true,
                ..done
            },
            TaskRow {
                has_claimed_by: true,
                ..task_row(TaskState::StepsInProcess)
            },
        ];
        for row in broken {
            assert!(row.problem().is_some(), "{row:?}");
        }
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = TaskState::ALL.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal.len(), 4);
        assert!(!TaskState::BlockedByFailures.is_terminal());
    }
}
