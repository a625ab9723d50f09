-- Plans: see 98_plans.sql (every operation runs with generic plans of key
-- lookups, planned once per session).

-- The primitives that change state. Every operation changes a step's or a
-- task's state through them, and nothing else writes `state`:
--   tasker._move_steps     steps to any state but enqueued
--   tasker._enqueue_steps  steps to enqueued (06_enqueue.sql: readiness,
--                          messages)
--   tasker._move_task      a task to any state
-- and every operation ends with tasker._settle_tasks over the moves it
-- made: the step counters of the tasks, and their state.
--
-- Lock order (docs/schema.md): the task rows first (FOR NO KEY UPDATE, in
-- task_uuid order when there are several), then their steps, then queue
-- messages. Every caller of the primitives holds the row locks of the
-- tasks whose steps move, except tasker.read_steps, whose move enqueued ->
-- in_progress changes no counter and so touches no task row; it locks the
-- steps with SKIP LOCKED and never waits. Holding the task lock, nobody
-- else waits for its steps, so steps need no order among themselves.
--
-- Each primitive is one UPDATE of the rows (with their audit rows in the
-- same statement): a row changes once per operation, so its other indexes
-- and foreign keys are not visited again.

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

-- One step that moved, as the primitives return it and
-- tasker._settle_tasks counts it.
CREATE TYPE tasker.step_move AS (
    step_uuid    uuid,
    task_uuid    uuid,
    from_state   tasker.step_state,
    to_state     tasker.step_state,
    attempts     integer,
    queue_msg_id bigint
);

-- Moves steps to p_to (not 'enqueued': tasker._enqueue_steps): the columns
-- p_to implies and one audit row per step, in one statement. Refuses (XX000:
-- a bug in the caller) a move that step_state_transitions does not list.
-- Returns the moves, which the caller settles (tasker._settle_tasks).
-- (The primitives take and return arrays: a PL/pgSQL caller evaluates
-- `v := tasker._move_steps(...)` as a plain expression, without a query.)
CREATE FUNCTION tasker._move_steps(p_changes tasker.step_change[], p_to tasker.step_state,
                                   p_reason text, p_metadata jsonb DEFAULT '{}')
RETURNS tasker.step_move[]
LANGUAGE plpgsql AS $$
DECLARE
    v_moves tasker.step_move[];
    to_class text := tasker.step_state_class(p_to);
BEGIN
    IF p_to = 'enqueued' THEN
        RAISE EXCEPTION 'pg_tasker internal error: steps are enqueued by tasker._enqueue_steps'
            USING ERRCODE = 'XX000';
    END IF;
    -- (SET expressions see the row before the change: previous_state takes
    -- the old state, so RETURNING has both)
    WITH m AS (
        UPDATE tasker.workflow_steps s
        SET previous_state = s.state,
            state          = p_to,
            transitions    = s.transitions + 1,
            updated_at     = now(),
            budget_offset  = CASE WHEN p_to = 'pending' THEN s.attempts ELSE s.budget_offset END,
            started_at     = CASE WHEN p_to = 'in_progress' THEN coalesce(s.started_at, now())
                                  ELSE s.started_at END,
            results        = CASE WHEN to_class = 'done' THEN c.payload ELSE s.results END,
            last_error     = CASE WHEN p_to IN ('waiting_for_retry', 'error') THEN coalesce(c.payload, s.last_error)
                                  ELSE s.last_error END,
            next_retry_at  = CASE WHEN p_to = 'waiting_for_retry' THEN c.retry_at END,
            completed_at   = CASE WHEN to_class = 'done' THEN now() END
        FROM unnest(p_changes) c
        WHERE s.step_uuid = c.step_uuid
          AND EXISTS (SELECT 1 FROM tasker.step_state_transitions l
                      WHERE l.from_state = s.state AND l.to_state = p_to)
        RETURNING s.step_uuid, s.task_uuid, s.previous_state, s.attempts, s.queue_msg_id, s.transitions,
                  c.reason, c.metadata
    ), audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT m.step_uuid, m.transitions, m.previous_state, p_to, coalesce(m.reason, p_reason),
               coalesce(p_metadata, '{}') || coalesce(m.metadata, '{}')
                   || jsonb_build_object('attempt', m.attempts)
        FROM m
    )
    SELECT coalesce(array_agg(ROW(m.step_uuid, m.task_uuid, m.previous_state, p_to, m.attempts,
                                  m.queue_msg_id)::tasker.step_move), '{}')
    INTO v_moves FROM m;

    IF cardinality(v_moves) <> coalesce(cardinality(p_changes), 0) THEN
        RAISE EXCEPTION 'pg_tasker internal error: % of % steps could not move to %',
            coalesce(cardinality(p_changes), 0) - cardinality(v_moves), coalesce(cardinality(p_changes), 0), p_to
            USING ERRCODE = 'XX000', HINT = 'only moves listed in tasker.step_state_transitions are allowed';
    END IF;
    RETURN v_moves;
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
    PERFORM tasker._count_moves('task', p_to::text, 1);
    IF tasker.task_state_is_event(p_to) THEN
        PERFORM pg_catalog.pg_notify(tasker.events_channel(), json_build_object(
            'task_uuid', p_task, 'namespace', (SELECT t.namespace_name FROM tasker.tasks t WHERE t.task_uuid = p_task),
            'state', p_to, 'from_state', previous)::text);
    END IF;
    RETURN previous;
