-- Task evaluation: the one place that decides a task's state. Every
-- operation that changes a step of an active task calls it before it
-- returns, in the same transaction.

-- The ready steps of a task now (tasker.step_is_ready), in uuid order.
-- (PL/pgSQL rather than SQL: its plan is kept for the session.)
CREATE FUNCTION tasker._ready_steps(p_task uuid) RETURNS uuid[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT array_agg(s.step_uuid ORDER BY s.step_uuid)
            FROM tasker.workflow_steps s
            WHERE s.task_uuid = p_task
              AND tasker.step_is_runnable(s.state, s.pending_parents)  -- workflow_steps_runnable_idx
              AND tasker.step_is_ready(s.state, s.pending_parents, s.next_retry_at, now()));
END
$$;

-- Enqueues the task's ready steps, decides its state from its step
-- counters (tasker._task_status, i.e. pg_tasker_core::status), moves
-- it when the state changes and records when the orchestrator must look at
-- it again (the earliest retry; NULL when nothing is due). The caller holds
-- the task row lock. A finished task is left as it is.
-- (p_queue, p_queue_seq: the task's queue and its sequence, when the caller
-- has them from tasker._lock_task.)
CREATE FUNCTION tasker._evaluate_task(p_task uuid, p_reason text, p_queue text DEFAULT NULL,
                                      p_queue_seq regclass DEFAULT NULL)
RETURNS tasker.task_state
LANGUAGE plpgsql AS $$
DECLARE
    t tasker.tasks%ROWTYPE;
    v_ready uuid[];
    v_status text;
    v_state tasker.task_state;
    v_next timestamptz;
BEGIN
    SELECT * INTO t FROM tasker.tasks WHERE task_uuid = p_task;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'P0002';
    END IF;
    IF tasker.task_state_is_terminal(t.state) THEN
        RETURN t.state;
    END IF;
    v_ready := tasker._ready_steps(p_task);
    IF v_ready IS NOT NULL THEN
        PERFORM tasker._enqueue_steps(p_task, v_ready, p_queue, p_queue_seq);
        SELECT * INTO t FROM tasker.tasks WHERE task_uuid = p_task;
    END IF;
    SELECT d.execution_status, d.task_state INTO v_status, v_state
    FROM tasker._task_status(t.steps_total, t.steps_pending, t.steps_out, t.steps_waiting,
                             t.steps_done, t.steps_error, t.steps_cancelled, 0) d;
    IF t.steps_waiting > 0 THEN
        SELECT min(s.next_retry_at) INTO v_next
        FROM tasker.workflow_steps s
        WHERE s.task_uuid = p_task
          AND tasker.step_is_runnable(s.state, s.pending_parents) AND s.state = 'waiting_for_retry';
    END IF;
    IF v_state <> t.state THEN
        PERFORM tasker._move_task(p_task, v_state, p_reason,
                                  jsonb_build_object('execution_status', v_status), v_next);
    ELSIF t.next_action_at IS DISTINCT FROM v_next THEN
        UPDATE tasker.tasks SET next_action_at = v_next WHERE task_uuid = p_task;
    END IF;
    IF v_next IS NOT NULL THEN
        -- the orchestrator recomputes its sleep when this commits
        PERFORM tasker._wake_orchestrator();
    END IF;
    RETURN v_state;
END
$$;
