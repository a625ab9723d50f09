-- Task evaluation by time: what the orchestration cycle does for a task
-- whose next_action_at has come (its due retries), and what an upgrade does
-- for every active task. Operations that move steps find their ready steps
-- through the counters and settle the task themselves (04_transitions.sql).

-- Enqueues the task's steps whose retry is due (with p_all: every ready
-- step, found by a scan of the task's steps) and settles the task, with
-- p_moves, the caller's own moves. The caller holds the task row lock.
-- Returns the task's state.
CREATE FUNCTION tasker._evaluate_task(p_task uuid, p_reason text, p_all boolean DEFAULT false,
                                      p_moves tasker.step_move[] DEFAULT '{}')
RETURNS tasker.task_state
LANGUAGE plpgsql AS $$
DECLARE
    v_candidates tasker.step_release[];
    v_moves tasker.step_move[];
BEGIN
    IF p_all THEN
        v_candidates := ARRAY(
            SELECT ROW(s.step_uuid, 0)::tasker.step_release FROM tasker.workflow_steps s
            WHERE s.task_uuid = p_task AND tasker.step_is_ready(s.state, s.pending_parents, s.next_retry_at, now()));
    ELSE
        v_candidates := ARRAY(
            SELECT ROW(s.step_uuid, 0)::tasker.step_release FROM tasker.workflow_steps s
            WHERE s.task_uuid = p_task AND s.next_retry_at <= now());  -- workflow_steps_retry_idx
    END IF;
    v_moves := p_moves || tasker._enqueue_steps(v_candidates, CASE WHEN p_all THEN 'ready' ELSE 'retry due' END);
    RETURN (tasker._settle_tasks(v_moves, p_reason, ARRAY[p_task]))[1];
END
$$;
