//! End to end: the blog workloads, each on a throwaway cluster with the
//! orchestrator preloaded, run by real `pg-tasker-worker` processes.
//! Requires pg_tasker installed into PostgreSQL 15 (scripts/test.sh does it).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{create, json, repo, settle, setup, step, task_state, Worker};
use postgres::{Client, NoTls};

#[test]
fn post_01_ecommerce_checkout_and_post_05_observability() {
    let mut env = setup("e2e_ecommerce", &["ecommerce_process_order.yaml"]);
    let order = |tier: &str, token: &str| {
        format!(
            r#"{{"customer_info": {{"email": "a@example.com", "tier": "{tier}"}},
                 "cart_items": [{{"sku": "A", "price": 20.0, "quantity": 2}}, {{"sku": "B", "price": 5.5, "quantity": 1}}],
                 "payment_info": {{"token": "{token}"}}}}"#
        )
    };
    let happy = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("standard", "tok_visa"),
    );
    let premium = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("premium", "tok_visa"),
    );
    let flaky = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("standard", "tok_timeout_twice"),
    );
    let declined = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("standard", "tok_declined"),
    );
    let _worker = Worker::start(&env, &["ecommerce"], "ecommerce", &[]);
    settle(&mut env, "ecommerce", Duration::from_secs(30));

    assert_eq!(task_state(&mut env.db, &happy), "complete");
    let pay = step(&mut env.db, &happy, "process_payment");
    assert_eq!(pay["results"]["amount_charged"], 45.5);
    assert_eq!(
        step(&mut env.db, &happy, "send_confirmation")["results"]["order_number"]
            .as_str()
            .unwrap()
            .len(),
        16
    );

    assert_eq!(task_state(&mut env.db, &premium), "complete");
    assert_eq!(
        step(&mut env.db, &premium, "process_payment")["results"]["discount"],
        0.1
    );
    assert_eq!(
        step(&mut env.db, &premium, "send_confirmation")["results"]["premium"],
        true
    );

    // two timeouts, then success: retries visible in step_status
    assert_eq!(task_state(&mut env.db, &flaky), "complete");
    let status = json(
        &mut env.db,
        "SELECT to_jsonb(s) FROM tasker.step_status s WHERE task_uuid = $1::text::uuid AND step_name = 'process_payment'",
        &[&flaky],
    );
    assert_eq!(
        (status["attempts"].as_i64(), status["state"].as_str()),
        (Some(3), Some("complete"))
    );
    assert!(status["last_error_message"]
        .as_str()
        .unwrap()
        .contains("timeout"));

    // a declined card is permanent: no retry, task blocked, nothing downstream ran
    assert_eq!(task_state(&mut env.db, &declined), "blocked_by_failures");
    let pay = step(&mut env.db, &declined, "process_payment");
    assert_eq!(
        (pay["state"].as_str(), pay["attempts"].as_i64()),
        (Some("error"), Some(1))
    );
    assert_eq!(pay["last_error"]["error_code"], "CARD_DECLINED");
    assert_eq!(
        step(&mut env.db, &declined, "update_inventory")["state"],
        "pending"
    );

    // post 05: the analytics see all of it
    let failures = json(
        &mut env.db,
        "SELECT jsonb_agg(to_jsonb(f)) FROM tasker.analytics_failures() f",
        &[],
    );
    let codes: Vec<&str> = failures
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["error_code"].as_str())
        .collect();
    assert!(
        codes.contains(&"CARD_DECLINED") && codes.contains(&"GATEWAY_TIMEOUT"),
        "{failures}"
    );
    let throughput = json(
        &mut env.db,
        "SELECT jsonb_agg(to_jsonb(t)) FROM tasker.analytics_throughput() t",
        &[],
    );
    let done: i64 = throughput
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["steps_completed"].as_i64().unwrap())
        .sum();
    assert_eq!(done, 5 * 3 + 1, "{throughput}");
    let slowest = json(
        &mut env.db,
        "SELECT jsonb_agg(to_jsonb(s)) FROM tasker.analytics_slowest_steps() s",
        &[],
    );
    assert_eq!(slowest.as_array().unwrap().len(), 5, "{slowest}");
    let graph: String = env
        .db
        .query_one("SELECT tasker.task_graph($1::text::uuid)", &[&declined])
        .unwrap()
        .get(0);
    assert!(graph.starts_with("flowchart LR"), "{graph}");
    assert!(
        graph.contains("process_payment<br/>error (1/5)\"]:::error"),
        "{graph}"
    );
    assert_eq!(graph.matches(" --> ").count(), 4);
}

