//! Namespaces are tenants (sql/03_privileges.sql): a matrix of roles ×
//! operations through real connections, each role logged in as itself.
//! Every denial must be 42501 and change nothing; every allowed cell must
//! work (run in a transaction that is rolled back, so the cells do not
//! depend on each other).

use postgres::error::SqlState;
use postgres::{Client, NoTls, SimpleQueryMessage};
use serde_json::json;

use super::*;

/// The roles of the matrix, in the order of the expectation strings.
const ROLES: [&str; 7] = [
    "sec_worker_a", // worker in sec_a
    "sec_app_a",    // app in sec_a
    "sec_worker",   // tasker_worker: every namespace
    "sec_app",      // tasker_app: every namespace
    "sec_admin",    // tasker_admin
    "sec_admin_a",  // admin in sec_a
    "sec_nobody",   // no grant at all
];

/// A connection logged in as `role` (the test cluster trusts local logins).
fn connect_as(via: &mut Client, role: &str) -> Client {
    let port: String = via.query_one("SHOW port", &[]).unwrap().get(0);
    postgres::Config::new()
        .host("localhost")
        .port(port.parse().unwrap())
        .user(role)
        .dbname(pgrx_tests::get_pg_dbname())
        .connect(NoTls)
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

/// What a cell did: 'A' worked (and found something), '0' worked and found
/// nothing (a count of 0, a NULL), 'D' was refused with 42501; anything
/// else is reported as the error.
fn outcome(c: &mut Client, sql: &str) -> String {
    match c.simple_query(sql) {
        Ok(msgs) => {
            let value = msgs.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                _ => None,
            });
            match value.flatten().as_deref() {
                None | Some("0") | Some("f") => "0".into(),
                Some(_) => "A".into(),
            }
        }
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => "D".into(),
        Err(e) => format!(
            "error {}: {}",
            e.code().map(|c| c.code()).unwrap_or("?"),
            e.as_db_error().map(|d| d.message()).unwrap_or("")
        ),
    }
}

/// Everything a cell could change, as one digest: the test's tasks, steps
/// and audit rows, its queues' rows, the request queue, the DLQ, grants,
/// templates and namespaces.
fn fingerprint(c: &mut Client) -> String {
    c.query_one(
        "WITH ns AS (SELECT n.* FROM tasker.namespaces n WHERE n.name IN ('sec_a', 'sec_b', 'sec_new'))
         SELECT md5(concat_ws('|',
            (SELECT string_agg(concat_ws(',', t.task_uuid, t.state, t.transitions), ';' ORDER BY t.task_uuid)
               FROM tasker.tasks t WHERE t.namespace_name IN (SELECT name FROM ns)),
            (SELECT string_agg(concat_ws(',', s.step_uuid, s.state, s.attempts, s.transitions, s.results), ';'
                               ORDER BY s.step_uuid)
               FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
              WHERE t.namespace_name IN (SELECT name FROM ns)),
            (SELECT count(*) FROM tasker.step_transitions x JOIN tasker.workflow_steps s USING (step_uuid)
               JOIN tasker.tasks t USING (task_uuid) WHERE t.namespace_name IN (SELECT name FROM ns)),
            (SELECT string_agg(concat_ws(',', m.msg_id, m.read_ct, m.vt, m.message), ';' ORDER BY m.msg_id)
               FROM pgmq.q_tasker_sec_a_queue m),
            (SELECT string_agg(concat_ws(',', m.msg_id, m.read_ct, m.vt, m.message), ';' ORDER BY m.msg_id)
               FROM pgmq.q_tasker_sec_b_queue m),
            (SELECT count(*) FROM pgmq.q_tasker_task_requests m WHERE m.message ->> 'namespace' IN (SELECT name FROM ns)),
            (SELECT count(*) FROM tasker.dlq d JOIN tasker.tasks t USING (task_uuid)
              WHERE t.namespace_name IN (SELECT name FROM ns)),
            (SELECT string_agg(concat_ws(',', g.namespace_uuid, g.grantee, g.privilege), ';' ORDER BY 1)
               FROM tasker.namespace_grants g WHERE g.namespace_uuid IN (SELECT namespace_uuid FROM ns)),
            (SELECT count(*) FROM tasker.task_templates tt WHERE tt.namespace_uuid IN (SELECT namespace_uuid FROM ns)),
            (SELECT count(*) FROM ns),
            (SELECT count(*) FROM pg_auth_members m
              WHERE m.member::regrole::text IN ('sec_worker_a', 'sec_app_a', 'sec_worker', 'sec_app', 'sec_admin',
                                                'sec_admin_a', 'sec_nobody'))))",
        &[],
    )
    .unwrap()
    .get(0)
}

