#!/usr/bin/env bash
# Installs everything pg_tasker needs on a fresh Debian 12 machine, skipping
# whatever is already in place: apt packages, cargo-pgrx 0.18.0, the pgrx
# configuration for the system PostgreSQL 15, and pgmq 1.11.1 (taken from the
# `pgmq` crate on crates.io, which ships the extension's SQL).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
PGRX_VERSION="0.18.0"
PGMQ_CRATE_VERSION="0.33.7"
PGMQ_EXT_VERSION="1.11.1"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log() { printf '==> %s\n' "$*"; }

# 1. Debian packages -----------------------------------------------------------
packages=(postgresql-15 postgresql-client-15 postgresql-server-dev-15 libclang-dev clang sudo openssl chromium)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
    log "apt packages present"
fi

# 2. cargo-pgrx ----------------------------------------------------------------
if cargo pgrx --version 2>/dev/null | grep -q " ${PGRX_VERSION}\$"; then
    log "cargo-pgrx ${PGRX_VERSION} present"
else
    log "installing cargo-pgrx ${PGRX_VERSION} (10-18 minutes on 2 cores)"
    cargo install cargo-pgrx --version "${PGRX_VERSION}" --locked
fi

# 3. pgrx configuration for the system PostgreSQL 15 ----------------------------
PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
if grep -qs "pg15 = \"${PG_CONFIG}\"" "${PGRX_HOME}/config.toml"; then
    log "pgrx configured for ${PG_CONFIG}"
else
    log "configuring pgrx for ${PG_CONFIG}"
    cargo pgrx init --pg15 "${PG_CONFIG}"
fi

# 4. pgmq -----------------------------------------------------------------------
EXT_DIR="$("${PG_CONFIG}" --sharedir)/extension"
if [ -f "${EXT_DIR}/pgmq--${PGMQ_EXT_VERSION}.sql" ] && [ -f "${EXT_DIR}/pgmq.control" ]; then
    log "pgmq ${PGMQ_EXT_VERSION} installed"
else
    log "installing pgmq ${PGMQ_EXT_VERSION} from the pgmq crate ${PGMQ_CRATE_VERSION}"
    cargo fetch --quiet --manifest-path "${ROOT}/scripts/pgmq-source/Cargo.toml"
    src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "pgmq-${PGMQ_CRATE_VERSION}" | head -n 1)"
    if [ -z "$src" ]; then echo "pgmq crate source not found after cargo fetch" >&2; exit 1; fi
    $SUDO install -m 0644 "$src/src/install/embedded/pgmq.control" "${EXT_DIR}/pgmq.control"
    $SUDO install -m 0644 "$src/src/install/embedded/sql/pgmq.sql" "${EXT_DIR}/pgmq--${PGMQ_EXT_VERSION}.sql"
    grep -q "default_version = '${PGMQ_EXT_VERSION}'" "${EXT_DIR}/pgmq.control" \
        || { echo "unexpected pgmq.control version" >&2; exit 1; }
fi
# 5. Python client for the example Python worker ---------------------------------
if python3 -c "import psycopg" 2>/dev/null; then
    log "psycopg present"
else
    log "installing psycopg (examples/python/requirements.txt)"
    python3 -m pip install --quiet --root-user-action=ignore -r "${ROOT}/examples/python/requirements.txt"
fi
log "setup complete"
