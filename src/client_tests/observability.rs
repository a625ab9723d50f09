//! Operating pg_tasker from outside: task events (NOTIFY tasker_events at
//! commit, `pg_tasker_worker::wait_for_task`) and `tasker.metrics()` read by
//! a real Prometheus text parser.

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use serde_json::{json, Value};

use super::*;

/// A second connection to the test database, listening for task events.
fn events_listener(c: &mut Client) -> Client {
    let mut listener = other_connection(c);
    listener.batch_execute("LISTEN tasker_events").unwrap();
    listener
}

/// The events a LISTENing connection has received within `wait`.
fn events(listener: &mut Client, wait: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let mut n = listener.notifications();
    let mut it = n.timeout_iter(wait);
    while let Ok(Some(e)) = it.next() {
        assert_eq!(e.channel(), "tasker_events");
        out.push(serde_json::from_str(e.payload()).unwrap());
    }
    out
}

fn of_task<'a>(events: &'a [Value], task: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["task_uuid"] == task).collect()
}

fn the_message(c: &mut Client, task: &str) -> Value {
    query_json(
        c,
        &format!(
            "SELECT jsonb_build_object('step_uuid', step_uuid, 'attempt', attempts)
             FROM tasker.workflow_steps WHERE task_uuid = '{task}' AND state IN ('enqueued', 'in_progress')
             ORDER BY position LIMIT 1"
        ),
    )
}

