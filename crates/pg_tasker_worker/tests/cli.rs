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
