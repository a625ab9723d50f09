-- Results: completing steps (a worker's success, an operator's resolution)
-- and failing attempts (a worker's failure, a lost or timed-out attempt).
-- The callers hold the task row lock and re-evaluate the task afterwards.

-- Moves steps to complete or resolved_manually with their results, and
-- releases their children (pending_parents counts down; evaluation enqueues
-- the children that became ready).
CREATE FUNCTION tasker._complete_steps(p_changes tasker.step_change[], p_to tasker.step_state,
                                       p_reason text, p_metadata jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_done uuid[];
    v_children uuid[];
    v_counts integer[];
BEGIN
    SELECT array_agg(m.step_uuid) INTO v_done
    FROM tasker._move_steps(p_changes, p_to, p_reason, p_metadata) m;
    SELECT array_agg(x.child), array_agg(x.n) INTO v_children, v_counts
    FROM (SELECT ed.to_step_uuid AS child, count(*)::integer AS n
          FROM tasker.step_edges ed
          WHERE ed.from_step_uuid = ANY (v_done)
          GROUP BY ed.to_step_uuid) x;
    IF v_children IS NOT NULL THEN
        -- (joined through unnest of arrays: a generic plan looks each child
        -- up by key; a join with the aggregate above was planned as a hash
        -- join over every step)
        UPDATE tasker.workflow_steps c
        SET pending_parents = c.pending_parents - e.n
        FROM unnest(v_children, v_counts) AS e(child, n)
        WHERE c.step_uuid = e.child;
    END IF;
END
$$;

-- Fails the current attempt of a step: the retry policy (pg_tasker_core's
-- retry::on_failure, through tasker._retry_decision) sends it to
-- waiting_for_retry or to error. p_error is stored as given. Returns the
-- step's new state.
CREATE FUNCTION tasker._fail_attempt(p_step uuid, p_error jsonb, p_message text,
                                     p_error_retryable boolean, p_requested_delay_ms bigint,
                                     p_metadata jsonb DEFAULT '{}')
RETURNS tasker.step_state
LANGUAGE plpgsql AS $$
DECLARE
    s tasker.workflow_steps%ROWTYPE;
    d record;
BEGIN
    SELECT * INTO s FROM tasker.workflow_steps WHERE step_uuid = p_step;
    SELECT * INTO d FROM tasker._retry_decision(s.retryable, s.max_attempts, s.attempts - s.budget_offset,
                                                s.backoff::text, s.backoff_base_ms, s.max_backoff_ms, s.jitter,
                                                p_error_retryable, p_requested_delay_ms);
    IF d.retry THEN
        PERFORM tasker._move_steps(
            ARRAY[ROW(p_step, p_error, now() + make_interval(secs => d.delay_ms / 1000.0), p_message,
                      jsonb_build_object('error', p_error, 'retry_in_ms', d.delay_ms,
                                         'delay_requested_by_handler', d.requested))::tasker.step_change],
            'waiting_for_retry', p_message, p_metadata);
        RETURN 'waiting_for_retry';
    END IF;
    PERFORM tasker._move_steps(
        ARRAY[ROW(p_step, p_error, NULL, p_message,
                  jsonb_build_object('error', p_error, 'attempts_exhausted', d.exhausted))::tasker.step_change],
        'error', p_message, p_metadata);
    RETURN 'error';
END
$$;

-- tasker.submit_result(step_uuid, status, result, error, metadata) RETURNS text:
-- a worker reports the outcome of an attempt. In one transaction: the
-- message is archived, the attempt settled, children released and enqueued,
-- the task re-evaluated. Returns the step's state afterwards.
CREATE FUNCTION tasker.submit_result(step_uuid uuid, status text, result jsonb DEFAULT NULL,
                                     error jsonb DEFAULT NULL, metadata jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_step uuid := submit_result.step_uuid;
    sub tasker.submission;
    t record;
    s tasker.workflow_steps%ROWTYPE;
    v_audit jsonb;
BEGIN
    IF v_step IS NULL THEN
        RAISE EXCEPTION 'step_uuid must not be NULL' USING ERRCODE = '22004';
    ELSIF submit_result.status IS NULL THEN
        RAISE EXCEPTION 'status must not be NULL' USING ERRCODE = '22004';
    END IF;
    sub := tasker._read_submission(submit_result.status, submit_result.error, submit_result.metadata);

    -- lock order: the task row, then the step
    t := tasker._lock_task_of_step(v_step);
    SELECT * INTO s FROM tasker.workflow_steps ws WHERE ws.step_uuid = v_step;

    IF tasker.step_state_class(s.state) <> 'out' THEN
        IF s.attempts = 0 THEN
            RAISE EXCEPTION 'step "%" (%) has never been enqueued; there is no attempt to report on', s.name, v_step
                USING ERRCODE = '55000';
        END IF;
        RAISE NOTICE 'pg_tasker: result for step "%" (%) ignored: the step is %, attempt % is already settled',
            s.name, v_step, s.state, s.attempts;
        RETURN s.state::text;
    ELSIF tasker.task_state_is_terminal(t.state) THEN
        RAISE NOTICE 'pg_tasker: result for step "%" (%) ignored: its task is %', s.name, v_step, t.state;
        RETURN s.state::text;
    ELSIF sub.attempt IS NOT NULL AND sub.attempt <> s.attempts THEN
        RAISE NOTICE 'pg_tasker: result for attempt % of step "%" (%) ignored: the current attempt is %',
            sub.attempt, s.name, v_step, s.attempts;
        RETURN s.state::text;
    END IF;
    IF sub.success THEN
        PERFORM tasker._check_payload_size(submit_result.result, 'limits.max_result_bytes', 'the result');
    ELSE
        PERFORM tasker._check_payload_size(submit_result.error, 'limits.max_result_bytes', 'the error');
    END IF;

    PERFORM tasker._pgmq_archive(t.queue_name, ARRAY[s.queue_msg_id]);
    v_audit := jsonb_strip_nulls(jsonb_build_object(
        'worker_id', sub.worker_id, 'execution_time_ms', sub.execution_time_ms,
        'metadata', submit_result.metadata));
    IF sub.success THEN
        PERFORM tasker._complete_steps(
            ARRAY[ROW(v_step, coalesce(submit_result.result, 'null'), NULL, NULL, NULL)::tasker.step_change],
            'complete', 'completed by worker', v_audit);
        PERFORM tasker._evaluate_task(t.task_uuid, 'step completed', t.queue_name, t.queue_seq);
        RETURN 'complete';
    END IF;
    PERFORM tasker._fail_attempt(v_step, submit_result.error, sub.message, sub.retryable,
                                 sub.requested_delay_ms, v_audit);
    PERFORM tasker._evaluate_task(t.task_uuid, 'step failed', t.queue_name, t.queue_seq);
    -- a retry due at once was enqueued again by the evaluation
    RETURN (SELECT ws.state::text FROM tasker.workflow_steps ws WHERE ws.step_uuid = v_step);
END
$$;
