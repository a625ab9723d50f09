-- psql-friendly views over tasker.health().

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
