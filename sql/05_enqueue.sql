-- Enqueueing: a runnable step starts a new attempt and gets one message in
-- its namespace queue, carrying everything a worker needs
-- (docs/worker-protocol.md).

-- Enqueues the given runnable steps of one task; the caller holds the task
-- row lock. Returns how many were enqueued.
CREATE FUNCTION tasker._enqueue_steps(p_task uuid, p_steps uuid[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_queue text;
    v_seq regclass;
    v_moved uuid[];
    v_ids bigint[];
    v_messages jsonb[];
BEGIN
    SELECT n.queue_name, n.queue_seq INTO v_queue, v_seq
    FROM tasker.tasks t JOIN tasker.namespaces n ON n.name = t.namespace_name
    WHERE t.task_uuid = p_task;

    SELECT array_agg(m.step_uuid) INTO v_moved
    FROM tasker._move_steps(
        ARRAY(SELECT ROW(u, NULL, NULL, NULL, NULL)::tasker.step_change FROM unnest(p_steps) u),
        'enqueued', 'ready', '{}', v_seq) m;

    SELECT array_agg(s.queue_msg_id ORDER BY s.queue_msg_id),
           array_agg(jsonb_build_object(
               'message_version', 1,
               'task_uuid', s.task_uuid,
               'step_uuid', s.step_uuid,
               'namespace', t.namespace_name,
               'task_name', t.task_name,
               'task_version', t.task_version,
               'step_name', s.name,
               'handler', jsonb_build_object('callable', s.handler_callable,
                                             'method', s.handler_method,
                                             'initialization', s.inputs),
               'task_context', t.context,
               'dependency_results', (
                   SELECT coalesce(jsonb_object_agg(p.name, p.results), '{}')
                   FROM tasker.step_edges e
                   JOIN tasker.workflow_steps p ON p.step_uuid = e.from_step_uuid
                   WHERE e.to_step_uuid = s.step_uuid),
               'attempt', s.attempts,
               'budget_attempt', s.attempts - s.budget_offset,
               'max_attempts', s.max_attempts,
               'timeout_seconds', s.timeout_seconds,
               'correlation_id', t.correlation_id,
               'enqueued_at', s.enqueued_at) ORDER BY s.queue_msg_id)
    INTO v_ids, v_messages
    FROM tasker.workflow_steps s
    JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
    WHERE s.step_uuid = ANY (v_moved);

    IF v_ids IS NOT NULL THEN
        PERFORM tasker._pgmq_send(v_queue, v_ids, v_messages);
    END IF;
    RETURN coalesce(cardinality(v_ids), 0);
END
$$;