struct Fixture {
    a_task: String,
    a_step: String,
    a_error_step: String,
    b_task: String,
    b_step: String,
    b_error_task: String,
    b_error_step: String,
}

fn the_step(c: &mut Client, task: &str) -> String {
    c.query_one(
        "SELECT step_uuid::text FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid",
        &[&task],
    )
    .unwrap()
    .get(0)
}

/// Two namespaces of one single-step template (with a secret in its
/// handler's initialization); in each, a task whose step is out with the
/// workers and a task whose step failed for good.
fn fixture(c: &mut Client) -> Fixture {
    let mut tasks = Vec::new();
    for ns in ["sec_a", "sec_b"] {
        register(
            c,
            &json!({"name": "flow", "namespace_name": ns, "version": "1.0.0",
                    "steps": [{"name": "only", "retry": {"max_attempts": 1},
                               "handler": {"callable": "Sec::Only", "initialization": {"api_key": "s3cr3t"}}}]}),
        );
        let out = create(c, ns, "flow").to_string();
        let failed = create(c, ns, "flow").to_string();
        let step = the_step(c, &failed);
        c.execute(
            "SELECT tasker.submit_result($1::text::uuid, 'failure', NULL, '{\"message\": \"no\", \"retryable\": false}',
                                         '{\"attempt\": 1}')",
            &[&step],
        )
        .unwrap();
        tasks.push((out, failed));
    }
    let (a_task, a_failed) = tasks[0].clone();
    let (b_task, b_failed) = tasks[1].clone();
    Fixture {
        a_step: the_step(c, &a_task),
        a_error_step: the_step(c, &a_failed),
        b_step: the_step(c, &b_task),
        b_error_step: the_step(c, &b_failed),
        a_task,
        b_task,
        b_error_task: b_failed,
    }
}

fn roles(c: &mut Client) {
    for r in ROLES {
        c.batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {r} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .unwrap();
    }
    c.batch_execute(
        "GRANT tasker_worker TO sec_worker; GRANT tasker_app TO sec_app; GRANT tasker_admin TO sec_admin;
         SELECT tasker.grant_namespace('sec_a', 'sec_worker_a', 'worker');
         SELECT tasker.grant_namespace('sec_a', 'sec_app_a', 'app');
         SELECT tasker.grant_namespace('sec_a', 'sec_admin_a', 'admin');",
    )
    .unwrap();
}

