-- Health: what tasker.health() (src/health.rs) reports besides the
-- orchestrator's shared-memory state, and psql-friendly views over it.
-- Cheap and side-effect free: queue depths, active tasks (never the
-- finished history), due tasks; of the namespaces the caller holds a
-- privilege in (the DLQ only for those who see every namespace).

CREATE FUNCTION tasker._health_data() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH seen AS (
        SELECT tasker._seen_namespaces() AS name
    ), active AS (
        SELECT t.namespace_name, t.state, count(*) AS n FROM tasker.tasks t
        WHERE NOT tasker.task_state_is_terminal(t.state) AND t.namespace_name IN (SELECT name FROM seen)
        GROUP BY t.namespace_name, t.state
    )
    SELECT jsonb_build_object(
        'queues', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'namespace', n.name, 'queue', n.queue_name, 'depth', m.depth, 'visible', m.visible,
                       'oldest_message_age_seconds', m.oldest_message_age_seconds,
                       'total_messages', m.total_messages) ORDER BY n.name)
            FROM tasker.namespaces n
            CROSS JOIN LATERAL tasker._pgmq_metrics(n.queue_name) m
            WHERE tasker._pgmq_queue_exists(n.queue_name)
              AND n.name IN (SELECT name FROM seen)), '[]'),
        'active_tasks_by_state', coalesce((
            SELECT jsonb_object_agg(a.state, a.n)
            FROM (SELECT state, sum(n) AS n FROM active GROUP BY state) a), '{}'),
        'active_tasks', coalesce((
            SELECT jsonb_agg(jsonb_build_object('namespace', a.namespace_name, 'state', a.state, 'tasks', a.n)
                             ORDER BY a.namespace_name, a.state)
            FROM active a), '[]'),
        'due_tasks', (SELECT count(*) FROM tasker.ready_tasks),
        'dlq_pending_by_reason', coalesce((
            SELECT jsonb_object_agg(d.reason, d.n)
            FROM (SELECT reason, count(*) AS n FROM tasker.dlq
                  WHERE resolution_status = 'pending' AND tasker._caller_holds_all('any')
                  GROUP BY reason) d), '{}'))
$$;

CREATE VIEW tasker.orchestrator_status AS
SELECT (h -> 'orchestrator' ->> 'running')::boolean AS running,
       (h -> 'orchestrator' ->> 'pid')::integer     AS pid,
       h -> 'orchestrator' ->> 'status'              AS status,
       (h -> 'orchestrator' ->> 'ticks')::bigint     AS ticks,
       to_timestamp((h -> 'orchestrator' ->> 'last_tick_at')::double precision / 1000) AS last_tick_at,
       (h -> 'orchestrator' ->> 'errors')::bigint    AS errors,
       h -> 'orchestrator' ->> 'last_error'          AS last_error,
       h -> 'config' ->> 'environment'               AS environment,
       (h -> 'config' ->> 'valid')::boolean          AS config_valid,
       (h ->> 'due_tasks')::bigint                   AS due_tasks
FROM tasker.health() AS h;
COMMENT ON VIEW tasker.orchestrator_status IS 'The background orchestrator at a glance.';

CREATE VIEW tasker.queue_status AS
SELECT q ->> 'namespace'                             AS namespace,
       q ->> 'queue'                                 AS queue,
       (q ->> 'depth')::bigint                       AS depth,
       (q ->> 'visible')::bigint                     AS visible,
       (q ->> 'oldest_message_age_seconds')::integer AS oldest_message_age_seconds,
       (q ->> 'total_messages')::bigint              AS total_messages
FROM tasker.health() AS h, jsonb_array_elements(h -> 'queues') AS q;
COMMENT ON VIEW tasker.queue_status IS 'Step queue depth per namespace.';
