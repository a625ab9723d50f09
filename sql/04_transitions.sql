-- Plans: see 98_plans.sql (every operation runs with generic plans of key
-- lookups, planned once per session).

-- The primitives that change state. Every operation changes a step's or a
-- task's state through them, and nothing else writes `state`:
--   tasker._move_steps     steps to any state but enqueued
--   tasker._enqueue_steps  steps to enqueued (06_enqueue.sql: readiness,
--                          messages)
-- and every operation ends with tasker._settle_tasks over the moves it
-- made: the step counters of the tasks and their state (decided from the
-- counters, or given: cancel, resolve, staleness, DLQ requeue), the one
-- writer of a task's state.
--
-- Lock order (docs/schema.md). Every operation that changes a task or its
-- steps first takes the task lock (tasker._lock_tasks: in task_uuid order
-- when there are several), shared or exclusive:
--   shared     results that only complete steps (successes of steps that
--              create none): the results of one task apply side by side;
--   exclusive  everything else (failures and retries, decisions, operator
--              actions, recovery, staleness, the orchestration cycle).
-- Then rows, each kind in uuid order: the steps whose results apply
-- (tasker._apply_results), the children they release (tasker._enqueue_steps),
-- the task rows (tasker._settle_tasks, FOR NO KEY UPDATE, counters read
-- only after), queue messages. Each primitive locks the rows it reads
-- before it decides on them, so two shared holders that release the same
-- child or settle the same task take turns on that row and each sees the
-- other's committed change. tasker.read_steps takes no task lock: its move
-- enqueued -> in_progress changes no counter; it locks the steps with SKIP
-- LOCKED and never waits.
--
-- Each primitive is one UPDATE of the rows (with their audit rows in the
-- same statement): a row changes once per operation, so its other indexes
-- and foreign keys are not visited again.

