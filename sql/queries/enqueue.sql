-- Enqueue the runnable steps of a task (all, or only those in $2): pending
-- or waiting_for_retry, no unfinished parent, retry time reached, task not
-- finished. Their rows are locked (uuid order) before anything else, so two
-- sessions can never enqueue the same attempt: the second finds the state
-- changed. Each step moves to 'enqueued' with attempts + 1, gets its pgmq
-- msg_id from the queue's sequence ($3), and a transition; the messages are
-- returned for the caller to insert into the queue in the same transaction.
--   $1 task_uuid  $2 uuid[] or NULL  $3 the queue's msg_id sequence (text)
WITH runnable AS (
    SELECT s.step_uuid
    FROM tasker.workflow_steps s
    JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
    WHERE s.task_uuid = $1
      AND t.state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
      AND ($2::uuid[] IS NULL OR s.step_uuid = ANY ($2::uuid[]))
      AND s.state IN ('pending', 'waiting_for_retry')
      AND s.pending_parents = 0
      AND (s.next_retry_at IS NULL OR s.next_retry_at <= now())
    ORDER BY s.step_uuid
    FOR UPDATE OF s
), enqueued AS (
    UPDATE tasker.workflow_steps s
    SET state = 'enqueued',
        attempts = s.attempts + 1,
        last_attempted_at = now(),
        enqueued_at = now(),
        next_retry_at = NULL,
        updated_at = now(),
        queue_msg_id = nextval($3::text::regclass)
    FROM runnable r
    WHERE s.step_uuid = r.step_uuid
    RETURNING s.*
), prev AS (
    UPDATE tasker.step_transitions st SET most_recent = false
    FROM enqueued e
    WHERE st.step_uuid = e.step_uuid AND st.most_recent
    RETURNING st.step_uuid, st.to_state, st.sort_key
), transitions AS (
    INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, reason, sort_key)
    SELECT e.step_uuid, p.to_state, 'enqueued', 'dependencies satisfied', coalesce(p.sort_key, 0) + 1
    FROM enqueued e LEFT JOIN prev p ON p.step_uuid = e.step_uuid
)
SELECT e.queue_msg_id,
       jsonb_build_object(
           'message_version', 1,
           'task_uuid', e.task_uuid,
           'step_uuid', e.step_uuid,
           'namespace', t.namespace_name,
           'task_name', t.task_name,
           'task_version', t.task_version,
           'step_name', e.name,
           'handler', jsonb_build_object('callable', e.handler_callable,
                                         'method', e.handler_method,
                                         'initialization', e.inputs),
           'task_context', t.context,
           'dependency_results', (
               SELECT coalesce(jsonb_object_agg(p.name, p.results), '{}')
               FROM tasker.step_edges ed
               JOIN tasker.workflow_steps p ON p.step_uuid = ed.from_step_uuid
               WHERE ed.to_step_uuid = e.step_uuid),
           'attempt', e.attempts,
           'max_attempts', e.max_attempts,
           'timeout_seconds', e.timeout_seconds,
           'correlation_id', t.correlation_id,
           'enqueued_at', now())
FROM enqueued e
JOIN tasker.tasks t ON t.task_uuid = e.task_uuid
ORDER BY e.queue_msg_id
