-- Locking, stopping steps, and the operator actions: cancel a task, resolve
-- a task, retry a failed step, resolve a step.

-- Takes a task's exclusive lock and its row (the first locks of every
-- operation but results that only complete steps: 04_transitions.sql);
-- P0002 when it does not exist. Also returns the task's queue and the
-- queue's msg_id sequence.
CREATE FUNCTION tasker._lock_task(p_task uuid, OUT task_uuid uuid, OUT state tasker.task_state,
                                  OUT queue_name text, OUT queue_seq regclass)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._lock_tasks(ARRAY[p_task], false);
    SELECT t.task_uuid, t.state, n.queue_name, n.queue_seq
    INTO _lock_task.task_uuid, _lock_task.state, _lock_task.queue_name, _lock_task.queue_seq
    FROM tasker.tasks t JOIN tasker.namespaces n ON n.name = t.namespace_name
    WHERE t.task_uuid = p_task
    FOR NO KEY UPDATE OF t;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'P0002';
    END IF;
END
$$;

-- Locks the task of a step (tasker._lock_task: the lock order); P0002 when
-- the step does not exist.
CREATE FUNCTION tasker._lock_task_of_step(p_step uuid, OUT task_uuid uuid, OUT state tasker.task_state,
                                          OUT queue_name text, OUT queue_seq regclass)
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid := (SELECT ws.task_uuid FROM tasker.workflow_steps ws WHERE ws.step_uuid = p_step);
BEGIN
    IF v_task IS NULL THEN
        RAISE EXCEPTION 'step % does not exist', p_step USING ERRCODE = 'P0002';
    END IF;
    SELECT * INTO _lock_task_of_step.task_uuid, _lock_task_of_step.state, _lock_task_of_step.queue_name,
                  _lock_task_of_step.queue_seq
    FROM tasker._lock_task(v_task);
END
$$;

-- Moves every step of a task that may legally move to p_to (cancelled, or
-- error for the attempts out with workers) and archives the messages of
-- those that were out, so no worker picks them up. The caller holds the
-- task row lock and settles the returned moves.
CREATE FUNCTION tasker._stop_steps(p_task uuid, p_queue text, p_to tasker.step_state, p_reason text,
                                   p_error jsonb DEFAULT NULL)
RETURNS tasker.step_move[]
LANGUAGE plpgsql AS $$
DECLARE
    v_steps uuid[];
    v_msgs bigint[];