-- The key of a task's lock: a transaction-level advisory lock (pg_locks,
-- locktype advisory), which PostgreSQL queues in arrival order, so an
-- operator's exclusive lock is not starved by a stream of shared ones (row
-- locks would be: a FOR KEY SHARE never waits behind a waiting FOR UPDATE).
-- (A 64-bit hash of the uuid, seeded: an application's own bigint advisory
-- locks would have to pick the same 64-bit value to collide, and then they
-- would only wait for each other.)
CREATE FUNCTION tasker._task_lock_key(p_task uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.uuid_hash_extended(p_task, 7306086865510360178);

-- Takes one task's lock, shared or exclusive, until the transaction ends
-- (callers take several in task_uuid order: two operations never
-- deadlock). One lock-table entry per task (a batch of results spanning
-- 1,000 tasks takes 1,000: max_locks_per_transaction). (An expression, so
-- that a caller's statement takes its locks without a function call.)
CREATE FUNCTION tasker._take_task_lock(p_task uuid, p_shared boolean) RETURNS void
LANGUAGE sql
RETURN CASE WHEN p_shared THEN pg_catalog.pg_advisory_xact_lock_shared(tasker._task_lock_key(p_task))
            ELSE pg_catalog.pg_advisory_xact_lock(tasker._task_lock_key(p_task)) END;

-- Takes the task lock of each of p_tasks, in task_uuid order, shared or
-- exclusive (the lock order above).
CREATE FUNCTION tasker._lock_tasks(p_tasks uuid[], p_shared boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._take_task_lock(x.u, p_shared)
    FROM (SELECT DISTINCT u FROM unnest(p_tasks) u WHERE u IS NOT NULL ORDER BY u) x;
END
$$;

-- Whether a result shares its task's lock (the lock order above): a
-- success of a step that creates no steps (a step's type never changes).
CREATE FUNCTION tasker._result_shares_task(p_success boolean, p_type tasker.step_type) RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN coalesce(p_success, false) AND NOT tasker.step_type_creates_steps(p_type);

-- The exclusive task lock of one task if it can be had at once (the
-- orchestration cycle passes over a task whose results are being applied).
CREATE FUNCTION tasker._try_lock_task(p_task uuid) RETURNS boolean
LANGUAGE sql
RETURN pg_catalog.pg_try_advisory_xact_lock(tasker._task_lock_key(p_task));

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
-- a bug in the caller) a move that step_state_transitions does not list
-- (tasker.step_move_is_legal).
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
          AND tasker.step_move_is_legal(s.state, p_to)
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

-- The payload of a task event (tasker.events_channel()).
CREATE FUNCTION tasker._task_event(p_task uuid, p_namespace text, p_state tasker.task_state,
                                   p_from tasker.task_state) RETURNS text
LANGUAGE sql STABLE
RETURN json_build_object('task_uuid', p_task, 'namespace', p_namespace, 'state', p_state,
                         'from_state', p_from)::text;

-- What follows a settle that moved tasks or left a retry due (the end of
-- tasker._settle_tasks and of tasker._complete_alone): the tasks' moves
-- counted for tasker.metrics() (when the transaction commits), their
-- events sent (tasker._notify), the orchestrator woken to recompute its
-- sleep (when this commits).
CREATE FUNCTION tasker._after_settle(p_moved tasker.task_state[], p_events text[], p_due boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_moved IS NOT NULL THEN
        PERFORM tasker._count_moves('task', t::text, count(*)) FROM unnest(p_moved) t GROUP BY t;
    END IF;
    IF p_events IS NOT NULL THEN
        PERFORM tasker._notify(tasker.events_channel(), e) FROM unnest(p_events) e;
    END IF;
    IF p_due THEN
        PERFORM tasker._wake_orchestrator();
    END IF;
END
$$;

-- The end of every operation that moved steps, and the one writer of a
-- task's state: for each task the moves touched (and each of p_tasks, moved
-- or not), the step counters take the moves (by class,
-- tasker.step_state_class), the task's state is decided from the counters
-- (tasker._task_status, i.e. pg_tasker_core::status) -- or is p_to, for the
-- operations that move a task themselves (cancel, resolve, staleness, DLQ
-- requeue) -- and next_action_at becomes the earliest retry (NULL when
-- nothing is due). One UPDATE of each task row with the audit row of its
-- move, in one statement; a terminal state also ends the task
-- (completed_at, nothing due, no claim). A finished task only takes its
-- counters (unless p_to moves it: error -> steps_in_process). The caller
-- holds the task locks (tasker._lock_tasks); the rows are locked here, in
-- task_uuid order, before their counters are read. Refuses (XX000) a move that
-- task_state_transitions does not list (tasker.task_move_is_legal). Returns
-- each task's state, in task_uuid order.
CREATE FUNCTION tasker._settle_tasks(p_moves tasker.step_move[], p_reason text, p_tasks uuid[] DEFAULT NULL,
                                     p_to tasker.task_state DEFAULT NULL, p_metadata jsonb DEFAULT NULL)
RETURNS tasker.task_state[]
LANGUAGE plpgsql AS $$
DECLARE
    v_tasks uuid[];
    v_to tasker.task_state[];
    v_wanted integer;
    v_moved tasker.task_state[];
    v_due boolean;
    v_events text[];
    v_refused text;
BEGIN
    -- the rows first, then a statement that reads them: it sees what
    -- another holder of a shared task lock committed before we got the row
    PERFORM 1 FROM tasker.tasks k
    WHERE k.task_uuid IN (SELECT m.task_uuid FROM unnest(p_moves) m UNION SELECT u FROM unnest(p_tasks) u)
    ORDER BY k.task_uuid
    FOR NO KEY UPDATE;
    -- (the task rows are read before the UPDATE: the locks keep them as
    -- they are, and the UPDATE writes counters and state at once; every
    -- ready step was enqueued by the operation, so ready = 0)
    WITH x AS (
        SELECT m.task_uuid, tasker.step_state_class(m.from_state) AS from_class,
               tasker.step_state_class(m.to_state) AS to_class
        FROM unnest(p_moves) m
        UNION ALL
        SELECT u, NULL, NULL FROM unnest(p_tasks) u
    ), d AS (
        SELECT x.task_uuid,
               (count(*) FILTER (WHERE x.to_class = 'pending')
                - count(*) FILTER (WHERE x.from_class = 'pending'))::integer AS pending,
               (count(*) FILTER (WHERE x.to_class = 'out')
                - count(*) FILTER (WHERE x.from_class = 'out'))::integer AS out,
               (count(*) FILTER (WHERE x.to_class = 'waiting')
                - count(*) FILTER (WHERE x.from_class = 'waiting'))::integer AS waiting,
               (count(*) FILTER (WHERE x.to_class = 'done')
                - count(*) FILTER (WHERE x.from_class = 'done'))::integer AS done,
               (count(*) FILTER (WHERE x.to_class = 'error')
                - count(*) FILTER (WHERE x.from_class = 'error'))::integer AS error,
               (count(*) FILTER (WHERE x.to_class = 'cancelled')
                - count(*) FILTER (WHERE x.from_class = 'cancelled'))::integer AS cancelled
        FROM x GROUP BY x.task_uuid
    ), n AS (
        SELECT d.*, k.state AS from_state, s.execution_status,
               coalesce(p_to, CASE WHEN tasker.task_state_is_terminal(k.state) THEN k.state
                                   ELSE s.task_state::tasker.task_state END) AS to_state
        FROM d
        JOIN tasker.tasks k ON k.task_uuid = d.task_uuid
        CROSS JOIN LATERAL tasker._task_status(
            k.steps_total, k.steps_pending + d.pending, k.steps_out + d.out, k.steps_waiting + d.waiting,
            k.steps_done + d.done, k.steps_error + d.error, k.steps_cancelled + d.cancelled, 0) s
    ), u AS (
        UPDATE tasker.tasks k
        SET steps_pending    = k.steps_pending + n.pending,
            steps_out        = k.steps_out + n.out,
            steps_waiting    = k.steps_waiting + n.waiting,
            steps_done       = k.steps_done + n.done,
            steps_error      = k.steps_error + n.error,
            steps_cancelled  = k.steps_cancelled + n.cancelled,
            state            = n.to_state,
            transitions      = k.transitions + (n.to_state <> n.from_state)::integer,
            updated_at       = now(),
            completed_at     = CASE WHEN n.to_state = n.from_state THEN k.completed_at
                                    WHEN tasker.task_state_is_terminal(n.to_state) THEN now() END,
            -- (the retries as this transaction left them: workflow_steps_retry_idx)
            next_action_at   = CASE WHEN tasker.task_state_is_terminal(n.to_state) THEN NULL
                                    WHEN k.steps_waiting + n.waiting = 0 THEN NULL
                                    ELSE (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s
                                          WHERE s.task_uuid = k.task_uuid AND s.next_retry_at IS NOT NULL) END,
            claimed_by       = CASE WHEN tasker.task_state_is_terminal(n.to_state) THEN NULL ELSE k.claimed_by END,
            claim_expires_at = CASE WHEN tasker.task_state_is_terminal(n.to_state) THEN NULL
                                    ELSE k.claim_expires_at END
        FROM n
        WHERE k.task_uuid = n.task_uuid
          AND (n.to_state = n.from_state OR tasker.task_move_is_legal(n.from_state, n.to_state))
        RETURNING k.task_uuid, k.namespace_name, n.from_state, k.state AS to_state, k.transitions,
                  n.execution_status, k.next_action_at
    ), audit AS (
        INSERT INTO tasker.task_transitions (task_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT u.task_uuid, u.transitions, u.from_state, u.to_state, p_reason,
               coalesce(p_metadata, CASE WHEN p_to IS NULL
                                         THEN jsonb_build_object('execution_status', u.execution_status)
                                         ELSE '{}' END)
        FROM u
        WHERE u.to_state <> u.from_state
    )
    SELECT array_agg(u.task_uuid ORDER BY u.task_uuid), array_agg(u.to_state ORDER BY u.task_uuid),
           (SELECT count(*) FROM n), array_agg(u.to_state) FILTER (WHERE u.to_state <> u.from_state),
           bool_or(u.next_action_at IS NOT NULL),
           array_agg(tasker._task_event(u.task_uuid, u.namespace_name, u.to_state, u.from_state))
               FILTER (WHERE u.to_state <> u.from_state AND tasker.task_state_is_event(u.to_state)),
           (SELECT string_agg(format('task %s cannot move from %s to %s', n.task_uuid, n.from_state, n.to_state), '; ')
            FROM n WHERE n.to_state <> n.from_state AND NOT tasker.task_move_is_legal(n.from_state, n.to_state))
    INTO v_tasks, v_to, v_wanted, v_moved, v_due, v_events, v_refused
    FROM u;
    IF coalesce(cardinality(v_tasks), 0) <> v_wanted THEN
        RAISE EXCEPTION 'pg_tasker internal error: %', coalesce(v_refused, 'a task to settle does not exist')
            USING ERRCODE = 'XX000', HINT = 'only moves listed in tasker.task_state_transitions are allowed';
    END IF;
    -- (counted for tasker.metrics() when the transaction commits)
    PERFORM tasker._count_moves('step', m.to_state::text, count(*))
    FROM unnest(p_moves) m GROUP BY m.to_state;
    IF v_moved IS NOT NULL OR v_events IS NOT NULL OR v_due THEN
        PERFORM tasker._after_settle(v_moved, v_events, v_due);
    END IF;
    RETURN v_to;
END
$$;
