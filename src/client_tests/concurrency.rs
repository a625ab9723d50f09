//! Concurrency with real connections in lockstep: results against
//! cancellation, two namespaces whose queues share msg ids, template
//! re-registration against create_task, and a randomized stress run whose
//! every task must satisfy the invariants afterwards.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};

use super::*;

fn read(c: &mut Client, queue: &str, vt: i32, qty: i32) -> Vec<Value> {
    c.query(
        "SELECT message::text FROM pgmq.read($1, $2, $3)",
        &[&queue, &vt, &qty],
    )
    .unwrap()
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
    .collect()
}

/// cancel_task and submit_result on the same task, started at the same
/// instant from two connections, 30 rounds: never a deadlock (both take the
/// task lock first), and the outcome is one of the two orders.
#[test]
fn cancel_and_results_in_lockstep_never_deadlock() {
    let mut c = connect();
    register(
        &mut c,
        &template(
            "cc_lock",
            "flow",
            vec![step("a", &[]), step("b", &[]), step("c", &["a", "b"])],
        ),
    );
    let mut worker = other_connection(&mut c);
    let mut operator = other_connection(&mut c);
    for round in 0..30 {
        let task = create(&mut c, "cc_lock", "flow");
        let msgs = read(&mut c, "tasker_cc_lock_queue", 60, 10);
        assert_eq!(msgs.len(), 2, "round {round}");
        let barrier = Arc::new(Barrier::new(2));
        let (b1, b2) = (barrier.clone(), barrier.clone());
        let (m1, m2) = (msgs[0].clone(), msgs[1].clone());
        let results = std::thread::scope(|s| {
            let w = s.spawn(|| {
                let mut tx = worker.transaction().unwrap();
                b1.wait();
                // two results in one transaction: step, task, step, task
                let r1 = tx.query_one(
                    "SELECT tasker.submit_result($1::text::uuid, 'success', '{}', NULL, jsonb_build_object('attempt', $2::int))",
                    &[&m1["step_uuid"].as_str().unwrap(), &(m1["attempt"].as_i64().unwrap() as i32)],
                );
                let r2 = tx.query_one(
                    "SELECT tasker.submit_result($1::text::uuid, 'success', '{}', NULL, jsonb_build_object('attempt', $2::int))",
                    &[&m2["step_uuid"].as_str().unwrap(), &(m2["attempt"].as_i64().unwrap() as i32)],
                );
                let out = r1.and(r2).map(|_| ());
                if out.is_ok() {
                    tx.commit().unwrap();
                }
                out
            });
            let o = s.spawn(|| {
                let mut tx = operator.transaction().unwrap();
                b2.wait();
                let r = tx
                    .query_one(
                        "SELECT tasker.cancel_task($1::text::uuid, 'lockstep')",
                        &[&task.to_string()],
                    )
                    .map(|_| ());
                if r.is_ok() {
                    tx.commit().unwrap();
                }
                r
            });
            (w.join().unwrap(), o.join().unwrap())
        });
        for r in [&results.0, &results.1] {
            if let Err(e) = r {
                assert_ne!(
                    e.code(),
                    Some(&SqlState::T_R_DEADLOCK_DETECTED),
                    "round {round}: {e}"
                );
                panic!("round {round}: {e}");
            }
        }
        assert_eq!(task_state(&mut c, task), "cancelled", "round {round}");
        assert_eq!(
            task_problems(&mut c, task),
            Vec::<String>::new(),
            "round {round}"
        );
    }
}

