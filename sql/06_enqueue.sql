-- Enqueueing: a ready step starts a new attempt and gets one message in its
-- namespace queue, carrying everything a worker needs
-- (docs/worker-protocol.md).

-- A candidate for enqueueing: a step, and how many of its parents the
-- operation has just completed (0 for a root, a due retry, a step put back
-- to pending).
CREATE TYPE tasker.step_release AS (
    step_uuid uuid,
    released  integer
);

-- The candidates for p_done, the moves of steps an operation has just
-- completed: their children, each with the number of its parents among them.
CREATE FUNCTION tasker._children_of(p_done tasker.step_move[]) RETURNS tasker.step_release[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN ARRAY(SELECT ROW(e.to_step_uuid, count(*))::tasker.step_release
                 FROM unnest(p_done) d
                 JOIN tasker.step_edges e ON e.from_step_uuid = d.step_uuid
                 GROUP BY e.to_step_uuid);
END
$$;

-- The message of a step's attempt (docs/worker-protocol.md): everything a
-- worker needs, from the step's row as its enqueue leaves it, its task's
-- row and the results of its parents (dependency_results: {name: results}
-- of the parents over edges that are not gates). (An SQL expression,
-- inlined where the enqueue builds its messages.)
CREATE FUNCTION tasker._step_message(p_task uuid, p_step uuid, p_namespace text, p_task_name text,
                                     p_task_version text, p_step_name text, p_callable text, p_method text,
                                     p_inputs jsonb, p_context jsonb, p_map_index integer, p_map_item jsonb,
                                     p_checkpoint jsonb, p_attempt integer, p_budget_offset integer,
                                     p_max_attempts integer, p_timeout_seconds integer, p_correlation_id uuid,
                                     p_traceparent text, p_dependency_results jsonb)
RETURNS jsonb LANGUAGE sql STABLE
-- (the keys in jsonb's order, shorter first: the object's sort then finds
-- them sorted and stops; the message is the same in any order)
RETURN jsonb_build_object(
    'attempt', p_attempt,
    'handler', jsonb_build_object('method', p_method, 'callable', p_callable, 'initialization', p_inputs),
    'namespace', p_namespace,
    'step_name', p_step_name,
    'step_uuid', p_step,
    'task_name', p_task_name,
    'task_uuid', p_task,
    'enqueued_at', now(),
    'traceparent', p_traceparent,
    'max_attempts', p_max_attempts,
    -- (a map element carries its item instead: the context once per
    -- element would make a wide map's messages quadratic)
    'task_context', CASE WHEN p_map_index IS NULL THEN p_context END,
    'task_version', p_task_version,
    'budget_attempt', p_attempt - p_budget_offset,
    'correlation_id', p_correlation_id,
    'message_version', 1,
    'timeout_seconds', p_timeout_seconds,
    'dependency_results', p_dependency_results)
    -- map elements: their index and item; resumed steps: their checkpoint
    || CASE WHEN p_map_index IS NULL THEN '{}'
            ELSE jsonb_build_object('map_index', p_map_index, 'map_item', p_map_item) END
    || CASE WHEN p_checkpoint IS NULL THEN '{}' ELSE jsonb_build_object('checkpoint', p_checkpoint) END;

-- Wakes the idle workers of queues that were just sent messages (delivered
-- at commit, once per transaction): a NOTIFY on the wake channel of each
-- queue a worker waits on (tasker.worker_idle). Sent directly, not through
-- the orchestrator's relay (tasker._notify): a worker waits only when the
-- queue is idle, so NOTIFY's commit lock costs nothing then, and the
-- relay's hop would add milliseconds to the wakeup. Callers look first
-- whether anyone waits at all (tasker._anyone_waits).
CREATE FUNCTION tasker._wake_workers(p_queues text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(tasker.wake_channel_of_queue(q), '')
    FROM unnest(p_queues) q
    -- (written here, not as tasker.worker_idle's SQL function: one with a
    -- subquery is not inlined)
    WHERE EXISTS (SELECT 1 FROM tasker.worker_waits w WHERE w.queue_name = q);
END
$$;

-- Releases and enqueues, in one statement: each candidate's
-- pending_parents counts down by `released`; those that are then ready
-- (tasker.step_is_ready) move to enqueued (a new attempt, a new msg_id from
-- their queue's sequence) with an audit row, and their messages are built
-- and sent, one insert per queue (a batch of results can span namespaces;
-- each queue is its own table); idle workers of those queues are notified.
-- Map steps that are ready are not sent: they expand or complete in the
-- database (tasker._run_maps). The candidates' rows are locked first, in
-- step_uuid order (two holders of a shared task lock may release the same
-- child), and read after, in a statement of their own: it sees the results
-- of parents whose transactions committed while we waited. The caller holds
-- the task locks and settles the returned moves (tasker._settle_tasks).
CREATE FUNCTION tasker._enqueue_steps(p_candidates tasker.step_release[], p_reason text DEFAULT 'ready')
RETURNS tasker.step_move[]
LANGUAGE plpgsql AS $$
DECLARE
    v_moves tasker.step_move[];
    v_maps uuid[];
    v_sent text[];
BEGIN
    IF coalesce(cardinality(p_candidates), 0) = 0 THEN
        RETURN '{}';
    END IF;
    -- (a candidate all of whose parents this operation releases needs no
    -- lock: nobody else can release it, and only exclusive task locks
    -- change its parents; so a chain's child and a fan-out's branches are
    -- not locked)
    PERFORM 1 FROM tasker.workflow_steps s
    JOIN (SELECT r.step_uuid, sum(r.released) AS released FROM unnest(p_candidates) r GROUP BY r.step_uuid) c
      ON c.step_uuid = s.step_uuid
    WHERE s.total_parents > c.released
    ORDER BY s.step_uuid
    FOR NO KEY UPDATE OF s;
    -- Readiness is decided once per candidate, on its row as the lock
    -- holds it (only holders of the task lock change a pending or waiting
    -- step); every row changes once. The moves pending -> enqueued and
    -- waiting_for_retry -> enqueued are the ones step_state_transitions
    -- lists for runnable states (src/tests/states.rs checks it).
    WITH c AS (
        SELECT x.step_uuid, x.released,
               r.ready AND s.step_type <> 'map' AS ready,
               r.ready AND s.step_type = 'map' AS map_ready,
               n.queue_name, n.queue_seq
        FROM (SELECT r.step_uuid, sum(r.released)::integer AS released
              FROM unnest(p_candidates) r GROUP BY r.step_uuid) x
        JOIN tasker.workflow_steps s ON s.step_uuid = x.step_uuid
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
        JOIN tasker.namespaces n ON n.name = t.namespace_name
        CROSS JOIN LATERAL (SELECT tasker.step_is_ready(s.state, s.pending_parents - x.released,
                                                        s.next_retry_at, now()) AS ready) r
        WHERE x.released > 0
           OR tasker.step_is_ready(s.state, s.pending_parents, s.next_retry_at, now())
    ), m AS (
        UPDATE tasker.workflow_steps s
        SET pending_parents = s.pending_parents - c.released,
            previous_state  = CASE WHEN c.ready THEN s.state ELSE s.previous_state END,
            state           = CASE WHEN c.ready THEN 'enqueued' ELSE s.state END,
            transitions     = s.transitions + c.ready::integer,
            updated_at      = now(),
            attempts        = s.attempts + c.ready::integer,
            queue_msg_id    = CASE WHEN c.ready THEN nextval(c.queue_seq) ELSE s.queue_msg_id END,
            enqueued_at     = CASE WHEN c.ready THEN now() ELSE s.enqueued_at END,
            started_at      = CASE WHEN c.ready THEN NULL ELSE s.started_at END,
            next_retry_at   = CASE WHEN c.ready THEN NULL ELSE s.next_retry_at END
        FROM c
        WHERE s.step_uuid = c.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.previous_state, s.attempts, s.budget_offset,
                  s.queue_msg_id, s.transitions, s.name, s.handler_callable, s.handler_method, s.inputs,
                  s.max_attempts, s.timeout_seconds, s.map_index, s.map_item, s.checkpoint, c.ready,
                  c.map_ready, c.queue_name
    ), enq AS (
        SELECT m.*, t.namespace_name, t.task_name, t.task_version, t.context, t.correlation_id, t.traceparent
        FROM m JOIN tasker.tasks t ON t.task_uuid = m.task_uuid
        WHERE m.ready
    ), audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT e.step_uuid, e.transitions, e.previous_state, 'enqueued', p_reason,
               jsonb_build_object('attempt', e.attempts)
        FROM enq e
    ), sent AS (
        SELECT e.queue_name,
               tasker._pgmq_send(e.queue_name, array_agg(e.queue_msg_id ORDER BY e.queue_msg_id),
                                 array_agg(tasker._step_message(
                    e.task_uuid, e.step_uuid, e.namespace_name, e.task_name, e.task_version, e.name,
                    e.handler_callable, e.handler_method, e.inputs, e.context, e.map_index, e.map_item,
                    e.checkpoint, e.attempts, e.budget_offset, e.max_attempts, e.timeout_seconds,
                    e.correlation_id, e.traceparent,
                    -- (gate edges carry no result)
                    (SELECT coalesce(jsonb_object_agg(p.name, p.results), '{}')
                     FROM tasker.step_edges pe
                     JOIN tasker.workflow_steps p ON p.step_uuid = pe.from_step_uuid
                     WHERE pe.to_step_uuid = e.step_uuid AND NOT pe.gate))
                ORDER BY e.queue_msg_id)) AS n
            FROM enq e
            GROUP BY e.queue_name
    )
    SELECT (SELECT coalesce(array_agg(ROW(e.step_uuid, e.task_uuid, e.previous_state, 'enqueued', e.attempts,
                                          e.queue_msg_id)::tasker.step_move), '{}')
            FROM enq e),
           (SELECT array_agg(m.step_uuid ORDER BY m.step_uuid) FROM m WHERE m.map_ready),
           (SELECT array_agg(s.queue_name) FILTER (WHERE s.n > 0) FROM sent s)
    INTO v_moves, v_maps, v_sent;
    -- wake idle workers of those queues (nobody waits most of the time
    -- under load: tasker._anyone_waits, then there is nothing to look at)
    IF v_sent IS NOT NULL AND tasker._anyone_waits() THEN
        PERFORM tasker._wake_workers(v_sent);
    END IF;
    IF v_maps IS NOT NULL THEN
        v_moves := v_moves || tasker._run_maps(v_maps);
    END IF;
    RETURN v_moves;
END
$$;