#[test]
fn post_02_data_pipeline_runs_extracts_in_parallel() {
    let mut env = setup("e2e_pipeline", &["data_pipeline_customer_analytics.yaml"]);
    let tasks: Vec<String> = (0..2)
        .map(|_| {
            create(
                &mut env.db,
                "data_pipeline",
                "customer_analytics",
                r#"{"date": "2026-11-22"}"#,
            )
        })
        .collect();
    let _worker = Worker::start(
        &env,
        &["data_pipeline"],
        "pipeline",
        &["--concurrency", "8"],
    );
    settle(&mut env, "data_pipeline", Duration::from_secs(30));
    for t in &tasks {
        assert_eq!(task_state(&mut env.db, t), "complete");
        // results flowed through the dependencies
        let agg = step(&mut env.db, t, "aggregate_metrics")["results"].clone();
        assert_eq!(
            agg["sources"],
            serde_json::json!(["customers", "inventory", "sales"])
        );
        assert_eq!(agg["total_records"], 1188 + 337 + 555);
        assert_eq!(
            step(&mut env.db, t, "generate_insights")["results"]["total_records"],
            agg["total_records"]
        );
        // the three extracts overlapped in time
        let spans: Vec<(f64, f64)> = [
            "extract_sales_data",
            "extract_inventory_data",
            "extract_customer_data",
        ]
        .iter()
        .map(|s| {
            let r = step(&mut env.db, t, s)["results"].clone();
            (
                r["started_ms"].as_f64().unwrap(),
                r["finished_ms"].as_f64().unwrap(),
            )
        })
        .collect();
        let latest_start = spans.iter().map(|s| s.0).fold(f64::MIN, f64::max);
        let earliest_end = spans.iter().map(|s| s.1).fold(f64::MAX, f64::min);
        assert!(
            latest_start < earliest_end,
            "extracts ran one after another: {spans:?}"
        );
    }
}

#[test]
fn post_03_microservices_with_circuit_breaker_and_retry_after() {
    let mut env = setup("e2e_micro", &["microservices_user_registration.yaml"]);
    let task = create(
        &mut env.db,
        "microservices",
        "user_registration",
        r#"{"email": "new@example.com"}"#,
    );
    let _worker = Worker::start(&env, &["microservices"], "microservices", &[]);
    settle(&mut env, "microservices", Duration::from_secs(30));
    assert_eq!(task_state(&mut env.db, &task), "complete");
    // billing failed until the breaker's trial call succeeded
    let billing = step(&mut env.db, &task, "setup_billing_profile");
    assert!(billing["attempts"].as_i64().unwrap() >= 4, "{billing}");
    let codes = json(
        &mut env.db,
        "SELECT jsonb_agg(DISTINCT st.metadata->'error'->>'error_code') FROM tasker.step_transitions st
          WHERE st.step_uuid = $1::text::uuid AND st.to_state = 'waiting_for_retry'",
        &[&billing["step_uuid"].as_str().unwrap()],
    );
    assert_eq!(
        codes,
        serde_json::json!(["CIRCUIT_OPEN", "SERVICE_UNAVAILABLE"])
    );
    // the preferences service's Retry-After: 1 was honoured
    let prefs = step(&mut env.db, &task, "initialize_preferences");
    assert_eq!(prefs["attempts"], 2);
    let gap: f64 = env
        .db
        .query_one(
            "SELECT extract(epoch FROM max(created_at) FILTER (WHERE to_state = 'enqueued' AND sort_key > 2)
                                    - max(created_at) FILTER (WHERE to_state = 'waiting_for_retry'))::float8
               FROM tasker.step_transitions WHERE step_uuid = $1::text::uuid",
            &[&prefs["step_uuid"].as_str().unwrap()],
        )
        .unwrap()
        .get(0);
    assert!(gap >= 0.95, "retried after {gap} s");
}

