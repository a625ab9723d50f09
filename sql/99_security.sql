-- Roles and privileges (runs last, after every function exists).
--
--   tasker_admin   registers templates and performs admin operations; is also
--                  a member of tasker_app and tasker_worker.
--   tasker_app     creates tasks and reads the status views.
--   tasker_worker  reads namespace queues and submits step results.
--
-- The roles are cluster-wide and NOLOGIN: grant them to your login roles.
-- They survive DROP EXTENSION (other databases may use them).

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_admin') THEN
        CREATE ROLE tasker_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_app') THEN
        CREATE ROLE tasker_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_worker') THEN
        CREATE ROLE tasker_worker NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('tasker_admin', 'tasker_app', 'MEMBER') THEN
        GRANT tasker_app TO tasker_admin;
    END IF;
    IF NOT pg_catalog.pg_has_role('tasker_admin', 'tasker_worker', 'MEMBER') THEN
        GRANT tasker_worker TO tasker_admin;
    END IF;
END
$roles$;

-- Nothing in the schema is reachable by default ...
REVOKE ALL ON ALL TABLES IN SCHEMA tasker FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tasker FROM PUBLIC;
GRANT USAGE ON SCHEMA tasker TO tasker_admin, tasker_app, tasker_worker;

-- ... except the API, role by role. Functions that write are SECURITY DEFINER
-- with a pinned search_path; the tables themselves stay closed.
GRANT SELECT ON tasker.templates, tasker.task_status, tasker.step_status, tasker.ready_tasks,
                tasker.step_state_transitions, tasker.task_state_transitions
    TO tasker_app, tasker_worker;
GRANT EXECUTE ON FUNCTION tasker.task_state_is_terminal(tasker.task_state),
                          tasker.step_state_class(tasker.step_state),
                          tasker.step_is_runnable(tasker.step_state, integer),
                          tasker.step_is_ready(tasker.step_state, integer, timestamptz, timestamptz)
    TO tasker_app, tasker_worker;

GRANT EXECUTE ON FUNCTION tasker.queue_name(text) TO tasker_app, tasker_worker;
GRANT EXECUTE ON FUNCTION tasker.uuid_generate_v7() TO tasker_app, tasker_worker;
GRANT EXECUTE ON FUNCTION tasker.register_template(jsonb) TO tasker_admin;
GRANT EXECUTE ON FUNCTION tasker.register_template_yaml(text) TO tasker_admin;
GRANT EXECUTE ON FUNCTION tasker.create_task(text, text, jsonb, text, integer, text, text, text, text[], text)
    TO tasker_app;
GRANT EXECUTE ON FUNCTION tasker.step_readiness(uuid), tasker.task_execution_context(uuid),
                          tasker.effective_priority(integer, interval)
    TO tasker_app, tasker_worker;
GRANT EXECUTE ON FUNCTION tasker.cancel_task(uuid, text) TO tasker_app;

-- Workers: take steps and report results.
GRANT EXECUTE ON FUNCTION tasker.submit_result(uuid, text, jsonb, jsonb, jsonb),
                          tasker.read_steps(text, text, integer, integer),
                          tasker.extend_lease(uuid, integer, integer),
                          tasker.submit_results(jsonb),
                          tasker.exchange(text[], text, jsonb, integer, integer),
                          tasker.wake_channel(text),
                          tasker.worker_idle(text[], text, boolean)
    TO tasker_worker;

-- Orchestration and operator actions.
GRANT EXECUTE ON FUNCTION tasker.run_orchestration_cycle(text, integer),
                          tasker.claim_ready_tasks(text, integer, text, integer),
                          tasker.release_task_claim(uuid, text),
                          tasker.extend_task_claim(uuid, text, integer),
                          tasker.retry_step(uuid, text),
                          tasker.resolve_step_manually(uuid, jsonb, text),
                          tasker.resolve_task_manually(uuid, text)
    TO tasker_admin;

-- Workers read step messages with plain pgmq calls; each namespace queue
-- grants its table to tasker_worker when it is created (register_template).
GRANT USAGE ON SCHEMA pgmq TO tasker_worker;

-- Health and configuration.
GRANT EXECUTE ON FUNCTION tasker.health() TO tasker_app, tasker_worker;
GRANT EXECUTE ON FUNCTION tasker.config() TO tasker_admin;
GRANT SELECT ON tasker.orchestrator_status, tasker.queue_status TO tasker_app, tasker_worker;

-- Maintenance and the dead letter queue.
GRANT EXECUTE ON FUNCTION tasker.run_maintenance(text[]),
                          tasker.dlq_requeue(uuid, text),
                          tasker.dlq_resolve(uuid, text, text)
    TO tasker_admin;
GRANT SELECT ON tasker.dlq, tasker.task_archive TO tasker_admin;

-- Observability.
GRANT EXECUTE ON FUNCTION tasker.analytics_throughput(interval, interval),
                          tasker.analytics_failures(interval),
                          tasker.analytics_slowest_steps(interval, integer),
                          tasker.task_graph(uuid)
    TO tasker_app, tasker_worker;
