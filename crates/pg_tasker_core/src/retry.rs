//! Backoff and retry decisions for failed step attempts.

use crate::template::{Backoff, RetryPolicy};

/// Jitter spreads a delay uniformly over ±15 % (then caps it).
pub const JITTER_FRACTION: f64 = 0.15;

/// The computed delay before the next attempt, after `attempts` attempts
/// have been made (`attempts >= 1`). `unit` is a random number in [0, 1),
/// used only when the policy asks for jitter.
///
/// | backoff     | delay after attempt n                 |
/// |-------------|---------------------------------------|
/// | none        | 0                                     |
/// | linear      | base × n                              |
/// | exponential | base × 2^(n-1)                        |
/// | fibonacci   | base × fib(n)   (1, 1, 2, 3, 5, 8, …) |
///
/// always capped at `max_backoff_ms`.
pub fn backoff_ms(policy: &RetryPolicy, attempts: u32, unit: f64) -> u64 {
    let n = attempts.max(1) as u64;
    let base = policy.backoff_base_ms;
    let raw: u128 = match policy.backoff {
        Backoff::None => 0,
        Backoff::Linear => base as u128 * n as u128,
        Backoff::Exponential => {
            let shift = (n - 1).min(64) as u32;
            (base as u128)
                .checked_shl(shift)
                .filter(|v| v >> shift == base as u128)
                .unwrap_or(u128::MAX)
        }
        Backoff::Fibonacci => base as u128 * fibonacci(n) as u128,
    };
    let capped = raw.min(policy.max_backoff_ms as u128) as u64;
    if policy.jitter && capped > 0 {
        let factor = 1.0 + JITTER_FRACTION * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        ((capped as f64 * factor).round() as u64).min(policy.max_backoff_ms)
    } else {
        capped
    }
}

fn fibonacci(n: u64) -> u64 {
    let (mut a, mut b) = (1u64, 1u64);
    for _ in 2..n.min(90) {
        let next = a.saturating_add(b);
        a = b;
        b = next;
    }
    b
}

/// What happens to a step after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Try again after `delay_ms`; `requested` is true when the delay came
    /// from the handler (retry-after / backoff hint) rather than the policy.
    Retry { delay_ms: u64, requested: bool },
    /// No further attempt: the error is permanent or attempts are exhausted.
    Error { exhausted: bool },
}

/// Decides the outcome of a failed attempt. `attempts` counts the attempts
/// made in the current retry budget, the failed one included (an operator's
/// retry starts a new budget; the attempt number itself only grows);
/// `error_retryable` is the handler's verdict; `requested_delay_ms` a delay
/// the handler asked for.
pub fn on_failure(
    policy: &RetryPolicy,
    attempts: u32,
    error_retryable: bool,
    requested_delay_ms: Option<u64>,
    unit: f64,
) -> FailureOutcome {
    if !policy.retryable || !error_retryable {
        return FailureOutcome::Error { exhausted: false };
    }
    if attempts >= policy.max_attempts {
        return FailureOutcome::Error { exhausted: true };
    }
    match requested_delay_ms {
        Some(d) => FailureOutcome::Retry {
            delay_ms: d.min(policy.max_backoff_ms),
            requested: true,
        },
        None => FailureOutcome::Retry {
            delay_ms: backoff_ms(policy, attempts, unit),
            requested: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Backoff, base: u64, cap: u64) -> RetryPolicy {
        RetryPolicy {
            retryable: true,
            max_attempts: 10,
            backoff,
            backoff_base_ms: base,
            max_backoff_ms: cap,
            jitter: false,
        }
    }

    #[test]
    fn each_policy_grows_as_documented() {
        let delays = |b| {
            (1..=7)
                .map(|n| backoff_ms(&policy(b, 100, 1_000_000), n, 0.5))
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(Backoff::None), [0; 7]);
        assert_eq!(delays(Backoff::Linear), [100, 200, 300, 400, 500, 600, 700]);
        assert_eq!(
            delays(Backoff::Exponential),
            [100, 200, 400, 800, 1600, 3200, 6400]
        );
        assert_eq!(
            delays(Backoff::Fibonacci),
            [100, 100, 200, 300, 500, 800, 1300]
        );
    }

    #[test]
    fn capped_and_overflow_safe() {
        let p = policy(Backoff::Exponential, 1000, 5000);
        assert_eq!(backoff_ms(&p, 3, 0.0), 4000);
        assert_eq!(backoff_ms(&p, 4, 0.0), 5000);
        assert_eq!(backoff_ms(&p, 1000, 0.0), 5000);
        assert_eq!(
            backoff_ms(&policy(Backoff::Fibonacci, 1000, 9000), 500, 0.0),
            9000
        );
    }

    #[test]
    fn jitter_stays_within_fifteen_percent_and_cap() {
        let mut p = policy(Backoff::Linear, 1000, 100_000);
        p.jitter = true;
        assert_eq!(backoff_ms(&p, 1, 0.0), 850);
        assert_eq!(backoff_ms(&p, 1, 0.5), 1000);
        assert_eq!(backoff_ms(&p, 1, 1.0), 1150);
        p.max_backoff_ms = 1000;
        assert_eq!(backoff_ms(&p, 1, 1.0), 1000);
    }

    #[test]
    fn failure_outcomes() {
        let mut p = policy(Backoff::Exponential, 1000, 60_000);
        p.max_attempts = 3;
        assert_eq!(
            on_failure(&p, 1, true, None, 0.5),
            FailureOutcome::Retry {
                delay_ms: 1000,
                requested: false
            }
        );
        assert_eq!(
            on_failure(&p, 2, true, None, 0.5),
            FailureOutcome::Retry {
                delay_ms: 2000,
                requested: false
            }
        );
        assert_eq!(
            on_failure(&p, 3, true, None, 0.5),
            FailureOutcome::Error { exhausted: true }
        );
        assert_eq!(
            on_failure(&p, 1, false, None, 0.5),
            FailureOutcome::Error { exhausted: false }
        );
        assert_eq!(
            on_failure(&p, 1, true, Some(7_000), 0.5),
            FailureOutcome::Retry {
                delay_ms: 7_000,
                requested: true
            }
        );
        assert_eq!(
            on_failure(&p, 1, true, Some(600_000), 0.5),
            FailureOutcome::Retry {
                delay_ms: 60_000,
                requested: true
            }
        );
        p.retryable = false;
        assert_eq!(
            on_failure(&p, 1, true, None, 0.5),
            FailureOutcome::Error { exhausted: false }
        );
    }
}
