//! The dashboard in a real browser: headless Chromium (Debian's package)
//! loads its pages from a live cluster; the test checks what the pages
//! show, that user text cannot become markup, paging, the DLQ actions of
//! an admin and their refusal when read-only, and saves screenshots under
//! docs/screenshots/ (shown in the README).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pg_tasker_worker::testing::Cluster;
use postgres::{Client, NoTls};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chromium(args: &[&str]) -> String {
    // (bounded: a page the browser would download instead of rendering
    // makes --dump-dom wait forever)
    let out = Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
        ])
        .args(args)
        .output()
        .expect("chromium runs (apt install chromium)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM as the browser built it.
fn dom(addr: SocketAddr, path: &str) -> String {
    chromium(&["--dump-dom", &format!("http://{addr}{path}")])
}

fn screenshot(addr: SocketAddr, path: &str, file: &str) {
    let dir = repo().join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join(file);
    chromium(&[
        &format!("--screenshot={}", target.display()),
        &format!("http://{addr}{path}"),
    ]);
    assert!(
        std::fs::metadata(&target).unwrap().len() > 10_000,
        "a real picture: {}",
        target.display()
    );
}

/// An HTTP/1.1 GET: the body.
fn get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// An HTTP/1.1 POST without a body: the status.
fn post(addr: SocketAddr, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split(' ').nth(1).unwrap().parse().unwrap()
}

fn register(db: &mut Client, t: Value) {
    db.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
}

fn create(db: &mut Client, ns: &str, name: &str) -> String {
    db.query_one("SELECT tasker.create_task($1, $2)::text", &[&ns, &name])
        .unwrap()
        .get(0)
}

/// Reads every visible message of a queue and answers each as `reply`
/// says (None: leave it with the worker).
fn work(db: &mut Client, queue: &str, reply: impl Fn(&Value) -> Option<(&'static str, Value)>) {
    let msgs: Vec<String> = db
        .query(
            "SELECT message::text FROM pgmq.read($1, 600, 100)",
            &[&queue],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for m in msgs {
        let m: Value = serde_json::from_str(&m).unwrap();
        if let Some((status, payload)) = reply(&m) {
            let (result, error) = if status == "success" {
                (Some(payload.to_string()), None)
            } else {
                (None, Some(payload.to_string()))
            };
            db.execute(
                "SELECT tasker.submit_result($1::text::uuid, $2, $3::text::jsonb, $4::text::jsonb, $5::text::jsonb)",
                &[&m["step_uuid"].as_str().unwrap(), &status, &result, &error,
                  &json!({"attempt": m["attempt"]}).to_string()],
            )
            .unwrap();
        }
    }
}

struct Dashboard {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _rt: tokio::runtime::Runtime,
}

impl Dashboard {
    fn start(url: &str) -> Dashboard {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let db = pg_tasker_worker::connection::database_config(url).unwrap();
        let (addr, _) = rt
            .block_on(pg_tasker_dashboard::serve(
                db,
                "127.0.0.1:0".parse().unwrap(),
                async {
                    let _ = stopped.await;
                },
            ))
            .unwrap();
        Dashboard {
            addr,
            stop: Some(stop),
            _rt: rt,
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

#[test]
fn the_dashboard_in_a_browser() {
    let cluster = Cluster::start(&repo(), "dashboard");
    let mut db = Client::connect(&cluster.url(), NoTls).unwrap();
    db.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
        .unwrap();
    let step = |name: &str, deps: &[&str]| {
        json!({"name": name, "dependencies": deps, "retry": {"max_attempts": 2, "backoff_base_ms": 0},
                                                 "handler": {"callable": format!("Shop::{name}")}})
    };
    register(
        &mut db,
        json!({"name": "order", "namespace_name": "shop", "version": "1.2.0",
        "description": "validate, charge and reserve, ship",
        "steps": [step("validate", &[]), step("charge", &["validate"]), step("reserve", &["validate"]),
                  step("ship", &["charge", "reserve"])]}),
    );
    let evil = "<img src=x onerror=alert(1)>";
    register(
        &mut db,
        json!({"name": "x", "namespace_name": "evil", "version": "1",
        "steps": [{"name": evil, "handler": {"callable": "E"}}]}),
    );
    let done = create(&mut db, "shop", "order");
    let blocked = create(&mut db, "shop", "order");
    let running = create(&mut db, "shop", "order");
    let evil_task = create(&mut db, "evil", "x");
    let (d, b) = (done.clone(), blocked.clone());
    for _ in 0..3 {
        work(&mut db, "tasker_shop_queue", |m| {
            let task = m["task_uuid"].as_str().unwrap();
            let step = m["step_name"].as_str().unwrap();
            if task == d || (task == b && step != "charge") {
                Some(("success", json!({"ok": true, "step": step})))
            } else if task == b {
                Some((
                    "failure",
                    json!({"message": "card declined <b>hard</b>", "retryable": false, "error_code": "DECLINED"}),
                ))
            } else if step == "validate" {
                Some(("success", json!({})))
            } else {
                None
            }
        });
    }
    work(&mut db, "tasker_evil_queue", |_| {
        Some(("success", json!({"html": "<script>alert(2)</script>"})))
    });
    // a request the orchestrator cannot turn into a task: a DLQ entry
    db.batch_execute("SELECT pgmq.send('tasker_task_requests', '{\"hello\": \"world\"}')")
        .unwrap();
    db.batch_execute("SELECT tasker.run_maintenance(ARRAY['task_requests'])")
        .unwrap();
    let state = |db: &mut Client, t: &str| -> String {
        db.query_one(
            "SELECT state::text FROM tasker.tasks WHERE task_uuid = $1::text::uuid",
            &[&t],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(state(&mut db, &done), "complete");
    assert_eq!(state(&mut db, &blocked), "blocked_by_failures");

    let url = format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.dir.display(),
        cluster.port
    );
    let dash = Dashboard::start(&url);
    let a = dash.addr;

    let overview = dom(a, "/");
    for want in [
        "Orchestrator",
        "Queues",
        "shop",
        "evil",
        "steps completed (1 h)",
        "DECLINED",
    ] {
        assert!(
            overview.contains(want),
            "overview lacks {want}:\n{overview}"
        );
    }
    let list = dom(a, "/tasks");
    for t in [&done, &blocked, &running, &evil_task] {
        assert!(list.contains(t.as_str()), "{t} missing from /tasks");
    }
    let only_blocked = dom(a, "/tasks?state=blocked_by_failures");
    assert!(
        only_blocked.contains(&blocked)
            && !only_blocked.contains(&done)
            && !only_blocked.contains(&running)
    );
    let shop_only = dom(a, "/tasks?namespace=shop&template=order");
    assert!(shop_only.contains(&done) && !shop_only.contains(&evil_task));
    assert!(
        get(a, "/tasks?since=yesterday-ish").contains("invalid input syntax"),
        "a bad filter is said"
    );

    let page = dom(a, &format!("/tasks/{blocked}"));
    assert!(page.contains("<svg"), "{page}");
    assert_eq!(page.matches("class=\"step\"").count(), 4, "{page}");
    assert!(
        page.contains("card declined &lt;b&gt;hard&lt;/b&gt;"),
        "error text escaped:\n{page}"
    );
    assert!(page.contains("blocked_by_failures"));
    let evil_page = dom(a, &format!("/tasks/{evil_task}"));
    assert!(
        !evil_page.contains("<img") && !evil_page.contains("<script>alert"),
        "user text became markup:\n{evil_page}"
    );
    assert!(
        evil_page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{evil_page}"
    );

    let templates = dom(a, "/templates");
    assert!(
        templates.contains("validate, charge and reserve, ship") && templates.contains("1.2.0")
    );
    // (Prometheus text is no page: fetched as a scraper does)
    let metrics = get(a, "/metrics");
    assert!(
        metrics.contains("pg_tasker_tasks_active{namespace=\"shop\""),
        "{metrics}"
    );

    // paging: 50 a page, then the older ones
    for _ in 0..55 {
        create(&mut db, "shop", "order");
    }
    let first = dom(a, "/tasks?namespace=shop");
    assert_eq!(first.matches("href=\"/tasks/").count(), 50);
    let next = first
        .split("id=\"next\" href=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&");
    let second = dom(a, &next);
    assert_eq!(
        second.matches("href=\"/tasks/").count(),
        58 - 50,
        "{second}"
    );
    assert!(second.contains(&done), "the oldest tasks come last");

    // the DLQ, with actions for an admin connection
    let dlq = dom(a, "/dlq");
    assert!(
        dlq.contains("invalid_task_request") && dlq.contains(">resolve<"),
        "{dlq}"
    );
    let entry: String = db
        .query_one(
            "SELECT dlq_uuid::text FROM tasker.dlq WHERE reason = 'invalid_task_request'",
            &[],
        )
        .unwrap()
        .get(0);

    screenshot(a, "/", "dashboard-overview.png");
    screenshot(a, &format!("/tasks/{blocked}"), "dashboard-task.png");
    screenshot(a, "/tasks", "dashboard-tasks.png");

    // read-only with a role that is not tasker_admin
    db.batch_execute("CREATE ROLE dash_app LOGIN; GRANT tasker_app TO dash_app")
        .unwrap();
    let ro = Dashboard::start(&url.replace("user=postgres", "user=dash_app"));
    assert_eq!(post(ro.addr, &format!("/dlq/{entry}/resolve")), 403);
    assert!(dom(ro.addr, "/dlq").contains("takes a tasker_admin connection"));
    assert!(
        dom(ro.addr, "/tasks?state=complete").contains(&done),
        "a read-only dashboard still shows tasks"
    );
    assert_eq!(post(a, &format!("/dlq/{entry}/resolve")), 303);
    let status: String = db
        .query_one(
            "SELECT resolution_status FROM tasker.dlq WHERE dlq_uuid = $1::text::uuid",
            &[&entry],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "resolved");
    assert_eq!(post(a, "/dlq/not-a-uuid/resolve"), 404);
    drop(ro);
    drop(dash);
    std::thread::sleep(Duration::from_millis(100));
}
