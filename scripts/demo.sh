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
\echo '==> tasker.step_status'
SELECT step_name, state, attempts, max_attempts, dependencies
FROM tasker.step_status WHERE task_uuid = :'task_uuid' ORDER BY position;
SQL
