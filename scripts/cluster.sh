#!/usr/bin/env bash
# A throwaway local PostgreSQL 15 cluster with pg_tasker preloaded, for the
# demo and the benchmarks. Runs as the postgres OS user when invoked as root.
#   scripts/cluster.sh start   # initdb (first time) + start; prints the psql URI
#   scripts/cluster.sh stop
#   scripts/cluster.sh psql [args...]
# Settings: PG_TASKER_CLUSTER_DIR (default /tmp/pg_tasker_cluster),
#           PG_TASKER_PORT (default 28815),
#           PG_TASKER_PRELOAD (default pg_tasker; empty: no orchestrator).
set -euo pipefail
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
DIR="${PG_TASKER_CLUSTER_DIR:-/tmp/pg_tasker_cluster}"
PORT="${PG_TASKER_PORT:-28815}"
PRELOAD="${PG_TASKER_PRELOAD-pg_tasker}"
DATA="$DIR/data"
SOCK="$DIR"

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then sudo -u postgres "$@"; else "$@"; fi
}

start() {
    if [ "$(id -u)" -eq 0 ]; then
        mkdir -p "$DIR" && chown postgres:postgres "$DIR"
    else
        mkdir -p "$DIR"
    fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 >/dev/null
        cat >>"$DATA/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PORT
shared_preload_libraries = '$PRELOAD'
pg_tasker.database = 'postgres'
CONF
    fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$DIR/postgres.log" -w start >/dev/null
    fi
    echo "postgresql://postgres@/postgres?host=$SOCK&port=$PORT"
}

stop() {
    if [ -f "$DATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    destroy) stop; rm -rf "$DIR" ;;
    psql) shift; exec psql -X -h "$SOCK" -p "$PORT" -U postgres "$@" ;;
    *) echo "usage: $0 start|stop|destroy|psql [args]" >&2; exit 2 ;;
esac
