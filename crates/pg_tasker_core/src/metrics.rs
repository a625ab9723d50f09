//! The Prometheus exposition of `tasker.metrics()`: what the database knows
//! (active tasks, queues, the DLQ, the orchestrator, committed state
//! changes) as metric families, encoded by the `prometheus-client` crate
//! (OpenMetrics text, which Prometheus scrapes).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// A queue's depth (pgmq.metrics of a namespace's queue).
#[derive(Debug, Clone, Default)]
pub struct Queue {
    pub namespace: String,
    pub depth: i64,
    pub visible: i64,
    pub oldest_message_age_seconds: Option<i64>,
}

/// The background orchestrator serving the database, when there is one.
#[derive(Debug, Clone, Default)]
pub struct Orchestrator {
    pub running: bool,
    pub ticks: u64,
    pub errors: u64,
    /// Notifications it sent for backends (tasker._notify).
    pub relayed_notifications: u64,
    pub last_tick_age_seconds: Option<f64>,
    pub last_tick_duration_seconds: f64,
    pub last_error_age_seconds: Option<f64>,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// (namespace, state, tasks) of the tasks not finished.
    pub active_tasks: Vec<(String, String, i64)>,
    pub due_tasks: i64,
    pub queues: Vec<Queue>,
    /// (reason, entries) of the DLQ entries pending.
    pub dlq_pending: Vec<(String, i64)>,
    pub orchestrator: Option<Orchestrator>,
    /// (state, moves into it) committed since the server started: steps,
    /// then tasks. None: not kept (no shared memory) or not shown.
    pub step_moves: Option<Vec<(&'static str, u64)>>,
    pub task_moves: Option<Vec<(&'static str, u64)>>,
}

/// Label pairs, their values escaped as the text format wants (the
/// encoder writes them as given): backslash, double quote, line feed.
fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            (k.to_string(), v)
        })
        .collect()
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn seconds(reg: &mut Registry, name: &str, help: &str, v: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn moves(reg: &mut Registry, name: &str, help: &str, m: &[(&'static str, u64)]) {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    for (state, n) in m {
        f.get_or_create(&labels(&[("state", state)])).inc_by(*n);
    }
}

/// The OpenMetrics text of a snapshot (metric names start `pg_tasker_`).
pub fn exposition(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("pg_tasker");
    let active = gauge_family(
        &mut reg,
        "tasks_active",
        "Tasks not finished, by namespace and state",
    );
    for (ns, state, n) in &s.active_tasks {
        active
            .get_or_create(&labels(&[("namespace", ns), ("state", state)]))
            .set(*n);
    }
    let due = Gauge::<i64>::default();
    due.set(s.due_tasks);
    reg.register(
        "tasks_due",
        "Tasks with due work nobody holds (tasker.ready_tasks)",
        due,
    );
    let depth = gauge_family(&mut reg, "queue_depth", "Messages in a namespace's queue");
    let visible = gauge_family(
        &mut reg,
        "queue_visible",
        "Messages a worker could read now",
    );
    let age = gauge_family(
        &mut reg,
        "queue_oldest_message_age_seconds",
        "Age of the oldest message in a namespace's queue",
    );
    for q in &s.queues {
        let l = labels(&[("namespace", &q.namespace)]);
        depth.get_or_create(&l).set(q.depth);
        visible.get_or_create(&l).set(q.visible);
        if let Some(a) = q.oldest_message_age_seconds {
            age.get_or_create(&l).set(a);
        }
    }
    let dlq = gauge_family(
        &mut reg,
        "dlq_pending",
        "Dead letter queue entries pending, by reason",
    );
    for (reason, n) in &s.dlq_pending {
        dlq.get_or_create(&labels(&[("reason", reason)])).set(*n);
    }
    let up = Gauge::<i64>::default();
    up.set(s.orchestrator.as_ref().is_some_and(|o| o.running) as i64);
    reg.register(
        "orchestrator_up",
        "Whether a background orchestrator serves this database",
        up,
    );
    if let Some(o) = &s.orchestrator {
        counter(
            &mut reg,
            "orchestrator_ticks",
            "Orchestration ticks since the server started",
            o.ticks,
        );
        counter(
            &mut reg,
            "orchestrator_errors",
            "Failed ticks and configuration errors",
            o.errors,
        );
        counter(
            &mut reg,
            "orchestrator_relayed_notifications",
            "Notifications the orchestrator sent for committed transactions (task events)",
            o.relayed_notifications,
        );
        seconds(
            &mut reg,
            "orchestrator_last_tick_duration_seconds",
            "How long the last tick took",
            o.last_tick_duration_seconds,
        );
        if let Some(a) = o.last_tick_age_seconds {
            seconds(
                &mut reg,
                "orchestrator_last_tick_age_seconds",
                "Time since the last tick",
                a,
            );
        }
        if let Some(a) = o.last_error_age_seconds {
            seconds(
                &mut reg,
                "orchestrator_last_error_age_seconds",
                "Time since the last error",
                a,
            );
        }
    }
    if let Some(m) = &s.step_moves {
        moves(
            &mut reg,
            "step_moves",
            "Committed step state changes, by the state reached",
            m,
        );
    }
    if let Some(m) = &s.task_moves {
        moves(
            &mut reg,
            "task_moves",
            "Committed task state changes, by the state reached",
            m,
        );
    }
    text(&reg)
}

/// The OpenMetrics text of a registry (also the worker's `/metrics`).
pub fn text(reg: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, reg).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_families_named() {
        let s = Snapshot {
            active_tasks: vec![("a\"b\\c\nd".into(), "steps_in_process".into(), 3)],
            due_tasks: 1,
            queues: vec![Queue {
                namespace: "billing".into(),
                depth: 5,
                visible: 2,
                oldest_message_age_seconds: Some(7),
            }],
            dlq_pending: vec![("staleness_timeout".into(), 4)],
            orchestrator: Some(Orchestrator {
                running: true,
                ticks: 10,
                errors: 1,
                relayed_notifications: 3,
                last_tick_age_seconds: Some(0.5),
                last_tick_duration_seconds: 0.002,
                last_error_age_seconds: None,
            }),
            step_moves: Some(vec![("complete", 9), ("error", 1)]),
            task_moves: None,
        };
        let text = exposition(&s);
        assert!(
            text.contains(
                r#"pg_tasker_tasks_active{namespace="a\"b\\c\nd",state="steps_in_process"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pg_tasker_queue_depth{namespace="billing"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pg_tasker_step_moves_total{state="complete"} 9"#),
            "{text}"
        );
        assert!(text.contains("pg_tasker_orchestrator_up 1"), "{text}");
        assert!(
            text.contains("pg_tasker_orchestrator_relayed_notifications_total 3"),
            "{text}"
        );
        assert!(
            text.contains("pg_tasker_orchestrator_ticks_total 10"),
            "{text}"
        );
        assert!(!text.contains("task_moves"), "{text}");
        assert!(!text.contains("last_error_age"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn without_an_orchestrator_only_up_is_shown() {
        let text = exposition(&Snapshot::default());
        assert!(text.contains("pg_tasker_orchestrator_up 0"), "{text}");
        assert!(!text.contains("ticks"), "{text}");
    }
}
