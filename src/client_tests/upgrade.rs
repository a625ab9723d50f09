//! ALTER EXTENSION pg_tasker UPDATE from 0.1.0, with tasks in flight, on a
//! cluster of the test's own: 0.1.0 runs first (its library, installed by
//! scripts/install-release.sh, found first on dynamic_library_path, its
//! orchestrator preloaded), then the library is swapped for this one and the
//! server restarted, as an operator upgrading would. The upgraded schema must
//! equal a fresh 0.2.0 install, and the old tasks must finish.

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

/// Every object of schema tasker, one line each, independent of OIDs and of
/// column order (an upgrade appends columns): columns, constraints,
/// indexes, functions (whole definitions), views, types, privileges,
/// comments, and the rows of the state machine's lookup tables.
const DESCRIBE_SCHEMA: &str = r#"
SELECT string_agg(line, E'\n' ORDER BY line) FROM (
    SELECT format('column %s.%s %s %s default %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attnotnull THEN 'not null' ELSE 'null' END, pg_get_expr(d.adbin, d.adrelid)) AS line
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relnamespace = 'tasker'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('relation %s %s acl %s comment %s', c.relname, c.relkind,
                  (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x),
                  obj_description(c.oid, 'pg_class'))
    FROM pg_class c WHERE c.relnamespace = 'tasker'::regnamespace
    UNION ALL
    SELECT format('constraint %s on %s: %s', co.conname, co.conrelid::regclass, pg_get_constraintdef(co.oid))
    FROM pg_constraint co WHERE co.connamespace = 'tasker'::regnamespace
    UNION ALL
    SELECT format('index %s', pg_get_indexdef(i.indexrelid))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace = 'tasker'::regnamespace
    UNION ALL
    SELECT format('function %s acl %s comment %s', pg_get_functiondef(p.oid),
                  (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x),
                  obj_description(p.oid, 'pg_proc'))
    FROM pg_proc p WHERE p.pronamespace = 'tasker'::regnamespace
    UNION ALL
    SELECT format('view %s: %s', c.relname, pg_get_viewdef(c.oid))
    FROM pg_class c WHERE c.relnamespace = 'tasker'::regnamespace AND c.relkind = 'v'
    UNION ALL
    SELECT format('type %s %s: %s', t.typname, t.typtype,
                  (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid))
    FROM pg_type t WHERE t.typnamespace = 'tasker'::regnamespace
    UNION ALL
    SELECT format('extension member %s', pg_describe_object(d.classid, d.objid, d.objsubid))
    FROM pg_depend d WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
      AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_tasker')
      -- (the test build's fresh install also has the #[pg_test] functions)
      AND pg_describe_object(d.classid, d.objid, d.objsubid) NOT LIKE '% tests.%'
      AND pg_describe_object(d.classid, d.objid, d.objsubid) <> 'schema tests'
    UNION ALL
    SELECT format('step move %s > %s via %s', s.from_state, s.to_state, s.via) FROM tasker.step_state_transitions s
    UNION ALL
    SELECT format('task move %s > %s via %s', s.from_state, s.to_state, s.via) FROM tasker.task_state_transitions s
) lines
"#;

struct OwnCluster(pg_tasker_worker::testing::Cluster);

impl OwnCluster {
    fn connect(&self, db: &str) -> Client {
        let start = Instant::now();
        loop {
            match postgres::Config::new()
                .host_path(&self.0.dir)
                .port(self.0.port)
                .user("postgres")
                .dbname(db)
                .connect(NoTls)
            {
                Ok(c) => return c,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(30), "connect: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

fn read(c: &mut Client, queue: &str, vt: i32) -> Vec<Value> {
    c.query(
        "SELECT message::text FROM pgmq.read($1, $2, 100)",
        &[&queue, &vt],
    )
    .unwrap()
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
    .collect()
}

fn submit(c: &mut Client, msg: &Value, status: &str, error: Option<Value>) -> String {
    c.query_one(
        "SELECT tasker.submit_result($1::text::uuid, $2, $3::text::jsonb, $4::text::jsonb, $5::text::jsonb)",
        &[
            &msg["step_uuid"].as_str().unwrap(),
            &status,
            &json!({"step": msg["step_name"]}).to_string(),
            &error.map(|e| e.to_string()),
            &json!({"attempt": msg["attempt"]}).to_string(),
        ],
    )
    .unwrap()
    .get(0)
}

fn states(c: &mut Client) -> Value {
    let s: String = c
        .query_one(
            "SELECT coalesce(jsonb_object_agg(state, n), '{}')::text FROM (SELECT state, count(*) n FROM tasker.tasks GROUP BY state) x",
            &[],
        )
        .unwrap()
        .get(0);
    serde_json::from_str(&s).unwrap()
}

/// The user data of every task and step and the steps' audit rows, as one
/// text (columns 0.1.0 and 0.2.0 share, states as text). Task states are
/// left out: the upgrade evaluates every active task once, and moves those
/// 0.1.0 left stranded.
fn fingerprint(c: &mut Client) -> String {
    c.query_one(
        "SELECT concat_ws(' | ',
            (SELECT string_agg(concat_ws(',', task_uuid, context::text, priority, tags::text), ';' ORDER BY task_uuid) FROM tasker.tasks),
            (SELECT string_agg(concat_ws(',', step_uuid, state::text, attempts, results::text, last_error::text, queue_msg_id), ';' ORDER BY step_uuid) FROM tasker.workflow_steps),
            (SELECT string_agg(concat_ws(',', step_uuid, sort_key, from_state::text, to_state::text, reason, metadata::text), ';' ORDER BY step_uuid, sort_key) FROM tasker.step_transitions),
            (SELECT count(*) FROM tasker.step_edges))",
        &[],
    )
    .unwrap()
    .get(0)
}

/// How many invariants fail over every task (tests.task_problems).
fn all_problems(c: &mut Client) -> i64 {
    let tasks: Vec<uuid::Uuid> = c
        .query("SELECT task_uuid::text FROM tasker.tasks", &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0).parse().unwrap())
        .collect();
    tasks
        .into_iter()
        .map(|t| super::basics::task_problems_in(c, t))
        .sum()
}

#[test]
fn update_from_0_1_0_with_tasks_in_flight_matches_a_fresh_install() {
    let ext = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_config")
        .arg("--sharedir")
        .output()
        .unwrap();
    let sharedir = String::from_utf8_lossy(&ext.stdout).trim().to_string();
    assert!(
        std::path::Path::new(&format!("{sharedir}/extension/pg_tasker--0.1.0.sql")).exists(),
        "pg_tasker 0.1.0 is not installed beside this version: run scripts/install-release.sh 0.1.0 (scripts/test.sh does)"
    );
    let cluster = OwnCluster(pg_tasker_worker::testing::Cluster::start(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        "upgrade",
    ));
    // "install" 0.1.0: its library comes first on the library path
    let mut c = cluster.connect("postgres");
    c.batch_execute(
        "ALTER SYSTEM SET dynamic_library_path = '$libdir/pg_tasker-releases/0.1.0:$libdir'",
    )
    .unwrap();
    drop(c);
    cluster.0.restart_fast();
    let mut c = cluster.connect("postgres");
    c.batch_execute("CREATE EXTENSION pg_tasker VERSION '0.1.0' CASCADE")
        .unwrap();
    let step = |n: &str, d: &[&str], extra: Value| {
        let mut s = json!({"name": n, "dependencies": d, "handler": {"callable": "T"}});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    let t = json!({"name": "diamond", "namespace_name": "upg", "version": "1.0.0",
        "steps": [step("start", &[], json!({})),
                  step("left", &["start"], json!({"retry": {"max_attempts": 3, "backoff": "linear", "backoff_base_ms": 600000}})),
                  step("right", &["start"], json!({})),
                  step("end", &["left", "right"], json!({}))]});
    c.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
    let t2 = json!({"name": "single", "namespace_name": "upg2", "version": "1",
        "steps": [step("only", &[], json!({"retry": {"max_attempts": 1}}))]});
    c.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t2.to_string()],
    )
    .unwrap();
    for _ in 0..6 {
        c.batch_execute("SELECT tasker.create_task('upg', 'diamond', '{\"n\": 0.1000000000000000055511151231257827}')")
            .unwrap();
    }
    let cancelled: String = c
        .query_one("SELECT tasker.create_task('upg2', 'single')::text", &[])
        .unwrap()
        .get(0);
    c.execute("SELECT tasker.cancel_task($1::text::uuid)", &[&cancelled])
        .unwrap();
    let blocked: String = c
        .query_one("SELECT tasker.create_task('upg2', 'single')::text", &[])
        .unwrap()
        .get(0);
    for m in read(&mut c, "tasker_upg2_queue", 30) {
        submit(
            &mut c,
            &m,
            "failure",
            Some(json!({"message": "no", "retryable": false})),
        );
    }
    // tasks in flight: starts done, lefts failed once (retry in 10 minutes)
    // on two tasks, rights read and held by a worker on the others
    for m in read(&mut c, "tasker_upg_queue", 30) {
        submit(&mut c, &m, "success", None);
    }
    let mut held = 0;
    for (i, m) in read(&mut c, "tasker_upg_queue", 600).iter().enumerate() {
        if m["step_name"] == "left" && i < 4 {
            submit(&mut c, m, "failure", Some(json!({"message": "later"})));
        } else if m["step_name"] == "right" && i % 3 == 0 {
            submit(&mut c, m, "success", None);
        } else {
            held += 1; // out with a worker that will answer after the upgrade
        }
    }
    assert!(held > 0);
    let before = states(&mut c);
    assert_eq!(before["blocked_by_failures"], 1, "{before}");
    let before_rows = fingerprint(&mut c);
    drop(c);

    // swap the library for this version and restart: the orchestrator stands down
    let mut c = cluster.connect("postgres");
    c.batch_execute("ALTER SYSTEM RESET dynamic_library_path")
        .unwrap();
    drop(c);
    cluster.0.restart_fast();
    let start = Instant::now();
    while !cluster
        .0
        .log()
        .contains("is version 0.1.0, this library is 0.2.0")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no stand-down:\n{}",
            cluster.0.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = cluster.connect("postgres");
    c.batch_execute("ALTER EXTENSION pg_tasker UPDATE").unwrap();
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_tasker'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // the same schema as a fresh install
    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = cluster.connect("fresh");
    fresh
        .batch_execute("CREATE EXTENSION pg_tasker CASCADE")
        .unwrap();
    let describe = |c: &mut Client| -> String { c.query_one(DESCRIBE_SCHEMA, &[]).unwrap().get(0) };
    let (upgraded, installed) = (describe(&mut c), describe(&mut fresh));
    if upgraded != installed {
        let a: std::collections::BTreeSet<&str> = upgraded.lines().collect();
        let b: std::collections::BTreeSet<&str> = installed.lines().collect();
        let only_upgraded: Vec<_> = a.difference(&b).take(10).collect();
        let only_fresh: Vec<_> = b.difference(&a).take(10).collect();
        panic!("schemas differ\nonly after the upgrade: {only_upgraded:#?}\nonly in a fresh install: {only_fresh:#?}");
    }

    // a queue made by 0.1.0 grants what one made by 0.2.0 does (pgmq.read's
    // columns to workers, nothing to apps), in the upgraded database and in
    // a fresh one
    let queue_acl = |c: &mut Client, queue: &str| -> String {
        c.query_one(
            "SELECT concat_ws(' ', (SELECT relacl::text FROM pg_class WHERE oid = $1::text::regclass),
                              (SELECT string_agg(attname || '=' || attacl::text, ' ' ORDER BY attnum)
                               FROM pg_attribute WHERE attrelid = $1::text::regclass AND attacl IS NOT NULL),
                              (SELECT relacl::text FROM pg_class WHERE oid = $2::text::regclass))",
            &[&format!("pgmq.q_{queue}"), &format!("pgmq.a_{queue}")],
        )
        .unwrap()
        .get(0)
    };
    let fresh_queue = |c: &mut Client| {
        let t = json!({"name": "x", "namespace_name": "upg_new", "version": "1",
            "steps": [step("only", &[], json!({}))]});
        c.execute(
            "SELECT tasker.register_template($1::text::jsonb)",
            &[&t.to_string()],
        )
        .unwrap();
    };
    fresh_queue(&mut c);
    fresh_queue(&mut fresh);
    let old_acl = queue_acl(&mut c, "tasker_upg_queue");
    assert_eq!(old_acl, queue_acl(&mut c, "tasker_upg_new_queue"));
    assert_eq!(old_acl, queue_acl(&mut fresh, "tasker_upg_new_queue"));
    assert!(
        old_acl.contains("vt=") && !old_acl.contains("message="),
        "{old_acl}"
    );

    // the data came along, consistently
    assert_eq!(all_problems(&mut c), 0);
    assert_eq!(states(&mut c)["cancelled"], 1);
    assert_eq!(states(&mut c)["blocked_by_failures"], 1);
    assert_eq!(
        fingerprint(&mut c),
        before_rows,
        "every task, step and audit row came along unchanged"
    );

    // and the old tasks finish: the orchestrator serves again, the held
    // messages (0.1.0's format) are answered, the retries come due
    let start = Instant::now();
    while !cluster.0.log().contains("pg_tasker orchestrator running") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "orchestrator did not resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.batch_execute(
        "UPDATE tasker.workflow_steps SET next_retry_at = now() WHERE state = 'waiting_for_retry';
         UPDATE tasker.tasks SET next_action_at = now() WHERE state = 'waiting_for_retry'",
    )
    .unwrap();
    c.batch_execute("UPDATE pgmq.q_tasker_upg_queue SET vt = clock_timestamp()")
        .unwrap();
    let start = Instant::now();
    loop {
        for m in read(&mut c, "tasker_upg_queue", 30) {
            submit(&mut c, &m, "success", None);
        }
        let s = states(&mut c);
        if s["complete"] == 6 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "old tasks did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(all_problems(&mut c), 0);
    // a blocked task from 0.1.0 can be retried under 0.2.0's fencing
    let step: String = c
        .query_one(
            "SELECT step_uuid::text FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid",
            &[&blocked],
        )
        .unwrap()
        .get(0);
    let state: String = c
        .query_one("SELECT tasker.retry_step($1::text::uuid)", &[&step])
        .unwrap()
        .get(0);
    assert_eq!(state, "enqueued");
    let m = read(&mut c, "tasker_upg2_queue", 30);
    assert_eq!(m[0]["attempt"], 2);
    assert_eq!(submit(&mut c, &m[0], "success", None), "complete");
}
