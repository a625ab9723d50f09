//! TLS as libpq's sslmode says, against a cluster with `ssl = on`, a
//! certificate made for the test (openssl) and a pg_hba.conf that refuses
//! TCP connections without TLS: the SDK worker and wait_for_task connect
//! with require / verify-ca / verify-full, and refuse a server whose
//! certificate their root does not sign, or that names another host — at
//! once, with the cause, not by retrying forever.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::task_state;
use pg_tasker_worker::testing::Cluster;
use pg_tasker_worker::{Outcome, Registry, StepContext, WorkerOptions};
use postgres::{Client, NoTls};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate it signs for DNS name `localhost` only, and
/// another CA that signs nothing here.
fn certificates(dir: &Path) {
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    for a in [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=pg_tasker test CA",
        ][..],
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
            "-subj",
            "/CN=another CA",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "san.ext",
        ],
    ] {
        openssl(dir, a);
    }
}

fn setup() -> (Cluster, Client, PathBuf) {
    let cluster = Cluster::start(&repo(), "tls");
    let data = cluster.dir.join("data");
    certificates(&data);
    let as_root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if as_root {
        for f in ["server.key", "server.crt"] {
            assert!(Command::new("chown")
                .args(["postgres:postgres", f])
                .current_dir(&data)
                .status()
                .unwrap()
                .success());
        }
    }
    std::fs::set_permissions(
        data.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        format!("hostnossl all all 127.0.0.1/32 reject\nhostssl all all 127.0.0.1/32 trust\n{hba}"),
    )
    .unwrap();
    let mut db = Client::connect(&cluster.url(), NoTls).expect("connect");
    // (ALTER SYSTEM cannot share a multi-statement batch: one each)
    for s in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "ALTER SYSTEM SET listen_addresses = '127.0.0.1'",
    ] {
        db.batch_execute(s).unwrap();
    }
    drop(db);
    cluster.stop();
    cluster.start_again();
    let mut db = Client::connect(&cluster.url(), NoTls).expect("connect");
    db.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
        .unwrap();
    let t = json!({"name": "flow", "namespace_name": "tls", "version": "1.0.0",
                   "steps": [{"name": "a", "handler": {"callable": "T"}}]});
    db.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
    (cluster, db, data)
}

fn tcp_url(cluster: &Cluster, host: &str, extra: &str) -> String {
    format!(
        "host={host} port={} user=postgres dbname=postgres {extra}",
        cluster.port
    )
}

#[test]
fn sslmodes_over_a_tls_only_server() {
    let (cluster, mut db, data) = setup();
    let ca = data.join("ca.crt").display().to_string();
    let other = data.join("other.crt").display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // require: a worker runs its steps over TLS (the server refuses TCP without it)
    let task: String = db
        .query_one("SELECT tasker.create_task('tls', 'flow')::text", &[])
        .unwrap()
        .get(0);
    let mut registry = Registry::new();
    registry.register("T", |_s: StepContext| async {
        Outcome::success(json!({"tls": true}))
    });
    let mut o = WorkerOptions::new(
        tcp_url(&cluster, "127.0.0.1", "sslmode=require"),
        vec!["tls".into()],
    );
    o.poll_interval = Duration::from_millis(200);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = rt.spawn(pg_tasker_worker::run(o, registry, async {
        let _ = stopped.await;
    }));
    let state = rt
        .block_on(pg_tasker_worker::wait_for_task(
            &tcp_url(
                &cluster,
                "localhost",
                &format!("sslmode=verify-full sslrootcert={ca}"),
            ),
            &task,
            Duration::from_secs(30),
        ))
        .unwrap();
    assert_eq!(state.as_deref(), Some("complete"));
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE s.ssl AND a.application_name = 'pg-tasker-worker'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the worker's connections use TLS");
    let _ = stop.send(());
    rt.block_on(worker).unwrap().unwrap();
    assert_eq!(task_state(&mut db, &task), "complete");

    let wait = |url: String| {
        rt.block_on(pg_tasker_worker::wait_for_task(
            &url,
            &task,
            Duration::from_secs(5),
        ))
    };
    // verify-ca checks the chain, not the name (the certificate names localhost only)
    assert_eq!(
        wait(tcp_url(
            &cluster,
            "127.0.0.1",
            &format!("sslmode=verify-ca sslrootcert={ca}")
        ))
        .unwrap()
        .as_deref(),
        Some("complete")
    );
    // verify-full checks the name too
    let e = wait(tcp_url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    ))
    .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // a root that did not sign the server's certificate
    let e = wait(tcp_url(
        &cluster,
        "localhost",
        &format!("sslmode=verify-full sslrootcert={other}"),
    ))
    .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // no TLS: pg_hba.conf refuses
    let e = wait(tcp_url(&cluster, "127.0.0.1", "sslmode=disable")).unwrap_err();
    assert!(e.contains("no encryption") || e.contains("pg_hba"), "{e}");

    // a worker whose root does not sign the server's certificate stops at
    // start-up with the cause (it is not a server that is not up yet)
    let o = WorkerOptions::new(
        tcp_url(
            &cluster,
            "localhost",
            &format!("sslmode=verify-full sslrootcert={other}"),
        ),
        vec!["tls".into()],
    );
    let started = std::time::Instant::now();
    let e = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                pg_tasker_worker::run(o, Registry::new(), std::future::pending::<()>()),
            )
            .await
        })
        .expect("refused at start-up, not retried")
        .unwrap_err();
    assert!(
        e.contains("certificate") && e.contains("sslrootcert"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
