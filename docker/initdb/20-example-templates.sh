#!/bin/sh
# Registers the example templates copied into the image (docker/Dockerfile).
set -e
for f in /opt/pg_tasker/templates/*.yaml; do
    [ -e "$f" ] || continue
    psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "${POSTGRES_DB:-postgres}" -v template="$(cat "$f")" <<'SQL'
SELECT tasker.register_template_yaml(:'template');
SQL
done
