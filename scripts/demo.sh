#!/usr/bin/env bash
# The main job: set everything up, build and install pg_tasker, start a local
# PostgreSQL 15 with pg_tasker preloaded, register the e-commerce template,
# create a task and print its state with psql. Leaves nothing running unless
# KEEP_RUNNING=1 (then: scripts/cluster.sh psql, and scripts/cluster.sh stop).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"

scripts/setup.sh
echo "==> building and installing pg_tasker (release)"
SUDO_FLAG=""
[ "$(id -u)" -ne 0 ] && SUDO_FLAG="--sudo"
cargo pgrx install --release --pg-config "$PG_CONFIG" $SUDO_FLAG >/dev/null

export PG_TASKER_CLUSTER_DIR="${PG_TASKER_CLUSTER_DIR:-/tmp/pg_tasker_demo}"
scripts/cluster.sh destroy
echo "==> starting PostgreSQL at $(scripts/cluster.sh start)"
[ "${KEEP_RUNNING:-0}" = 1 ] || trap 'scripts/cluster.sh stop' EXIT

psql_() { scripts/cluster.sh psql -v ON_ERROR_STOP=1 -q "$@"; }

psql_ -c "CREATE EXTENSION pg_tasker CASCADE"
psql_ -v template="$(cat examples/templates/ecommerce_process_order.yaml)" <<'SQL'
\echo '==> register_template_yaml(examples/templates/ecommerce_process_order.yaml)'
SELECT tasker.register_template_yaml(:'template') AS template_uuid;
SELECT namespace, name, version, step_count, queue_name FROM tasker.templates;
\echo '==> create_task'
SELECT tasker.create_task(
    'ecommerce', 'process_order',
    '{"customer_info": {"email": "ada@example.com", "tier": "premium"},
      "cart_items": [{"sku": "BOOK-1", "qty": 2}],
      "payment_info": {"token": "tok_visa"}}',
    initiator => 'demo', idempotency_key => 'order-1001') AS task_uuid \gset
\echo '==> tasker.task_status'
SELECT task_uuid, namespace, task_name, task_version, state, priority, steps_total, steps_pending
FROM tasker.task_status WHERE task_uuid = :'task_uuid';
\echo '==> tasker.step_status right after create_task: the root step is already in the queue'
SELECT step_name, state, attempts, max_attempts, dependencies
FROM tasker.step_status WHERE task_uuid = :'task_uuid' ORDER BY position;
SQL

# A minimal worker written in SQL: read the namespace queue with plain pgmq,
# answer with tasker.submit_result. Each call is its own transaction, as a
# real worker's would be. The first payment attempt fails with a retryable
# error and retry_after_seconds = 1; the background orchestrator inside
# PostgreSQL re-enqueues it when it is due.
echo "==> a worker (psql) processes the queue"
for _ in $(seq 1 100); do
    out="$(psql_ -At -F ' ' <<'SQL'
SELECT message->>'step_name', message->>'attempt',
       CASE WHEN message->>'step_name' = 'process_payment' AND (message->>'attempt')::int = 1
            THEN tasker.submit_result((message->>'step_uuid')::uuid, 'failure',
                     error => '{"message": "payment gateway timeout", "retry_after_seconds": 1}')
            ELSE tasker.submit_result((message->>'step_uuid')::uuid, 'success',
                     jsonb_build_object('handled_by', 'demo-worker',
                                        'saw', (SELECT coalesce(jsonb_agg(k), '[]') FROM jsonb_object_keys(message->'dependency_results') k)),
                     metadata => jsonb_build_object('attempt', message->'attempt', 'worker_id', 'demo-worker'))
       END
FROM pgmq.read('tasker_ecommerce_queue', 30, 10);
SQL
)"
    if [ -n "$out" ]; then
        printf '%s\n' "$out" | awk '{printf "    %-18s attempt %s -> %s\n", $1, $2, $3}'
    else
        sleep 0.2   # nothing visible: the orchestrator has a retry timer running
    fi
    state="$(psql_ -At -c "SELECT state FROM tasker.tasks WHERE idempotency_key = 'order-1001'")"
    if [ "$state" = complete ]; then break; fi
done

psql_ <<'SQL'
\echo '==> tasker.task_status'
SELECT task_uuid, task_name, state, steps_total, steps_complete, created_at, completed_at
FROM tasker.task_status WHERE namespace = 'ecommerce';
\echo '==> tasker.step_status'
SELECT step_name, state, attempts, max_attempts, dependencies, last_error_message, results
FROM tasker.step_status WHERE namespace = 'ecommerce' ORDER BY position;
\echo '==> tasker.orchestrator_status (the background worker inside PostgreSQL)'
SELECT running, status, ticks, errors, environment, config_valid FROM tasker.orchestrator_status;
SQL
