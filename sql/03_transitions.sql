-- Plans: the API functions and the maintenance entry points run with
-- plan_cache_mode = force_generic_plan, so the statements of these
-- primitives (and of everything else they call) are planned once per
-- session; custom plans re-plan on every call, which was most of the cost
-- of a small state change. Every statement here joins by key, so the
-- generic plan is the right one for 1 row and for 10,000.

-- The two primitives that change state. Every operation changes a step's
-- or a task's state through them, and nothing else writes `state`.
--
-- Lock order (docs/schema.md): the task row first (FOR NO KEY UPDATE), then
-- its steps in uuid order, then queue messages. Every caller of
-- tasker._move_steps holds the row locks of the tasks whose steps move,
-- except tasker.read_steps, whose move enqueued -> in_progress changes no
-- counter and so touches no task row; it locks the steps with SKIP LOCKED
-- and never waits.

-- One change of one step, as tasker._move_steps applies it.
CREATE TYPE tasker.step_change AS (
    step_uuid uuid,
    -- -> complete / resolved_manually: the results;
    -- -> waiting_for_retry / error: the error (NULL keeps last_error)
    payload   jsonb,
    -- -> waiting_for_retry: when the next attempt is due
    retry_at  timestamptz,
    -- audit row: reason (NULL: the call's) and metadata (over the call's)
    reason    text,
    metadata  jsonb
);

-- Moves steps to p_to: the columns p_to implies, one audit row per step and
-- the counters of their tasks, in one statement. Refuses (XX000: a bug in
-- the caller) a move that step_state_transitions does not list. Moving to
-- 'enqueued' starts a new attempt and takes a msg_id from p_queue_seq.
CREATE FUNCTION tasker._move_steps(p_changes tasker.step_change[], p_to tasker.step_state,
                                   p_reason text, p_metadata jsonb DEFAULT '{}',
                                   p_queue_seq regclass DEFAULT NULL)
RETURNS TABLE (step_uuid uuid, task_uuid uuid, from_state tasker.step_state, attempts integer,
               queue_msg_id bigint)
-- (most calls move one step: joins on the result use the keys)
LANGUAGE plpgsql ROWS 1 AS $$
DECLARE
    moved integer;
    to_class text := tasker.step_state_class(p_to);
