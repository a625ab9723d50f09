//! Orchestration with real connections: workflows driven by a test worker
//! loop, retries in real time, races between concurrent sessions,
//! redelivery, notices.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};

use super::*;

/// A worker loop: reads the namespace queue, answers each message with
/// `handler`, and when the queue is empty runs an orchestration cycle (the
/// background worker's job, which does not exist yet in these tests) until
/// `done` says so or the time is up.
fn drive(
    c: &mut Client,
    ns: &str,
    mut handler: impl FnMut(&Value) -> Reply,
    done: impl Fn(&mut Client) -> bool,
    limit: Duration,
) {
    let queue = format!("tasker_{ns}_queue");
    let start = Instant::now();
    loop {
        let rows = c
            .query("SELECT message::text FROM pgmq.read($1, 30, 50)", &[&queue])
            .unwrap();
        for row in &rows {
            let msg: Value = serde_json::from_str(row.get::<_, &str>(0)).unwrap();
            let reply = handler(&msg);
            submit(c, &msg, &reply);
        }
        if rows.is_empty() {
            c.query_one(
                "SELECT tasker.run_orchestration_cycle('test-worker', 100)",
                &[],
            )
            .unwrap();
            if done(c) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "workflow did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn all_tasks_settled(ns: &'static str) -> impl Fn(&mut Client) -> bool {
    move |c: &mut Client| {
        let open: i64 = c
            .query_one(
                "SELECT count(*) FROM tasker.tasks WHERE namespace_name = $1
                   AND NOT tasker.task_state_is_terminal(state) AND state <> 'blocked_by_failures'",
                &[&ns],
            )
            .unwrap()
            .get(0);
        open == 0
    }
}

/// Handler used by the DAG tests: records which dependency results it saw.
fn echo_dependencies(msg: &Value) -> Reply {
    let mut deps: Vec<String> = msg["dependency_results"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    deps.sort();
    let depth = msg["dependency_results"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| r["depth"].as_i64().unwrap())
        .max()
        .map_or(0, |d| d + 1);
    Reply::Success(json!({"step": msg["step_name"], "saw": deps, "depth": depth}))
}

#[test]
fn dag_workflows_complete_and_steps_see_exactly_their_dependencies() {
    let mut c = connect();
    let shapes: Vec<(&str, Vec<Value>)> = vec![
        (
            "linear",
            vec![
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["b"]),
                step("d", &["c"]),
            ],
        ),
        (
            "diamond",
            vec![
                step("start", &[]),
                step("left", &["start"]),
                step("right", &["start"]),
                step("end", &["left", "right"]),
            ],
        ),
        (
            "tree",
            vec![
                step("root", &[]),
                step("b1", &["root"]),
                step("b2", &["root"]),
                step("l1", &["b1"]),
                step("l2", &["b1"]),
                step("l3", &["b2"]),
                step("l4", &["b2"]),
                step("merge", &["l1", "l2", "l3", "l4"]),
            ],
        ),
        (
            "mixed",
            vec![
                step("init", &[]),
                step("p1", &["init"]),
                step("p2", &["init"]),
                step("p3", &["init"]),
                step("j1", &["p1", "p2"]),
                step("j2", &["p2", "p3"]),
                step("final", &["j1", "j2"]),
            ],
        ),
    ];
    for (name, steps) in &shapes {
        register(&mut c, &template("c_dag", name, steps.clone()));
        for _ in 0..3 {
            create(&mut c, "c_dag", name);
        }
    }
    drive(
        &mut c,
        "c_dag",
        echo_dependencies,
        all_tasks_settled("c_dag"),
        Duration::from_secs(60),
    );

    for (name, steps) in &shapes {
        let states = query_json(
            &mut c,
            &format!("SELECT jsonb_agg(DISTINCT state) FROM tasker.tasks WHERE namespace_name = 'c_dag' AND task_name = '{name}'"),
        );
        assert_eq!(states, json!(["complete"]), "{name}");
        for s in steps {
            let mut want: Vec<String> = s["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap().to_string())
                .collect();
            want.sort();
            let seen = query_json(
                &mut c,
                &format!(
                    "SELECT jsonb_agg(DISTINCT s.results->'saw') FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
                      WHERE t.namespace_name = 'c_dag' AND t.task_name = '{name}' AND s.name = '{}' AND s.state = 'complete' AND s.attempts = 1",
                    s["name"].as_str().unwrap()
                ),
            );
            assert_eq!(seen, json!([want]), "{name}/{}", s["name"]);
        }
    }
    // completed_at set, no message left behind
    let left: i64 = c
        .query_one("SELECT count(*) FROM pgmq.q_tasker_c_dag_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let undated: i64 = c
        .query_one("SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'c_dag' AND completed_at IS NULL", &[])
        .unwrap()
        .get(0);
    assert_eq!(undated, 0);
}

#[test]
fn retries_in_real_time() {
    let mut c = connect();
    let mut flaky = step("flaky", &[]);
    flaky["retry"] = json!({"max_attempts": 5, "backoff": "exponential", "backoff_base_ms": 100});
    let mut broken = step("broken", &[]);
    broken["retry"] = json!({"max_attempts": 3, "backoff": "linear", "backoff_base_ms": 50});
    let mut polite = step("polite", &[]);
    polite["retry"] = json!({"max_attempts": 3, "backoff_base_ms": 10});
    register(
        &mut c,
        &template("c_retry", "flaky", vec![flaky, step("after", &["flaky"])]),
    );
    register(
        &mut c,
        &template(
            "c_retry",
            "broken",
            vec![broken, step("never", &["broken"])],
        ),
    );
    register(&mut c, &template("c_retry", "polite", vec![polite]));
    let flaky_task = create(&mut c, "c_retry", "flaky");
    let broken_task = create(&mut c, "c_retry", "broken");
    let polite_task = create(&mut c, "c_retry", "polite");

    let mut polite_times: Vec<Instant> = Vec::new();
    drive(
        &mut c,
        "c_retry",
        |msg| {
            let attempt = msg["attempt"].as_i64().unwrap();
            match msg["step_name"].as_str().unwrap() {
                "flaky" if attempt <= 2 => {
                    Reply::Failure(json!({"message": format!("timeout #{attempt}")}))
                }
                "broken" => Reply::Failure(json!({"message": "always broken"})),
                "polite" if attempt == 1 => {
                    polite_times.push(Instant::now());
                    Reply::Failure(json!({"message": "rate limited", "retry_after_seconds": 1}))
                }
                "polite" => {
                    polite_times.push(Instant::now());
                    Reply::Success(json!("ok"))
                }
                _ => Reply::Success(json!({"attempt": attempt})),
            }
        },
        all_tasks_settled("c_retry"),
        Duration::from_secs(30),
    );
    let row = |c: &mut Client, task: uuid::Uuid, step: &str| -> (String, i32) {
        let r = c
            .query_one(
                "SELECT state::text, attempts FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid AND name = $2",
                &[&task.to_string(), &step],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(row(&mut c, flaky_task, "flaky"), ("complete".into(), 3));
    assert_eq!(row(&mut c, flaky_task, "after"), ("complete".into(), 1));
    assert_eq!(task_state(&mut c, flaky_task), "complete");
    assert_eq!(row(&mut c, broken_task, "broken"), ("error".into(), 3));
    assert_eq!(row(&mut c, broken_task, "never"), ("pending".into(), 0));
    assert_eq!(task_state(&mut c, broken_task), "blocked_by_failures");
    assert_eq!(task_state(&mut c, polite_task), "complete");
    // retry-after of 1 s was honoured (the policy alone would have said 10 ms)
    let gap = polite_times[1] - polite_times[0];
    assert!(
        gap >= Duration::from_millis(950) && gap < Duration::from_secs(5),
        "retry came after {gap:?}"
    );
    // the step's history tells the story
    let history = query_json(
        &mut c,
        &format!(
            "SELECT jsonb_agg(st.to_state ORDER BY st.sort_key) FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid)
              WHERE s.task_uuid = '{flaky_task}' AND s.name = 'flaky'"
        ),
    );
    assert_eq!(
        history,
        json!([
            "pending",
            "enqueued",
            "waiting_for_retry",
            "enqueued",
            "waiting_for_retry",
            "enqueued",
            "complete"
        ])
    );
}

#[test]
fn fan_in_join_is_enqueued_exactly_once_under_concurrency() {
    let mut c = connect();
    let mut steps = vec![step("root", &[])];
    let branches: Vec<String> = (0..50).map(|i| format!("b{i:02}")).collect();
    for b in &branches {
        steps.push(step(b, &["root"]));
    }
    let names: Vec<&str> = branches.iter().map(String::as_str).collect();
    steps.push(step("join", &names));
    register(&mut c, &template("c_fanin", "wide", steps));

    for round in 0..3 {
        let task = create(&mut c, "c_fanin", "wide");
        // the root, then all 50 branch messages
        let root: String = c
            .query_one(
                "SELECT message::text FROM pgmq.read('tasker_c_fanin_queue', 60, 1)",
                &[],
            )
            .unwrap()
            .get(0);
        submit(
            &mut c,
            &serde_json::from_str(&root).unwrap(),
            &Reply::Success(json!(0)),
        );
        let msgs: Vec<Value> = c
            .query(
                "SELECT message::text FROM pgmq.read('tasker_c_fanin_queue', 60, 100)",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
            .collect();
        assert_eq!(msgs.len(), 50, "round {round}");
        // 8 connections submit their share at the same moment
        let barrier = Arc::new(Barrier::new(8));
        let chunks: Vec<Vec<Value>> = msgs.chunks(7).map(|c| c.to_vec()).collect::<Vec<_>>();
        let mut shares: Vec<Vec<Value>> = vec![Vec::new(); 8];
        for (i, chunk) in chunks.into_iter().enumerate() {
            shares[i % 8].extend(chunk);
        }
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                let mut conn = other_connection(&mut c);
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for m in share {
                        submit(
                            &mut conn,
                            &m,
                            &Reply::Success(json!({"branch": m["step_name"]})),
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let join = c
            .query_one(
                "SELECT state::text, attempts, pending_parents FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid AND name = 'join'",
                &[&task.to_string()],
            )
            .unwrap();
        assert_eq!(
            (
                join.get::<_, String>(0),
                join.get::<_, i32>(1),
                join.get::<_, i32>(2)
            ),
            ("enqueued".into(), 1, 0),
            "round {round}"
        );
        let join_msgs: i64 = c
            .query_one(
                "SELECT count(*) FROM pgmq.q_tasker_c_fanin_queue WHERE message->>'task_uuid' = $1 AND message->>'step_name' = 'join'",
                &[&task.to_string()],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            join_msgs, 1,
            "the join is enqueued exactly once (round {round})"
        );
        let join_msg: String = c
            .query_one(
                "SELECT message::text FROM pgmq.read('tasker_c_fanin_queue', 60, 1)",
                &[],
            )
            .unwrap()
            .get(0);
        let join_msg: Value = serde_json::from_str(&join_msg).unwrap();
        assert_eq!(
            join_msg["dependency_results"].as_object().unwrap().len(),
            50
        );
        submit(&mut c, &join_msg, &Reply::Success(json!("joined")));
        let state: String = task_state(&mut c, task);
        assert_eq!(state, "complete");
    }
}

#[test]
fn concurrent_orchestrators_never_process_the_same_task_twice() {
    // the background orchestrator stays out of this race
    let _guard = super::bgworker::lock();
    let mut c = connect();
    super::bgworker::set_enabled(&mut c, false);
    let mut s = step("a", &[]);
    s["retry"] = json!({"max_attempts": 5, "backoff": "linear", "backoff_base_ms": 1});
    register(&mut c, &template("c_orch", "flow", vec![s]));
    let n = 60;
    for _ in 0..n {
        create(&mut c, "c_orch", "flow");
    }
    // every first attempt fails; the retries become due 1 ms later and are
    // left for the orchestrators
    let msgs = c
        .query(
            "SELECT message::text FROM pgmq.read('tasker_c_orch_queue', 60, 100)",
            &[],
        )
        .unwrap();
    assert_eq!(msgs.len(), n);
    for m in &msgs {
        let m: Value = serde_json::from_str(m.get::<_, &str>(0)).unwrap();
        assert_eq!(
            submit(
                &mut c,
                &m,
                &Reply::Failure(json!({"message": "first try fails"}))
            ),
            "waiting_for_retry"
        );
    }
    std::thread::sleep(Duration::from_millis(50));

    // two sessions run cycles at the same time, in small batches
    let barrier = Arc::new(Barrier::new(2));
    let processed = Arc::new(Mutex::new(0i64));
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let mut conn = other_connection(&mut c);
            let (barrier, processed) = (barrier.clone(), processed.clone());
            std::thread::spawn(move || {
                barrier.wait();
                loop {
                    let s: String = conn
                        .query_one(
                            "SELECT tasker.run_orchestration_cycle($1, 5)::text",
                            &[&format!("orch-{i}")],
                        )
                        .unwrap()
                        .get(0);
                    let v: Value = serde_json::from_str(&s).unwrap();
                    assert_eq!(v["errors"], json!([]));
                    if v["tasks_claimed"] == 0 {
                        break;
                    }
                    *processed.lock().unwrap() += v["tasks_processed"].as_i64().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Other tests' sessions may run cycles too and take some of these tasks;
    // what matters is that no task was processed twice: a second processing
    // would have enqueued its step again (attempts 3, two messages).
    let processed = *processed.lock().unwrap();
    assert!(processed <= n as i64, "{processed} tasks processed for {n}");
    let bad: i64 = c
        .query_one(
            "SELECT count(*) FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
              WHERE t.namespace_name = 'c_orch' AND NOT (s.state = 'enqueued' AND s.attempts = 2)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "every step enqueued exactly once more");
    let queued: i64 = c
        .query_one("SELECT count(*) FROM pgmq.q_tasker_c_orch_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(queued, n as i64);

    // claim_ready_tasks: two open transactions get disjoint sets
    for _ in 0..10 {
        create(&mut c, "c_orch", "flow");
    }
    c.execute(
        "UPDATE tasker.tasks SET next_action_at = now() WHERE namespace_name = 'c_orch'",
        &[],
    )
    .unwrap();
    let mut c1 = other_connection(&mut c);
    let mut c2 = other_connection(&mut c);
    let mut t1 = c1.transaction().unwrap();
    let mut t2 = c2.transaction().unwrap();
    let claim = "SELECT task_uuid::text FROM tasker.claim_ready_tasks($1, 50, 'c_orch')";
    let a: Vec<String> = t1
        .query(claim, &[&"one"])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let b: Vec<String> = t2
        .query(claim, &[&"two"])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(a.len(), 50);
    assert_eq!(b.len(), 20);
    assert!(a.iter().all(|x| !b.contains(x)), "claims are disjoint");
    t1.rollback().unwrap();
    t2.rollback().unwrap();
    super::bgworker::set_enabled(&mut c, true);
}

#[test]
fn an_unanswered_message_is_delivered_again_after_its_visibility_timeout() {
    let mut c = connect();
    register(&mut c, &template("c_vt", "flow", vec![step("a", &[])]));
    let task = create(&mut c, "c_vt", "flow");
    let first = c
        .query(
            "SELECT msg_id, read_ct, message::text FROM pgmq.read('tasker_c_vt_queue', 1, 1)",
            &[],
        )
        .unwrap();
    assert_eq!(first.len(), 1);
    // the worker "dies": no answer. The message stays invisible for 1 s ...
    assert_eq!(
        c.query("SELECT 1 FROM pgmq.read('tasker_c_vt_queue', 1, 1)", &[])
            .unwrap()
            .len(),
        0
    );
    std::thread::sleep(Duration::from_millis(1200));
    // ... then comes back, same message, second delivery
    let again = c
        .query(
            "SELECT msg_id, read_ct, message::text FROM pgmq.read('tasker_c_vt_queue', 30, 1)",
            &[],
        )
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].get::<_, i64>(0), first[0].get::<_, i64>(0));
    assert_eq!(again[0].get::<_, i32>(1), 2);
    let msg: Value = serde_json::from_str(again[0].get::<_, &str>(2)).unwrap();
    assert_eq!(submit(&mut c, &msg, &Reply::Success(json!(1))), "complete");
    let state: String = task_state(&mut c, task);
    assert_eq!(state, "complete");
}

#[test]
fn rollback_of_create_task_leaves_no_message() {
    let mut c = connect();
    register(
        &mut c,
        &template("c_txq", "flow", vec![step("a", &[]), step("b", &[])]),
    );
    let mut tx = c.transaction().unwrap();
    tx.query_one("SELECT tasker.create_task('c_txq', 'flow')", &[])
        .unwrap();
    let inside: i64 = tx
        .query_one("SELECT count(*) FROM pgmq.q_tasker_c_txq_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(inside, 2);
    tx.rollback().unwrap();
    let after: i64 = c
        .query_one("SELECT count(*) FROM pgmq.q_tasker_c_txq_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(after, 0);
}

#[test]
fn duplicate_and_late_submissions_say_so_with_a_notice() {
    let mut c = connect();
    register(&mut c, &template("c_notice", "flow", vec![step("a", &[])]));
    let port: String = c.query_one("SHOW port", &[]).unwrap().get(0);
    let notices: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = notices.clone();
    let mut w = postgres::Config::new()
        .host("localhost")
        .port(port.parse().unwrap())
        .user(&pgrx_tests::get_pg_user())
        .dbname(pgrx_tests::get_pg_dbname())
        .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()))
        .connect(postgres::NoTls)
        .unwrap();
    create(&mut w, "c_notice", "flow");
    let m: String = w
        .query_one(
            "SELECT message::text FROM pgmq.read('tasker_c_notice_queue', 30, 1)",
            &[],
        )
        .unwrap()
        .get(0);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(submit(&mut w, &m, &Reply::Success(json!(1))), "complete");
    assert!(notices.lock().unwrap().is_empty());
    assert_eq!(submit(&mut w, &m, &Reply::Success(json!(2))), "complete");
    assert_eq!(
        submit(&mut w, &m, &Reply::Failure(json!({"message": "late"}))),
        "complete"
    );
    let got = notices.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|n| n.contains("ignored") && n.contains("\"a\"")),
        "{got:?}"
    );
    let results: String = w
        .query_one(
            "SELECT results::text FROM tasker.workflow_steps WHERE step_uuid = $1::text::uuid",
            &[&m["step_uuid"].as_str().unwrap()],
        )
        .unwrap()
        .get(0);
    assert_eq!(results, "1", "the first result stands");
}

#[test]
fn enqueues_notify_a_queue_channel_only_while_a_worker_waits_on_it() {
    let mut c = connect();
    register(
        &mut c,
        &template("co_wake", "flow", vec![step("a", &[]), step("b", &["a"])]),
    );
    let mut listener = other_connection(&mut c);
    let channel: String = listener
        .query_one("SELECT tasker.wake_channel('co_wake')", &[])
        .unwrap()
        .get(0);
    assert_eq!(channel, "tasker_co_wake_queue");
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    let wait = |listener: &mut Client| -> usize {
        let mut n = 0;
        let mut notes = listener.notifications();
        let mut it = notes.timeout_iter(Duration::from_millis(300));
        while let Ok(Some(note)) = postgres::fallible_iterator::FallibleIterator::next(&mut it) {
            assert_eq!(note.channel(), channel);
            n += 1;
        }
        n
    };
    // nobody registered as idle: no notification (busy systems pay nothing)
    create(&mut c, "co_wake", "flow");
    assert_eq!(wait(&mut listener), 0);
    // idle: every committed enqueue notifies, once per transaction
    listener
        .execute(
            "SELECT tasker.worker_idle(ARRAY['co_wake'], 'w1', true)",
            &[],
        )
        .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tasker.worker_waits WHERE worker_id = 'w1'"
        ),
        1
    );
    c.batch_execute(
        "BEGIN; SELECT tasker.create_task('co_wake', 'flow') FROM generate_series(1, 3); COMMIT",
    )
    .unwrap();
    assert_eq!(wait(&mut listener), 1);
    // a rolled-back enqueue does not
    c.batch_execute("BEGIN; SELECT tasker.create_task('co_wake', 'flow'); ROLLBACK")
        .unwrap();
    assert_eq!(wait(&mut listener), 0);
    // going busy in a transaction that rolls back leaves the worker idle:
    // still notified (the shared count of waiting backends follows commits)
    listener
        .batch_execute("BEGIN; SELECT tasker.worker_idle(ARRAY['co_wake'], 'w1', false); ROLLBACK")
        .unwrap();
    create(&mut c, "co_wake", "flow");
    assert_eq!(wait(&mut listener), 1);
    // busy again: none
    listener
        .execute(
            "SELECT tasker.worker_idle(ARRAY['co_wake'], 'w1', false)",
            &[],
        )
        .unwrap();
    create(&mut c, "co_wake", "flow");
    assert_eq!(wait(&mut listener), 0);
    // the registration of a backend that is gone is dropped by the next call
    listener
        .execute(
            "SELECT tasker.worker_idle(ARRAY['co_wake'], 'w1', true)",
            &[],
        )
        .unwrap();
    drop(listener);
    std::thread::sleep(Duration::from_millis(200));
    c.execute(
        "SELECT tasker.worker_idle(ARRAY['co_wake'], 'w2', false)",
        &[],
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tasker.worker_waits WHERE worker_id = 'w1'"
        ),
        0
    );
    let e = c
        .query_one("SELECT tasker.wake_channel('co_nope')", &[])
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&postgres::error::SqlState::UNDEFINED_OBJECT),
        "{e}"
    );
}
