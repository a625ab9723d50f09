//! Basics over real connections: the caller's transaction, SQLSTATEs on
//! the wire, CREATE / DROP EXTENSION in a fresh database.

use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};

use super::*;

#[test]
fn rollback_of_the_callers_transaction_leaves_nothing() {
    let mut c = connect();
    register_linear(&mut c, "c_rollback", "flow", 3);
    let mut tx = c.transaction().unwrap();
    tx.query_one("SELECT tasker.create_task('c_rollback', 'flow')", &[])
        .unwrap();
    assert_eq!(
        tx.query_one(
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'c_rollback'",
            &[]
        )
        .unwrap()
        .get::<_, i64>(0),
        1
    );
    tx.rollback().unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'c_rollback'"
        ),
        0
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM tasker.workflow_steps s WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid)"),
        0
    );
    // committed, it stays
    c.query_one("SELECT tasker.create_task('c_rollback', 'flow')", &[])
        .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'c_rollback'"
        ),
        1
    );
}

#[test]
fn errors_reach_clients_with_their_sqlstate() {
    let mut c = connect();
    register_linear(&mut c, "c_errors", "flow", 1);
    let cases: [(&str, SqlState); 7] = [
        (
            "SELECT tasker.create_task('c_errors', 'missing')",
            SqlState::UNDEFINED_OBJECT,
        ),
        (
            "SELECT tasker.create_task('c_errors', 'flow', priority => 500)",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT tasker.register_template('{\"name\": \"x\"}')",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT tasker.register_template_yaml(':name: [')",
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
        (
            "SELECT tasker.create_task('c_errors', 'flow', '{\"x\": 1}'::jsonb || jsonb_build_object('blob', repeat('x', 2000000)))",
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        (
            "SELECT tasker.submit_result('00000000-0000-7000-8000-000000000000', 'success')",
            SqlState::NO_DATA_FOUND,
        ),
        (
            "SELECT tasker.cancel_task(NULL)",
            SqlState::NULL_VALUE_NOT_ALLOWED,
        ),
    ];
    for (sql, state) in cases {
        let e = c.query(sql, &[]).expect_err(sql);
        assert_eq!(e.code(), Some(&state), "{sql}: {e}");
    }
}

#[test]
fn create_extension_cascade_in_a_new_database_and_drop_it_cleanly() {
    let mut admin = connect();
    admin
        .batch_execute("DROP DATABASE IF EXISTS tasker_fresh")
        .unwrap();
    admin.batch_execute("CREATE DATABASE tasker_fresh").unwrap();
    {
        let mut c = connect_db(&mut admin, "tasker_fresh");
        c.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
            .unwrap();
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM pg_extension WHERE extname IN ('pgmq', 'pg_tasker')"
            ),
            2
        );
        register_linear(&mut c, "fresh", "flow", 2);
        c.query_one("SELECT tasker.create_task('fresh', 'flow')", &[])
            .unwrap();
        assert_eq!(count(&mut c, "SELECT count(*) FROM tasker.step_status"), 2);

        c.batch_execute("DROP EXTENSION pg_tasker").unwrap();
        // no relation, function, view or type of ours remains; only the empty
        // schema Postgres created for the control file (it cannot be a member)
        for catalog in [
            "pg_class c WHERE c.relnamespace",
            "pg_proc p WHERE p.pronamespace",
            "pg_type t WHERE t.typnamespace",
        ] {
            let sql = format!("SELECT count(*) FROM {catalog} = 'tasker'::regnamespace");
            assert_eq!(count(&mut c, &sql), 0, "{sql}");
        }
        assert_eq!(count(&mut c, "SELECT count(*) FROM pg_proc WHERE proname IN ('create_task', 'register_template')"), 0);
        // pgmq stays installed (it may serve others); so does the namespace's queue
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'"
            ),
            1
        );
        // and the extension installs again, into the schema that was left
        c.batch_execute("CREATE EXTENSION pg_tasker").unwrap();
        register_linear(&mut c, "fresh", "flow", 1);
    }
    admin.batch_execute("DROP DATABASE tasker_fresh").unwrap();
}

