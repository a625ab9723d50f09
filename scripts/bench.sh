#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: sets up, installs the release build of
# pg_tasker, and runs the benchmark harness on a throwaway cluster of its own.
# Arguments go to the harness: --quick,
# --scenarios idle,p1,pgbench,p2,p3,sdk,p5,sustained,p4,commit,relay,onestatement,
# --json FILE (default docs/benchmarks/results.json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
scripts/setup.sh
SUDO_FLAG=""
[ "$(id -u)" -ne 0 ] && SUDO_FLAG="--sudo"
cargo pgrx install --release --pg-config "$PG_CONFIG" $SUDO_FLAG >/dev/null 2>&1 \
    || cargo pgrx install --release --pg-config "$PG_CONFIG" $SUDO_FLAG
has_json=0
for a in "$@"; do [ "$a" = "--json" ] && has_json=1; done
if [ "$has_json" = 1 ]; then
    exec cargo run --release -q -p pg_tasker_bench -- "$@"
else
    exec cargo run --release -q -p pg_tasker_bench -- --json docs/benchmarks/results.json "$@"
fi
