#!/usr/bin/env python3
"""A/B of tasker.submit_result's cost: two databases of one cluster, calls
interleaved one by one (A, B, A, B, ...), so that both see the same machine
(its speed swings by 20 % from minute to minute here; rounds of one version
after the other cannot show a 3 % change, this can: A/A reads 0.99-1.02).

    scripts/ab-submit.py setup CONNINFO         # creates databases ab_a and ab_b
    # change ab_b: CREATE OR REPLACE the functions under test (and re-run the
    # DO block of sql/98_plans.sql: CREATE OR REPLACE drops a function's SET
    # clauses), or install a new build and recreate ab_b only:
    scripts/ab-submit.py setup CONNINFO ab_b
    scripts/ab-submit.py run CONNINFO [TASKS]   # default 300 tasks of 5 steps each
    scripts/ab-submit.py batch CONNINFO [TASKS] # tasker.exchange, batches of 10

CONNINFO is a libpq string of a cluster that preloads pg_tasker (e.g.
"host=/tmp/scratch port=5499 user=postgres"). Each call: pgmq.read of one
message, then a fenced submit_result timed on the client (the round trip is
the same for both), synchronous_commit off (no WAL flush in the figure).
Prints the median per database and the median of the paired ratios.
`batch` times tasker.exchange calls instead (each submits the previous
call's 10 results and reads 10 messages), per step.
docs/benchmarks.md ("Where a result's time goes") records what it found.
"""
import json
import statistics
import sys
import time

import psycopg

DBS = ("ab_a", "ab_b")


def connect(conninfo, db):
    c = psycopg.connect(f"{conninfo} dbname={db}", autocommit=True)
    c.execute("SET synchronous_commit = off")
    return c


def setup(conninfo, dbs):
    admin = psycopg.connect(f"{conninfo} dbname=postgres", autocommit=True)
    steps = [{"name": f"s{i}", "dependencies": [f"s{i - 1}"] if i else [], "handler": {"callable": "T"}}
             for i in range(5)]
    for db in dbs:
        admin.execute(f"DROP DATABASE IF EXISTS {db}")
        admin.execute(f"CREATE DATABASE {db}")
        c = connect(conninfo, db)
        c.execute("CREATE EXTENSION pg_tasker CASCADE")
        c.execute("SELECT tasker.register_template(%s::jsonb)",
                  [json.dumps({"name": "lin", "namespace_name": "ab", "version": "1", "steps": steps})])
        c.close()


def one(c):
    rows = c.execute("SELECT message FROM pgmq.read('tasker_ab_queue', 30, 1)").fetchall()
    if not rows:
        return None
    m = rows[0][0]
    started = time.perf_counter()
    c.execute("SELECT tasker.submit_result(%s::uuid, 'success', '{}'::jsonb, NULL, %s::jsonb)",
              [m["step_uuid"], json.dumps({"attempt": m["attempt"], "worker_id": "ab", "execution_time_ms": 1.5})])
    return (time.perf_counter() - started) * 1000


class Exchanger:
    """A worker of batches: each call submits the results of the messages
    the previous call returned and reads up to 10 more."""

    def __init__(self, c):
        self.c = c
        self.results = None

    def __call__(self):
        started = time.perf_counter()
        rows = self.c.execute("SELECT step_uuid, message FROM tasker.exchange(ARRAY['ab'], 'ab', %s::jsonb, 10, 30)",
                              [json.dumps(self.results) if self.results else None]).fetchall()
        elapsed = (time.perf_counter() - started) * 1000
        done = len(self.results or [])
        self.results = [{"step_uuid": str(s), "status": "success", "result": {},
                         "metadata": {"attempt": m["attempt"], "worker_id": "ab", "execution_time_ms": 1.5}}
                        for s, m in rows]
        if not rows and not done:
            return None
        # per step settled and read (a call both settles and reads a batch)
        return elapsed / max(done, len(rows), 1)


def run(conninfo, tasks, batch=False):
    cs = [connect(conninfo, db) for db in DBS]
    for c in cs:
        c.execute("SELECT tasker.create_task('ab', 'lin') FROM generate_series(1, %s)", [tasks])
    calls = [Exchanger(c) for c in cs] if batch else [lambda c=c: one(c) for c in cs]
    a, b = [], []
    while True:
        x, y = calls[0](), calls[1]()
        if x is None or y is None:
            break
        a.append(x)
        b.append(y)
    for c, f in zip(cs, calls):
        while f() is not None:
            pass
        unfinished = c.execute("SELECT count(*) FROM tasker.tasks WHERE state <> 'complete'").fetchone()[0]
        if unfinished:
            raise SystemExit(f"{unfinished} tasks did not complete")
    ratios = [y / x for x, y in zip(a, b)]
    print(f"calls {len(a)} each: A median {statistics.median(a):.3f} ms, B median {statistics.median(b):.3f} ms, "
          f"B/A {statistics.median(b) / statistics.median(a):.3f} (median of paired ratios {statistics.median(ratios):.3f})")


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("setup", "run", "batch"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "setup":
        setup(sys.argv[2], sys.argv[3:] or DBS)
    else:
        run(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 300, sys.argv[1] == "batch")


if __name__ == "__main__":
    main()