END
$$;

-- The end of every operation that moved steps: for each task the moves
-- touched (and each of p_tasks, moved or not), the step counters take the
-- moves (by class, tasker.step_state_class), the task's state is decided
-- from the counters (tasker._task_status, i.e. pg_tasker_core::status) and
-- changed when it differs, and next_action_at becomes the earliest retry
-- (NULL when nothing is due). One UPDATE per task; a second one
-- (tasker._move_task) only when the state changes. The caller holds the
-- task row locks. A finished task only takes its counters. Returns each
-- task's state.
CREATE FUNCTION tasker._settle_tasks(p_moves tasker.step_move[], p_reason text, p_tasks uuid[] DEFAULT NULL)
RETURNS tasker.task_state[]
LANGUAGE plpgsql AS $$
DECLARE
    v_tasks uuid[];
    v_from tasker.task_state[];
    v_to tasker.task_state[];
    v_status text[];
    v_next timestamptz[];
    i integer;
BEGIN
    -- (the decided state comes back from the UPDATE: counters after the
    -- moves, tasker._task_status over them; every ready step was enqueued
    -- by the operation, so ready = 0)
    WITH x AS (
        SELECT m.task_uuid, tasker.step_state_class(m.from_state) AS from_class,
               tasker.step_state_class(m.to_state) AS to_class
        FROM unnest(p_moves) m
        UNION ALL
        SELECT u, NULL, NULL FROM unnest(p_tasks) u
    ), d AS (
        SELECT x.task_uuid,
               count(*) FILTER (WHERE x.to_class = 'pending') - count(*) FILTER (WHERE x.from_class = 'pending') AS pending,
               count(*) FILTER (WHERE x.to_class = 'out') - count(*) FILTER (WHERE x.from_class = 'out') AS out,
               count(*) FILTER (WHERE x.to_class = 'waiting') - count(*) FILTER (WHERE x.from_class = 'waiting') AS waiting,
               count(*) FILTER (WHERE x.to_class = 'done') - count(*) FILTER (WHERE x.from_class = 'done') AS done,
               count(*) FILTER (WHERE x.to_class = 'error') - count(*) FILTER (WHERE x.from_class = 'error') AS error,
               count(*) FILTER (WHERE x.to_class = 'cancelled') - count(*) FILTER (WHERE x.from_class = 'cancelled') AS cancelled
        FROM x GROUP BY x.task_uuid
    ), u AS (
        UPDATE tasker.tasks k
        SET steps_pending   = k.steps_pending + d.pending,
            steps_out       = k.steps_out + d.out,
            steps_waiting   = k.steps_waiting + d.waiting,
            steps_done      = k.steps_done + d.done,
            steps_error     = k.steps_error + d.error,
            steps_cancelled = k.steps_cancelled + d.cancelled,
            updated_at      = now(),
            -- (the retries as this transaction left them: workflow_steps_retry_idx)
            next_action_at  = CASE WHEN tasker.task_state_is_terminal(k.state) THEN NULL
                                   WHEN k.steps_waiting + d.waiting = 0 THEN NULL
                                   ELSE (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s
                                         WHERE s.task_uuid = k.task_uuid AND s.next_retry_at IS NOT NULL) END
        FROM d
        WHERE k.task_uuid = d.task_uuid
        RETURNING k.task_uuid, k.state, k.next_action_at, k.steps_total, k.steps_pending, k.steps_out,
                  k.steps_waiting, k.steps_done, k.steps_error, k.steps_cancelled
    )
    SELECT array_agg(u.task_uuid ORDER BY u.task_uuid), array_agg(u.state ORDER BY u.task_uuid),
           array_agg(CASE WHEN tasker.task_state_is_terminal(u.state) THEN u.state
                          ELSE s.task_state::tasker.task_state END ORDER BY u.task_uuid),
           array_agg(s.execution_status ORDER BY u.task_uuid), array_agg(u.next_action_at ORDER BY u.task_uuid)
    INTO v_tasks, v_from, v_to, v_status, v_next
    FROM u
    CROSS JOIN LATERAL tasker._task_status(u.steps_total, u.steps_pending, u.steps_out, u.steps_waiting,
                                           u.steps_done, u.steps_error, u.steps_cancelled, 0) s;
    -- (counted for tasker.metrics() when the transaction commits)
    PERFORM tasker._count_moves('step', m.to_state::text, count(*))
    FROM unnest(p_moves) m GROUP BY m.to_state;
    FOR i IN 1 .. coalesce(cardinality(v_tasks), 0) LOOP
        IF v_to[i] <> v_from[i] THEN
            PERFORM tasker._move_task(v_tasks[i], v_to[i], p_reason,
                                      jsonb_build_object('execution_status', v_status[i]), v_next[i]);
        END IF;
        IF v_next[i] IS NOT NULL THEN
            -- the orchestrator recomputes its sleep when this commits
            PERFORM tasker._wake_orchestrator();
        END IF;
    END LOOP;
    RETURN v_to;
END
$$;