/// Without shared_preload_libraries there is no orchestrator, and the
/// extension works all the same (loading the library later used to be
/// FATAL): a workflow runs with results and run_orchestration_cycle.
#[test]
fn the_extension_works_without_shared_preload_libraries() {
    let cluster = pg_tasker_worker::testing::Cluster::start_with_preload(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        "nopreload",
        "",
    );
    let mut c = postgres::Config::new()
        .host_path(&cluster.dir)
        .port(cluster.port)
        .user("postgres")
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap();
    c.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
        .unwrap();
    let mut s = step("b", &["a"]);
    s["retry"] = json!({"max_attempts": 2, "backoff_base_ms": 50});
    register(&mut c, &template("nopre", "flow", vec![step("a", &[]), s]));
    let task = create(&mut c, "nopre", "flow");
    let h = query_json(&mut c, "SELECT tasker.health()");
    assert_eq!(h["orchestrator"]["preloaded"], false, "{h}");
    let start = std::time::Instant::now();
    let mut failed_once = false;
    while task_state(&mut c, task) != "complete" {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "did not finish"
        );
        let msgs = c
            .query(
                "SELECT message::text FROM pgmq.read('tasker_nopre_queue', 30, 10)",
                &[],
            )
            .unwrap();
        for m in &msgs {
            let m: Value = serde_json::from_str(m.get::<_, &str>(0)).unwrap();
            let reply = if m["step_name"] == "b" && !failed_once {
                failed_once = true;
                Reply::Failure(json!({"message": "once"}))
            } else {
                Reply::Success(json!({}))
            };
            submit(&mut c, &m, &reply);
        }
        // the retry timer is nobody's job here but ours
        c.batch_execute("SELECT tasker.run_orchestration_cycle()")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(failed_once);
    assert_eq!(task_problems_in(&mut c, task), 0);
}

/// tests.task_problems in a cluster of the test's own (the test build's
/// install script has it; an upgraded database does not).
pub fn task_problems_in(c: &mut Client, task: uuid::Uuid) -> i64 {
    let present: bool = c
        .query_one(
            "SELECT to_regprocedure('tests.task_problems(uuid)') IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    if !present {
        c.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS tests; {}",
            include_str!("../tests/invariants.sql")
        ))
        .unwrap();
    }
    count(
        c,
        &format!("SELECT count(*) FROM tests.task_problems('{task}')"),
    )
}

/// Payloads cross the wire and come back byte-exact (jsonb equality), in
/// the context, the step message, the result and the child's
/// dependency_results.
#[test]
fn payloads_are_exact_over_real_connections() {
    let mut c = connect();
    register(
        &mut c,
        &template("c_exact", "flow", vec![step("a", &[]), step("b", &["a"])]),
    );
    let deep = format!("{}\"end\"{}", "[".repeat(500), "]".repeat(500));
    let v = format!(
        r#"{{"dec": 0.1000000000000000055511151231257827, "big": 63340286662973277706162286946811886609896461828096, "huge": 1e400, "deep": {deep}}}"#
    );
    let task: String = c
        .query_one(
            "SELECT tasker.create_task('c_exact', 'flow', $1::text::jsonb)::text",
            &[&v],
        )
        .unwrap()
        .get(0);
    let row = c
        .query_one(
            "SELECT message::text FROM pgmq.read('tasker_c_exact_queue', 30, 1)",
            &[],
        )
        .unwrap();
    let msg_text: String = row.get(0);
    // compared in the database, as jsonb: the client never parses the numbers
    let same: bool = c
        .query_one(
            "SELECT ($1::text::jsonb) -> 'task_context' = $2::text::jsonb",
            &[&msg_text, &v],
        )
        .unwrap()
        .get(0);
    assert!(same);
    let step: String = c
        .query_one("SELECT ($1::text::jsonb) ->> 'step_uuid'", &[&msg_text])
        .unwrap()
        .get(0);
    let attempt: i32 = c
        .query_one(
            "SELECT (($1::text::jsonb) ->> 'attempt')::int",
            &[&msg_text],
        )
        .unwrap()
        .get(0);
    c.query_one(
        "SELECT tasker.submit_result($1::text::uuid, 'success', $2::text::jsonb, NULL, jsonb_build_object('attempt', $3::int))",
        &[&step, &v, &attempt],
    )
    .unwrap();
    let same: bool = c
        .query_one(
            "SELECT message -> 'dependency_results' -> 'a' = $2::text::jsonb AND
                    (SELECT results FROM tasker.workflow_steps WHERE step_uuid = $3::text::uuid) = $2::text::jsonb
               FROM pgmq.q_tasker_c_exact_queue WHERE message ->> 'task_uuid' = $1",
            &[&task, &v, &step],
        )
        .unwrap()
        .get(0);
    assert!(same);
}