BEGIN
    SELECT array_agg(s.step_uuid ORDER BY s.step_uuid),
           array_agg(s.queue_msg_id) FILTER (WHERE tasker.step_state_class(s.state) = 'out')
    INTO v_steps, v_msgs
    FROM tasker.workflow_steps s
    WHERE s.task_uuid = p_task
      AND tasker.step_move_is_legal(s.state, p_to)
      -- (error: only attempts out with workers fail; pending -> error is a
      -- map step's invalid input)
      AND (p_to <> 'error' OR tasker.step_state_class(s.state) = 'out');
    IF v_steps IS NULL THEN
        RETURN '{}';
    END IF;
    IF v_msgs IS NOT NULL THEN
        PERFORM tasker._pgmq_archive(p_queue, v_msgs);
    END IF;
    RETURN tasker._move_steps(
        ARRAY(SELECT ROW(u, p_error, NULL, NULL, NULL)::tasker.step_change FROM unnest(v_steps) u),
        p_to, p_reason, CASE WHEN p_error IS NULL THEN '{}' ELSE jsonb_build_object('error', p_error) END);
END
$$;

-- Closes an active task: its unfinished steps are cancelled (attempts out
-- with workers withdrawn), the task moves to p_to (cancelled,
-- resolved_manually). 55000 for a finished task.
CREATE FUNCTION tasker._close_task(p_task uuid, p_to tasker.task_state, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    IF p_task IS NULL THEN
        RAISE EXCEPTION 'task_uuid must not be NULL' USING ERRCODE = '22004';
    END IF;
    t := tasker._lock_task(p_task);
    IF tasker.task_state_is_terminal(t.state) THEN
        RAISE EXCEPTION 'task % is already % and cannot be %', t.task_uuid, t.state,
            CASE p_to WHEN 'cancelled' THEN 'cancelled' ELSE 'resolved' END USING ERRCODE = '55000';
    END IF;
    PERFORM tasker._settle_tasks(
        tasker._stop_steps(t.task_uuid, t.queue_name, 'cancelled', p_reason),
        p_reason, ARRAY[t.task_uuid], p_to);
END
$$;

-- tasker.cancel_task(task_uuid, reason) RETURNS text: cancels every
-- unfinished step (archiving their messages) and the task.
CREATE FUNCTION tasker.cancel_task(task_uuid uuid, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM tasker._require_tasks(ARRAY[cancel_task.task_uuid], 'app');
    PERFORM tasker._close_task(cancel_task.task_uuid, 'cancelled',
                               coalesce(cancel_task.reason, 'cancelled by operator'));
    RETURN 'cancelled';
END
$$;

-- tasker.resolve_task_manually(task_uuid, reason) RETURNS text: an operator
-- closes an active task (typically blocked_by_failures) as resolved; its
-- unfinished steps are cancelled, steps in error stay as they are.
CREATE FUNCTION tasker.resolve_task_manually(task_uuid uuid, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM tasker._require_tasks(ARRAY[resolve_task_manually.task_uuid], 'admin');
    PERFORM tasker._close_task(resolve_task_manually.task_uuid, 'resolved_manually',
                               coalesce(resolve_task_manually.reason, 'resolved manually by operator'));
    RETURN 'resolved_manually';
END
$$;

-- tasker.retry_step(step_uuid, reason) RETURNS text: a step in error gets a
-- new retry budget (max_attempts more attempts; the attempt number keeps
-- growing) and the task resumes. Returns the step's state afterwards.
CREATE FUNCTION tasker.retry_step(step_uuid uuid, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    s tasker.workflow_steps%ROWTYPE;
BEGIN
    IF retry_step.step_uuid IS NULL THEN
        RAISE EXCEPTION 'step_uuid must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM tasker._require_steps(ARRAY[retry_step.step_uuid], 'admin');
    t := tasker._lock_task_of_step(retry_step.step_uuid);
    SELECT * INTO s FROM tasker.workflow_steps ws WHERE ws.step_uuid = retry_step.step_uuid;
    IF s.state <> 'error' THEN
        RAISE EXCEPTION 'step "%" is %; only a step in error can be retried', s.name, s.state USING ERRCODE = '55000';
    ELSIF tasker.task_state_is_terminal(t.state) THEN
        RAISE EXCEPTION 'task % is %; its steps cannot change', t.task_uuid, t.state USING ERRCODE = '55000';
    END IF;
    PERFORM tasker._settle_tasks(
        tasker._move_steps(ARRAY[ROW(s.step_uuid, NULL, NULL, NULL, NULL)::tasker.step_change],
                           'pending', coalesce(retry_step.reason, 'retried by operator'),
                           jsonb_build_object('previous_attempts', s.attempts))
        || tasker._enqueue_steps(ARRAY[ROW(s.step_uuid, 0)::tasker.step_release]),
        'step retried by operator', ARRAY[t.task_uuid]);
    RETURN (SELECT ws.state::text FROM tasker.workflow_steps ws WHERE ws.step_uuid = s.step_uuid);
END
$$;

-- tasker.resolve_step_manually(step_uuid, result, reason) RETURNS text: an
-- operator supplies a step's result; it satisfies its dependents as a
-- completion would (an attempt out with a worker is withdrawn).
CREATE FUNCTION tasker.resolve_step_manually(step_uuid uuid, result jsonb DEFAULT NULL, reason text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    s tasker.workflow_steps%ROWTYPE;
BEGIN
    IF resolve_step_manually.step_uuid IS NULL THEN
        RAISE EXCEPTION 'step_uuid must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM tasker._require_steps(ARRAY[resolve_step_manually.step_uuid], 'admin');
    t := tasker._lock_task_of_step(resolve_step_manually.step_uuid);
    SELECT * INTO s FROM tasker.workflow_steps ws WHERE ws.step_uuid = resolve_step_manually.step_uuid;
    IF NOT tasker.step_move_is_legal(s.state, 'resolved_manually') THEN
        RAISE EXCEPTION 'step "%" is already % and cannot be resolved manually', s.name, s.state
            USING ERRCODE = '55000';
    ELSIF tasker.task_state_is_terminal(t.state) THEN
        RAISE EXCEPTION 'task % is %; its steps cannot change', t.task_uuid, t.state USING ERRCODE = '55000';
    END IF;
    PERFORM tasker._check_payload_size(resolve_step_manually.result, 'limits.max_result_bytes', 'the result');
    IF tasker.step_state_class(s.state) = 'out' THEN
        PERFORM tasker._pgmq_archive(t.queue_name, ARRAY[s.queue_msg_id]);
    END IF;
    PERFORM tasker._settle_tasks(
        tasker._finish_steps(
            ARRAY[ROW(s.step_uuid, coalesce(resolve_step_manually.result, 'null'), NULL, NULL, NULL)::tasker.step_change],
            'resolved_manually', coalesce(resolve_step_manually.reason, 'resolved manually by operator')),
        'step resolved manually', ARRAY[t.task_uuid]);
    RETURN 'resolved_manually';
END
$$;
