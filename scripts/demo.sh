#!/usr/bin/env bash
# The main job: set everything up, build and install pg_tasker, start a local
# PostgreSQL 15 with pg_tasker preloaded (its orchestrator runs inside), register
# the e-commerce template, start the Rust example worker, create orders (one
# whose payment times out twice, one declined), wait, and print the task and
# step states and a Mermaid graph. Leaves nothing running unless
# KEEP_RUNNING=1 (then: scripts/cluster.sh psql, and scripts/cluster.sh stop).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"

scripts/setup.sh
echo "==> building and installing pg_tasker and the example worker (release)"
SUDO_FLAG=""
[ "$(id -u)" -ne 0 ] && SUDO_FLAG="--sudo"
cargo pgrx install --release --pg-config "$PG_CONFIG" $SUDO_FLAG >/dev/null 2>&1 \
    || cargo pgrx install --release --pg-config "$PG_CONFIG" $SUDO_FLAG
cargo build --release --quiet -p pg_tasker_worker

export PG_TASKER_CLUSTER_DIR="${PG_TASKER_CLUSTER_DIR:-/tmp/pg_tasker_demo}"
export PG_TASKER_PORT="${PG_TASKER_PORT:-28815}"
scripts/cluster.sh destroy
echo "==> starting PostgreSQL at $(scripts/cluster.sh start)"
WORKER_PID=""
cleanup() {
    if [ -n "$WORKER_PID" ]; then kill "$WORKER_PID" 2>/dev/null || true; wait "$WORKER_PID" 2>/dev/null || true; fi
    [ "${KEEP_RUNNING:-0}" = 1 ] || scripts/cluster.sh stop
}
trap cleanup EXIT

psql_() { scripts/cluster.sh psql -v ON_ERROR_STOP=1 -q "$@"; }

psql_ -c "CREATE EXTENSION pg_tasker CASCADE"
psql_ -v template="$(cat examples/templates/ecommerce_process_order.yaml)" <<'SQL'
\echo '==> register_template_yaml(examples/templates/ecommerce_process_order.yaml)'
SELECT tasker.register_template_yaml(:'template') AS template_uuid \gset
SELECT namespace, name, version, step_count, queue_name FROM tasker.templates WHERE template_uuid = :'template_uuid';
SQL

echo "==> starting the example worker: pg-tasker-worker --namespace ecommerce"
target/release/pg-tasker-worker --handlers ecommerce --namespace ecommerce \
    --database-url "host=$PG_TASKER_CLUSTER_DIR port=$PG_TASKER_PORT user=postgres dbname=postgres" \
    --worker-id demo-worker 2>/tmp/pg_tasker_demo_worker.log &
WORKER_PID=$!

echo "==> creating four orders"
psql_ <<'SQL'
SELECT o.label, tasker.create_task('ecommerce', 'process_order',
         jsonb_build_object('customer_info', jsonb_build_object('email', o.label || '@example.com', 'tier', o.tier),
                            'cart_items', '[{"sku": "BOOK-1", "price": 20.0, "quantity": 2}, {"sku": "PEN", "price": 5.5, "quantity": 1}]'::jsonb,
                            'payment_info', jsonb_build_object('token', o.token)),
         initiator => 'demo', idempotency_key => 'demo-' || o.label) AS task_uuid
FROM (VALUES ('ada', 'standard', 'tok_visa'), ('grace', 'premium', 'tok_visa'),
             ('linus', 'standard', 'tok_timeout_twice'), ('mallory', 'standard', 'tok_declined')) AS o(label, tier, token);
SQL

echo "==> waiting for the orders to settle"
for _ in $(seq 1 150); do
    open="$(psql_ -At -c "SELECT count(*) FROM tasker.tasks WHERE NOT tasker.task_state_is_terminal(state) AND state <> 'blocked_by_failures'")"
    [ "$open" = 0 ] && break
    sleep 0.2
done

psql_ <<'SQL'
\echo '==> tasker.task_status'
SELECT t.initiator, s.task_context->'customer_info'->>'email' AS customer, ts.state, ts.steps_complete || '/' || ts.steps_total AS steps,
       round(extract(epoch FROM coalesce(ts.completed_at, now()) - ts.created_at) * 1000) AS ms
FROM tasker.task_status ts
JOIN tasker.tasks t USING (task_uuid)
CROSS JOIN LATERAL (SELECT t.context AS task_context) s
ORDER BY ts.created_at;
\echo '==> tasker.step_status: process_payment of every order'
SELECT t.context->'customer_info'->>'email' AS customer, ss.state, ss.attempts || '/' || ss.max_attempts AS attempts,
       ss.last_error_message, ss.results->>'amount_charged' AS charged
FROM tasker.step_status ss JOIN tasker.tasks t USING (task_uuid)
WHERE ss.step_name = 'process_payment' ORDER BY t.created_at;
\echo '==> tasker.step_status of the declined order'
SELECT ss.step_name, ss.state, ss.attempts, ss.dependencies, ss.last_error_message
FROM tasker.step_status ss JOIN tasker.tasks t USING (task_uuid)
WHERE t.idempotency_key = 'demo-mallory' ORDER BY ss.position;
\echo '==> tasker.task_graph of the order whose payment timed out twice (Mermaid)'
SELECT tasker.task_graph(task_uuid) FROM tasker.tasks WHERE idempotency_key = 'demo-linus' \g (format=unaligned tuples_only)
\echo '==> tasker.analytics_failures()'
SELECT step_name, error_code, failures, permanent, last_message FROM tasker.analytics_failures();
\echo '==> tasker.orchestrator_status'
SELECT running, status, ticks, errors, environment FROM tasker.orchestrator_status;
SQL
