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

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = TaskState::ALL.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal.len(), 4);
        assert!(!TaskState::BlockedByFailures.is_terminal());
    }
}