#[test]
fn post_04_team_namespaces_are_isolated() {
    let mut env = setup(
        "e2e_teams",
        &[
            "payments_process_refund.yaml",
            "customer_success_process_refund.yaml",
        ],
    );
    let pay: Vec<String> = (0..3)
        .map(|i| {
            create(
                &mut env.db,
                "payments",
                "process_refund",
                &format!(r#"{{"payment_id": "p{i}", "amount": 25}}"#),
            )
        })
        .collect();
    let cs: Vec<String> = (0..3)
        .map(|i| {
            create(
                &mut env.db,
                "customer_success",
                "process_refund",
                &format!(r#"{{"ticket_id": "t{i}", "amount": 900}}"#),
            )
        })
        .collect();
    // queues are separate
    let depths = json(
        &mut env.db,
        "SELECT jsonb_object_agg(namespace, depth) FROM tasker.queue_status",
        &[],
    );
    assert_eq!(
        (
            depths["payments"].as_i64(),
            depths["customer_success"].as_i64()
        ),
        (Some(3), Some(3)),
        "{depths}"
    );
    let _payments = Worker::start(
        &env,
        &["payments"],
        "teams",
        &["--worker-id", "payments-worker"],
    );
    let _support = Worker::start(
        &env,
        &["customer_success"],
        "teams",
        &["--worker-id", "support-worker"],
    );
    settle(&mut env, "payments", Duration::from_secs(30));
    settle(&mut env, "customer_success", Duration::from_secs(30));
    for (tasks, ns, worker) in [
        (&pay, "payments", "payments-worker"),
        (&cs, "customer_success", "support-worker"),
    ] {
        for t in tasks {
            assert_eq!(task_state(&mut env.db, t), "complete");
        }
        // every step of the namespace was done by its own team's worker
        let workers = json(
            &mut env.db,
            "SELECT jsonb_agg(DISTINCT st.metadata->>'worker_id') FROM tasker.step_transitions st
               JOIN tasker.workflow_steps s USING (step_uuid) JOIN tasker.tasks t USING (task_uuid)
              WHERE t.namespace_name = $1 AND st.to_state = 'complete'",
            &[&ns],
        );
        assert_eq!(workers, serde_json::json!([worker]), "{ns}");
    }
    assert_eq!(
        step(&mut env.db, &cs[0], "get_manager_approval")["results"]["manager_approval_needed"],
        true
    );
}

#[test]
fn a_worker_killed_mid_workflow_and_restarted_finishes_the_work() {
    let mut env = setup("e2e_sigkill", &["data_pipeline_customer_analytics.yaml"]);
    for _ in 0..6 {
        create(
            &mut env.db,
            "data_pipeline",
            "customer_analytics",
            r#"{"date": "2026-11-22"}"#,
        );
    }
    let mut first = Worker::start(
        &env,
        &["data_pipeline"],
        "pipeline",
        &["--visibility-timeout", "2", "--concurrency", "4"],
    );
    let start = Instant::now();
    loop {
        let done: i64 = env
            .db
            .query_one(
                "SELECT count(*) FROM tasker.workflow_steps WHERE state = 'complete'",
                &[],
            )
            .unwrap()
            .get(0);
        if done >= 6 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no progress before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill9(); // SIGKILL: in-flight steps are never answered
    let in_flight: i64 = env
        .db
        .query_one(
            "SELECT count(*) FROM tasker.workflow_steps WHERE state IN ('enqueued', 'in_progress')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(in_flight > 0);
    let _second = Worker::start(
        &env,
        &["data_pipeline"],
        "pipeline",
        &["--visibility-timeout", "2"],
    );
    settle(&mut env, "data_pipeline", Duration::from_secs(40));
    let complete: i64 = env
        .db
        .query_one(
            "SELECT count(*) FROM tasker.tasks WHERE state = 'complete'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(complete, 6);
    let twice: i64 = env
        .db
        .query_one("SELECT count(*) FROM tasker.step_transitions WHERE to_state = 'complete' GROUP BY step_uuid ORDER BY 1 DESC LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(twice, 1, "no step completed twice");
}

#[test]
fn a_python_worker_runs_the_ecommerce_workflow() {
    let mut env = setup("e2e_python", &["ecommerce_process_order.yaml"]);
    let order = |token: &str| {
        format!(
            r#"{{"customer_info": {{"email": "py@example.com", "tier": "premium"}},
                 "cart_items": [{{"sku": "A", "price": 10.0, "quantity": 3}}], "payment_info": {{"token": "{token}"}}}}"#
        )
    };
    let log_path = env.cluster.dir.join("python-worker.log");
    let python = Command::new("python3")
        .arg(repo().join("examples/python/worker.py"))
        .args(["--dsn", &env.cluster.url(), "--namespace", "ecommerce"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("python3 runs");
    let _python = Worker(python);
    // its connection is cut (as by a server restart): it reconnects
    let started = Instant::now();
    loop {
        let cut: i64 = env
            .db
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE application_name = 'python-worker'",
                &[],
            )
            .unwrap()
            .get(0);
        if cut > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the python worker never connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let happy = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("tok_visa"),
    );
    let flaky = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("tok_timeout_twice"),
    );
    let declined = create(
        &mut env.db,
        "ecommerce",
        "process_order",
        &order("tok_declined"),
    );
    settle(&mut env, "ecommerce", Duration::from_secs(30));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("retrying in"), "no reconnect logged:\n{log}");
    assert_eq!(task_state(&mut env.db, &happy), "complete");
    let pay = step(&mut env.db, &happy, "process_payment");
    assert_eq!(
        (
            pay["results"]["worker"].as_str(),
            pay["results"]["amount_charged"].as_f64()
        ),
        (Some("python"), Some(27.0))
    );
    assert_eq!(
        step(&mut env.db, &happy, "send_confirmation")["results"]["sent_to"],
        "py@example.com"
    );
    assert_eq!(task_state(&mut env.db, &flaky), "complete");
    assert_eq!(step(&mut env.db, &flaky, "process_payment")["attempts"], 3);
    assert_eq!(task_state(&mut env.db, &declined), "blocked_by_failures");
    assert_eq!(
        step(&mut env.db, &declined, "process_payment")["last_error"]["error_code"],
        "CARD_DECLINED"
    );
}

#[test]
fn a_python_worker_explains_an_unknown_namespace() {
    let env = setup("e2e_python_ns", &["ecommerce_process_order.yaml"]);
    let started = Instant::now();
    let out = Command::new("python3")
        .arg(repo().join("examples/python/worker.py"))
        .args(["--dsn", &env.cluster.url(), "--namespace", "nosuch"])
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains("namespace 'nosuch' is not registered"),
        "{stderr}"
    );
    assert!(!stderr.contains("Traceback"), "{stderr}");
}

/// Shutdown: a handler that outlives the grace period has its message
/// released at once (not after its lease), and the step is done by the next
/// worker; a finished handler's result is kept.
#[test]
fn graceful_shutdown_releases_unfinished_steps() {
    use pg_tasker_worker::{Outcome, Registry, StepContext, WorkerOptions};
    let mut env = setup("e2e_shutdown", &[]);
    env.db
        .execute(
            "SELECT tasker.register_template($1::text::jsonb)",
            &[&serde_json::json!({"name": "flow", "namespace_name": "slow", "version": "1.0.0", "steps": [
                {"name": "quick", "handler": {"callable": "Quick"}},
                {"name": "slow", "handler": {"callable": "Slow"}}]})
            .to_string()],
        )
        .unwrap();
    let task = create(&mut env.db, "slow", "flow", "{}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut registry = Registry::new();
    registry.register("Quick", |_s: StepContext| async move {
        Outcome::success(serde_json::json!("quick"))
    });
    registry.register("Slow", |_s: StepContext| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Outcome::success(serde_json::json!("too late"))
    });
    let mut options = WorkerOptions::new(env.cluster.url(), vec!["slow".into()]);
    options.shutdown_timeout = Duration::from_millis(300);
    options.visibility_timeout = Duration::from_secs(60);
    let stats = rt
        .block_on(pg_tasker_worker::run(options, registry, async {
            tokio::time::sleep(Duration::from_millis(800)).await
        }))
        .unwrap();
    assert_eq!((stats.succeeded, stats.released), (1, 1), "{stats:?}");
    assert_eq!(step(&mut env.db, &task, "quick")["state"], "complete");
    // released: visible again right away despite its 60 s lease
    let visible: i64 = env
        .db
        .query_one(
            "SELECT count(*) FROM pgmq.read('tasker_slow_queue', 30, 10)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(visible, 1);
}

/// A handler longer than the lease keeps its message: the lease is extended
/// while it runs, so no other reader gets the step meanwhile.
#[test]
fn the_lease_is_extended_while_a_long_handler_runs() {
    use pg_tasker_worker::{Outcome, Registry, StepContext, WorkerOptions};
    let mut env = setup("e2e_lease", &[]);
    env.db
        .execute(
            "SELECT tasker.register_template($1::text::jsonb)",
            &[
                &serde_json::json!({"name": "flow", "namespace_name": "long", "version": "1.0.0",
                "steps": [{"name": "long", "handler": {"callable": "Long"}}]})
                .to_string(),
            ],
        )
        .unwrap();
    let task = create(&mut env.db, "long", "flow", "{}");
    let mut registry = Registry::new();
    registry.register("Long", |_s: StepContext| async move {
        tokio::time::sleep(Duration::from_millis(3500)).await;
        Outcome::success(serde_json::json!("done"))
    });
    let mut options = WorkerOptions::new(env.cluster.url(), vec!["long".into()]);
    options.visibility_timeout = Duration::from_secs(1);
    let worker = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(pg_tasker_worker::run(options, registry, async {
                tokio::time::sleep(Duration::from_millis(5000)).await
            }))
    });
    // for 3 s, well past the 1 s lease, nobody else can read the message
    let mut spy = Client::connect(&env.cluster.url(), NoTls).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        let stolen: i64 = spy
            .query_one(
                "SELECT count(*) FROM pgmq.read('tasker_long_queue', 1, 1)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(stolen, 0, "the lease lapsed while the handler ran");
    }
    let stats = worker.join().unwrap().unwrap();
    assert_eq!(stats.succeeded, 1);
    assert_eq!(step(&mut env.db, &task, "long")["state"], "complete");
}

#[test]
fn the_lease_survives_a_lost_connection() {
    use pg_tasker_worker::{Outcome, Registry, StepContext, WorkerOptions};
    let mut env = setup("e2e_lease_reconnect", &[]);
    env.db
        .execute(
            "SELECT tasker.register_template($1::text::jsonb)",
            &[
                &serde_json::json!({"name": "flow", "namespace_name": "long_rc", "version": "1.0.0",
                "steps": [{"name": "long", "handler": {"callable": "Long"}}]})
                .to_string(),
            ],
        )
        .unwrap();
    let task = create(&mut env.db, "long_rc", "flow", "{}");
    let mut registry = Registry::new();
    registry.register("Long", |_s: StepContext| async move {
        tokio::time::sleep(Duration::from_millis(4500)).await;
        Outcome::success(serde_json::json!("done"))
    });
    let mut options = WorkerOptions::new(env.cluster.url(), vec!["long_rc".into()]);
    options.visibility_timeout = Duration::from_secs(2);
    let worker = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(pg_tasker_worker::run(options, registry, async {
                tokio::time::sleep(Duration::from_millis(7000)).await
            }))
    });
    let mut spy = Client::connect(&env.cluster.url(), NoTls).unwrap();
    let started = Instant::now();
    while step(&mut env.db, &task, "long")["state"] != "in_progress" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the worker took the step"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the worker's connections are cut while its handler runs
    let cut: i64 = env
        .db
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'pg-tasker-worker') x",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(cut >= 1, "the worker's connection was found");
    // for 3.5 s, well past the 2 s lease, nobody else can read the message
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(350));
        let stolen: i64 = spy
            .query_one(
                "SELECT count(*) FROM pgmq.read('tasker_long_rc_queue', 1, 1)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(stolen, 0, "the lease lapsed after the reconnect");
    }
    let stats = worker.join().unwrap().unwrap();
    assert_eq!(stats.succeeded, 1);
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert_eq!(step(&mut env.db, &task, "long")["state"], "complete");
}
