//! pg_tasker benchmark harness.
//!
//! ```text
//! cargo run --release -p pg_tasker_bench -- [--quick] [--json FILE]
//!     [--scenarios idle,p1,pgbench,p2,p3,sdk,p5,sustained,p4,commit,relay]
//! ```
//! Starts its own throwaway cluster with pg_tasker preloaded (the installed
//! extension: run `cargo pgrx install --release` first), runs the scenarios,
//! prints a table per scenario and writes every figure as JSON
//! (default target/bench/results.json). Figures only: nothing is asserted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pg_tasker_worker::testing::Cluster;
use postgres::{Client, NoTls};
use serde_json::{json, Value};

struct Bench {
    cluster: Cluster,
    quick: bool,
    results: BTreeMap<String, Value>,
}

fn connect(c: &Cluster) -> Client {
    Client::connect(&c.url(), NoTls).expect("connect")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Machine-wide CPU counters (busy, total) from /proc/stat.
fn cpu_counters() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Percent of all cores busy between two `cpu_counters` readings.
fn busy_percent(a: (u64, u64), b: (u64, u64)) -> f64 {
    let (busy, total) = (b.0 - a.0, b.1 - a.1);
    if total == 0 {
        0.0
    } else {
        busy as f64 * 100.0 / total as f64
    }
}

fn step(name: &str, deps: &[&str]) -> Value {
    json!({"name": name, "dependencies": deps, "handler": {"callable": "Noop"}, "retry": {"max_attempts": 3}})
}

fn linear(ns: &str, n: usize) -> Value {
    let steps: Vec<Value> = (0..n)
        .map(|i| {
            let dep = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            let deps: Vec<&str> = dep.iter().map(String::as_str).collect();
            step(&format!("s{i}"), &deps)
        })
        .collect();
    json!({"name": "linear", "namespace_name": ns, "version": "1.0.0", "steps": steps})
}

fn diamond(ns: &str) -> Value {
    json!({"name": "diamond", "namespace_name": ns, "version": "1.0.0", "steps": [
        step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["a"]), step("e", &["b", "c", "d"])]})
}

fn register(db: &mut Client, t: &Value) {
    db.execute(
        "SELECT tasker.register_template($1::text::jsonb)",
        &[&t.to_string()],
    )
    .unwrap();
}

/// How a no-op worker talks to pg_tasker.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    /// The plain protocol, one message per read: pgmq.read(q, 30, 1), then
    /// tasker.submit_result.
    Plain,
    /// The batched protocol: tasker.exchange with the previous batch's
    /// results and room for `n` messages; one round trip, one commit.
    Batched(i32),
}

/// How long a no-op worker waits after a read that found nothing.
struct Idle(Duration);

impl Default for Idle {
    fn default() -> Self {
        Idle(Duration::from_micros(200))
    }
}

impl Idle {
    fn wait(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(10));
    }

    fn reset(&mut self) {
        *self = Idle::default();
    }
}

