#!/usr/bin/env python3
"""Server time of tasker.submit_result, by pg_stat_statements, for the
released 0.1.0 and this version, measured in one run on one cluster.

Each version runs the same workload: 400 tasks of a linear 5-step template,
every step read with pgmq.read and answered with a fenced submit_result, one
at a time. pg_stat_statements (track = all) gives the mean execution time of
the top-level submit_result call and how many statements run inside one.

    scripts/profile-submit.py        # needs scripts/install-release.sh 0.1.0

Prints a Markdown table (docs/benchmarks.md records it).
"""
import json
import statistics
import os
import subprocess
import sys
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = "/tmp/pg_tasker_profile"
PORT = "28830"
PG_CTL = "/usr/lib/postgresql/15/bin/pg_ctl"
TASKS = int(os.environ.get("TASKS", "400"))


def cluster(*args, preload="pg_tasker,pg_stat_statements"):
    env = dict(os.environ, PG_TASKER_CLUSTER_DIR=DIR, PG_TASKER_PORT=PORT, PG_TASKER_PRELOAD=preload)
    subprocess.run(["bash", os.path.join(ROOT, "scripts/cluster.sh"), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def restart():
    cmd = [PG_CTL, "-D", f"{DIR}/data", "-m", "fast", "-w", "-l", f"{DIR}/postgres.log", "restart"]
    if os.geteuid() == 0:
        cmd = ["sudo", "-u", "postgres", *cmd]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def connect(db="postgres"):
    for _ in range(100):
        try:
            return psycopg.connect(host=DIR, port=PORT, user="postgres", dbname=db, autocommit=True)
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise SystemExit("cannot connect")


def measure(version):
    c = connect()
    c.execute(f"DROP DATABASE IF EXISTS prof_{version.replace('.', '_')}")
    db = f"prof_{version.replace('.', '_')}"
    c.execute(f"CREATE DATABASE {db}")
    c.close()
    c = connect(db)
    c.execute(f"CREATE EXTENSION pg_tasker VERSION '{version}' CASCADE")
    c.execute("CREATE EXTENSION pg_stat_statements")
    steps = [{"name": f"s{i}", "dependencies": [f"s{i-1}"] if i else [], "handler": {"callable": "T"}}
             for i in range(5)]
    c.execute("SELECT tasker.register_template(%s::jsonb)",
              [json.dumps({"name": "lin", "namespace_name": "prof", "version": "1", "steps": steps})])
    c.execute("SELECT tasker.create_task('prof', 'lin') FROM generate_series(1, %s)", [TASKS])
    def run(n):
        done = 0
        while done < n:
            rows = c.execute("SELECT message FROM pgmq.read('tasker_prof_queue', 30, 1)").fetchall()
            if not rows:
                time.sleep(0.001)
                continue
            m = rows[0][0]
            c.execute("SELECT tasker.submit_result(%s::uuid, 'success', '{}'::jsonb, NULL, %s::jsonb)",
                      [m["step_uuid"], json.dumps({"attempt": m["attempt"]})])
            done += 1

    # warm the session's caches and plans, then time top-level calls only
    # (tracking every nested statement adds its own cost to each)
    run(50)
    c.execute("SET pg_stat_statements.track = 'top'")
    c.execute("SELECT pg_stat_statements_reset()")
    started = time.perf_counter()
    run(TASKS * 5 - 250)
    wall = time.perf_counter() - started
    top = c.execute("""
        SELECT calls, mean_exec_time FROM pg_stat_statements
        WHERE toplevel AND query LIKE 'SELECT tasker.submit_result(%'""").fetchone()
    # then count the statements one call runs
    c.execute("SET pg_stat_statements.track = 'all'")
    c.execute("SELECT pg_stat_statements_reset()")
    run(200)
    calls = c.execute("""
        SELECT calls FROM pg_stat_statements
        WHERE toplevel AND query LIKE 'SELECT tasker.submit_result(%'""").fetchone()[0]
    nested = c.execute("""
        SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
        WHERE NOT toplevel AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND query NOT LIKE '%pgmq.read%'""").fetchone()
    nested = (nested[0] / calls, )
    if os.environ.get("DETAIL"):
        for row in c.execute("""
                SELECT round(total_exec_time::numeric / %s, 4), calls / %s, left(regexp_replace(query, '\\s+', ' ', 'g'), 100)
                FROM pg_stat_statements WHERE NOT toplevel ORDER BY total_exec_time DESC LIMIT 25""", [calls, calls]):
            print(version, row, file=sys.stderr)
    c.close()
    return {"version": version, "calls": top[0], "mean_ms": top[1],
            "nested_per_call": nested[0], "wall_s": wall}


def use_version(version):
    c = connect()
    if version == "0.1.0":
        c.execute("ALTER SYSTEM SET dynamic_library_path = '$libdir/pg_tasker-releases/0.1.0:$libdir'")
    else:
        c.execute("ALTER SYSTEM RESET dynamic_library_path")
    c.close()
    restart()


def main():
    if not os.path.exists("/usr/share/postgresql/15/extension/pg_tasker--0.1.0.sql"):
        raise SystemExit("run scripts/install-release.sh 0.1.0 first")
    current = subprocess.run(["sed", "-n", 's/^version = "\\(.*\\)"/\\1/p', os.path.join(ROOT, "Cargo.toml")],
                             capture_output=True, text=True).stdout.split()[0]
    rounds = int(os.environ.get("ROUNDS", "3"))
    cluster("destroy")
    cluster("start")
    c = connect()
    c.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = off")
    c.close()
    results = {"0.1.0": [], current: []}
    # alternate the versions, so that both see the same machine (its speed
    # varies by 20 % from minute to minute here); report medians
    for _ in range(rounds):
        for version in ("0.1.0", current):
            use_version(version)
            results[version].append(measure(version))
    cluster("destroy")
    print(f"| version | submit_result calls | mean server time (ms), median of {rounds} | "
          "statements inside one call | wall time of a run (s) |")
    print("|---|---|---|---|---|")
    for version, runs in results.items():
        mean = statistics.median(r["mean_ms"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        each = ", ".join(f"{r['mean_ms']:.2f}" for r in runs)
        print(f"| {version} | {runs[0]['calls']} | {mean:.3f} ({each}) "
              f"| {runs[0]['nested_per_call']:.1f} | {wall:.1f} |")

if __name__ == "__main__":
    sys.exit(main())
