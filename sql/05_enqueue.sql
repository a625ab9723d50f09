-- Enqueueing: a runnable step starts a new attempt and gets one message in
-- its namespace queue, carrying everything a worker needs
-- (docs/worker-protocol.md).

-- Enqueues the given runnable steps of one task; the caller holds the task
-- row lock. p_queue / p_queue_seq: the task's queue and its msg_id
-- sequence (looked up when NULL). Returns how many were enqueued.
CREATE FUNCTION tasker._enqueue_steps(p_task uuid, p_steps uuid[], p_queue text DEFAULT NULL,
                                      p_queue_seq regclass DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_queue text := p_queue;
    v_seq regclass := p_queue_seq;
    v_sent integer;
BEGIN
    IF v_queue IS NULL OR v_seq IS NULL THEN
        SELECT n.queue_name, n.queue_seq INTO v_queue, v_seq
        FROM tasker.tasks t JOIN tasker.namespaces n ON n.name = t.namespace_name
        WHERE t.task_uuid = p_task;
    END IF;
    -- One statement: the steps move (a new attempt, a new msg_id each), and
    -- their messages are built and sent. The joined step and task rows are
    -- read as they were when the statement began, which is right for every
    -- column used here but attempts and queue_msg_id, which come from the
    -- move itself.
    SELECT tasker._pgmq_send(v_queue, array_agg(x.queue_msg_id ORDER BY x.queue_msg_id),
                             array_agg(x.message ORDER BY x.queue_msg_id))
    INTO v_sent
    FROM (
        SELECT m.queue_msg_id,
               jsonb_build_object(
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
                   'attempt', m.attempts,
                   'budget_attempt', m.attempts - s.budget_offset,
                   'max_attempts', s.max_attempts,
                   'timeout_seconds', s.timeout_seconds,
                   'correlation_id', t.correlation_id,
                   'enqueued_at', now()) AS message
        FROM tasker._move_steps(
                 ARRAY(SELECT ROW(u, NULL, NULL, NULL, NULL)::tasker.step_change FROM unnest(p_steps) u),
                 'enqueued', 'ready', '{}', v_seq) m
        JOIN tasker.workflow_steps s ON s.step_uuid = m.step_uuid
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid) x;
    RETURN coalesce(v_sent, 0);
END
$$;
