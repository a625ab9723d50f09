//! Blog post 03: microservices coordination (namespace `microservices`,
//! template `user_registration`): create_user_account → (setup_billing_profile,
//! initialize_preferences) → send_welcome_sequence → update_user_status.
//!
//! The billing service is down for its first calls; a circuit breaker opens
//! after two failures and answers "retry after the cooldown" without calling
//! it, then lets a trial call through. The preferences service answers its
//! first call with 429 and `Retry-After: 1`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Outcome, Registry, StepContext};

/// A minimal circuit breaker: closed → open after `threshold` consecutive
/// failures → half-open after `cooldown` (one trial call).
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    opened_at: Option<Instant>,
}

pub enum Gate {
    Call,
    Open { retry_in: Duration },
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            threshold,
            cooldown,
            failures: 0,
            opened_at: None,
        }
    }

    pub fn gate(&self) -> Gate {
        match self.opened_at {
            Some(t) if t.elapsed() < self.cooldown => Gate::Open {
                retry_in: self.cooldown - t.elapsed(),
            },
            _ => Gate::Call, // closed, or half-open: one trial
        }
    }

    pub fn record(&mut self, ok: bool) {
        if ok {
            self.failures = 0;
            self.opened_at = None;
        } else {
            self.failures += 1;
            if self.failures >= self.threshold {
                self.opened_at = Some(Instant::now());
            }
        }
    }

    pub fn state(&self) -> &'static str {
        match self.gate() {
            Gate::Open { .. } => "open",
            Gate::Call if self.opened_at.is_some() => "half_open",
            Gate::Call => "closed",
        }
    }
}

/// The simulated billing service: fails its first `down_for` calls.
struct BillingService {
    calls: u32,
    down_for: u32,
}

pub fn registry() -> Registry {
    let breaker = Arc::new(Mutex::new(CircuitBreaker::new(
        2,
        Duration::from_millis(700),
    )));
    let billing = Arc::new(Mutex::new(BillingService {
        calls: 0,
        down_for: 3,
    }));
    let mut r = Registry::new();
    r.register("Microservices::CreateUserAccountHandler", |step: StepContext| async move {
        let email = step.message.task_context["email"].as_str().unwrap_or("").to_string();
        Outcome::success(json!({"user_id": format!("usr_{}", &step.message.task_uuid[24..]), "email": email}))
    });
    r.register("Microservices::SetupBillingProfileHandler", move |step: StepContext| {
        let (breaker, billing) = (breaker.clone(), billing.clone());
        async move {
            if let Gate::Open { retry_in } = breaker.lock().unwrap().gate() {
                return Outcome::Retryable {
                    message: "billing circuit open".into(),
                    error_code: Some("CIRCUIT_OPEN".into()),
                    retry_after: Some(retry_in),
                };
            }
            let ok = {
                let mut b = billing.lock().unwrap();
                b.calls += 1;
                b.calls > b.down_for
            };
            let mut cb = breaker.lock().unwrap();
            cb.record(ok);
            if ok {
                Outcome::success(json!({"billing_id": format!("bill_{}", &step.message.task_uuid[24..]), "breaker": cb.state()}))
            } else {
                Outcome::Retryable {
                    message: "billing service unavailable (503)".into(),
                    error_code: Some("SERVICE_UNAVAILABLE".into()),
                    retry_after: None,
                }
            }
        }
    });
    r.register(
        "Microservices::InitializePreferencesHandler",
        |step: StepContext| async move {
            if step.message.attempt == 1 {
                return Outcome::Retryable {
                    message: "preferences service: 429 Too Many Requests".into(),
                    error_code: Some("RATE_LIMITED".into()),
                    retry_after: Some(Duration::from_secs(1)),
                };
            }
            Outcome::success(
                json!({"preferences": {"newsletter": true}, "attempt": step.message.attempt}),
            )
        },
    );
    r.register(
        "Microservices::SendWelcomeSequenceHandler",
        |step: StepContext| async move {
            let ready = step.dependency("setup_billing_profile").is_some()
                && step.dependency("initialize_preferences").is_some();
            Outcome::success(json!({"welcome_sent": ready}))
        },
    );
    r.register(
        "Microservices::UpdateUserStatusHandler",
        |_step: StepContext| async move { Outcome::success(json!({"status": "active"})) },
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_half_opens_after_cooldown() {
        let mut cb = CircuitBreaker::new(2, Duration::from_millis(50));
        assert_eq!(cb.state(), "closed");
        cb.record(false);
        assert!(matches!(cb.gate(), Gate::Call));
        cb.record(false);
        assert!(matches!(cb.gate(), Gate::Open { .. }));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cb.state(), "half_open");
        cb.record(true);
        assert_eq!(cb.state(), "closed");
    }
}
