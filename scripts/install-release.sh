#!/usr/bin/env bash
# Installs a released pg_tasker beside the current one, for the upgrade
# test (client_tests::upgrade): the release's library as
# $libdir/pg_tasker-releases/<version>/pg_tasker.so (a cluster whose
# dynamic_library_path starts with that directory runs the release, as if
# it were installed) and its full install script, kept in
# sql/pg_tasker--<version>.sql. The library is built once from the
# release's commit and cached under target/releases/<version>.
#   scripts/install-release.sh 0.1.0             # debug build (tests)
#   PROFILE=release scripts/install-release.sh 0.1.0   # optimized (benchmarks)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
VERSION="${1:?usage: $0 <released version>}"
case "$VERSION" in
    0.1.0) COMMIT=dd9538a746f3d68b3e91a2a83bcb7767cb0f1648 ;;
    *) echo "unknown release $VERSION" >&2; exit 2 ;;
esac
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PROFILE="${PROFILE:-debug}"
OUT="$ROOT/target/releases/$VERSION"
LIB="$OUT/libpg_tasker-$PROFILE.so"
if [ ! -f "$LIB" ]; then
    if ! git -C "$ROOT" cat-file -e "${COMMIT}^{commit}" 2>/dev/null; then
        echo "release $VERSION (commit $COMMIT) is not in this clone's history; clone without --depth" >&2
        exit 1
    fi
    echo "==> building pg_tasker $VERSION ($PROFILE) from $COMMIT (once; cached in $OUT)"
    if [ ! -f "$OUT/src/Cargo.toml" ]; then
        mkdir -p "$OUT/src"
        git -C "$ROOT" archive "$COMMIT" | tar -x -C "$OUT/src"
    fi
    flag=""
    [ "$PROFILE" = release ] && flag="--release"
    (cd "$OUT/src" && CARGO_TARGET_DIR="$ROOT/target/releases/target" \
        cargo build --quiet --locked --lib -p pg_tasker --features pg15 $flag)
    cp "$ROOT/target/releases/target/$PROFILE/libpg_tasker.so" "$LIB"
fi
LIBDIR="$("$PG_CONFIG" --pkglibdir)/pg_tasker-releases/$VERSION"
EXTDIR="$("$PG_CONFIG" --sharedir)/extension"
$SUDO mkdir -p "$LIBDIR"
$SUDO install -m 0755 "$LIB" "$LIBDIR/pg_tasker.so"
$SUDO install -m 0644 "$ROOT/sql/pg_tasker--$VERSION.sql" "$EXTDIR/pg_tasker--$VERSION.sql"
echo "==> pg_tasker $VERSION installed in $LIBDIR"