#[test]
fn task_events_are_notified_at_commit() {
    let mut c = connect();
    let mut listener = events_listener(&mut c);
    register(
        &mut c,
        &json!({"name": "flow", "namespace_name": "obs_ev", "version": "1",
                "steps": [{"name": "a", "retry": {"max_attempts": 1}, "handler": {"callable": "T"}}]}),
    );
    let done = create(&mut c, "obs_ev", "flow").to_string();
    let failed = create(&mut c, "obs_ev", "flow").to_string();
    let cancelled = create(&mut c, "obs_ev", "flow").to_string();
    assert!(of_task(&events(&mut listener, Duration::from_millis(200)), &done).is_empty());

    // the completion is told when its transaction commits, not before
    c.batch_execute("BEGIN").unwrap();
    let m = the_message(&mut c, &done);
    submit(&mut c, &m, &Reply::Success(json!({})));
    assert!(
        of_task(&events(&mut listener, Duration::from_millis(300)), &done).is_empty(),
        "nothing before commit"
    );
    c.batch_execute("COMMIT").unwrap();
    let m = the_message(&mut c, &failed);
    submit(
        &mut c,
        &m,
        &Reply::Failure(json!({"message": "no", "retryable": false})),
    );
    c.execute("SELECT tasker.cancel_task($1::text::uuid)", &[&cancelled])
        .unwrap();
    let got = events(&mut listener, Duration::from_millis(500));
    let state = |t: &str| -> Vec<String> {
        of_task(&got, t)
            .iter()
            .map(|e| {
                assert_eq!(e["namespace"], "obs_ev");
                e["state"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(state(&done), ["complete"], "{got:?}");
    assert_eq!(state(&failed), ["blocked_by_failures"], "{got:?}");
    assert_eq!(state(&cancelled), ["cancelled"], "{got:?}");
}

/// Waits until the orchestrator relays this database's notifications (it
/// starts with the cluster and connects a moment later).
fn until_relaying(c: &mut Client) {
    let started = Instant::now();
    while query_json(
        c,
        "tasker.health() -> 'orchestrator' -> 'relays_notifications'",
    ) != json!(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the orchestrator never relayed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection, a listener for task events and a one-step template in
/// `namespace`, once the orchestrator relays.
fn relay_setup(namespace: &str) -> (Client, Client) {
    let mut c = connect();
    let listener = events_listener(&mut c);
    register_linear(&mut c, namespace, "flow", 1);
    until_relaying(&mut c);
    (c, listener)
}

/// Notifications the orchestrator relayed (tasker.health()).
fn relayed(c: &mut Client) -> i64 {
    query_json(
        c,
        "tasker.health() -> 'orchestrator' -> 'relayed_notifications'",
    )
    .as_i64()
    .unwrap()
}

/// Events go through the orchestrator (crate::relay), so a committing
/// transaction does not take the NOTIFY lock; they keep NOTIFY's meaning:
/// a rolled-back savepoint or transaction tells nothing, a released one
/// tells at commit, and a transaction with more events than the relay
/// holds sends them itself, none lost.
#[test]
fn task_events_keep_transaction_semantics_through_the_relay() {
    let (mut c, mut listener) = relay_setup("obs_relay");
    let [undone, kept, rolled_back] =
        [(); 3].map(|_| create(&mut c, "obs_relay", "flow").to_string());
    let before = relayed(&mut c);

    c.batch_execute("BEGIN; SAVEPOINT a").unwrap();
    let m = the_message(&mut c, &undone);
    submit(&mut c, &m, &Reply::Success(json!({})));
    c.batch_execute("ROLLBACK TO SAVEPOINT a; SAVEPOINT b")
        .unwrap();
    let m = the_message(&mut c, &kept);
    submit(&mut c, &m, &Reply::Success(json!({})));
    c.batch_execute("RELEASE SAVEPOINT b; COMMIT").unwrap();
    c.batch_execute("BEGIN").unwrap();
    let m = the_message(&mut c, &rolled_back);
    submit(&mut c, &m, &Reply::Success(json!({})));
    c.batch_execute("ROLLBACK").unwrap();
    let got = events(&mut listener, Duration::from_millis(500));
    assert_eq!(of_task(&got, &kept).len(), 1, "{got:?}");
    assert!(of_task(&got, &undone).is_empty(), "{got:?}");
    assert!(of_task(&got, &rolled_back).is_empty(), "{got:?}");
    assert!(relayed(&mut c) > before, "sent by the orchestrator");

    // the step rolled back to its savepoint finishes later: told once
    let m = the_message(&mut c, &undone);
    submit(&mut c, &m, &Reply::Success(json!({})));
    let got = events(&mut listener, Duration::from_millis(500));
    assert_eq!(of_task(&got, &undone).len(), 1, "{got:?}");

    // pg_tasker.relay_notifications = off: the transaction NOTIFYs itself
    // (told the same; which path it took is not visible to a listener,
    // nor countable here, where other tests' events are relayed meanwhile)
    let direct = create(&mut c, "obs_relay", "flow").to_string();
    c.batch_execute("BEGIN; SET LOCAL pg_tasker.relay_notifications = off")
        .unwrap();
    let m = the_message(&mut c, &direct);
    submit(&mut c, &m, &Reply::Success(json!({})));
    c.batch_execute("COMMIT").unwrap();
    let got = events(&mut listener, Duration::from_millis(500));
    assert_eq!(of_task(&got, &direct).len(), 1, "{got:?}");

    // more events in one transaction than the relay's 512 slots
    let tasks: Vec<String> = c
        .query(
            "SELECT tasker.create_task('obs_relay', 'flow')::text FROM generate_series(1, 600)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.execute(
        "SELECT count(tasker.cancel_task(t::uuid)) FROM unnest($1::text[]) t",
        &[&tasks],
    )
    .unwrap();
    let got = events(&mut listener, Duration::from_millis(1500));
    for t in &tasks {
        assert_eq!(of_task(&got, t).len(), 1, "task {t}: {} events", got.len());
    }
}

/// Four connections finish tasks at once through the relay, a third of
/// them after a rolled-back attempt and some two to a transaction with one
/// of them rolled back to a savepoint: every committed finish is told
/// exactly once, nothing rolled back is told.
#[test]
fn concurrent_finishes_are_each_told_once_through_the_relay() {
    let (mut c, mut listener) = relay_setup("obs_relay_many");
    let per = 90;
    let tasks: Vec<Vec<String>> = (0..4)
        .map(|_| {
            (0..per)
                .map(|_| create(&mut c, "obs_relay_many", "flow").to_string())
                .collect()
        })
        .collect();
    let threads: Vec<_> = tasks
        .iter()
        .cloned()
        .map(|mine| {
            let mut w = other_connection(&mut c);
            std::thread::spawn(move || {
                for pair in mine.chunks(2) {
                    let (a, b) = (&pair[0], &pair[1]);
                    // a rolled-back attempt at both
                    w.batch_execute("BEGIN").unwrap();
                    for t in pair {
                        let m = the_message(&mut w, t);
                        submit(&mut w, &m, &Reply::Success(json!({})));
                    }
                    w.batch_execute("ROLLBACK").unwrap();
                    // both in one transaction, b's first try undone
                    w.batch_execute("BEGIN").unwrap();
                    let m = the_message(&mut w, a);
                    submit(&mut w, &m, &Reply::Success(json!({})));
                    w.batch_execute("SAVEPOINT s").unwrap();
                    let m = the_message(&mut w, b);
                    submit(&mut w, &m, &Reply::Success(json!({})));
                    w.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
                    let m = the_message(&mut w, b);
                    submit(&mut w, &m, &Reply::Success(json!({})));
                    w.batch_execute("COMMIT").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = events(&mut listener, Duration::from_millis(1500));
    for t in tasks.iter().flatten() {
        let mine = of_task(&got, t);
        assert_eq!(mine.len(), 1, "task {t}: {mine:?}");
        assert_eq!(mine[0]["state"], "complete");
    }
}

#[test]
fn wait_for_task_returns_when_the_task_finishes() {
    let mut c = connect();
    register_linear(&mut c, "obs_wait", "flow", 1);
    let task = create(&mut c, "obs_wait", "flow").to_string();
    let port: String = c.query_one("SHOW port", &[]).unwrap().get(0);
    let url = format!(
        "host=localhost port={port} user={} dbname={}",
        pgrx_tests::get_pg_user(),
        pgrx_tests::get_pg_dbname()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    // not finished: the timeout passes
    let started = Instant::now();
    let r = rt
        .block_on(pg_tasker_worker::wait_for_task(
            &url,
            &task,
            Duration::from_millis(300),
        ))
        .unwrap();
    assert_eq!(r, None);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // finished while it waits: it returns at once, without polling
    let waiter = {
        let (url, task) = (url.clone(), task.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let started = Instant::now();
            let r = rt.block_on(pg_tasker_worker::wait_for_task(
                &url,
                &task,
                Duration::from_secs(30),
            ));
            (r, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let m = the_message(&mut c, &task);
    submit(&mut c, &m, &Reply::Success(json!({})));
    let (r, took) = waiter.join().unwrap();
    assert_eq!(r.unwrap().as_deref(), Some("complete"));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // already finished: answered from its state
    let r = rt
        .block_on(pg_tasker_worker::wait_for_task(
            &url,
            &task,
            Duration::from_secs(30),
        ))
        .unwrap();
    assert_eq!(r.as_deref(), Some("complete"));
    let e = rt
        .block_on(pg_tasker_worker::wait_for_task(
            &url,
            "01000000-0000-7000-8000-000000000000",
            Duration::from_secs(1),
        ))
        .unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
}

/// One sample: (metric, labels, value).
type Sample = (String, Vec<(String, String)>, f64);

/// A scrape, parsed by a Prometheus text parser.
fn scrape(c: &mut Client) -> Vec<Sample> {
    let text: String = c.query_one("SELECT tasker.metrics()", &[]).unwrap().get(0);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{e}\n{text}"));
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("unexpected {other:?}"),
            };
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            (s.metric, labels, v)
        })
        .collect()
}

fn sample(s: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.iter()
        .find(|(m, l, _)| {
            m == metric
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|(_, _, v)| *v)
}

/// On a cluster of its own, so that the counters move only by what the
/// test does.
#[test]
fn metrics_are_prometheus_text_and_count_committed_moves() {
    let cluster = pg_tasker_worker::testing::Cluster::start(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        "metrics",
    );
    let mut c = Client::connect(&cluster.url(), postgres::NoTls).unwrap();
    c.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
        .unwrap();
    register_linear(&mut c, "obs_m", "flow", 2);
    for _ in 0..3 {
        create(&mut c, "obs_m", "flow");
    }
    let enqueued = |c: &mut Client| {
        query_json(
            c,
            "SELECT jsonb_build_object('step_uuid', s.step_uuid, 'attempt', s.attempts)
             FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
             WHERE t.namespace_name = 'obs_m' AND s.state = 'enqueued' AND s.position = 0
             ORDER BY s.step_uuid LIMIT 1",
        )
    };
    let completed =
        |s: &[Sample]| sample(s, "pg_tasker_step_moves_total", &[("state", "complete")]).unwrap();
    let before = scrape(&mut c);
    assert_eq!(
        sample(
            &before,
            "pg_tasker_tasks_active",
            &[("namespace", "obs_m"), ("state", "steps_in_process")]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&before, "pg_tasker_queue_depth", &[("namespace", "obs_m")]),
        Some(3.0)
    );
    assert_eq!(sample(&before, "pg_tasker_orchestrator_up", &[]), Some(1.0));
    assert!(sample(&before, "pg_tasker_orchestrator_ticks_total", &[]).unwrap() >= 1.0);
    assert_eq!(completed(&before), 0.0);

    // a completion rolled back counts nothing; committed ones once each
    let m = enqueued(&mut c);
    c.batch_execute("BEGIN").unwrap();
    submit(&mut c, &m, &Reply::Success(json!({})));
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(completed(&scrape(&mut c)), 0.0);
    for _ in 0..2 {
        let m = enqueued(&mut c);
        submit(&mut c, &m, &Reply::Success(json!({})));
    }
    let after = scrape(&mut c);
    assert_eq!(completed(&after), 2.0);
    assert_eq!(
        sample(&after, "pg_tasker_queue_depth", &[("namespace", "obs_m")]),
        Some(3.0),
        "two done, their children enqueued"
    );

    // a role with app in one namespace sees only that namespace, and no
    // cluster-wide counters
    register_linear(&mut c, "obs_other", "flow", 1);
    create(&mut c, "obs_other", "flow");
    c.batch_execute(
        "CREATE ROLE obs_app;
         SELECT tasker.grant_namespace('obs_m', 'obs_app', 'app');
         SET ROLE obs_app",
    )
    .unwrap();
    let tenant = scrape(&mut c);
    c.batch_execute("RESET ROLE").unwrap();
    assert!(tenant
        .iter()
        .filter(|(_, l, _)| l.iter().any(|(k, _)| k == "namespace"))
        .all(|(_, l, _)| l.iter().any(|(k, v)| k == "namespace" && v == "obs_m")));
    assert!(sample(&tenant, "pg_tasker_queue_depth", &[("namespace", "obs_m")]).is_some());
    assert!(sample(
        &scrape(&mut c),
        "pg_tasker_queue_depth",
        &[("namespace", "obs_other")]
    )
    .is_some());
    assert!(sample(
        &tenant,
        "pg_tasker_step_moves_total",
        &[("state", "complete")]
    )
    .is_none());

    // cheap enough to scrape often: no history scan
    let started = Instant::now();
    for _ in 0..20 {
        scrape(&mut c);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_traceparent_travels_in_every_step_message() {
    let mut c = connect();
    register_linear(&mut c, "obs_tr", "flow", 1);
    let task: String = c
        .query_one(
            "SELECT tasker.create_task('obs_tr', 'flow', traceparent => '00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01')::text",
            &[],
        )
        .unwrap()
        .get(0);
    let tp: Option<String> = c
        .query_one(
            "SELECT message ->> 'traceparent' FROM pgmq.q_tasker_obs_tr_queue WHERE message ->> 'task_uuid' = $1",
            &[&task],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        tp.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let plain: String = c
        .query_one("SELECT tasker.create_task('obs_tr', 'flow')::text", &[])
        .unwrap()
        .get(0);
    let none: bool = c
        .query_one(
            "SELECT message -> 'traceparent' = 'null' FROM pgmq.q_tasker_obs_tr_queue WHERE message ->> 'task_uuid' = $1",
            &[&plain],
        )
        .unwrap()
        .get(0);
    assert!(none);
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "garbage",
    ] {
        let e = c
            .query_one(
                "SELECT tasker.create_task('obs_tr', 'flow', traceparent => $1)",
                &[&bad],
            )
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "22023", "{bad}: {e}");
        let e = c
            .query_one(
                "SELECT tasker.request_task('obs_tr', 'flow', traceparent => $1)",
                &[&bad],
            )
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "22023", "{bad}: {e}");
    }
    // a request carries it to the task it becomes
    let msg: i64 = c
        .query_one(
            "SELECT tasker.request_task('obs_tr', 'flow', idempotency_key => 'tr-1',
                                        traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(msg > 0);
    c.query_one("SELECT tasker.run_maintenance(ARRAY['task_requests'])", &[])
        .unwrap();
    wait_until(
        "the request becomes a task",
        Duration::from_secs(10),
        || {
            count(
                &mut c,
                "SELECT count(*) FROM tasker.tasks WHERE idempotency_key = 'tr-1'
                       AND traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'",
            ) == 1
        },
    );
}
