//! Basics over real connections: the caller's transaction, SQLSTATEs on
//! the wire, CREATE / DROP EXTENSION in a fresh database.

use postgres::error::SqlState;

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
