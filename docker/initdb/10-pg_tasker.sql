-- Run once by the postgres image's entrypoint on a new data directory.
CREATE EXTENSION IF NOT EXISTS pg_tasker CASCADE;
