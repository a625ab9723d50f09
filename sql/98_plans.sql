-- How the operations are planned: their one home.
--
-- Every operation is a handful of statements that join by key, run
-- thousands of times per session. They run with
--   plan_cache_mode = force_generic_plan
--     planned once per session (a custom plan re-plans on every call, which
--     was most of the cost of a small state change);
--   enable_seqscan, enable_hashjoin, enable_mergejoin = off
--     a generic plan cannot see how many rows an array argument holds
--     (unnest of a parameter is estimated at 10 rows), and one built while
--     a table is small (a new database) would scan and hash it on every call
--     for the rest of the session; key lookups by index are right for 1 row
--     and for 10,000.
--   jit = off
--     a plan that must scan a table all the same (a tiny one: worker_waits)
--     carries the cost of a disabled scan, far above jit_above_cost, and
--     would be compiled on every execution (40-100 ms each, measured).
-- The settings apply to the statements these functions run and to those of
-- every function they call (a cached plan keeps the settings it was made
-- with). Retention, analytics and the views are planned as usual.

CREATE FUNCTION tasker._operations() RETURNS text[]
LANGUAGE sql IMMUTABLE
RETURN ARRAY[
    'create_task', 'submit_result', 'submit_results', 'exchange', 'read_steps', 'extend_lease', 'checkpoint',
    'worker_idle',
    'cancel_task', 'resolve_task_manually', 'retry_step', 'resolve_step_manually',
    '_run_cycle', 'run_orchestration_cycle', 'claim_ready_tasks', 'release_task_claim', 'extend_task_claim',
    '_recover_attempts', '_detect_stale', '_ingest_requests', 'dlq_requeue', 'dlq_resolve'];

DO $$
DECLARE
    f regprocedure;
    missing text[];
BEGIN
    SELECT array_agg(o) INTO missing FROM unnest(tasker._operations()) o
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p
                      WHERE p.pronamespace = 'tasker'::regnamespace AND p.proname = o);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'pg_tasker internal error: no function %', missing USING ERRCODE = 'XX000';
    END IF;
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'tasker'::regnamespace AND p.proname = ANY (tasker._operations()) LOOP
        EXECUTE format('ALTER FUNCTION %s SET plan_cache_mode = force_generic_plan SET enable_seqscan = off '
                       'SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off', f);
    END LOOP;
END
$$;
