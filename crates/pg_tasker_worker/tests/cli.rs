//! The CLI as an operator meets it: --help, and misconfiguration that ends
//! the worker at once with its cause (a real process against a real
//! cluster), libpq environment variables honoured.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pg_tasker_worker::testing::Cluster;
use postgres::{Client, NoTls};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the CLI to its end (at most 10 s); its output and how long it took.
fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pg-tasker-worker"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PG_TASKER_ENV")
        .env_remove("PGPASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("the CLI starts");
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 10 s: {args:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_flag_with_its_default_and_variable() {
    let (out, _) = run_cli(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--namespace",
        "--handlers",
        "--database-url",
        "--config-dir",
        "--environment",
        "--worker-id",
        "--concurrency",
        "--batch-size",
        "--visibility-timeout",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for shown in [
        "env: DATABASE_URL",
        "env: PG_TASKER_ENV",
        "[default: development]",
        "[default: all]",
    ] {
        assert!(help.contains(shown), "{shown} missing from:\n{help}");
    }
    // bad values are refused with a usage error
    let (out, _) = run_cli(&["--namespace", "x", "--concurrency", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let (out, _) = run_cli(&["--namespace", "x", "--handlers", "nope"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let (out, _) = run_cli(&["--namespace", "x", "--environment", "prodution"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown environment \"prodution\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn misconfiguration_ends_the_worker_with_its_cause() {
    let cluster = Cluster::start(&repo(), "cli");
    let mut db = Client::connect(&cluster.url(), NoTls).expect("connect");
    db.batch_execute("CREATE DATABASE bare").unwrap();
    db.batch_execute(
        "CREATE EXTENSION pg_tasker CASCADE;
         CREATE ROLE pwuser LOGIN PASSWORD 'right-one' IN ROLE tasker_worker;
         SELECT tasker.register_template('{\"name\": \"t\", \"namespace_name\": \"cli_ns\", \"version\": \"1.0.0\",
             \"steps\": [{\"name\": \"a\", \"handler\": {\"callable\": \"X\"}}]}');",
    )
    .unwrap();
    // password authentication for pwuser over the socket
    let hba = cluster.dir.join("data/pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local all pwuser scram-sha-256\n{old}")).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let host = cluster.dir.display().to_string();
    let port = cluster.port.to_string();
    let url =
        |user: &str, dbname: &str| format!("host={host} port={port} user={user} dbname={dbname}");
    // (arguments, environment, the cause the worker must name)
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--database-url".into(), url("pwuser", "postgres")],
            vec![("PGPASSWORD", "wrong")],
            "authentication failed for role \"pwuser\"",
        ),
        (
            vec!["--database-url".into(), url("nobody", "postgres")],
            vec![],
            "role \"nobody\" does not exist",
        ),
        (
            vec!["--database-url".into(), url("postgres", "nodb")],
            vec![],
            "database \"nodb\" does not exist",
        ),
        (
            vec!["--database-url".into(), url("postgres", "bare")],
            vec![],
            "the pg_tasker extension is not installed in database \"bare\"",
        ),
        (
            vec![
                "--database-url".into(),
                url("postgres", "postgres"),
                "--namespace".into(),
                "ghost".into(),
            ],
            vec![],
            "namespace \"ghost\" is not registered",
        ),
    ];
    for (args, env, cause) in cases {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        if !all.contains(&"--namespace") {
            all.extend(["--namespace", "cli_ns"]);
        }
        let (out, took) = run_cli(&all, &env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {err}");
        assert!(
            err.contains(cause),
            "{all:?}: expected {cause:?} in:\n{err}"
        );
        assert!(took < Duration::from_secs(10));
        assert!(
            !err.contains("right-one") && !err.contains("wrong"),
            "no password in logs: {err}"
        );
    }

    // libpq variables fill what the URL leaves out, PGPASSWORD included;
    // the worker says where it connects (without the password) and serves
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pg-tasker-worker"));
    cmd.args([
        "--namespace",
        "cli_ns",
        "--environment",
        "test",
        "--database-url",
        "",
    ])
    .env_remove("DATABASE_URL")
    .env("PGHOST", &host)
    .env("PGPORT", &port)
    .env("PGUSER", "pwuser")
    .env("PGDATABASE", "postgres")
    .env("PGPASSWORD", "right-one")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    let registered = loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM tasker.worker_waits WHERE queue_name = 'tasker_cli_ns_queue'",
                &[],
            )
            .unwrap()
            .get(0);
        if n > 0 || t0.elapsed() > Duration::from_secs(10) || child.try_wait().unwrap().is_some() {
            break n > 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(registered, "the worker did not come up:\n{err}");
    assert!(
        err.contains(&format!(
            "connecting to host={host} port={port} dbname=postgres user=pwuser"
        )),
        "{err}"
    );
    assert!(!err.contains("right-one"), "{err}");
    assert!(out.status.success(), "graceful stop: {err}");
}

/// `--log-format json`: one JSON object per line, and a step's lines carry
/// its span — ids and the trace id of the task's traceparent.
#[test]
fn json_logs_carry_the_step_and_its_trace() {
    let cluster = Cluster::start(&repo(), "cli_json");
    let mut db = Client::connect(&cluster.url(), NoTls).expect("connect");
    db.batch_execute(
        "CREATE EXTENSION pg_tasker CASCADE;
         SELECT tasker.register_template('{\"name\": \"t\", \"namespace_name\": \"cli_tr\", \"version\": \"1.0.0\",
             \"steps\": [{\"name\": \"a\", \"handler\": {\"callable\": \"No::Such\"}}]}');",
    )
    .unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let task: String = db
        .query_one(
            "SELECT tasker.create_task('cli_tr', 't', traceparent => $1)::text",
            &[&format!("00-{trace}-00f067aa0ba902b7-01")],
        )
        .unwrap()
        .get(0);
    let child = Command::new(env!("CARGO_BIN_EXE_pg-tasker-worker"))
        .args([
            "--namespace",
            "cli_tr",
            "--environment",
            "test",
            "--log-format",
            "json",
            "--database-url",
        ])
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres",
            cluster.dir.display(),
            cluster.port
        ))
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let state: String = db
            .query_one(
                "SELECT state::text FROM tasker.workflow_steps WHERE task_uuid = $1::text::uuid",
                &[&task],
            )
            .unwrap()
            .get(0);
        if state == "error" || t0.elapsed() > Duration::from_secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let no_handler = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("NO HANDLER"))
        })
        .unwrap_or_else(|| panic!("no NO HANDLER line:\n{err}"));
    let span = &no_handler["span"];
    assert_eq!(span["trace_id"], trace, "{no_handler}");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{no_handler}");
    assert_eq!(span["namespace"], "cli_tr", "{no_handler}");
    assert_eq!(span["task_uuid"], task.as_str(), "{no_handler}");
    assert_eq!(
        span["span_id"].as_str().map(str::len),
        Some(16),
        "{no_handler}"
    );
    assert!(lines.iter().any(|l| l["fields"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("connecting to"))));
}