BEGIN
    IF p_to = 'enqueued' AND p_queue_seq IS NULL THEN
        RAISE EXCEPTION 'pg_tasker internal error: enqueueing needs the queue''s sequence'
            USING ERRCODE = 'XX000';
    END IF;
    RETURN QUERY
    WITH v AS (
        SELECT s.step_uuid, s.state AS from_state, c.payload, c.retry_at, c.reason, c.metadata
        FROM tasker.workflow_steps s
        JOIN unnest(p_changes) c ON c.step_uuid = s.step_uuid
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE OF s
    ), m AS (
        UPDATE tasker.workflow_steps s
        SET state         = p_to,
            transitions   = s.transitions + 1,
            updated_at    = now(),
            attempts      = s.attempts + CASE WHEN p_to = 'enqueued' THEN 1 ELSE 0 END,
            budget_offset = CASE WHEN p_to = 'pending' THEN s.attempts ELSE s.budget_offset END,
            queue_msg_id  = CASE WHEN p_to = 'enqueued' THEN nextval(p_queue_seq) ELSE s.queue_msg_id END,
            enqueued_at   = CASE WHEN p_to = 'enqueued' THEN now() ELSE s.enqueued_at END,
            started_at    = CASE WHEN p_to = 'enqueued' THEN NULL
                                 WHEN p_to = 'in_progress' THEN coalesce(s.started_at, now())
                                 ELSE s.started_at END,
            results       = CASE WHEN to_class = 'done' THEN v.payload ELSE s.results END,
            last_error    = CASE WHEN p_to IN ('waiting_for_retry', 'error') THEN coalesce(v.payload, s.last_error)
                                 ELSE s.last_error END,
            next_retry_at = CASE WHEN p_to = 'waiting_for_retry' THEN v.retry_at END,
            completed_at  = CASE WHEN to_class = 'done' THEN now() END
        FROM v
        JOIN tasker.step_state_transitions l ON l.from_state = v.from_state AND l.to_state = p_to
        WHERE s.step_uuid = v.step_uuid
        RETURNING s.step_uuid, s.task_uuid, v.from_state, tasker.step_state_class(v.from_state) AS from_class,
                  s.attempts, s.queue_msg_id, s.transitions, v.reason, v.metadata
    ), audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT m.step_uuid, m.transitions, m.from_state, p_to, coalesce(m.reason, p_reason),
               coalesce(p_metadata, '{}') || coalesce(m.metadata, '{}')
                   || jsonb_build_object('attempt', m.attempts)
        FROM m
    ), delta AS (
        SELECT m.task_uuid,
               count(*) FILTER (WHERE to_class = 'pending') - count(*) FILTER (WHERE m.from_class = 'pending') AS pending,
               count(*) FILTER (WHERE to_class = 'out') - count(*) FILTER (WHERE m.from_class = 'out') AS out,
               count(*) FILTER (WHERE to_class = 'waiting') - count(*) FILTER (WHERE m.from_class = 'waiting') AS waiting,
               count(*) FILTER (WHERE to_class = 'done') - count(*) FILTER (WHERE m.from_class = 'done') AS done,
               count(*) FILTER (WHERE to_class = 'error') - count(*) FILTER (WHERE m.from_class = 'error') AS error,
               count(*) FILTER (WHERE to_class = 'cancelled') - count(*) FILTER (WHERE m.from_class = 'cancelled') AS cancelled
        FROM m GROUP BY m.task_uuid
    ), counters AS (
        UPDATE tasker.tasks t
        SET steps_pending   = t.steps_pending + d.pending,
            steps_out       = t.steps_out + d.out,
            steps_waiting   = t.steps_waiting + d.waiting,
            steps_done      = t.steps_done + d.done,
            steps_error     = t.steps_error + d.error,
            steps_cancelled = t.steps_cancelled + d.cancelled,
            updated_at      = now()
        FROM delta d
        WHERE t.task_uuid = d.task_uuid
          AND (d.pending, d.out, d.waiting, d.done, d.error, d.cancelled) <> (0, 0, 0, 0, 0, 0)
    )
    SELECT m.step_uuid, m.task_uuid, m.from_state, m.attempts, m.queue_msg_id FROM m;

    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> coalesce(cardinality(p_changes), 0) THEN
        RAISE EXCEPTION 'pg_tasker internal error: % of % steps could not move to %',
            coalesce(cardinality(p_changes), 0) - moved, coalesce(cardinality(p_changes), 0), p_to
            USING ERRCODE = 'XX000', HINT = 'only moves listed in tasker.step_state_transitions are allowed';
    END IF;
END
$$;

-- Moves a task to p_to with its audit row, in one statement; a terminal
-- state also ends the task (completed_at, nothing due, no claim).
-- p_next_action_at is when the orchestrator must look at it again. The
-- caller holds the task row lock. Refuses (XX000) a move that
-- task_state_transitions does not list.
CREATE FUNCTION tasker._move_task(p_task uuid, p_to tasker.task_state, p_reason text,
                                  p_metadata jsonb DEFAULT '{}', p_next_action_at timestamptz DEFAULT NULL)
RETURNS tasker.task_state
LANGUAGE plpgsql AS $$
DECLARE
    previous tasker.task_state;
    terminal boolean := tasker.task_state_is_terminal(p_to);
BEGIN
    WITH v AS (
        SELECT t.state FROM tasker.tasks t WHERE t.task_uuid = p_task
    ), m AS (
        UPDATE tasker.tasks t
        SET state            = p_to,
            transitions      = t.transitions + 1,
            updated_at       = now(),
            completed_at     = CASE WHEN terminal THEN now() END,
            next_action_at   = CASE WHEN terminal THEN NULL ELSE p_next_action_at END,
            claimed_by       = CASE WHEN terminal THEN NULL ELSE t.claimed_by END,
            claim_expires_at = CASE WHEN terminal THEN NULL ELSE t.claim_expires_at END
        FROM v
        JOIN tasker.task_state_transitions l ON l.from_state = v.state AND l.to_state = p_to
        WHERE t.task_uuid = p_task
        RETURNING v.state AS from_state, t.transitions
    )
    INSERT INTO tasker.task_transitions (task_uuid, sort_key, from_state, to_state, reason, metadata)
    SELECT p_task, m.transitions, m.from_state, p_to, p_reason, coalesce(p_metadata, '{}')
    FROM m
    RETURNING from_state INTO previous;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_tasker internal error: task % cannot move to %', p_task, p_to
            USING ERRCODE = 'XX000', HINT = 'only moves listed in tasker.task_state_transitions are allowed';
    END IF;
    RETURN previous;
END
$$;
