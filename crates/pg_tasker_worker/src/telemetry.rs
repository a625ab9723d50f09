//! What a running worker reports about itself: Prometheus metrics and the
//! figures of its `/health` document (seed 002's worker web API, served by
//! [`crate::web`]). The runtime records into it; scrapes read it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Outcome;

type Labels = Vec<(String, String)>;

/// How far back the processing rate looks.
const RATE_WINDOW: Duration = Duration::from_secs(60);

pub struct Telemetry {
    pub worker_id: String,
    pub namespaces: Vec<String>,
    started: Instant,
    steps: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    /// The runtime's count of re-established connections.
    reconnects: Arc<AtomicU64>,
    /// The last exchange (or the start-up check) reached the database.
    connected: AtomicBool,
    /// When the loop last went round (liveness).
    heartbeat_ms: AtomicI64,
    per_namespace: Mutex<HashMap<String, NamespaceState>>,
}

/// A namespace's handlers as `/health` reports them.
#[derive(Debug, Default, Clone)]
struct NamespaceState {
    /// Finish times within the rate window.
    recent: VecDeque<Instant>,
    active: i64,
    /// ms since the epoch of the last finished handler (0: none yet).
    last_ms: i64,
}

/// What `/health` says of one namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceHealth {
    pub processing_rate_per_second: f64,
    pub active_steps: i64,
    pub last_processed_ms: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn handler_buckets() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The outcome label of a handler's result.
pub fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Success { .. } => "success",
        Outcome::Retryable { .. } => "retryable_failure",
        Outcome::Permanent { .. } => "permanent_failure",
    }
}

impl Telemetry {
    pub fn new(
        worker_id: String,
        namespaces: Vec<String>,
        reconnects: Arc<AtomicU64>,
    ) -> Telemetry {
        Telemetry {
            worker_id,
            namespaces,
            started: Instant::now(),
            steps: Family::default(),
            durations: Family::new_with_constructor(handler_buckets),
            reconnects,
            connected: AtomicBool::new(false),
            heartbeat_ms: AtomicI64::new(now_ms()),
            per_namespace: Mutex::new(HashMap::new()),
        }
    }

    pub fn handler_started(&self, namespace: &str) {
        let mut m = self.per_namespace.lock().unwrap();
        m.entry(namespace.to_string()).or_default().active += 1;
    }

    /// A handler of `namespace` finished with `outcome` after `took`.
    pub fn handler_finished(&self, namespace: &str, outcome: &Outcome, took: Duration) {
        let ns = vec![("namespace".to_string(), namespace.to_string())];
        let mut l = ns.clone();
        l.push(("outcome".into(), outcome_label(outcome).into()));
        self.steps.get_or_create(&l).inc();
        self.durations
            .get_or_create(&ns)
            .observe(took.as_secs_f64());
        let now = Instant::now();
        let mut m = self.per_namespace.lock().unwrap();
        let s = m.entry(namespace.to_string()).or_default();
        s.active -= 1;
        s.last_ms = now_ms();
        s.recent.push_back(now);
        while s
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            s.recent.pop_front();
        }
    }

    /// A namespace's processing rate (handlers finished per second over
    /// the last minute, or since start), active steps, last finish.
    pub fn namespace_health(&self, namespace: &str) -> NamespaceHealth {
        let now = Instant::now();
        let window = RATE_WINDOW.min(self.uptime()).as_secs_f64().max(1.0);
        let m = self.per_namespace.lock().unwrap();
        let s = m.get(namespace).cloned().unwrap_or_default();
        let n = s
            .recent
            .iter()
            .filter(|t| now.duration_since(**t) <= RATE_WINDOW)
            .count();
        NamespaceHealth {
            processing_rate_per_second: n as f64 / window,
            active_steps: s.active,
            last_processed_ms: Some(s.last_ms).filter(|&ms| ms > 0),
        }
    }

    pub fn set_connected(&self, yes: bool) {
        self.connected.store(yes, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the loop last went round.
    pub fn since_heartbeat(&self) -> Duration {
        Duration::from_millis((now_ms() - self.heartbeat_ms.load(Ordering::Relaxed)).max(0) as u64)
    }

    /// Handlers running now, in every namespace.
    pub fn in_flight(&self) -> i64 {
        self.per_namespace
            .lock()
            .unwrap()
            .values()
            .map(|s| s.active)
            .sum()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The OpenMetrics text of `/metrics` (names start `pg_tasker_worker_`).
    pub fn encode(&self) -> String {
        let mut reg = Registry::with_prefix("pg_tasker_worker");
        reg.register(
            "steps",
            "Steps handled, by namespace and outcome",
            self.steps.clone(),
        );
        reg.register(
            "handler_duration_seconds",
            "How long handlers ran, by namespace",
            self.durations.clone(),
        );
        let in_flight = Gauge::<i64>::default();
        in_flight.set(self.in_flight());
        reg.register("in_flight", "Handlers running now", in_flight);
        let reconnects = Counter::<u64>::default();
        reconnects.inc_by(self.reconnects.load(Ordering::Relaxed));
        reg.register(
            "reconnects",
            "Database connections re-established",
            reconnects,
        );
        let up = Gauge::<i64>::default();
        up.set(self.connected() as i64);
        reg.register(
            "connected",
            "Whether the last exchange reached the database",
            up,
        );
        pg_tasker_core::metrics::text(&reg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_are_counted_by_namespace_and_outcome() {
        let t = Telemetry::new("w".into(), vec!["a".into()], Arc::new(AtomicU64::new(2)));
        t.handler_started("a");
        t.handler_started("a");
        assert_eq!(t.in_flight(), 2);
        t.handler_finished(
            "a",
            &Outcome::success(serde_json::json!({})),
            Duration::from_millis(3),
        );
        t.handler_finished(
            "a",
            &Outcome::permanent("no", "X"),
            Duration::from_millis(40),
        );
        assert_eq!(t.in_flight(), 0);
        let text = t.encode();
        assert!(
            text.contains(r#"pg_tasker_worker_steps_total{namespace="a",outcome="success"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pg_tasker_worker_steps_total{namespace="a",outcome="permanent_failure"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pg_tasker_worker_handler_duration_seconds_count{namespace="a"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("pg_tasker_worker_reconnects_total 2"),
            "{text}"
        );
        let h = t.namespace_health("a");
        assert!(h.processing_rate_per_second > 0.0);
        assert_eq!(h.active_steps, 0);
        assert!(h.last_processed_ms.is_some());
        assert_eq!(t.namespace_health("b").last_processed_ms, None);
    }
}
