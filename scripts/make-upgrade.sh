#!/usr/bin/env bash
# Writes sql/pg_tasker--0.1.0--0.2.0.sql: the hand-written steps around
# pg_tasker 0.2.0's own install script (as `cargo pgrx schema` generates
# it), so that an upgraded database gets exactly the objects of a fresh
# install. Run it after any change to sql/ or to a #[pg_extern] signature;
# client_tests::upgrade compares the two schemas and fails when it was not.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FROM=0.1.0
TO="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
body="$(mktemp)"
trap 'rm -f "$body"' EXIT
cargo pgrx schema pg15 --out "$body" >/dev/null
out="sql/pg_tasker--${FROM}--${TO}.sql"
{
    cat "sql/upgrade/${FROM}--${TO}.pre.sql"
    cat "$body"
    cat "sql/upgrade/${FROM}--${TO}.post.sql"
} >"$out"
echo "wrote $out"