/// (operation, expectation per role of ROLES, statement).
fn operations(f: &Fixture) -> Vec<(&'static str, &'static str, String)> {
    let result = |step: &str| {
        format!(
            "SELECT tasker.submit_result('{step}', 'success', '{{}}', NULL, '{{\"attempt\": 1}}')"
        )
    };
    vec![
        ("pgmq.read alpha", "ADADAAD", "SELECT count(*) FROM pgmq.read('tasker_sec_a_queue', 0, 1)".into()),
        ("pgmq.read beta", "DDADADD", "SELECT count(*) FROM pgmq.read('tasker_sec_b_queue', 0, 1)".into()),
        ("read_steps alpha", "ADADAAD", "SELECT count(*) FROM tasker.read_steps('sec_a', 'sec', 1, 1)".into()),
        ("read_steps beta", "DDADADD", "SELECT count(*) FROM tasker.read_steps('sec_b', 'sec', 1, 1)".into()),
        ("exchange alpha+beta", "DDADADD",
         "SELECT count(*) FROM tasker.exchange(ARRAY['sec_a', 'sec_b'], 'sec', NULL, 2, 1)".into()),
        ("wake_channel beta", "DDADADD", "SELECT tasker.wake_channel('sec_b')".into()),
        ("worker_idle beta", "DDADADD", "SELECT 1 FROM tasker.worker_idle(ARRAY['sec_b'], 'sec')".into()),
        ("worker_idle off beta", "DDADADD", "SELECT 1 FROM tasker.worker_idle(ARRAY['sec_b'], 'sec', false)".into()),
        ("submit_result alpha", "ADADAAD", result(&f.a_step)),
        ("submit_result beta", "DDADADD", result(&f.b_step)),
        ("submit_results beta", "DDADADD", format!(
            "SELECT count(*) FROM tasker.submit_results('[{{\"step_uuid\": \"{}\", \"status\": \"success\", \"metadata\": {{\"attempt\": 1}}}}]')",
            f.b_step)),
        ("exchange alpha with a beta result", "DDADADD", format!(
            "SELECT count(*) + 1 FROM tasker.exchange(ARRAY['sec_a'], 'sec', '[{{\"step_uuid\": \"{}\", \"status\": \"success\", \"metadata\": {{\"attempt\": 1}}}}]', 0)",
            f.b_step)),
        ("extend_lease alpha", "ADADAAD", format!("SELECT tasker.extend_lease('{}', 1, 60)", f.a_step)),
        ("extend_lease beta", "DDADADD", format!("SELECT tasker.extend_lease('{}', 1, 60)", f.b_step)),
        ("checkpoint alpha", "ADADAAD", format!("SELECT tasker.checkpoint('{}', '{{\"cursor\": 1}}', 1)", f.a_step)),
        ("checkpoint beta", "DDADADD", format!("SELECT tasker.checkpoint('{}', '{{\"cursor\": 1}}', 1)", f.b_step)),
        ("create_task alpha", "DADAAAD", "SELECT tasker.create_task('sec_a', 'flow')".into()),
        ("create_task beta", "DDDAADD", "SELECT tasker.create_task('sec_b', 'flow')".into()),
        ("request_task alpha", "DADAAAD", "SELECT tasker.request_task('sec_a', 'flow')".into()),
        ("request_task beta", "DDDAADD", "SELECT tasker.request_task('sec_b', 'flow')".into()),
        ("cancel_task alpha", "DADAAAD", format!("SELECT tasker.cancel_task('{}')", f.a_task)),
        ("cancel_task beta", "DDDAADD", format!("SELECT tasker.cancel_task('{}')", f.b_task)),
        ("retry_step alpha", "DDDDAAD", format!("SELECT tasker.retry_step('{}')", f.a_error_step)),
        ("retry_step beta", "DDDDADD", format!("SELECT tasker.retry_step('{}')", f.b_error_step)),
        ("resolve_step_manually beta", "DDDDADD",
         format!("SELECT tasker.resolve_step_manually('{}', '{{}}')", f.b_error_step)),
        ("resolve_task_manually beta", "DDDDADD",
         format!("SELECT tasker.resolve_task_manually('{}')", f.b_error_task)),
        ("register_template alpha", "DDDDAAD", json_template("sec_a")),
        ("register_template new namespace", "DDDDADD", json_template("sec_new")),
        ("pgmq.send task request", "DDDAADD",
         "SELECT pgmq.send('tasker_task_requests', '{\"namespace\": \"sec_b\", \"name\": \"flow\"}')".into()),
        ("read task requests", "DDDDADD", "SELECT count(message) + 1 FROM pgmq.q_tasker_task_requests".into()),
        ("pgmq.read task requests", "DDDDDDD",
         "SELECT count(*) + 1 FROM pgmq.read('tasker_task_requests', 0, 1)".into()),
        ("forge a task request's msg_id", "DDDDDDD",
         "INSERT INTO pgmq.q_tasker_task_requests (msg_id, vt, message) OVERRIDING SYSTEM VALUE
          VALUES (999999999, now(), '{}') RETURNING msg_id".into()),
        ("update a step message", "DDDDDDD",
         "WITH u AS (UPDATE pgmq.q_tasker_sec_a_queue SET message = message || '{\"x\": 1}' RETURNING 1)
          SELECT count(*) + 1 FROM u".into()),
        ("delete a step message", "DDDDDDD",
         "WITH u AS (DELETE FROM pgmq.q_tasker_sec_a_queue RETURNING 1) SELECT count(*) + 1 FROM u".into()),
        ("lease columns of alpha's queue", "ADADAAD",
         "WITH u AS (UPDATE pgmq.q_tasker_sec_a_queue SET vt = vt RETURNING 1) SELECT count(*) FROM u".into()),
        ("read alpha's queue archive", "DDDDDDD", "SELECT count(*) + 1 FROM pgmq.a_tasker_sec_a_queue".into()),
        ("set pg_tasker.environment", "DDDDDDD",
         "SELECT set_config('pg_tasker.environment', 'production', false)".into()),
        ("grant_namespace", "DDDDADD", "SELECT tasker.grant_namespace('sec_b', 'sec_nobody', 'app')".into()),
        ("namespace_privileges", "DDDDADD", "SELECT count(*) FROM tasker.namespace_privileges".into()),
        ("dlq", "DDDDADD", "SELECT count(*) + 1 FROM tasker.dlq".into()),
        ("run_maintenance", "DDDDADD", "SELECT tasker.run_maintenance(ARRAY['staleness'])".into()),
        ("task_status alpha", "AAAAAAD", "SELECT count(*) FROM tasker.task_status WHERE namespace = 'sec_a'".into()),
        ("task_status beta", "00AAA0D", "SELECT count(*) FROM tasker.task_status WHERE namespace = 'sec_b'".into()),
        ("list_tasks beta", "00AAA0D", "SELECT count(*) FROM tasker.list_tasks('sec_b')".into()),
        ("list_tasks alpha", "AAAAAAD", "SELECT count(*) FROM tasker.list_tasks(namespace => 'sec_a')".into()),
        ("step_status alpha", "AAAAAAD", "SELECT count(*) FROM tasker.step_status WHERE namespace = 'sec_a'".into()),
        ("step_status beta", "00AAA0D", "SELECT count(*) FROM tasker.step_status WHERE namespace = 'sec_b'".into()),
        ("templates beta", "00AAA0D", "SELECT count(*) FROM tasker.templates WHERE namespace = 'sec_b'".into()),
        ("handler secrets alpha", "0000AAD",
         "SELECT count(*) FROM tasker.templates WHERE namespace = 'sec_a' AND definition::text LIKE '%s3cr3t%'".into()),
        ("handler secrets beta", "0000A0D",
         "SELECT count(*) FROM tasker.templates WHERE definition::text LIKE '%s3cr3t%' AND namespace = 'sec_b'".into()),
        ("queue_status beta", "00AAA0D", "SELECT count(*) FROM tasker.queue_status WHERE namespace = 'sec_b'".into()),
        ("analytics_failures beta", "00AAA0D",
         "SELECT count(*) FROM tasker.analytics_failures() WHERE namespace = 'sec_b'".into()),
        ("task_graph beta", "DDAAADD", format!("SELECT tasker.task_graph('{}')", f.b_task)),
        ("step_readiness beta", "DDAAADD", format!("SELECT count(*) FROM tasker.step_readiness('{}')", f.b_task)),
        ("task_execution_context beta", "DDAAADD",
         format!("SELECT count(*) FROM tasker.task_execution_context('{}')", f.b_task)),
    ]
}

fn json_template(ns: &str) -> String {
    let t = json!({"name": "flow", "namespace_name": ns, "version": "2.0.0",
                   "steps": [{"name": "only", "handler": {"callable": "Sec::Only"}}]});
    format!("SELECT tasker.register_template('{t}')")
}

#[test]
fn roles_by_operations_in_two_namespaces() {
    let mut c = connect();
    let f = fixture(&mut c);
    roles(&mut c);
    let before = fingerprint(&mut c);
    let mut conns: Vec<Client> = ROLES.iter().map(|r| connect_as(&mut c, r)).collect();
    let mut wrong = Vec::new();
    for (op, expected, sql) in operations(&f) {
        assert_eq!(expected.len(), ROLES.len(), "{op}");
        for (i, want) in expected.chars().enumerate() {
            let conn = &mut conns[i];
            let got = if want == 'D' {
                // a denial runs on its own (autocommit): it must leave nothing behind
                let got = outcome(conn, &sql);
                let after = fingerprint(&mut c);
                if after != before {
                    wrong.push(format!("{op} as {}: changed something ({got})", ROLES[i]));
                    break;
                }
                got
            } else {
                conn.batch_execute("BEGIN").unwrap();
                let got = outcome(conn, &sql);
                conn.batch_execute("ROLLBACK").unwrap();
                got
            };
            if got != want.to_string() {
                wrong.push(format!("{op} as {}: expected {want}, got {got}", ROLES[i]));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(fingerprint(&mut c), before);
}

#[test]
fn revoking_a_namespace_takes_its_queue_and_api_with_it() {
    let mut c = connect();
    register_linear(&mut c, "sec_r", "flow", 1);
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE sec_worker_r LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .unwrap();
    create(&mut c, "sec_r", "flow");
    let granted: bool = c
        .query_one(
            "SELECT tasker.grant_namespace('sec_r', 'sec_worker_r', 'worker')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(granted);
    let again: bool = c
        .query_one(
            "SELECT tasker.grant_namespace('sec_r', 'sec_worker_r', 'worker')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!again, "a second grant changes nothing");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM tasker.namespace_privileges
                       WHERE namespace = 'sec_r' AND role = 'sec_worker_r' AND privilege = 'worker'"),
        1
    );
    let mut w = connect_as(&mut c, "sec_worker_r");
    let read = "SELECT count(*) FROM pgmq.read('tasker_sec_r_queue', 0, 1)";
    assert_eq!(outcome(&mut w, read), "A");

    let revoked: bool = c
        .query_one(
            "SELECT tasker.revoke_namespace('sec_r', 'sec_worker_r', 'worker')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(revoked);
    assert_eq!(
        outcome(&mut w, read),
        "D",
        "the queue table went with the grant"
    );
    assert_eq!(
        outcome(
            &mut w,
            "SELECT count(*) FROM tasker.read_steps('sec_r', 'w', 1, 1)"
        ),
        "D",
        "the API role went with the last worker grant"
    );
    let member: bool = c
        .query_one(
            "SELECT pg_has_role('sec_worker_r', 'tasker_namespace_worker', 'MEMBER')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!member);

    // bad input: specific errors, nothing granted
    for (sql, code) in [
        (
            "SELECT tasker.grant_namespace('sec_r', 'sec_worker_r', 'owner')",
            "22023",
        ),
        (
            "SELECT tasker.grant_namespace('sec_nope', 'sec_worker_r', 'worker')",
            "42704",
        ),
        (
            "SELECT tasker.grant_namespace('sec_r', 'sec_no_such_role', 'worker')",
            "42704",
        ),
        (
            "SELECT tasker.grant_namespace('sec_r', NULL, 'worker')",
            "22004",
        ),
    ] {
        let e = c.query_one(sql, &[]).unwrap_err();
        assert_eq!(e.code().unwrap().code(), code, "{sql}: {e}");
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tasker.namespace_privileges WHERE namespace = 'sec_r'"
        ),
        0
    );
}

#[test]
fn task_graph_escapes_step_names() {
    let mut c = connect();
    let evil = "x\"] --> click s0 href \"javascript:alert(1)\" <b>#";
    register(
        &mut c,
        &template(
            "sec_g",
            "flow",
            vec![json!({"name": evil, "handler": {"callable": "T"}})],
        ),
    );
    let task = create(&mut c, "sec_g", "flow");
    let graph: String = c
        .query_one(
            "SELECT tasker.task_graph($1::text::uuid)",
            &[&task.to_string()],
        )
        .unwrap()
        .get(0);
    let node = graph
        .lines()
        .find(|l| l.trim_start().starts_with("s0["))
        .unwrap();
    // the label is one quoted string: its only quotes are the two around it
    assert_eq!(node.matches('"').count(), 2, "{node}");
    assert!(!node.contains('<') || node.contains("<br/>"), "{node}");
    assert!(
        !node.contains("<b>") && !node.contains("javascript:alert(1)\""),
        "{node}"
    );
    assert!(
        node.contains(
            "x#34;#93; --#62; click s0 href #34;javascript:alert#40;1#41;#34; #60;b#62;#35;"
        ),
        "{node}"
    );
}

/// The views are security barriers: a function of the caller's own in a
/// WHERE clause (cheap enough to run first, if the planner could) never
/// sees a row of another namespace, and a lookup by key still uses the
/// primary key.
#[test]
fn a_leaky_function_sees_no_other_namespace() {
    let mut c = connect();
    register_linear(&mut c, "sec_l1", "flow", 2);
    register_linear(&mut c, "sec_l2", "flow", 2);
    let mine = create(&mut c, "sec_l1", "flow");
    create(&mut c, "sec_l2", "flow");
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE sec_leaker LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         SELECT tasker.grant_namespace('sec_l1', 'sec_leaker', 'app');",
    )
    .unwrap();
    let port: String = c.query_one("SHOW port", &[]).unwrap().get(0);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let mut leaker = postgres::Config::new()
        .host("localhost")
        .port(port.parse().unwrap())
        .user("sec_leaker")
        .dbname(pgrx_tests::get_pg_dbname())
        .notice_callback(move |n| s.lock().unwrap().push(n.message().to_string()))
        .connect(NoTls)
        .unwrap();
    leaker
        .batch_execute(
            "CREATE FUNCTION pg_temp.leak(t text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS
             $$ BEGIN RAISE NOTICE 'saw %', t; RETURN true; END $$;",
        )
        .unwrap();
    for q in [
        "SELECT count(*) FROM tasker.task_status WHERE pg_temp.leak(namespace)",
        "SELECT count(*) FROM tasker.step_status WHERE pg_temp.leak(namespace || ' ' || step_name)",
        "SELECT count(*) FROM tasker.templates WHERE pg_temp.leak(namespace || ' ' || definition::text)",
        "SELECT count(*) FROM tasker.ready_tasks WHERE pg_temp.leak(namespace)",
    ] {
        leaker.query_one(q, &[]).unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|n| n.contains("sec_l1")), "{seen:?}");
    let foreign: Vec<_> = seen.iter().filter(|n| !n.contains("sec_l1")).collect();
    assert!(foreign.is_empty(), "the leaky function saw {foreign:?}");

    let plan: Vec<String> = leaker
        .query(
            &format!("EXPLAIN SELECT * FROM tasker.task_status WHERE task_uuid = '{mine}'"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|l| l.contains("Index Scan using tasks_pkey")),
        "{}",
        plan.join("\n")
    );
}

/// What the review of #12 found, closed: a worker cannot unregister
/// another namespace's idle workers; the cluster-wide, API and pg_* roles
/// take no namespace grants; pgmq's grant to pg_monitor is gone from
/// pg_tasker's queues; inside a security-restricted operation (an index
/// expression, ANALYZE) the session's role does not count as the caller.
#[test]
fn the_review_findings_stay_closed() {
    let mut c = connect();
    register_linear(&mut c, "sec_v1", "flow", 1);
    register_linear(&mut c, "sec_v2", "flow", 1);
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE sec_vworker LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DO $$ BEGIN CREATE ROLE sec_vmon LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT pg_monitor TO sec_vmon;
         SELECT tasker.grant_namespace('sec_v1', 'sec_vworker', 'worker');",
    )
    .unwrap();
    create(&mut c, "sec_v2", "flow");
    // a victim idle on sec_v2, registered from a live backend
    let mut victim = other_connection(&mut c);
    victim
        .batch_execute("SELECT tasker.worker_idle(ARRAY['sec_v2'], 'victim-1', true)")
        .unwrap();
    let mut w = connect_as(&mut c, "sec_vworker");
    assert_eq!(
        outcome(
            &mut w,
            "SELECT 1 FROM tasker.worker_idle('{}', 'victim-1', false)"
        ),
        "A"
    );
    assert_eq!(
        outcome(
            &mut w,
            "SELECT 1 FROM tasker.worker_idle(ARRAY['sec_v1'], 'victim-1', false)"
        ),
        "A"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM tasker.worker_waits WHERE worker_id = 'victim-1' AND queue_name = 'tasker_sec_v2_queue'"),
        1,
        "another namespace's registration stays"
    );
    for role in ["tasker_worker", "tasker_namespace_app", "pg_monitor"] {
        for f in ["grant_namespace", "revoke_namespace"] {
            let e = c
                .query_one(
                    &format!("SELECT tasker.{f}('sec_v1', '{role}', 'worker')"),
                    &[],
                )
                .unwrap_err();
            assert_eq!(e.code().unwrap().code(), "0LP01", "{f} {role}: {e}");
        }
    }
    // revoking what was never granted takes nothing
    c.batch_execute("GRANT tasker_namespace_app TO sec_vworker")
        .unwrap();
    let r: bool = c
        .query_one(
            "SELECT tasker.revoke_namespace('sec_v1', 'sec_vworker', 'app')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!r);
    let member: bool = c
        .query_one(
            "SELECT pg_has_role('sec_vworker', 'tasker_namespace_app', 'MEMBER')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(member, "a membership granted by hand stays");
    let mut mon = connect_as(&mut c, "sec_vmon");
    assert_eq!(
        outcome(
            &mut mon,
            "SELECT count(*) + 1 FROM pgmq.q_tasker_sec_v2_queue"
        ),
        "D"
    );
    assert_eq!(
        outcome(
            &mut mon,
            "SELECT count(*) + 1 FROM pgmq.a_tasker_sec_v2_queue"
        ),
        "D"
    );
    // an index expression runs in a security-restricted operation
    c.batch_execute(
        "DROP TABLE IF EXISTS sec_idx;
         CREATE TABLE sec_idx (i int); INSERT INTO sec_idx SELECT generate_series(1, 3);
         CREATE OR REPLACE FUNCTION sec_probe(i int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
         $$ BEGIN PERFORM count(*) FROM tasker.task_status; RETURN i; END $$;",
    )
    .unwrap();
    let e = c
        .batch_execute("CREATE INDEX ON sec_idx (sec_probe(i))")
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501", "{e}");
    c.batch_execute("DROP TABLE sec_idx; DROP FUNCTION sec_probe(int)")
        .unwrap();
}

/// The namespaces a session keeps for its caller (tasker._caller_namespaces,
/// src/caller.rs) follow every committed change of grants and of role
/// memberships, are not changed by another session's uncommitted one, and
/// follow the session's own changes at once, rollbacks included.
#[test]
fn kept_grants_follow_committed_changes() {
    let mut c = connect();
    for ns in ["sec_k1", "sec_k2"] {
        register_linear(&mut c, ns, "flow", 1);
        create(&mut c, ns, "flow");
    }
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE sec_kw LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DO $$ BEGIN CREATE ROLE sec_kg NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         SELECT tasker.grant_namespace('sec_k1', 'sec_kw', 'worker');
         SELECT tasker.grant_namespace('sec_k2', 'sec_kw', 'worker');",
    )
    .unwrap();
    let mut w = connect_as(&mut c, "sec_kw");
    // a read (in a transaction rolled back: it takes nothing) and what the
    // views show, as the worker
    let read = |w: &mut Client| {
        w.batch_execute("BEGIN").unwrap();
        let got = outcome(
            w,
            "SELECT count(*) FROM tasker.read_steps('sec_k1', 'w', 1, 30)",
        );
        w.batch_execute("ROLLBACK").unwrap();
        got
    };
    let seen = "SELECT count(*) FROM tasker.task_status WHERE namespace = 'sec_k1'";
    assert_eq!(read(&mut w), "A");
    assert_eq!(count(&mut w, seen), 1);

    // another session's revoke counts from its commit, not before
    let mut a = other_connection(&mut c);
    a.batch_execute("BEGIN; SELECT tasker.revoke_namespace('sec_k1', 'sec_kw', 'worker')")
        .unwrap();
    assert_eq!(read(&mut w), "A", "an uncommitted revoke takes nothing yet");
    assert_eq!(count(&mut w, seen), 1);
    a.batch_execute("COMMIT").unwrap();
    assert_eq!(
        read(&mut w),
        "D",
        "the committed revoke reached the session"
    );
    assert_eq!(count(&mut w, seen), 0);

    // a grant rolled back gives nothing; a committed one, at once
    a.batch_execute("BEGIN; SELECT tasker.grant_namespace('sec_k1', 'sec_kw', 'worker'); ROLLBACK")
        .unwrap();
    assert_eq!(read(&mut w), "D");
    c.batch_execute("SELECT tasker.grant_namespace('sec_k1', 'sec_kg', 'worker')")
        .unwrap();
    assert_eq!(read(&mut w), "D", "a grant to a role it is not a member of");

    // role memberships: GRANT role / REVOKE role, committed
    c.batch_execute("GRANT sec_kg TO sec_kw").unwrap();
    assert_eq!(read(&mut w), "A", "now a member of the grantee");
    assert_eq!(count(&mut w, seen), 1);
    c.batch_execute("REVOKE sec_kg FROM sec_kw").unwrap();
    assert_eq!(read(&mut w), "D", "no longer a member");
    assert_eq!(count(&mut w, seen), 0);

    // the session's own changes, in its transaction: at once, and undone by
    // a rollback (to a savepoint, and of the whole transaction)
    let as_worker = |c: &mut Client| {
        c.batch_execute("SET ROLE sec_kw").unwrap();
        let n = count(c, seen);
        c.batch_execute("RESET ROLE").unwrap();
        n
    };
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(as_worker(&mut c), 0);
    c.batch_execute("SAVEPOINT s; SELECT tasker.grant_namespace('sec_k1', 'sec_kw', 'app')")
        .unwrap();
    assert_eq!(as_worker(&mut c), 1, "its own grant counts at once");
    c.batch_execute("ROLLBACK TO s").unwrap();
    assert_eq!(as_worker(&mut c), 0, "and goes with the savepoint");
    c.batch_execute("SELECT tasker.grant_namespace('sec_k1', 'sec_kw', 'app')")
        .unwrap();
    assert_eq!(as_worker(&mut c), 1);
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(as_worker(&mut c), 0, "and with the transaction");
    assert_eq!(count(&mut w, seen), 0);

    // a grant's rows deleted in bulk (an operator's TRUNCATE) reach it too
    c.batch_execute("SELECT tasker.grant_namespace('sec_k1', 'sec_kw', 'worker')")
        .unwrap();
    assert_eq!(read(&mut w), "A");
    let kept: i64 = count(&mut c, "SELECT count(*) FROM tasker.namespace_grants");
    c.batch_execute(
        "BEGIN;
         CREATE TEMP TABLE kept_grants ON COMMIT DROP AS SELECT * FROM tasker.namespace_grants;
         TRUNCATE tasker.namespace_grants;",
    )
    .unwrap();
    c.batch_execute("SET ROLE sec_kw").unwrap();
    assert_eq!(count(&mut c, seen), 0, "truncated in this transaction");
    c.batch_execute(
        "RESET ROLE; INSERT INTO tasker.namespace_grants SELECT * FROM kept_grants; COMMIT",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM tasker.namespace_grants"),
        kept
    );
    assert_eq!(read(&mut w), "A");

    // a revoke that commits while a statement runs, before the statement
    // first asks (its snapshot is older than the revoke): the next
    // statement sees it; and one that commits inside a REPEATABLE READ
    // transaction, whose snapshot keeps the grant: the next transaction
    let revoke_meanwhile = |c: &mut Client| {
        let mut a = other_connection(c);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            a.batch_execute("SELECT tasker.revoke_namespace('sec_k1', 'sec_kw', 'worker')")
                .unwrap();
        })
    };
    let regrant = |c: &mut Client| {
        c.batch_execute("SELECT tasker.grant_namespace('sec_k1', 'sec_kw', 'worker')")
            .unwrap()
    };
    assert_eq!(count(&mut w, seen), 1);
    let revoking = revoke_meanwhile(&mut c);
    let during: Option<i64> = w
        .query_one(
            &format!("SELECT CASE WHEN pg_sleep(1) IS NOT NULL THEN ({seen}) END"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(during.is_some(), "the statement asked after its sleep");
    revoking.join().unwrap();
    assert_eq!(
        count(&mut w, seen),
        0,
        "a revoke committed during a statement"
    );
    regrant(&mut c);
    assert_eq!(count(&mut w, seen), 1);
    w.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    revoke_meanwhile(&mut c).join().unwrap();
    count(&mut w, seen);
    w.batch_execute("COMMIT").unwrap();
    assert_eq!(
        count(&mut w, seen),
        0,
        "a revoke committed during a REPEATABLE READ transaction"
    );
    assert_eq!(read(&mut w), "D");

    // reading the grants again writes nothing (no xid: a read-only
    // transaction stays one, as on a standby)
    regrant(&mut c);
    w.batch_execute("BEGIN").unwrap();
    assert_eq!(count(&mut w, seen), 1);
    assert_eq!(
        count(
            &mut w,
            "SELECT count(*) FROM (SELECT pg_current_xact_id_if_assigned() AS x) t WHERE x IS NULL"
        ),
        1
    );
    w.batch_execute("COMMIT").unwrap();

    // the answers are names: a namespace renamed by hand reaches them
    let kept_names = |c: &mut Client| -> String {
        c.batch_execute("SET ROLE sec_kw").unwrap();
        let names = c
            .query_one("SELECT tasker._caller_namespaces('worker')::text", &[])
            .unwrap()
            .get(0);
        c.batch_execute("RESET ROLE").unwrap();
        names
    };
    assert_eq!(kept_names(&mut c), "{sec_k1,sec_k2}");
    c.batch_execute(
        "BEGIN; UPDATE tasker.namespaces SET name = 'sec_k1_renamed' WHERE name = 'sec_k1'",
    )
    .unwrap();
    let renamed = kept_names(&mut c);
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(renamed, "{sec_k1_renamed,sec_k2}");
    assert_eq!(kept_names(&mut c), "{sec_k1,sec_k2}");

    // a change made with triggers off for replication (a restore, an
    // apply worker) reaches it too
    c.batch_execute(
        "SET session_replication_role = replica;
         SELECT tasker.revoke_namespace('sec_k1', 'sec_kw', 'worker');
         RESET session_replication_role;",
    )
    .unwrap();
    assert_eq!(
        count(&mut w, seen),
        0,
        "a revoke with session_replication_role = replica"
    );
}

/// Every read of the API writes nothing: no transaction id is assigned
/// (so reads burn no xids, write no commit records and work on a
/// standby), for a superuser and for a role with a grant in one namespace
/// (whose namespaces are read and kept on the way).
#[test]
fn reads_write_nothing() {
    let mut c = connect();
    register_linear(&mut c, "sec_ro", "flow", 2);
    let task = create(&mut c, "sec_ro", "flow");
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE sec_ro_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         SELECT tasker.grant_namespace('sec_ro', 'sec_ro_app', 'admin');",
    )
    .unwrap();
    let reads = [
        "SELECT tasker.health()::text".to_string(),
        "SELECT tasker.metrics()".into(),
        "SELECT count(*) FROM tasker.templates".into(),
        "SELECT count(*) FROM tasker.task_status".into(),
        "SELECT count(*) FROM tasker.step_status".into(),
        "SELECT count(*) FROM tasker.ready_tasks".into(),
        "SELECT count(*) FROM tasker.list_tasks('sec_ro')".into(),
        format!("SELECT count(*) FROM tasker.step_readiness('{task}')"),
        format!("SELECT count(*) FROM tasker.task_execution_context('{task}')"),
        format!("SELECT tasker.task_graph('{task}')"),
        "SELECT count(*) FROM tasker.analytics_throughput()".into(),
        "SELECT count(*) FROM tasker.analytics_failures()".into(),
        "SELECT count(*) FROM tasker.analytics_slowest_steps()".into(),
        "SELECT tasker.queue_name('sec_ro')".into(),
    ];
    let mut superuser = other_connection(&mut c);
    let mut granted = connect_as(&mut c, "sec_ro_app");
    for (who, conn) in [("superuser", &mut superuser), ("granted", &mut granted)] {
        for sql in &reads {
            // (a change of grants first: the granted role's namespaces are
            // read again inside the transaction)
            c.batch_execute("SELECT tasker.grant_namespace('sec_ro', 'sec_ro_app', 'app')")
                .unwrap();
            c.batch_execute("SELECT tasker.revoke_namespace('sec_ro', 'sec_ro_app', 'app')")
                .unwrap();
            conn.batch_execute("BEGIN").unwrap();
            conn.batch_execute(sql)
                .unwrap_or_else(|e| panic!("{who}: {sql}: {e}"));
            let xid: Option<String> = conn
                .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
                .unwrap()
                .get(0);
            conn.batch_execute("COMMIT").unwrap();
            assert_eq!(xid, None, "{who}: {sql} assigned a transaction id");
        }
    }
}
