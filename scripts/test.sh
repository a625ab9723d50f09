#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite:
#   1. unit tests of the plain-Rust core (templates, validation, config, ...);
#   2. the extension's tests, against a throwaway PostgreSQL 15 cluster
#      started by `cargo pgrx test` (as the postgres OS user when run as root,
#      since initdb refuses root); this also installs the extension;
#   3. the worker SDK's unit tests and the end-to-end blog workloads, run by
#      real worker processes (Rust and Python) on clusters of their own;
#   4. the dashboard, in headless Chromium against a live cluster.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/setup.sh
# the released 0.1.0 beside this version, for the upgrade test
scripts/install-release.sh 0.1.0

echo "==> core unit tests"
cargo test --quiet -p pg_tasker_core

echo "==> extension tests (PostgreSQL 15)"
PGDATA_BASE="${PG_TASKER_TEST_PGDATA:-/tmp/pg_tasker_test}"
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || { echo "the postgres OS user is missing" >&2; exit 1; }
    cargo pgrx test pg15 --runas postgres --pgdata "$PGDATA_BASE"
else
    cargo pgrx test pg15 --pgdata "$PGDATA_BASE"
fi

echo "==> worker SDK and end-to-end workloads"
cargo test -p pg_tasker_worker

echo "==> dashboard (headless Chromium against a live cluster)"
cargo test -p pg_tasker_dashboard
