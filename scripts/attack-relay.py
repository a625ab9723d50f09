#!/usr/bin/env python3
"""Attack on the task-event relay (src/relay.rs): 4 plain-protocol workers
finish 4,000 one-step tasks while the orchestrator is stopped
(pg_terminate_backend) at a random moment; a LISTENing client must hear
every finished task exactly once (events reserved in the ring before the
stop are sent by the orchestrator's last relay, later ones by their own
transactions). Needs a cluster preloading pg_tasker whose orchestrator
serves the database; it stops the orchestrator (restart the cluster after).

    scripts/attack-relay.py "host=/tmp/scratch port=5499 user=postgres dbname=postgres"
"""
import random, json, sys, threading, time, psycopg, collections
CI = sys.argv[1] if len(sys.argv) > 1 else "host=/tmp/scratch port=5499 user=postgres dbname=postgres"
admin = psycopg.connect(CI, autocommit=True)
ns = f"atk{int(time.time())}"
admin.execute("""SELECT tasker.register_template('{"name":"flow","namespace":"%s","version":"1.0.0",
  "steps":[{"name":"s0","handler":{"callable":"Noop"}}]}'::jsonb)""" % ns)
N = 4000
tasks = [r[0] for r in admin.execute("SELECT tasker.create_task(%s,'flow')::text FROM generate_series(1,%s)", [ns, N]).fetchall()]
heard = collections.Counter()
stop = False
def listen():
    l = psycopg.connect(CI, autocommit=True)
    l.execute("LISTEN tasker_events")
    while not stop:
        for n in l.notifies(timeout=0.5):
            heard[json.loads(n.payload)["task_uuid"]] += 1
def work():
    w = psycopg.connect(CI, autocommit=True)
    while True:
        r = w.execute("SELECT message->>'step_uuid', (message->>'attempt') FROM pgmq.read(tasker.queue_name(%s), 30, 1)", [ns]).fetchone()
        if r is None:
            left = w.execute("SELECT count(*) FROM tasker.tasks WHERE namespace_name=%s AND state <> 'complete'", [ns]).fetchone()[0]
            if left == 0: return
            time.sleep(0.01); continue
        w.execute("SELECT tasker.submit_result(%s::uuid, 'success')", [r[0]])
kills = 0
def kill():
    global kills
    k = psycopg.connect(CI, autocommit=True)
    while not stop:
        time.sleep(1.0 + random.random() * 2)
        pid = k.execute("SELECT (tasker.health()->'orchestrator'->>'pid')::int").fetchone()[0]
        if pid:
            k.execute("SELECT pg_terminate_backend(%s)", [pid]); kills += 1
lt = threading.Thread(target=listen); lt.start()
time.sleep(0.5)
kt = threading.Thread(target=kill); kt.start()
t0 = time.time()
ws = [threading.Thread(target=work) for _ in range(4)]
[w.start() for w in ws]; [w.join() for w in ws]
took = time.time() - t0
stop = True; kt.join()
time.sleep(0)
# wait for the orchestrator to return and flush the ring
for _ in range(12):
    if sum(heard[t] for t in tasks) >= N and admin.execute("SELECT (tasker.health()->'orchestrator'->>'running')::bool").fetchone()[0]: break
    time.sleep(0.25)
time.sleep(1)
lt.join()
missing = [t for t in tasks if heard[t] == 0]
dup = [t for t in tasks if heard[t] > 1]
print(f"{N} tasks in {took:.1f}s, {kills} orchestrator stop(s), missing {len(missing)}, duplicated {len(dup)}")
sys.exit(1 if missing or dup else 0)