/// Waits until the backend `pid` waits for a lock (wait_event_type Lock,
/// and wait_event `event` when given); panics after 10 s.
fn until_waiting(c: &mut Client, pid: i32, event: Option<&str>) {
    let t0 = Instant::now();
    loop {
        let waiting: bool = c
            .query_one(
                "SELECT coalesce(bool_or(wait_event_type = 'Lock' AND ($2::text IS NULL OR wait_event = $2)), false)
                   FROM pg_stat_activity WHERE pid = $1",
                &[&pid, &event],
            )
            .unwrap()
            .get(0);
        if waiting {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "backend {pid} never waited for a lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn backend_pid(c: &mut Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0)
}

fn submit(
    c: &mut impl postgres::GenericClient,
    step: &Value,
    result: &Value,
) -> Result<String, postgres::Error> {
    c.query_one(
        "SELECT tasker.submit_result($1::text::uuid, 'success', $2::text::jsonb)",
        &[&step["step_uuid"].as_str().unwrap(), &result.to_string()],
    )
    .map(|r| r.get(0))
}

/// The results of two siblings apply side by side (a shared task lock) and
/// release their join in turn on its row: with the first held open, the
/// second waits on the join, and once the first commits, the second enqueues
/// the join once, its message carrying both results.
#[test]
fn sibling_results_release_their_join_once_with_both_results() {
    let mut c = connect();
    register(
        &mut c,
        &template(
            "cc_join",
            "flow",
            vec![step("a", &[]), step("b", &[]), step("j", &["a", "b"])],
        ),
    );
    let mut first = other_connection(&mut c);
    let mut second = other_connection(&mut c);
    let second_pid = backend_pid(&mut second);
    for round in 0..5 {
        let task = create(&mut c, "cc_join", "flow");
        let mut msgs = read(&mut c, "tasker_cc_join_queue", 60, 10);
        msgs.sort_by_key(|m| m["step_name"].as_str().unwrap().to_string());
        assert_eq!(msgs.len(), 2, "round {round}");
        let (ma, mb) = (msgs[0].clone(), msgs[1].clone());
        let mut tx = first.transaction().unwrap();
        assert_eq!(
            submit(&mut tx, &ma, &json!({"from": "a", "round": round})).unwrap(),
            "complete"
        );
        let state = std::thread::scope(|s| {
            let h = s.spawn(|| submit(&mut second, &mb, &json!({"from": "b", "round": round})));
            until_waiting(&mut c, second_pid, None);
            tx.commit().unwrap();
            h.join().unwrap()
        });
        assert_eq!(state.unwrap(), "complete", "round {round}");
        let joins = read(&mut c, "tasker_cc_join_queue", 60, 10);
        assert_eq!(joins.len(), 1, "round {round}: {joins:?}");
        assert_eq!(joins[0]["step_name"], "j");
        assert_eq!(
            joins[0]["dependency_results"],
            json!({"a": {"from": "a", "round": round}, "b": {"from": "b", "round": round}}),
            "round {round}"
        );
        assert_eq!(
            task_problems(&mut c, task),
            Vec::<String>::new(),
            "round {round}"
        );
    }
}

/// Sibling results that each release only their own children (the
/// one-statement path, tasker._complete_alone) apply side by side: the
/// second waits for the task row only, then counts on the first's
/// committed counters; in the second round the later of the last two
/// results finishes the task, once.
#[test]
fn sibling_results_alone_share_their_task_row() {
    let mut c = connect();
    register(
        &mut c,
        &template(
            "cc_alone",
            "flow",
            vec![
                step("a", &[]),
                step("b", &[]),
                step("a2", &["a"]),
                step("b2", &["b"]),
            ],
        ),
    );
    let mut first = other_connection(&mut c);
    let mut second = other_connection(&mut c);
    let second_pid = backend_pid(&mut second);
    let task = create(&mut c, "cc_alone", "flow");
    for round in ["roots", "leaves"] {
        let mut msgs = read(&mut c, "tasker_cc_alone_queue", 60, 10);
        msgs.sort_by_key(|m| m["step_name"].as_str().unwrap().to_string());
        assert_eq!(msgs.len(), 2, "{round}: {msgs:?}");
        let mut tx = first.transaction().unwrap();
        assert_eq!(
            submit(&mut tx, &msgs[0], &json!({"round": round})).unwrap(),
            "complete"
        );
        let state = std::thread::scope(|s| {
            let h = s.spawn(|| submit(&mut second, &msgs[1], &json!({"round": round})));
            until_waiting(&mut c, second_pid, None);
            tx.commit().unwrap();
            h.join().unwrap()
        });
        assert_eq!(state.unwrap(), "complete", "{round}");
        assert_eq!(task_problems(&mut c, task), Vec::<String>::new(), "{round}");
    }
    let (state, completions): (String, i64) = {
        let r = c
            .query_one(
                "SELECT t.state::text, (SELECT count(*) FROM tasker.task_transitions a
                                         WHERE a.task_uuid = t.task_uuid AND a.to_state = 'complete')
                   FROM tasker.tasks t WHERE t.task_uuid = $1::text::uuid",
                &[&task.to_string()],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((state.as_str(), completions), ("complete", 1));
}

/// Two results for one step (a redelivered message) from two connections
/// at once: the second waits on the step's row and is then told the attempt
/// is settled; nothing fails, the step completes once.
#[test]
fn duplicate_results_in_lockstep_settle_once() {
    let mut c = connect();
    register(
        &mut c,
        &template("cc_dup", "flow", vec![step("a", &[]), step("b", &[])]),
    );
    let mut first = other_connection(&mut c);
    let mut second = other_connection(&mut c);
    let second_pid = backend_pid(&mut second);
    let task = create(&mut c, "cc_dup", "flow");
    let msgs = read(&mut c, "tasker_cc_dup_queue", 60, 1);
    let mut tx = first.transaction().unwrap();
    assert_eq!(submit(&mut tx, &msgs[0], &json!(1)).unwrap(), "complete");
    let again = std::thread::scope(|s| {
        let h = s.spawn(|| submit(&mut second, &msgs[0], &json!(2)));
        until_waiting(&mut c, second_pid, None);
        tx.commit().unwrap();
        h.join().unwrap()
    });
    assert_eq!(again.unwrap(), "complete");
    let step = msgs[0]["step_name"].as_str().unwrap();
    assert_eq!(
        count(&mut c, &format!(
            "SELECT count(*) FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid)
              WHERE s.task_uuid = '{task}' AND s.name = '{step}' AND st.to_state = 'complete'")),
        1
    );
    assert_eq!(
        query_json(&mut c, &format!(
            "SELECT results FROM tasker.workflow_steps WHERE task_uuid = '{task}' AND name = '{step}'")),
        json!(1)
    );
    assert_eq!(task_problems(&mut c, task), Vec::<String>::new());
}

/// The task lock is fair: a cancel waits for the result already applying,
/// and a result that arrives while the cancel waits waits behind it (it
/// does not overtake: a stream of results cannot starve an operator). The
/// late result then finds its step cancelled and changes nothing.
#[test]
fn a_waiting_cancel_is_not_overtaken_by_later_results() {
    let mut c = connect();
    register(
        &mut c,
        &template(
            "cc_fair",
            "flow",
            vec![step("a", &[]), step("b", &[]), step("c", &[])],
        ),
    );
    let mut first = other_connection(&mut c);
    let mut operator = other_connection(&mut c);
    let mut late = other_connection(&mut c);
    let (operator_pid, late_pid) = (backend_pid(&mut operator), backend_pid(&mut late));
    let task = create(&mut c, "cc_fair", "flow");
    let mut msgs = read(&mut c, "tasker_cc_fair_queue", 60, 10);
    msgs.sort_by_key(|m| m["step_name"].as_str().unwrap().to_string());
    let mut tx = first.transaction().unwrap();
    assert_eq!(submit(&mut tx, &msgs[0], &json!("a")).unwrap(), "complete");
    let (cancelled, late_state) = std::thread::scope(|s| {
        let op = s.spawn(|| {
            operator
                .query_one(
                    "SELECT tasker.cancel_task($1::text::uuid, 'fairness')",
                    &[&task.to_string()],
                )
                .map(|r| r.get::<_, String>(0))
        });
        until_waiting(&mut c, operator_pid, Some("advisory"));
        let l = s.spawn(|| submit(&mut late, &msgs[1], &json!("b")));
        until_waiting(&mut c, late_pid, Some("advisory"));
        tx.commit().unwrap();
        (op.join().unwrap(), l.join().unwrap())
    });
    assert_eq!(cancelled.unwrap(), "cancelled");
    assert_eq!(
        late_state.unwrap(),
        "cancelled",
        "the late result came after the cancel"
    );
    assert_eq!(task_state(&mut c, task), "cancelled");
    assert_eq!(step_state(&mut c, task, "a"), "complete");
    assert_eq!(step_state(&mut c, task, "b"), "cancelled");
    assert_eq!(task_problems(&mut c, task), Vec::<String>::new());
}

/// Two namespaces, each queue's first message has msg_id 1. One step is
/// held under a long lease; the other namespace's message is delivered
/// three times without a result. Recovery fails only the lost one.
#[test]
fn recovery_joins_each_queue_with_its_own_namespace_only() {
    let mut c = connect();
    let mut s = step("a", &[]);
    s["retry"] = json!({"max_attempts": 1});
    for ns in ["cc_msgid_held", "cc_msgid_lost"] {
        register(&mut c, &template(ns, "flow", vec![s.clone()]));
    }
    let held = create(&mut c, "cc_msgid_held", "flow");
    let lost = create(&mut c, "cc_msgid_lost", "flow");
    let ids: Vec<i64> = c
        .query(
            "SELECT queue_msg_id FROM tasker.workflow_steps WHERE task_uuid IN ($1::text::uuid, $2::text::uuid) ORDER BY queue_msg_id",
            &[&held.to_string(), &lost.to_string()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 1], "both queues start at msg_id 1");
    assert_eq!(read(&mut c, "tasker_cc_msgid_held_queue", 300, 1).len(), 1);
    for _ in 0..3 {
        wait_until("lost message visible", Duration::from_secs(5), || {
            !read(&mut c, "tasker_cc_msgid_lost_queue", 1, 1).is_empty()
        });
    }
    std::thread::sleep(Duration::from_millis(1100));
    c.query_one("SELECT tasker.run_maintenance(ARRAY['recovery'])", &[])
        .unwrap();
    wait_until("the lost step fails", Duration::from_secs(5), || {
        step_state(&mut c, lost, "a") == "error"
    });
    assert_eq!(
        step_state(&mut c, held, "a"),
        "enqueued",
        "the held step keeps its lease"
    );
    assert_eq!(task_state(&mut c, held), "steps_in_process");
    assert_eq!(task_state(&mut c, lost), "blocked_by_failures");
    for t in [held, lost] {
        assert_eq!(task_problems(&mut c, t), Vec::<String>::new());
    }
}

/// Re-registering a changed definition of a version races create_task of
/// that version: whoever commits first wins, and the task is always built
/// from the definition that ends up registered.
#[test]
fn re_registration_and_create_task_serialize() {
    let mut c = connect();
    let v1 = template("cc_rereg", "flow", vec![step("a", &[])]);
    let v1b = template("cc_rereg", "flow", vec![step("a", &[]), step("b", &["a"])]);
    register(&mut c, &v1);
    // create_task first: the re-registration waits, then sees the task and refuses
    let mut app = other_connection(&mut c);
    let mut admin = other_connection(&mut c);
    let mut tx = app.transaction().unwrap();
    tx.query_one("SELECT tasker.create_task('cc_rereg', 'flow')", &[])
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let v1b_text = v1b.to_string();
    let h = std::thread::spawn(move || {
        let r = admin.query_one(
            "SELECT tasker.register_template($1::text::jsonb)",
            &[&v1b_text],
        );
        d2.store(true, Ordering::SeqCst);
        (r.map(|_| ()), admin)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "registration waits for the open create_task"
    );
    tx.commit().unwrap();
    let (r, mut admin) = h.join().unwrap();
    let e = r.expect_err("refused once a task uses the version");
    assert_eq!(
        e.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{e}"
    );

    // registration first (in a new namespace): create_task waits and then
    // builds the task from the new definition
    let w1 = template("cc_rereg2", "flow", vec![step("a", &[])]);
    let w1b = template("cc_rereg2", "flow", vec![step("a", &[]), step("b", &["a"])]);
    register(&mut c, &w1);
    let mut tx = admin.transaction().unwrap();
    tx.query_one(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&w1b.to_string()],
    )
    .unwrap();
    let h = std::thread::spawn(move || {
        let id: String = app
            .query_one("SELECT tasker.create_task('cc_rereg2', 'flow')::text", &[])
            .unwrap()
            .get(0);
        id
    });
    std::thread::sleep(Duration::from_millis(300));
    tx.commit().unwrap();
    let task = h.join().unwrap();
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = '{task}'")
        ),
        2,
        "built from the definition committed first"
    );
}

/// Random operations from several connections at once — results (success,
/// retryable and permanent failures; alone, in batches, in exchanges),
/// cancellations, operator retries and resolutions, orchestration cycles,
/// recovery — on a set of diamond and fan-in tasks. Afterwards: no deadlock, no internal error, and every task
/// satisfies every invariant (tests.task_problems).
#[test]
fn a_randomized_stress_run_keeps_every_invariant() {
    let mut c = connect();
    let mut flaky = step("right", &["start"]);
    flaky["retry"] = json!({"max_attempts": 3, "backoff": "none"});
    register(
        &mut c,
        &template(
            "cc_stress",
            "diamond",
            vec![
                step("start", &[]),
                step("left", &["start"]),
                flaky,
                step("end", &["left", "right"]),
            ],
        ),
    );
    let mut fan: Vec<Value> = (0..8).map(|i| step(&format!("p{i}"), &[])).collect();
    let parents: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    let parent_refs: Vec<&str> = parents.iter().map(String::as_str).collect();
    fan.push(step("join", &parent_refs));
    register(&mut c, &template("cc_stress", "fan", fan));
    // (every success of a tree's steps goes the one-statement way,
    // tasker._complete_alone; the diamond's and the fan's joins do not)
    let mut leaf = step("d", &["b"]);
    leaf["retry"] = json!({"max_attempts": 2, "backoff": "none"});
    register(
        &mut c,
        &template(
            "cc_stress",
            "tree",
            vec![
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["a"]),
                leaf,
                step("e", &["c"]),
            ],
        ),
    );
    let tasks: Vec<uuid::Uuid> = (0..60)
        .map(|i| create(&mut c, "cc_stress", ["diamond", "fan", "tree"][i % 3]))
        .collect();
    let tasks = Arc::new(tasks);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let handles: Vec<_> = (0..4u64)
        .map(|w| {
            let mut conn = other_connection(&mut c);
            let (tasks, stop, ops, failures) = (tasks.clone(), stop.clone(), ops.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
                let mut rand = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                let mut kept: Vec<Value> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let task = tasks[rand(tasks.len() as u64) as usize].to_string();
                    let r = match rand(10) {
                        0..=2 => {
                            // the batched protocol: read through exchange
                            // (with the previous batch's results, when
                            // kept), answer the batch in one call (in a
                            // random order) or keep it for the next exchange
                            let previous = (!kept.is_empty())
                                .then(|| Value::from(std::mem::take(&mut kept)).to_string());
                            let msgs = conn
                                .query(
                                    "SELECT message::text FROM tasker.exchange(ARRAY['cc_stress'], 'stress', $1::text::jsonb, 4, 5)",
                                    &[&previous],
                                )
                                .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>());
                            match msgs {
                                Err(e) => Err(e),
                                Ok(msgs) => {
                                    let mut results: Vec<Value> = msgs
                                        .iter()
                                        .map(|m| {
                                            let m: Value = serde_json::from_str(m).unwrap();
                                            let meta = json!({"attempt": m["attempt"]});
                                            match rand(6) {
                                                0 => json!({"step_uuid": m["step_uuid"], "status": "failure", "error": {"message": "flaky"}, "metadata": meta}),
                                                1 => json!({"step_uuid": m["step_uuid"], "status": "failure", "error": {"message": "broken", "retryable": false}, "metadata": meta}),
                                                _ => json!({"step_uuid": m["step_uuid"], "status": "success", "result": {"ok": 1}, "metadata": meta}),
                                            }
                                        })
                                        .collect();
                                    if results.len() > 1 && rand(2) == 0 {
                                        results.reverse();
                                    }
                                    if rand(2) == 0 {
                                        kept = results;
                                        Ok(())
                                    } else {
                                        conn.query(
                                            "SELECT * FROM tasker.submit_results($1::text::jsonb)",
                                            &[&Value::from(results).to_string()],
                                        )
                                        .map(|_| ())
                                    }
                                }
                            }
                        }
                        3..=5 => {
                            let msgs = conn
                                .query(
                                    "SELECT message::text FROM pgmq.read('tasker_cc_stress_queue', 5, 3)",
                                    &[],
                                )
                                .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>());
                            match msgs {
                                Err(e) => Err(e),
                                Ok(msgs) => {
                                    let mut out = Ok(());
                                    for m in msgs {
                                        let m: Value = serde_json::from_str(&m).unwrap();
                                        let (status, error) = match rand(6) {
                                            0 => ("failure", Some(json!({"message": "flaky"}).to_string())),
                                            1 => ("failure", Some(json!({"message": "broken", "retryable": false}).to_string())),
                                            _ => ("success", None),
                                        };
                                        let r = conn.query_one(
                                            "SELECT tasker.submit_result($1::text::uuid, $2, '{\"ok\": 1}', $3::text::jsonb, jsonb_build_object('attempt', $4::int))",
                                            &[&m["step_uuid"].as_str().unwrap(), &status, &error, &(m["attempt"].as_i64().unwrap() as i32)],
                                        );
                                        if let Err(e) = r {
                                            out = Err(e);
                                            break;
                                        }
                                    }
                                    out
                                }
                            }
                        }
                        6 => conn
                            .query_one("SELECT tasker.cancel_task($1::text::uuid, 'stress')", &[&task])
                            .map(|_| ()),
                        7 => conn
                            .query(
                                "SELECT tasker.retry_step(step_uuid) FROM tasker.workflow_steps
                                  WHERE task_uuid = $1::text::uuid AND state = 'error' LIMIT 1",
                                &[&task],
                            )
                            .map(|_| ()),
                        8 => conn
                            .query(
                                "SELECT tasker.resolve_step_manually(step_uuid, '\"by hand\"') FROM tasker.workflow_steps
                                  WHERE task_uuid = $1::text::uuid AND state IN ('error', 'pending', 'in_progress', 'enqueued') LIMIT 1",
                                &[&task],
                            )
                            .map(|_| ()),
                        _ => conn
                            .query_one(
                                "SELECT tasker.run_orchestration_cycle('stress', 10), tasker.run_maintenance(ARRAY['recovery'])",
                                &[],
                            )
                            .map(|_| ()),
                    };
                    ops.fetch_add(1, Ordering::SeqCst);
                    if let Err(e) = r {
                        // refused operator actions on finished tasks or steps are fine
                        if e.code() != Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) {
                            failures.lock().unwrap().push(e.to_string());
                        }
                    }
                }
                if !kept.is_empty() {
                    if let Err(e) = conn.query(
                        "SELECT * FROM tasker.submit_results($1::text::jsonb)",
                        &[&Value::from(kept).to_string()],
                    ) {
                        failures.lock().unwrap().push(e.to_string());
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} unexpected errors, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let total = ops.load(Ordering::SeqCst);
    assert!(total > 200, "only {total} operations ran");
    let mut states = std::collections::BTreeMap::new();
    for t in tasks.iter() {
        assert_eq!(task_problems(&mut c, t), Vec::<String>::new(), "task {t}");
        *states.entry(task_state(&mut c, t)).or_insert(0) += 1;
    }
    eprintln!("stress: {total} operations; tasks by state {states:?}");
}

fn apply_batch(c: &mut impl postgres::GenericClient, results: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FILTER (WHERE outcome = 'applied') FROM tasker.submit_results($1::text::jsonb)",
        &[&results],
    )
    .unwrap()
    .get(0)
}

/// Batches of a join's parents (tasker.submit_results; the general path,
/// which releases a join in a statement of its own after locking it): the
/// first held open, the second waits for the join's row, then counts down
/// from the first's committed count and releases the join, once, with every
/// parent's result.
#[test]
fn sibling_batches_release_their_join_once_with_every_result() {
    let mut c = connect();
    let names: Vec<String> = (0..6).map(|i| format!("b{i}")).collect();
    let mut steps = vec![step("root", &[])];
    for n in &names {
        steps.push(step(n, &["root"]));
    }
    let deps: Vec<&str> = names.iter().map(String::as_str).collect();
    steps.push(step("j", &deps));
    register(&mut c, &template("cc_batch_join", "flow", steps));
    let mut first = other_connection(&mut c);
    let mut second = other_connection(&mut c);
    let second_pid = backend_pid(&mut second);
    let batch = |msgs: &[Value]| -> String {
        Value::from(
            msgs.iter()
                .map(|m| {
                    json!({"step_uuid": m["step_uuid"], "status": "success",
                                "result": {"from": m["step_name"]},
                                "metadata": {"attempt": m["attempt"]}})
                })
                .collect::<Vec<_>>(),
        )
        .to_string()
    };
    for round in 0..3 {
        let task = create(&mut c, "cc_batch_join", "flow");
        let root = read(&mut c, "tasker_cc_batch_join_queue", 60, 10);
        assert_eq!(root.len(), 1);
        assert_eq!(apply_batch(&mut c, &batch(&root)), 1);
        let msgs = read(&mut c, "tasker_cc_batch_join_queue", 60, 10);
        assert_eq!(msgs.len(), 6, "round {round}");
        let (x, y) = (batch(&msgs[..3]), batch(&msgs[3..]));
        let mut tx = first.transaction().unwrap();
        assert_eq!(apply_batch(&mut tx, &x), 3);
        let applied = std::thread::scope(|s| {
            let h = s.spawn(|| apply_batch(&mut second, &y));
            until_waiting(&mut c, second_pid, None);
            tx.commit().unwrap();
            h.join().unwrap()
        });
        assert_eq!(applied, 3, "round {round}");
        let joins = read(&mut c, "tasker_cc_batch_join_queue", 60, 10);
        assert_eq!(joins.len(), 1, "round {round}: {joins:?}");
        assert_eq!(joins[0]["step_name"], "j");
        let want: serde_json::Map<String, Value> = names
            .iter()
            .map(|n| (n.clone(), json!({"from": n})))
            .collect();
        assert_eq!(
            joins[0]["dependency_results"],
            Value::Object(want),
            "round {round}"
        );
        assert_eq!(
            task_problems(&mut c, task),
            Vec::<String>::new(),
            "round {round}"
        );
        assert_eq!(task_state(&mut c, task), "steps_in_process");
    }
}
