-- Roles and privileges (runs last, after every function exists).
--
-- Cluster-wide roles, each holding its privilege in every namespace
-- (sql/03_privileges.sql):
--   tasker_admin   registers templates, creates namespaces, grants
--                  namespace privileges, runs maintenance, handles the DLQ;
--                  a member of tasker_app and tasker_worker.
--   tasker_app     creates tasks, sees them, cancels them.
--   tasker_worker  reads namespace queues and reports step results.
-- API roles, holding EXECUTE on the API and no namespace: a role granted a
-- privilege in one namespace (tasker.grant_namespace) becomes a member of
-- one of them; the cluster-wide roles are members too.
--   tasker_namespace_worker, tasker_namespace_app, tasker_namespace_admin
--   (a member of the other two).
--
-- The roles are cluster-wide and NOLOGIN: grant them to your login roles.
-- They survive DROP EXTENSION (other databases may use them).

DO $roles$
DECLARE
    m record;
BEGIN
    -- roles of these names made by someone else beforehand must not be
    -- able to log in or be superusers (they would hold pg_tasker's API)
    SELECT r.rolname INTO m FROM pg_catalog.pg_roles r
    WHERE r.rolname IN ('tasker_admin', 'tasker_app', 'tasker_worker', 'tasker_namespace_admin',
                        'tasker_namespace_app', 'tasker_namespace_worker')
      AND (r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolbypassrls)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'role "%" exists and can log in (or is privileged); pg_tasker''s roles must be NOLOGIN and unprivileged', m.rolname
            USING ERRCODE = '42501', HINT = format('ALTER ROLE %I NOLOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS, or drop it', m.rolname);
    END IF;
    FOR m IN SELECT * FROM (VALUES ('tasker_admin'), ('tasker_app'), ('tasker_worker'),
                                   ('tasker_namespace_admin'), ('tasker_namespace_app'),
                                   ('tasker_namespace_worker')) r(name)
             WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.rolname = r.name) LOOP
        EXECUTE format('CREATE ROLE %I NOLOGIN', m.name);
    END LOOP;
    FOR m IN SELECT * FROM (VALUES ('tasker_app', 'tasker_admin'), ('tasker_worker', 'tasker_admin'),
                                   ('tasker_namespace_app', 'tasker_namespace_admin'),
                                   ('tasker_namespace_worker', 'tasker_namespace_admin'),
                                   ('tasker_namespace_admin', 'tasker_admin'),
                                   ('tasker_namespace_app', 'tasker_app'),
                                   ('tasker_namespace_worker', 'tasker_worker')) g(role, member)
             WHERE NOT pg_catalog.pg_has_role(g.member, g.role, 'MEMBER') LOOP
        EXECUTE format('GRANT %I TO %I', m.role, m.member);
    END LOOP;
END
$roles$;

-- Nothing in the schema is reachable by default ...
REVOKE ALL ON ALL TABLES IN SCHEMA tasker FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tasker FROM PUBLIC;
GRANT USAGE ON SCHEMA tasker TO tasker_namespace_app, tasker_namespace_worker;

-- ... except the API, role by role. Functions that write are SECURITY DEFINER
-- with a pinned search_path; the tables themselves stay closed.
GRANT SELECT ON tasker.templates, tasker.task_status, tasker.step_status, tasker.ready_tasks,
                tasker.step_state_transitions, tasker.task_state_transitions
    TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.task_state_is_terminal(tasker.task_state),
                          tasker.step_state_class(tasker.step_state),
                          tasker.step_is_runnable(tasker.step_state, integer),
                          tasker.step_is_ready(tasker.step_state, integer, timestamptz, timestamptz),
                          tasker.task_state_is_event(tasker.task_state),
                          tasker.step_move_is_legal(tasker.step_state, tasker.step_state),
                          tasker.task_move_is_legal(tasker.task_state, tasker.task_state),
                          tasker.events_channel()
    TO tasker_namespace_app, tasker_namespace_worker;

-- what the views call (functions in a view run with the rights of its user)
GRANT EXECUTE ON FUNCTION tasker._seen_namespaces(), tasker._caller_namespaces(text), tasker._granted_namespaces(text),
                          tasker._redacted_definition(jsonb), tasker._without_initialization(jsonb)
    TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.queue_name(text) TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.uuid_generate_v7() TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.register_template(jsonb),
                          tasker.register_template_yaml(text)
    TO tasker_namespace_admin;
GRANT EXECUTE ON FUNCTION tasker.create_task(text, text, jsonb, text, integer, text, text, text, text[], text, text),
                          tasker.request_task(text, text, jsonb, text, integer, text, text, text, text[], text, text)
    TO tasker_namespace_app;
GRANT EXECUTE ON FUNCTION tasker.list_tasks(text, tasker.task_state, text, timestamptz, uuid, integer)
    TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.step_readiness(uuid), tasker.task_execution_context(uuid),
                          tasker.effective_priority(integer, interval)
    TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.cancel_task(uuid, text) TO tasker_namespace_app;

-- Workers: take steps and report results.
GRANT EXECUTE ON FUNCTION tasker.submit_result(uuid, text, jsonb, jsonb, jsonb),
                          tasker.read_steps(text, text, integer, integer),
                          tasker.extend_lease(uuid, integer, integer),
                          tasker.checkpoint(uuid, jsonb, integer),
                          tasker.submit_results(jsonb),
                          tasker.exchange(text[], text, jsonb, integer, integer),
                          tasker.wake_channel(text),
                          tasker.worker_idle(text[], text, boolean)
    TO tasker_namespace_worker;

-- Operator actions in a namespace.
GRANT EXECUTE ON FUNCTION tasker.retry_step(uuid, text),
                          tasker.resolve_step_manually(uuid, jsonb, text),
                          tasker.resolve_task_manually(uuid, text)
    TO tasker_namespace_admin;

-- Orchestration across namespaces, and who holds what.
GRANT EXECUTE ON FUNCTION tasker.run_orchestration_cycle(text, integer),
                          tasker.claim_ready_tasks(text, integer, text, integer),
                          tasker.release_task_claim(uuid, text),
                          tasker.extend_task_claim(uuid, text, integer),
                          tasker.grant_namespace(text, name, text),
                          tasker.revoke_namespace(text, name, text)
    TO tasker_admin;
GRANT SELECT ON tasker.namespace_privileges TO tasker_admin;

-- Workers read step messages with plain pgmq calls; each namespace queue
-- grants what pgmq.read needs on its table to tasker_worker when it is
-- created (register_template), and to a namespace's workers when they are
-- granted (tasker.grant_namespace).
GRANT USAGE ON SCHEMA pgmq TO tasker_namespace_worker;

-- Health and configuration.
GRANT EXECUTE ON FUNCTION tasker.health(), tasker.metrics() TO tasker_namespace_app, tasker_namespace_worker;
GRANT EXECUTE ON FUNCTION tasker.config() TO tasker_admin;
GRANT SELECT ON tasker.orchestrator_status, tasker.queue_status TO tasker_namespace_app, tasker_namespace_worker;

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
    TO tasker_namespace_app, tasker_namespace_worker;
