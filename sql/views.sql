-- Views for people at a psql prompt. They run with the extension owner's
-- rights, so tasker_app / tasker_worker can read them without any access to
-- the tables underneath.

CREATE VIEW tasker.templates AS
SELECT tt.template_uuid,
       n.name                                   AS namespace,
       tt.name,
       tt.version,
       tt.description,
       jsonb_array_length(tt.definition -> 'steps') AS step_count,
       n.queue_name,
       tt.created_at,
       tt.updated_at,
       tt.definition
FROM tasker.task_templates tt
JOIN tasker.namespaces n USING (namespace_uuid);
COMMENT ON VIEW tasker.templates IS 'Registered task templates, one row per version.';

CREATE VIEW tasker.task_status AS
SELECT t.task_uuid,
       t.namespace_name AS namespace,
       t.task_name,
       t.task_version,
       t.state,
       t.priority,
       t.total_steps                                                        AS steps_total,
       c.pending                                                            AS steps_pending,
       c.in_flight                                                          AS steps_in_flight,
       c.waiting_for_retry                                                  AS steps_waiting_for_retry,
       c.complete                                                           AS steps_complete,
       c.error                                                              AS steps_error,
       c.other                                                              AS steps_other,
       t.initiator,
       t.tags,
       t.created_at,
       t.updated_at,
       t.completed_at
FROM tasker.tasks t
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE s.state = 'pending')                              AS pending,
           count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress',
                                              'enqueued_for_orchestration',
                                              'enqueued_as_error_for_orchestration')) AS in_flight,
           count(*) FILTER (WHERE s.state = 'waiting_for_retry')                    AS waiting_for_retry,
           count(*) FILTER (WHERE s.state IN ('complete', 'resolved_manually'))     AS complete,
           count(*) FILTER (WHERE s.state = 'error')                                AS error,
           count(*) FILTER (WHERE s.state = 'cancelled')                            AS other
    FROM tasker.workflow_steps s
    WHERE s.task_uuid = t.task_uuid
) c;
COMMENT ON VIEW tasker.task_status IS
    'One row per task: state, priority and step counts by state (complete includes resolved_manually).';

CREATE VIEW tasker.step_status AS
SELECT s.task_uuid,
       t.namespace_name AS namespace,
       t.task_name,
       s.step_uuid,
       s.name           AS step_name,
       s.position,
       s.state,
       s.attempts,
       s.max_attempts,
       coalesce((SELECT array_agg(p.name ORDER BY p.position)
                 FROM tasker.step_edges e
                 JOIN tasker.workflow_steps p ON p.step_uuid = e.from_step_uuid
                 WHERE e.to_step_uuid = s.step_uuid), '{}')      AS dependencies,
       s.last_error ->> 'message'                                AS last_error_message,
       s.next_retry_at,
       s.results,
       s.last_error,
       s.enqueued_at,
       s.completed_at,
       s.updated_at
FROM tasker.workflow_steps s
JOIN tasker.tasks t USING (task_uuid);
COMMENT ON VIEW tasker.step_status IS
    'One row per step: state, attempts, dependencies by name, last error, results, next retry time.';
