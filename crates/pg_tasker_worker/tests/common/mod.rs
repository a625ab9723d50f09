//! Helpers shared by the end-to-end test files (each uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pg_tasker_worker::testing::Cluster;
use postgres::{Client, NoTls};
use serde_json::Value;

/// A task's state, as text.
pub fn task_state(db: &mut Client, task: &str) -> String {
    db.query_one(
        "SELECT state::text FROM tasker.tasks WHERE task_uuid = $1::text::uuid",
        &[&task],
    )
    .unwrap()
    .get(0)
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub struct Env {
    pub cluster: Cluster,
    pub db: Client,
}

pub fn setup(tag: &str, templates: &[&str]) -> Env {
    let cluster = Cluster::start(&repo(), tag);
    let mut db = Client::connect(&cluster.url(), NoTls).expect("connect");
    for sql in [
        "CREATE EXTENSION pg_tasker CASCADE",
        "ALTER SYSTEM SET pg_tasker.environment = 'test'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql).unwrap();
    }
    for t in templates {
        let yaml = std::fs::read_to_string(repo().join("examples/templates").join(t)).unwrap();
        db.execute("SELECT tasker.register_template_yaml($1)", &[&yaml])
            .unwrap();
    }
    Env { cluster, db }
}

pub struct Worker(pub Child);

impl Worker {
    pub fn start(env: &Env, namespaces: &[&str], handlers: &str, extra: &[&str]) -> Worker {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pg-tasker-worker"));
        cmd.args([
            "--database-url",
            &env.cluster.url(),
            "--handlers",
            handlers,
            "--environment",
            "test",
        ]);
        for ns in namespaces {
            cmd.args(["--namespace", ns]);
        }
        cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::null());
        Worker(cmd.spawn().expect("worker starts"))
    }

    pub fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // graceful stop: SIGTERM, then wait (unless it is gone already)
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let _ = self.0.wait();
        }
    }
}

pub fn create(db: &mut Client, ns: &str, name: &str, context: &str) -> String {
    db.query_one(
        "SELECT tasker.create_task($1, $2, $3::text::jsonb)::text",
        &[&ns, &name, &context],
    )
    .unwrap()
    .get(0)
}

/// Waits until no task of the namespace is still moving.
pub fn settle(env: &mut Env, ns: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let open: i64 = env
            .db
            .query_one(
                "SELECT count(*) FROM tasker.tasks WHERE namespace_name = $1
                   AND NOT tasker.task_state_is_terminal(state) AND state <> 'blocked_by_failures'",
                &[&ns],
            )
            .unwrap()
            .get(0);
        if open == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "namespace {ns} did not settle; postgres log:\n{}",
            env.cluster.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn json(db: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Value {
    let s: Option<String> = db
        .query_one(&format!("SELECT ({sql})::text"), params)
        .unwrap()
        .get(0);
    s.map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(Value::Null)
}

pub fn step(db: &mut Client, task: &str, name: &str) -> Value {
    json(
        db,
        "SELECT to_jsonb(s) FROM tasker.workflow_steps s WHERE s.task_uuid = $1::text::uuid AND s.name = $2",
        &[&task, &name],
    )
}