/// One no-op worker on its own connection: takes step messages and reports
/// each as a success; until `total` steps are done across workers.
fn noop_worker(
    url: String,
    ns: String,
    protocol: Protocol,
    done: Arc<AtomicUsize>,
    limit: Arc<AtomicUsize>,
    start: Arc<Barrier>,
) {
    let mut c = Client::connect(&url, NoTls).unwrap();
    let queue = format!("tasker_{ns}_queue");
    let read = c
        .prepare("SELECT message->>'step_uuid' FROM pgmq.read($1, 30, 1)")
        .unwrap();
    let submit = c
        .prepare("SELECT tasker.submit_result($1::text::uuid, 'success')")
        .unwrap();
    let exchange = c
        .prepare(
            "SELECT message->>'step_uuid' FROM tasker.exchange(ARRAY[$1], 'bench', $2::text::jsonb, $3, 30)",
        )
        .unwrap();
    let mut results: Vec<Value> = Vec::new();
    // an empty read waits before the next one, from 0.2 ms doubling up to
    // 10 ms (a real worker waits for a wakeup; one that polled every 0.2 ms
    // would take the CPU the producers of its work need: the sustained
    // scenario's feeder, starved by 8 such workers, once cut it to a fifth)
    let mut idle = Idle::default();
    start.wait();
    loop {
        let total = limit.load(Ordering::SeqCst);
        match protocol {
            Protocol::Plain => {
                if done.load(Ordering::SeqCst) >= total {
                    break;
                }
                let rows = c.query(&read, &[&queue]).unwrap();
                if rows.is_empty() {
                    idle.wait();
                    continue;
                }
                idle.reset();
                for r in rows {
                    let step: String = r.get(0);
                    c.query_one(&submit, &[&step]).unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
            Protocol::Batched(n) => {
                let finished = done.fetch_add(results.len(), Ordering::SeqCst) + results.len();
                let qty = if finished >= total { 0 } else { n };
                if results.is_empty() && qty == 0 {
                    break;
                }
                let batch = Value::from(std::mem::take(&mut results)).to_string();
                let rows = c.query(&exchange, &[&ns, &batch, &qty]).unwrap();
                if rows.is_empty() && qty > 0 {
                    if done.load(Ordering::SeqCst) >= total {
                        break;
                    }
                    idle.wait();
                } else {
                    idle.reset();
                }
                for r in rows {
                    let step: String = r.get(0);
                    results.push(json!({"step_uuid": step, "status": "success"}));
                }
            }
        }
    }
}

/// Drains `tasks` pre-created tasks of `template` with `n` workers; steps/s.
fn drain(
    b: &Bench,
    ns: &str,
    template: &str,
    tasks: usize,
    steps_per_task: usize,
    n: usize,
    protocol: Protocol,
) -> f64 {
    drain_with_cpu(b, ns, template, tasks, steps_per_task, n, protocol).0
}

/// `drain`, and how busy the machine's cores were meanwhile (%).
fn drain_with_cpu(
    b: &Bench,
    ns: &str,
    template: &str,
    tasks: usize,
    steps_per_task: usize,
    n: usize,
    protocol: Protocol,
) -> (f64, f64) {
    let mut db = connect(&b.cluster);
    db.execute(
        "SELECT count(*) FROM (SELECT tasker.create_task($1, $2) FROM generate_series(1, $3)) x",
        &[&ns, &template, &(tasks as i32)],
    )
    .unwrap();
    let total = tasks * steps_per_task;
    let done = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (url, ns, d, s) = (b.cluster.url(), ns.to_string(), done.clone(), start.clone());
            let limit = Arc::new(AtomicUsize::new(total));
            std::thread::spawn(move || noop_worker(url, ns, protocol, d, limit, s))
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let cpu0 = cpu_counters();
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = t0.elapsed();
    let busy = busy_percent(cpu0, cpu_counters());
    let complete: i64 = db
        .query_one(
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = $1 AND state = 'complete'",
            &[&ns],
        )
        .unwrap()
        .get(0);
    assert_eq!(complete as usize, tasks, "every task completed");
    (total as f64 / elapsed.as_secs_f64(), busy)
}

/// The floor: `n` clients each doing send → read → archive of one message.
fn baseline(b: &Bench, messages: usize, n: usize) -> f64 {
    baseline_with_cpu(b, messages, n).0
}

fn baseline_with_cpu(b: &Bench, messages: usize, n: usize) -> (f64, f64) {
    let mut db = connect(&b.cluster);
    db.batch_execute("SELECT pgmq.create('bench_baseline')")
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (url, d, s) = (b.cluster.url(), done.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&url, NoTls).unwrap();
                let send = c
                    .prepare("SELECT * FROM pgmq.send('bench_baseline', '{\"step\": 1}'::jsonb)")
                    .unwrap();
                let read = c
                    .prepare("SELECT msg_id FROM pgmq.read('bench_baseline', 30, 1)")
                    .unwrap();
                let archive = c
                    .prepare("SELECT pgmq.archive('bench_baseline', $1::bigint)")
                    .unwrap();
                s.wait();
                while d.fetch_add(1, Ordering::SeqCst) < messages {
                    c.query_one(&send, &[]).unwrap();
                    if let Some(r) = c.query(&read, &[]).unwrap().first() {
                        let id: i64 = r.get(0);
                        c.query_one(&archive, &[&id]).unwrap();
                    }
                }
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let cpu0 = cpu_counters();
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = t0.elapsed();
    let busy = busy_percent(cpu0, cpu_counters());
    db.batch_execute("SELECT pgmq.drop_queue('bench_baseline')")
        .unwrap();
    (messages as f64 / elapsed.as_secs_f64(), busy)
}

/// CPU time of the whole machine per unit of work (ms), from the share of
/// the cores that were busy.
fn cpu_ms_per(busy_percent: f64, per_second: f64) -> f64 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    busy_percent / 100.0 * cores * 1000.0 / per_second
}

fn p1(b: &mut Bench) {
    let tasks: usize = std::env::var("BENCH_P1_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if b.quick { 300 } else { 2000 });
    let only_n: Option<usize> = std::env::var("BENCH_P1_N")
        .ok()
        .and_then(|v| v.parse().ok());
    // BENCH_P1_KINDS: a subset of pl,pd,bl,bd,bs (plain/batched linear/diamond, bare) to run
    let kinds: Option<String> = std::env::var("BENCH_P1_KINDS").ok();
    let skipped = |kind: &str| {
        kinds
            .as_ref()
            .is_some_and(|k| !k.split(',').any(|x| x == kind))
    };
    println!("\nP1 throughput: {tasks} tasks of 5 steps, no-op workers, steps/s; baseline: pgmq send→read→archive of one message");
    println!("   plain: pgmq.read(1) + submit_result per step; batched: tasker.exchange, 10 per round trip; cpu: ms of machine CPU per step/message");
    println!(
        "{:>3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "N",
        "plain lin",
        "plain dia",
        "batch lin",
        "batch dia",
        "baseline",
        "pl/base",
        "ba/base",
        "cpu pl",
        "cpu ba",
        "cpu bs"
    );
    let mut rows = Vec::new();
    for n in [1usize, 2, 4, 8] {
        if only_n.is_some_and(|o| o != n) {
            continue;
        }
        let mut db = connect(&b.cluster);
        let mut rate = |kind: &str, template: &Value, name: &str, protocol: Protocol| {
            if skipped(kind) {
                return (f64::NAN, f64::NAN);
            }
            let ns = format!("p1_{kind}_{n}");
            let mut t = template.clone();
            t["namespace_name"] = json!(ns);
            register(&mut db, &t);
            drain_with_cpu(b, &ns, name, tasks, 5, n, protocol)
        };
        let (pl, pl_cpu) = rate("pl", &linear("x", 5), "linear", Protocol::Plain);
        let (pd, _) = rate("pd", &diamond("x"), "diamond", Protocol::Plain);
        let (bl, bl_cpu) = rate("bl", &linear("x", 5), "linear", Protocol::Batched(10));
        let (bd, _) = rate("bd", &diamond("x"), "diamond", Protocol::Batched(10));
        let (base, base_cpu) = if skipped("bs") {
            (f64::NAN, f64::NAN)
        } else {
            baseline_with_cpu(b, tasks * 5, n)
        };
        let (cpl, cbl, cbs) = (
            cpu_ms_per(pl_cpu, pl),
            cpu_ms_per(bl_cpu, bl),
            cpu_ms_per(base_cpu, base),
        );
        println!(
            "{n:>3} {pl:>9.0} {pd:>9.0} {bl:>9.0} {bd:>9.0} {base:>9.0} {:>7.2} {:>7.2} {cpl:>7.3} {cbl:>7.3} {cbs:>7.3}",
            pl / base,
            bl / base,
        );
        rows.push(json!({"n": n, "plain_linear_steps_per_s": pl, "plain_diamond_steps_per_s": pd,
                         "batched_linear_steps_per_s": bl, "batched_diamond_steps_per_s": bd,
                         "baseline_msgs_per_s": base, "plain_ratio": pl / base, "batched_ratio": bl / base,
                         "plain_diamond_ratio": pd / base, "batched_diamond_ratio": bd / base,
                         "cpu_ms_per_step_plain": cpl, "cpu_ms_per_step_batched": cbl, "cpu_ms_per_message_baseline": cbs,
                         "cpu_busy_percent_plain": pl_cpu, "cpu_busy_percent_batched": bl_cpu,
                         "cpu_busy_percent_baseline": base_cpu}));
    }
    b.results
        .insert("p1".into(), json!({"tasks": tasks, "rows": rows}));
}

/// P1's linear tasks of 5 steps at N = 8 (or BENCH_P1_N), plain and batched,
/// with a boolean setting off and on in turn (ALTER SYSTEM), three rounds,
/// in the same run: what the setting changes, measured beside itself.
/// `probe` counts something per round (or returns None). Returns the rows.
fn alternate(
    b: &mut Bench,
    setting: &str,
    title: &str,
    mut probe: impl FnMut() -> Option<i64>,
) -> (usize, usize, Vec<Value>) {
    let tasks = if b.quick { 300 } else { 1000 };
    let n: usize = std::env::var("BENCH_P1_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut db = connect(&b.cluster);
    println!("\n{title}, N = {n}, {tasks} linear tasks of 5 steps a run, steps/s");
    println!(
        "{:>6} {:>6} {:>10} {:>10} {:>10}",
        "round", "setting", "plain", "batched", "probe"
    );
    let tag = setting.trim_start_matches("pg_tasker.").replace('.', "_");
    let mut rows = Vec::new();
    for round in 1..=3 {
        for on in [false, true] {
            db.batch_execute(&format!("ALTER SYSTEM SET {setting} = {on}"))
                .unwrap();
            db.batch_execute("SELECT pg_reload_conf()").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let mut rate = |kind: &str, protocol: Protocol| {
                let ns = format!("{tag}_{kind}_{round}_{on}");
                let mut t = linear("x", 5);
                t["namespace_name"] = json!(ns);
                register(&mut db, &t);
                drain(b, &ns, "linear", tasks, 5, n, protocol)
            };
            let before = probe();
            let pl = rate("pl", Protocol::Plain);
            let bl = rate("bl", Protocol::Batched(10));
            let counted = probe().zip(before).map(|(a, b)| a - b);
            let mode = if on { "on" } else { "off" };
            let shown = counted.map_or("-".to_string(), |c| c.to_string());
            println!("{round:>6} {mode:>6} {pl:>10.0} {bl:>10.0} {shown:>10}");
            rows.push(
                json!({"round": round, "on": on, "plain_steps_per_s": pl, "batched_steps_per_s": bl,
                             "probe": counted}),
            );
        }
    }
    db.batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    (n, tasks, rows)
}

/// The relay of task events (docs/operations.md, Task events) against
/// each transaction's own NOTIFY (pg_tasker.relay_notifications off and on
/// in turn); the probe: the events the orchestrator relayed meanwhile.
fn relay(b: &mut Bench) {
    let mut probe = connect(&b.cluster);
    let (n, tasks, rows) = alternate(
        b,
        "pg_tasker.relay_notifications",
        "Relay of task events (off: each transaction NOTIFYs itself; probe: events relayed)",
        || {
            Some(
                probe
                    .query_one(
                        "SELECT (tasker.health() -> 'orchestrator' ->> 'relayed_notifications')::bigint",
                        &[],
                    )
                    .unwrap()
                    .get(0),
            )
        },
    );
    b.results.insert(
        "relay".into(),
        json!({"n": n, "tasks": tasks, "rows": rows}),
    );
}

/// Results in one statement (tasker._complete_alone) against the general
/// path (pg_tasker.one_statement_results off and on in turn).
fn one_statement(b: &mut Bench) {
    let (n, tasks, rows) = alternate(
        b,
        "pg_tasker.one_statement_results",
        "Results in one statement (off: every result the general way)",
        || None,
    );
    b.results.insert(
        "one_statement".into(),
        json!({"n": n, "tasks": tasks, "rows": rows}),
    );
}

/// The pgbench method (one message per read): pgbench clients run the bare
/// pgmq cycle (send; read 1; archive) and pg_tasker's plain protocol (read
/// 1; submit_result) as scripts, in the same run.
fn pgbench(b: &mut Bench) {
    let tasks: usize = if b.quick { 500 } else { 2000 };
    let dir = std::env::temp_dir().join(format!("pg_tasker_pgbench_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bare = dir.join("bare.sql");
    std::fs::write(
        &bare,
        "SELECT pgmq.send('pgb_bare', '{\"step\": 1}'::jsonb);\n\
         SELECT coalesce((SELECT msg_id FROM pgmq.read('pgb_bare', 30, 1)), 0) AS msg_id \\gset\n\
         SELECT pgmq.archive('pgb_bare', :msg_id::bigint);\n",
    )
    .unwrap();
    let step = dir.join("tasker.sql");
    println!("\npgbench, one message per read: transactions/s of each script (bare cycle = 3 transactions)");
    println!(
        "{:>3} {:>12} {:>12} {:>7}",
        "N", "bare cycle/s", "steps/s", "ratio"
    );
    let mut rows = Vec::new();
    for n in [1usize, 2, 4, 8] {
        let mut db = connect(&b.cluster);
        let ns = format!("pgb_{n}");
        let mut t = linear("x", 5);
        t["namespace_name"] = json!(ns);
        register(&mut db, &t);
        db.execute(
            "SELECT count(*) FROM (SELECT tasker.create_task($1, 'linear') FROM generate_series(1, $2)) x",
            &[&ns, &(tasks as i32)],
        )
        .unwrap();
        std::fs::write(
            &step,
            format!(
                "SELECT (m IS NOT NULL)::int AS got, coalesce(m->>'step_uuid', '') AS step
                   FROM (SELECT (SELECT message FROM pgmq.read('tasker_{ns}_queue', 30, 1)) AS m) x \\gset\n\
                 \\if :got\n\
                 SELECT tasker.submit_result(:step::uuid, 'success');\n\
                 \\endif\n"
            ),
        )
        .unwrap();
        db.batch_execute("SELECT pgmq.create('pgb_bare')").unwrap();
        // leave a fifth of the steps: the queue never runs dry
        let per_client = (tasks * 4 / n).max(1);
        let bare_tps = run_pgbench(b, &bare, n, (tasks * 5 / n).max(1));
        let step_tps = run_pgbench(b, &step, n, per_client);
        db.batch_execute("SELECT pgmq.drop_queue('pgb_bare')")
            .unwrap();
        println!(
            "{n:>3} {bare_tps:>12.0} {step_tps:>12.0} {:>7.2}",
            step_tps / bare_tps
        );
        rows.push(json!({"n": n, "bare_cycles_per_s": bare_tps, "steps_per_s": step_tps, "ratio": step_tps / bare_tps}));
    }
    let _ = std::fs::remove_dir_all(&dir);
    b.results
        .insert("pgbench".into(), json!({"tasks": tasks, "rows": rows}));
}

fn run_pgbench(b: &Bench, script: &Path, clients: usize, transactions: usize) -> f64 {
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args(["-n", "-M", "prepared", "-h"])
        .arg(&b.cluster.dir)
        .args([
            "-p",
            &b.cluster.port.to_string(),
            "-U",
            "postgres",
            "-c",
            &clients.to_string(),
        ])
        .args([
            "-j",
            &clients.min(2).to_string(),
            "-t",
            &transactions.to_string(),
            "-f",
        ])
        .arg(script)
        .arg("postgres")
        .output()
        .expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// P2: a parent's submit_result returns (committed) → its child's message
/// is readable by another connection. A reader spins on pgmq.read.
fn p2(b: &mut Bench) {
    let stages = if b.quick { 200 } else { 1000 };
    let mut db = connect(&b.cluster);
    register(&mut db, &linear("p2", 2));
    let mut reader = connect(&b.cluster);
    let read = reader.prepare("SELECT message->>'step_uuid', message->>'step_name' FROM pgmq.read('tasker_p2_queue', 30, 1)").unwrap();
    let submit = db
        .prepare("SELECT tasker.submit_result($1::text::uuid, 'success')")
        .unwrap();
    let (mut to_visible, mut submit_rt) = (Vec::new(), Vec::new());
    for _ in 0..stages {
        db.execute("SELECT tasker.create_task('p2', 'linear')", &[])
            .unwrap();
        let root: String = loop {
            if let Some(r) = reader.query(&read, &[]).unwrap().first() {
                break r.get(0);
            }
        };
        let t0 = Instant::now();
        db.query_one(&submit, &[&root]).unwrap();
        let committed = Instant::now();
        let child: String = loop {
            if let Some(r) = reader.query(&read, &[]).unwrap().first() {
                break r.get(0);
            }
        };
        let seen = Instant::now();
        submit_rt.push(ms(committed - t0));
        to_visible.push(ms(seen - committed));
        db.query_one(&submit, &[&child]).unwrap();
    }
    to_visible.sort_by(f64::total_cmp);
    submit_rt.sort_by(f64::total_cmp);
    println!("\nP2 stage latency over {stages} stages (ms)");
    println!("{:<44} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    println!(
        "{:<44} {:>8.3} {:>8.3} {:>8.3}",
        "parent commit → child readable (other conn.)",
        percentile(&to_visible, 0.5),
        percentile(&to_visible, 0.99),
        to_visible.last().unwrap()
    );
    println!(
        "{:<44} {:>8.3} {:>8.3} {:>8.3}",
        "submit_result round trip (incl. commit)",
        percentile(&submit_rt, 0.5),
        percentile(&submit_rt, 0.99),
        submit_rt.last().unwrap()
    );
    b.results.insert("p2".into(), json!({"stages": stages,
        "commit_to_readable_ms": {"p50": percentile(&to_visible, 0.5), "p99": percentile(&to_visible, 0.99)},
        "submit_result_ms": {"p50": percentile(&submit_rt, 0.5), "p99": percentile(&submit_rt, 0.99)},
        "submit_plus_readable_ms": {"p50": percentile(&submit_rt, 0.5) + percentile(&to_visible, 0.5)}}));
}

/// P3: create_task → task complete, linear 4 steps, one hot worker.
fn p3(b: &mut Bench) {
    let tasks = if b.quick { 100 } else { 500 };
    let mut db = connect(&b.cluster);
    register(&mut db, &linear("p3", 4));
    let mut w = connect(&b.cluster);
    let read = w
        .prepare("SELECT message->>'step_uuid' FROM pgmq.read('tasker_p3_queue', 30, 1)")
        .unwrap();
    let submit = w
        .prepare("SELECT tasker.submit_result($1::text::uuid, 'success')")
        .unwrap();
    // a client waiting for its tasks (docs/operations.md, Task events):
    // the last result's commit → its `tasker_events` notification
    let mut events = connect(&b.cluster);
    events.batch_execute("LISTEN tasker_events").unwrap();
    let (mut lat, mut event_lat) = (Vec::new(), Vec::new());
    for _ in 0..tasks {
        let t0 = Instant::now();
        let task: String = db
            .query_one("SELECT tasker.create_task('p3', 'linear')::text", &[])
            .unwrap()
            .get(0);
        let mut done = 0;
        while done < 4 {
            if let Some(r) = w.query(&read, &[]).unwrap().first() {
                let s: String = r.get(0);
                w.query_one(&submit, &[&s]).unwrap();
                done += 1;
            }
        }
        let committed = Instant::now();
        lat.push(ms(committed - t0));
        let mut notes = events.notifications();
        let mut it = notes.timeout_iter(Duration::from_secs(10));
        loop {
            let n = postgres::fallible_iterator::FallibleIterator::next(&mut it)
                .unwrap()
                .expect("a task event within 10 s");
            let e: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
            if e["task_uuid"] == task.as_str() {
                event_lat.push(ms(committed.elapsed()));
                break;
            }
        }
    }
    let open: i64 = db
        .query_one(
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'p3' AND state <> 'complete'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    lat.sort_by(f64::total_cmp);
    event_lat.sort_by(f64::total_cmp);
    println!(
        "\nP3 end-to-end, linear 4 steps, one hot worker, {tasks} tasks (ms): p50 {:.2}  p99 {:.2}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!(
        "  last result's commit → its task event received (ms): p50 {:.2}  p99 {:.2}",
        percentile(&event_lat, 0.5),
        percentile(&event_lat, 0.99)
    );
    b.results.insert(
        "p3".into(),
        json!({"tasks": tasks, "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
               "event_after_commit_ms": {"p50": percentile(&event_lat, 0.5), "p99": percentile(&event_lat, 0.99)}}),
    );
}

/// Adds finished tasks (with one step and their transitions) as history.
fn add_history(db: &mut Client, upto: i64) {
    let have: i64 = db
        .query_one(
            "SELECT count(*) FROM tasker.tasks WHERE namespace_name = 'p4_hist'",
            &[],
        )
        .unwrap()
        .get(0);
    if have >= upto {
        return;
    }
    let add = upto - have;
    db.batch_execute(&format!(
        "WITH t AS (
            INSERT INTO tasker.tasks (template_uuid, namespace_name, task_name, task_version, state, steps_total,
                                      steps_pending, steps_done, transitions, completed_at, created_at)
            SELECT (SELECT template_uuid FROM tasker.templates WHERE namespace = 'p4_hist'), 'p4_hist', 'linear', '1.0.0',
                   'complete', 1, 0, 1, 2, now() - interval '1 hour', now() - interval '2 hours'
            FROM generate_series(1, {add})
            RETURNING task_uuid
         ), s AS (
            INSERT INTO tasker.workflow_steps (task_uuid, name, position, state, handler_callable, attempts, queue_msg_id,
                                               enqueued_at, completed_at, results, transitions)
            SELECT task_uuid, 's0', 0, 'complete', 'Noop', 1, 0, now() - interval '2 hours', now() - interval '1 hour',
                   '{{}}'::jsonb, 3 FROM t
            RETURNING step_uuid
         ), st AS (
            INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state)
            SELECT step_uuid, k, CASE k WHEN 1 THEN NULL WHEN 2 THEN 'pending' ELSE 'enqueued' END::tasker.step_state,
                   CASE k WHEN 1 THEN 'pending' WHEN 2 THEN 'enqueued' ELSE 'complete' END::tasker.step_state
            FROM s, generate_series(1, 3) k
         )
         INSERT INTO tasker.task_transitions (task_uuid, sort_key, from_state, to_state)
         SELECT task_uuid, k, CASE k WHEN 1 THEN NULL ELSE 'steps_in_process' END::tasker.task_state,
                CASE k WHEN 1 THEN 'steps_in_process' ELSE 'complete' END::tasker.task_state
         FROM t, generate_series(1, 2) k;"
    ))
    .unwrap();
    // as autovacuum would leave them, before anything is timed (else it
    // runs during the measurement, on the same two cores)
    for t in [
        "tasks",
        "workflow_steps",
        "step_transitions",
        "task_transitions",
    ] {
        db.batch_execute(&format!("VACUUM (ANALYZE) tasker.{t}"))
            .unwrap();
    }
}

/// P4: claim/readiness cost and throughput as finished history grows.
fn p4(b: &mut Bench) {
    let sizes: Vec<i64> = if b.quick {
        vec![10_000, 100_000]
    } else {
        vec![10_000, 100_000, 1_000_000]
    };
    let mut db = connect(&b.cluster);
    register(&mut db, &linear("p4_hist", 1));
    register(&mut db, &linear("p4_due", 1));
    println!("\nP4 history: cost with N finished tasks in the tables (ms per call: median / p10 of 1,000)");
    println!(
        "{:>10} {:>16} {:>16} {:>16} {:>12}",
        "history", "ready_tasks", "claim(10)", "step_readiness", "P1 lin N=4"
    );
    let mut rows = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let t0 = Instant::now();
        add_history(&mut db, *size);
        let fill = t0.elapsed();
        // 50 due tasks (a retry's worth of work) to look for
        db.batch_execute(
            "SELECT tasker.create_task('p4_due', 'linear') FROM generate_series(1, 50);
             UPDATE tasker.tasks SET next_action_at = now() - interval '1 second' WHERE namespace_name = 'p4_due' AND state <> 'complete';",
        )
        .unwrap();
        let some_task: String = db
            .query_one(
                "SELECT task_uuid::text FROM tasker.tasks WHERE namespace_name = 'p4_due' LIMIT 1",
                &[],
            )
            .unwrap()
            .get(0);
        // median and 10th percentile of 1,000 timed calls, each in a
        // rolled-back transaction (sub-millisecond calls: the p10 shows the
        // cost without scheduling noise)
        let time = |db: &mut Client, sql: &str| -> (f64, f64) {
            let stmt = db.prepare(sql).unwrap();
            let mut v: Vec<f64> = (0..1000)
                .map(|_| {
                    let mut tx = db.transaction().unwrap();
                    let t = Instant::now();
                    tx.query(&stmt, &[]).unwrap();
                    let d = ms(t.elapsed());
                    tx.rollback().unwrap();
                    d
                })
                .collect();
            v.sort_by(f64::total_cmp);
            (percentile(&v, 0.5), percentile(&v, 0.1))
        };
        let ready = time(&mut db, "SELECT count(*) FROM tasker.ready_tasks");
        let claim = time(
            &mut db,
            "SELECT * FROM tasker.claim_ready_tasks('bench', 10)",
        );
        let readiness = time(
            &mut db,
            &format!("SELECT * FROM tasker.step_readiness('{some_task}')"),
        );
        let ns = format!("p4_tp_{i}");
        register(&mut db, &linear(&ns, 5));
        let tput = drain(
            b,
            &ns,
            "linear",
            if b.quick { 200 } else { 1000 },
            5,
            4,
            Protocol::Batched(10),
        );
        let pair = |p: (f64, f64)| format!("{:.3} / {:.3}", p.0, p.1);
        println!(
            "{size:>10} {:>16} {:>16} {:>16} {tput:>12.0}   (history filled in {:.1}s)",
            pair(ready),
            pair(claim),
            pair(readiness),
            fill.as_secs_f64()
        );
        rows.push(json!({"history": size,
            "ready_tasks_ms": {"median": ready.0, "p10": ready.1},
            "claim_ms": {"median": claim.0, "p10": claim.1},
            "step_readiness_ms": {"median": readiness.0, "p10": readiness.1},
            "p1_linear_n4_steps_per_s": tput}));
        db.batch_execute(
            "UPDATE tasker.tasks SET next_action_at = NULL WHERE namespace_name = 'p4_due'",
        )
        .unwrap();
    }
    b.results.insert("p4".into(), json!({"rows": rows}));
}

/// P5: one task, 10,000 parallel steps joining into one, against linear
/// tasks at the same N in the same run (batched protocol, 4 workers).
fn p5(b: &mut Bench) {
    // (a root, the branches and the join: at most the 10,000 steps a
    // template may have)
    let width = if b.quick { 1000 } else { 9_998 };
    let mut db = connect(&b.cluster);
    let mut steps = vec![step("root", &[])];
    let names: Vec<String> = (0..width).map(|i| format!("b{i}")).collect();
    for n in &names {
        steps.push(step(n, &["root"]));
    }
    let deps: Vec<&str> = names.iter().map(String::as_str).collect();
    steps.push(step("join", &deps));
    register(
        &mut db,
        &json!({"name": "wide", "namespace_name": "p5", "version": "1.0.0", "steps": steps}),
    );
    // (BENCH_P5_N: the number of workers, 4 unless set)
    let n: usize = std::env::var("BENCH_P5_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let rate = drain(b, "p5", "wide", 1, width + 2, n, Protocol::Batched(10));
    register(&mut db, &linear("p5_lin", 5));
    let lin = drain(
        b,
        "p5_lin",
        "linear",
        (width + 2) / 5,
        5,
        n,
        Protocol::Batched(10),
    );
    let join: (i32, i64) = {
        let r = db
            .query_one(
                "SELECT s.attempts, (SELECT count(*) FROM tasker.step_transitions st WHERE st.step_uuid = s.step_uuid AND st.to_state = 'enqueued')
                   FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid) WHERE t.namespace_name = 'p5' AND s.name = 'join'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    // where the drain's time went, from the steps' rows (times are their
    // transactions' start): the root's completion until another worker
    // first took a branch (the fan-out's transaction, whose worker takes its
    // first branches itself: the others have nothing to do meanwhile), the
    // branches, the last branch's completion until the join's (its release
    // with every branch's result, its attempt)
    let phases: (f64, f64, f64) = {
        let r = db
            .query_one(
                "WITH s AS (SELECT s.name, s.started_at, s.completed_at FROM tasker.workflow_steps s
                            JOIN tasker.tasks t USING (task_uuid) WHERE t.namespace_name = 'p5'),
                      r AS (SELECT completed_at AS root FROM s WHERE name = 'root'),
                      b AS (SELECT min(started_at) FILTER (WHERE started_at > r.root) AS first, max(completed_at) AS last
                            FROM s, r WHERE name LIKE 'b%')
                 SELECT (extract(epoch FROM b.first - r.root) * 1000)::float8,
                        (extract(epoch FROM b.last - b.first) * 1000)::float8,
                        (extract(epoch FROM (SELECT completed_at FROM s WHERE name = 'join') - b.last) * 1000)::float8
                 FROM b, r",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let branches_rate = width as f64 / (phases.1 / 1000.0);
    println!("\nP5 wide fan-out/fan-in: 1 task, {width} parallel steps → join, {n} batched workers: {rate:.0} steps/s \
              = {:.2} × linear ({lin:.0} steps/s, same N); join enqueued {} time(s), attempts {}", rate / lin, join.1, join.0);
    println!("  drain {:.0} ms: root's fan-out → first branch taken {:.0} ms, branches {:.0} ms ({branches_rate:.0} steps/s \
              = {:.2} × linear), last branch → join complete {:.0} ms",
             (width + 2) as f64 / rate * 1000.0, phases.0, phases.1, branches_rate / lin, phases.2);
    b.results.insert("p5".into(), json!({"width": width, "workers": n, "steps_per_s": rate, "linear_steps_per_s": lin,
                                         "ratio_to_linear": rate / lin, "join_enqueued": join.1, "join_attempts": join.0,
                                         "fan_out_ms": phases.0, "branches_ms": phases.1, "join_ms": phases.2,
                                         "branches_ratio_to_linear": branches_rate / lin}));
}

/// Sustained load: N = 8 batched workers for `secs`, a feeder keeping the
/// queue stocked; per interval the throughput, the sizes of the tables the
/// hot path writes and their dead tuples (autovacuum as configured).
fn sustained(b: &mut Bench) {
    let secs: u64 = if b.quick { 60 } else { 600 };
    let interval = Duration::from_secs(if b.quick { 10 } else { 60 });
    let n = 8;
    let ns = "sustained";
    let mut db = connect(&b.cluster);
    register(&mut db, &linear(ns, 5));
    let queue = format!("tasker_{ns}_queue");
    // A queue table churns (every message: an insert, an update per read,
    // a delete): with autovacuum's defaults (one visit a minute, 20 % of
    // the table dead first) its dead rows pile up between visits and slow
    // every read. The recommended settings (docs/operations.md) unless
    // BENCH_AUTOVACUUM=default.
    let tuned = std::env::var("BENCH_AUTOVACUUM").map_or(true, |v| v != "default");
    if tuned {
        db.batch_execute("ALTER SYSTEM SET autovacuum_naptime = '10s'")
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
        db.batch_execute(&format!(
            "ALTER TABLE pgmq.q_{queue} SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                            autovacuum_vacuum_cost_delay = 0)"
        ))
        .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    // the feeder keeps 2,000 to 2,500 steps to do, counting what it created
    // against what the workers finished (no query of the queue: a count of
    // a queue table scans its dead rows too)
    let feeder = {
        let (url, stop, done) = (b.cluster.url(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&url, NoTls).unwrap();
            let mut created = 0usize;
            let backlog: usize = std::env::var("BENCH_BACKLOG")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000);
            let batch: usize = std::env::var("BENCH_FEED_BATCH")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            while !stop.load(Ordering::SeqCst) {
                if created * 5 < done.load(Ordering::SeqCst) + backlog {
                    c.execute(
                        "SELECT count(*) FROM (SELECT tasker.create_task('sustained', 'linear') FROM generate_series(1, $1)) x",
                        &[&(batch as i32)],
                    )
                    .unwrap();
                    created += batch;
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let limit = Arc::new(AtomicUsize::new(usize::MAX));
    let start = Arc::new(Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (url, d, l, s) = (b.cluster.url(), done.clone(), limit.clone(), start.clone());
            std::thread::spawn(move || {
                noop_worker(url, ns.to_string(), Protocol::Batched(10), d, l, s)
            })
        })
        .collect();
    start.wait();
    println!("\nSustained: N = {n} batched workers, {secs} s, a feeder keeps 2,000-2,500 steps to do; autovacuum {}; per interval:",
             if tuned { "naptime 10 s, queue table: scale factor 0, threshold 5000, no cost delay" } else { "as configured (defaults)" });
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "t (s)",
        "steps/s",
        "tasks MB",
        "steps MB",
        "audit MB",
        "queue MB",
        "arch MB",
        "dead st",
        "dead tk",
        "dead q"
    );
    let size_sql = format!(
        "SELECT pg_total_relation_size('tasker.tasks'), pg_total_relation_size('tasker.workflow_steps'),
                pg_total_relation_size('tasker.step_transitions') + pg_total_relation_size('tasker.task_transitions'),
                pg_total_relation_size('pgmq.q_{ns}'), pg_total_relation_size('pgmq.a_{ns}'),
                (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'tasker.workflow_steps'::regclass),
                (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'tasker.tasks'::regclass),
                (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'pgmq.q_{ns}'::regclass)",
        ns = queue
    );
    let mut rows = Vec::new();
    let t0 = Instant::now();
    let mut last = (Instant::now(), 0usize);
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(interval.min(Duration::from_secs(secs).saturating_sub(t0.elapsed())));
        let now = (Instant::now(), done.load(Ordering::SeqCst));
        let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
        last = now;
        let r = db.query_one(&size_sql, &[]).unwrap();
        let mb = |i: usize| r.get::<_, i64>(i) as f64 / 1048576.0;
        let dead = |i: usize| r.get::<_, i64>(i);
        println!(
            "{:>6.0} {rate:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>9.1} {:>8} {:>8} {:>8}",
            t0.elapsed().as_secs_f64(),
            mb(0),
            mb(1),
            mb(2),
            mb(3),
            mb(4),
            dead(5),
            dead(6),
            dead(7)
        );
        rows.push(json!({"t_s": t0.elapsed().as_secs_f64(), "steps_per_s": rate,
                         "tasks_bytes": r.get::<_, i64>(0), "steps_bytes": r.get::<_, i64>(1),
                         "transitions_bytes": r.get::<_, i64>(2), "queue_bytes": r.get::<_, i64>(3),
                         "archive_bytes": r.get::<_, i64>(4), "steps_dead": dead(5), "tasks_dead": dead(6),
                         "queue_dead": dead(7)}));
    }
    stop.store(true, Ordering::SeqCst);
    limit.store(0, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    feeder.join().unwrap();
    let first = rows
        .first()
        .and_then(|r| r["steps_per_s"].as_f64())
        .unwrap_or(0.0);
    let lastr = rows
        .last()
        .and_then(|r| r["steps_per_s"].as_f64())
        .unwrap_or(0.0);
    println!("  last interval / first: {:.2}", lastr / first);
    if tuned {
        db.batch_execute("ALTER SYSTEM RESET autovacuum_naptime")
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    b.results.insert(
        "sustained".into(),
        json!({"seconds": secs, "workers": n, "rows": rows, "last_over_first": lastr / first,
               "autovacuum": if tuned { "naptime 10s; queue: scale_factor 0, threshold 5000, cost_delay 0" } else { "default" }}),
    );
}

/// SDK workers (pg_tasker_worker::run, default options: the batched
/// protocol, LISTEN wakeups, the fallback poll of the base configuration):
/// the database load of N idle workers, and P3 (create_task → complete,
/// linear 4 steps) with one worker that goes idle between tasks.
fn sdk(b: &mut Bench) {
    let secs = if b.quick { 10 } else { 30 };
    let mut db = connect(&b.cluster);
    register(&mut db, &linear("sdk", 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spawn_workers = |count: usize| {
        let mut stops = Vec::new();
        for i in 0..count {
            let mut options =
                pg_tasker_worker::WorkerOptions::new(b.cluster.url(), vec!["sdk".into()]);
            options.worker_id = format!("bench-sdk-{i}");
            let mut registry = pg_tasker_worker::Registry::new();
            registry.register("Noop", |_s: pg_tasker_worker::StepContext| async move {
                pg_tasker_worker::Outcome::success(json!({}))
            });
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let h = runtime.spawn(pg_tasker_worker::run(options, registry, async {
                let _ = rx.await;
            }));
            stops.push((tx, h));
        }
        stops
    };
    let xacts = |db: &mut Client| -> i64 {
        db.query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0)
    };
    println!(
        "\nSDK workers (batched protocol, LISTEN wakeups, fallback poll {} ms):",
        pg_tasker_worker::WorkerOptions::new("", vec![])
            .poll_interval
            .as_millis()
    );
    let mut idle_rows = Vec::new();
    for count in [0usize, 3, 8] {
        let stops = spawn_workers(count);
        // (backends report their transactions to the statistics at most
        // every second while busy and 10 s after going idle: let the
        // start-up's transactions reach them first)
        std::thread::sleep(Duration::from_secs(12));
        let (x0, c0) = (xacts(&mut db), cpu_counters());
        std::thread::sleep(Duration::from_secs(secs));
        let c1 = cpu_counters();
        // the workers' backends report what is left when they exit
        let mut exchanges = 0;
        for (tx, h) in stops {
            let _ = tx.send(());
            if let Ok(Ok(stats)) = runtime.block_on(h) {
                exchanges += stats.exchanges;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let x1 = xacts(&mut db);
        // (our own two statistics queries are transactions too; the
        // workers' shutdown is counted, the background orchestrator is not)
        let tps = (x1 - x0 - 1) as f64 / secs as f64;
        let busy = busy_percent(c0, c1);
        println!("  {count} idle workers: {tps:.2} transactions/s in the database, machine {busy:.2} % busy over {secs} s ({exchanges} exchanges in all, start-up included)");
        idle_rows.push(json!({"workers": count, "seconds": secs, "transactions_per_s": tps, "cpu_busy_percent": busy,
                              "exchanges_including_startup": exchanges}));
    }
    let tasks = if b.quick { 50 } else { 200 };
    let stops = spawn_workers(1);
    std::thread::sleep(Duration::from_secs(1));
    let mut lat = Vec::new();
    for _ in 0..tasks {
        // long enough for the worker to find the queue empty and LISTEN
        std::thread::sleep(Duration::from_millis(30));
        let t0 = Instant::now();
        let task: String = db
            .query_one("SELECT tasker.create_task('sdk', 'linear')::text", &[])
            .unwrap()
            .get(0);
        loop {
            let st: String = db
                .query_one(
                    "SELECT state::text FROM tasker.tasks WHERE task_uuid = $1::text::uuid",
                    &[&task],
                )
                .unwrap()
                .get(0);
            if st == "complete" {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(ms(t0.elapsed()));
    }
    for (tx, h) in stops {
        let _ = tx.send(());
        let _ = runtime.block_on(h);
    }
    // where a step's time goes, from the audit rows (each stamped with its
    // transaction's start): enqueued → read by the worker → settled
    let gaps = db
        .query_one(
            "WITH t AS (SELECT st.step_uuid, st.to_state, st.created_at FROM tasker.step_transitions st
                          JOIN tasker.workflow_steps s USING (step_uuid)
                          JOIN tasker.tasks k USING (task_uuid) WHERE k.namespace_name = 'sdk')
             SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.created_at - e.created_at) * 1000),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM c.created_at - r.created_at) * 1000)
             FROM t e JOIN t r ON r.step_uuid = e.step_uuid AND r.to_state = 'in_progress'
                      JOIN t c ON c.step_uuid = e.step_uuid AND c.to_state = 'complete'
             WHERE e.to_state = 'enqueued'",
            &[],
        )
        .unwrap();
    let (to_read, to_done): (f64, f64) = (gaps.get(0), gaps.get(1));
    lat.sort_by(f64::total_cmp);
    println!(
        "  P3 with an SDK worker idle between tasks, linear 4 steps, {tasks} tasks (ms): p50 {:.2}  p99 {:.2}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    // throughput of one SDK worker with the default settings (the
    // handlers do nothing: what is left is the runtime and the database)
    let backlog = if b.quick { 500 } else { 2_500 };
    db.batch_execute(&format!(
        "SELECT tasker.create_task('sdk', 'linear') FROM generate_series(1, {backlog})"
    ))
    .unwrap();
    let steps = 4 * backlog as i64;
    let done = |db: &mut Client| -> i64 {
        db.query_one(
            "SELECT count(*) FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid)
              WHERE t.namespace_name = 'sdk' AND s.state = 'complete'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let before = done(&mut db);
    let (t0, c0) = (Instant::now(), cpu_counters());
    let stops = spawn_workers(1);
    while done(&mut db) - before < steps {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (took, c1) = (t0.elapsed(), cpu_counters());
    let mut exchanges = 0;
    for (tx, h) in stops {
        let _ = tx.send(());
        if let Ok(Ok(stats)) = runtime.block_on(h) {
            exchanges += stats.exchanges;
        }
    }
    let per_s = steps as f64 / took.as_secs_f64();
    let busy = busy_percent(c0, c1);
    let defaults = pg_tasker_worker::WorkerOptions::new("", vec![]);
    println!(
        "  one SDK worker (concurrency {}, batch {}), {backlog} tasks x 4 steps queued: {per_s:.0} steps/s, CPU {:.3} ms/step, {:.1} steps per exchange",
        defaults.concurrency,
        defaults.batch_size,
        cpu_ms_per(busy, per_s),
        steps as f64 / exchanges.max(1) as f64
    );
    b.results.insert("sdk".into(), json!({"idle": idle_rows,
        "p3_idle_worker": {"tasks": tasks, "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
                           "enqueued_to_read_p50_ms": to_read, "read_to_result_p50_ms": to_done},
        "throughput_one_worker": {"tasks": backlog, "steps": steps, "steps_per_s": per_s,
                                  "cpu_ms_per_step": cpu_ms_per(busy, per_s),
                                  "concurrency": defaults.concurrency, "batch_size": defaults.batch_size,
                                  "exchanges": exchanges}}));
}

fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Idle: CPU of the orchestrator with no work at all.
fn idle(b: &mut Bench) {
    let secs = if b.quick { 15 } else { 60 };
    let mut db = connect(&b.cluster);
    let pid: i32 = db
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_tasker'",
            &[],
        )
        .unwrap()
        .get(0);
    let ticks0: i64 = db
        .query_one("SELECT ticks FROM tasker.orchestrator_status", &[])
        .unwrap()
        .get(0);
    drop(db);
    let hz = 100.0; // USER_HZ on Linux
    let c0 = cpu_ticks(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(secs));
    let c1 = cpu_ticks(pid).unwrap_or(0);
    let mut db = connect(&b.cluster);
    let ticks1: i64 = db
        .query_one("SELECT ticks FROM tasker.orchestrator_status", &[])
        .unwrap()
        .get(0);
    let cpu_s = (c1 - c0) as f64 / hz;
    let pct = cpu_s / secs as f64 * 100.0;
    println!("\nIdle: orchestrator used {cpu_s:.2} s CPU over {secs} s = {pct:.3} % of a core ({} ticks)", ticks1 - ticks0);
    b.results.insert("idle".into(), json!({"seconds": secs, "cpu_seconds": cpu_s, "percent_of_core": pct, "ticks": ticks1 - ticks0}));
}

/// P1 (N = 4, linear) and the baseline under each synchronous_commit setting.
fn commit_modes(b: &mut Bench) {
    let tasks = if b.quick { 300 } else { 2000 };
    println!("\nsynchronous_commit: P1 linear, N = 4, {tasks} tasks (steps/s)");
    let mut rows = Vec::new();
    for (i, mode) in ["on", "off"].iter().enumerate() {
        let mut db = connect(&b.cluster);
        db.batch_execute(&format!("ALTER SYSTEM SET synchronous_commit = {mode}"))
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let ns = format!("sc_{i}");
        register(&mut db, &linear(&ns, 5));
        let lin = drain(b, &ns, "linear", tasks, 5, 4, Protocol::Plain);
        let base = baseline(b, tasks * 5, 4);
        println!(
            "  {mode:<4} pg_tasker {lin:>8.0}   baseline {base:>8.0}   ratio {:.2}",
            lin / base
        );
        rows.push(json!({"synchronous_commit": mode, "linear_steps_per_s": lin, "baseline_msgs_per_s": base, "ratio": lin / base}));
    }
    let mut db = connect(&b.cluster);
    db.batch_execute("ALTER SYSTEM RESET synchronous_commit")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    b.results.insert("synchronous_commit".into(), json!(rows));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "target/bench/results.json".into());
    let scenarios: Vec<String> = args
        .iter()
        .position(|a| a == "--scenarios")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| {
            [
                "idle",
                "p1",
                "pgbench",
                "p2",
                "p3",
                "sdk",
                "p5",
                "sustained",
                "p4",
                "commit",
                "relay",
                "onestatement",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        });

    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cluster = Cluster::start(&repo, "bench");
    {
        let mut db = connect(&cluster);
        db.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
            .unwrap();
    }
    let mut b = Bench {
        cluster,
        quick,
        results: BTreeMap::new(),
    };
    let machine = json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "postgres": connect(&b.cluster).query_one("SHOW server_version", &[]).unwrap().get::<_, String>(0),
        "synchronous_commit": connect(&b.cluster).query_one("SHOW synchronous_commit", &[]).unwrap().get::<_, String>(0),
        "quick": quick,
    });
    println!("pg_tasker benchmarks on {machine}");
    for s in &scenarios {
        match s.as_str() {
            "p1" => p1(&mut b),
            "p2" => p2(&mut b),
            "p3" => p3(&mut b),
            "p4" => p4(&mut b),
            "p5" => p5(&mut b),
            "pgbench" => pgbench(&mut b),
            "idle" => idle(&mut b),
            "commit" => commit_modes(&mut b),
            "sustained" => sustained(&mut b),
            "sdk" => sdk(&mut b),
            "relay" => relay(&mut b),
            "onestatement" => one_statement(&mut b),
            other => eprintln!("unknown scenario {other}"),
        }
    }
    b.results.insert("machine".into(), machine);
    if let Some(dir) = Path::new(&json_path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&b.results).unwrap(),
    )
    .unwrap();
    println!("\nfigures written to {json_path}");
}
