-- Results: completing steps (a worker's success, an operator's resolution)
-- and failing attempts (a worker's failure, a lost or timed-out attempt),
-- one result or a batch, set-based: a batch of results costs about as many
-- statements as one.

-- One result to apply: a checked submission for one step.
CREATE TYPE tasker.step_result AS (
    step_uuid          uuid,
    success            boolean,
    -- the result (success) or the error (failure), stored as given
    payload            jsonb,
    -- the attempt the worker ran; NULL: unfenced (the current one)
    attempt            integer,
    -- failures: the message, whether it may be retried, the delay asked for
    message            text,
    retryable          boolean,
    requested_delay_ms bigint,
    -- metadata of the audit row (worker_id, execution time, ...)
    audit              jsonb
);

-- What became of one result: its step's state afterwards, the outcome
-- (tasker._apply_results) and, for every outcome but applied, why.
CREATE TYPE tasker.result_outcome AS (
    step_uuid uuid,
    state     tasker.step_state,
    outcome   text,
    note      text
);

-- A read to make in the middle of applying results (tasker.exchange): what
-- to read (tasker._read_queues' arguments) and, once read, what was. Made
-- after the results' messages are archived and before their children are
-- released: what the results of one task take turns on (a join's row, the
-- task's row) is then held only from the release to the commit, not
-- through the read; and the read, which can leave locks on messages it
-- does not return (a row another worker's read changed after our snapshot
-- fails the recheck and stays locked), comes after this transaction's
-- archive, the only place where it waits for queue rows. (Reading before
-- the archive let two exchanges each wait for the other's archive:
-- deadlocks within minutes of sustained load, docs/benchmarks.md.)
CREATE TYPE tasker.read_request AS (
    namespaces      text[],
    queues          text[],
    worker_id       text,
    qty             integer,
    vt              integer,
    -- filled in by the read: each message read ({msg_id, read_ct,
    -- message}) and its namespace
    read_namespaces text[],
    read_msgs       jsonb[]
);

-- Moves steps to a done state (complete, resolved_manually) with their
-- results, releases their children, creates what generator steps among
-- them ask for (with p_dynamic: some may be decision or batchable steps,
-- sql/18_dynamic.sql) and enqueues what became ready. The caller holds the
-- task row locks and settles the returned moves.
CREATE FUNCTION tasker._finish_steps(p_changes tasker.step_change[], p_to tasker.step_state, p_reason text,
                                     p_dynamic boolean DEFAULT true)
RETURNS tasker.step_move[]
LANGUAGE plpgsql AS $$
DECLARE
    v_done tasker.step_move[] := tasker._move_steps(p_changes, p_to, p_reason);
    -- (the children as they were: edges from these steps created below
    -- start counted as done)
    v_ready tasker.step_release[] := tasker._children_of(v_done);
BEGIN
    IF p_dynamic THEN
        v_ready := v_ready || tasker._create_steps_of(v_done);
    END IF;
    RETURN v_done || tasker._enqueue_steps(v_ready);
END
$$;

-- Applies results, in one transaction: takes their tasks' locks (per task:
-- shared when its results are all successes of steps that create none,
-- 04_transitions.sql), applies the common case in one statement
-- (tasker._complete_alone, unless p_alone is false or
-- pg_tasker.one_statement_results is off) and the rest as follows:
-- decides what each result meets on its locked step row, archives the
-- messages of the accepted ones, makes the read of p_read (if any),
-- completes or fails their attempts (the retry policy:
-- pg_tasker_core::retry through tasker._retry_decision), releases and
-- enqueues what became ready (a retry due at once included), and settles
-- the tasks. Per result, in the order given: its step's state afterwards
-- and the outcome:
--   applied         the attempt is settled by this result
--   unknown_step    no such step
--   never_enqueued  the step has had no attempt yet
--   settled         the step is not out with a worker (its attempt was
--                   settled before: a late or duplicate result)
--   task_finished   the step's task is finished
--   stale_attempt   the result is for an attempt other than the current one
--   duplicate       an earlier result in the same batch is for this step
-- and, for every outcome but applied, a note saying why it was ignored.
CREATE FUNCTION tasker._apply_results(p_results tasker.step_result[], p_reason text,
                                      INOUT p_read tasker.read_request DEFAULT NULL,
                                      p_alone boolean DEFAULT true,
                                      OUT outcomes tasker.result_outcome[])
LANGUAGE plpgsql AS $$
DECLARE
    v_outcomes text[];
    v_notes text[];
    v_tasks uuid[];
    v_queues text[];
    v_msgs bigint[];
    v_success tasker.step_change[];
    v_generators uuid[];
    v_invalid tasker.step_result[];
    v_failed tasker.step_result[];
    v_retry tasker.step_change[];
    v_error tasker.step_change[];
    v_error_moves tasker.step_move[];
    v_moves tasker.step_move[] := '{}';
    v_settled tasker.task_state[];
    v_archived bigint;
    v_move tasker.step_move;
    v_state tasker.step_state;
    q record;
    v_shared boolean;
    v_once boolean;
    v_alone uuid[];
    v_general record;
    k integer := 0;
    v_result tasker.step_result;
BEGIN
    -- the task locks, in task_uuid order, per task: shared when all its
    -- results share (tasker._result_shares_task: the results of one task
    -- then apply side by side, each on its own steps), exclusive otherwise
    -- (tasker._lock_tasks' statement with the mode decided in it: one
    -- statement on the hot path; the lock is taken in the outer query's
    -- filter, over the sorted rows: a filter with a volatile function is
    -- not pushed down into them)
    SELECT bool_or(x.shared), bool_and(x.once) INTO v_shared, v_once
    FROM (SELECT ws.task_uuid, bool_and(tasker._result_shares_task(r.success, ws.step_type)) AS shared,
                 count(*) = count(DISTINCT r.step_uuid) AS once
          FROM unnest(p_results) r JOIN tasker.workflow_steps ws ON ws.step_uuid = r.step_uuid
          GROUP BY ws.task_uuid
          ORDER BY ws.task_uuid) x
    WHERE tasker._take_task_lock(x.task_uuid, x.shared) IS NOT NULL;

    -- the common case in one statement (tasker._complete_alone: successes
    -- of steps none of whose children has another parent, in a batch that
    -- gives no step twice), the rest here, in the order given
    IF v_shared AND v_once AND p_alone AND tasker._one_statement_results() THEN
        v_alone := tasker._complete_alone(p_results, p_reason);
        IF cardinality(v_alone) = cardinality(p_results) THEN
            IF p_read.qty IS NOT NULL THEN
                SELECT r.namespaces, r.msgs INTO p_read.read_namespaces, p_read.read_msgs
                FROM tasker._read_queues(p_read.namespaces, p_read.queues, p_read.worker_id, p_read.qty,
                                         p_read.vt) r;
            END IF;
            outcomes := ARRAY(SELECT ROW(x.step_uuid, 'complete', 'applied', NULL)::tasker.result_outcome
                              FROM unnest(p_results) x);
            RETURN;
        ELSIF cardinality(v_alone) > 0 THEN
            v_general := tasker._apply_results(
                ARRAY(SELECT x FROM unnest(p_results) x WHERE x.step_uuid <> ALL (v_alone)), p_reason, p_read, false);
            p_read := v_general.p_read;
            outcomes := '{}';
            FOREACH v_result IN ARRAY p_results LOOP
                IF v_result.step_uuid = ANY (v_alone) THEN
                    outcomes := outcomes || ROW(v_result.step_uuid, 'complete', 'applied', NULL)::tasker.result_outcome;
                ELSE
                    k := k + 1;
                    outcomes := outcomes || v_general.outcomes[k];
                END IF;
            END LOOP;
            RETURN;
        END IF;
    END IF;

    -- what each result meets, on its step's row locked (uuid order): a
    -- concurrent result for the same step has committed or waits
    WITH locked AS (
        SELECT ws.step_uuid, ws.task_uuid, ws.name, ws.state, ws.attempts, ws.queue_msg_id, ws.step_type
        FROM tasker.workflow_steps ws
        WHERE ws.step_uuid IN (SELECT x.step_uuid FROM unnest(p_results) x)
        ORDER BY ws.step_uuid
        FOR NO KEY UPDATE
    ), r AS (
        SELECT x.* FROM unnest(p_results) WITH ORDINALITY
            AS x(step_uuid, success, payload, attempt, message, retryable, requested_delay_ms, audit, i)
    ), v AS (
        SELECT r.*, ws.name, ws.state AS step_state, ws.attempts AS current_attempt, ws.queue_msg_id, ws.step_type,
               t.task_uuid, t.state AS task_state, n.queue_name,
               CASE WHEN ws.step_uuid IS NULL THEN 'unknown_step'
                    WHEN r.i > min(r.i) OVER (PARTITION BY r.step_uuid) THEN 'duplicate'
                    WHEN tasker.step_state_class(ws.state) <> 'out' AND ws.attempts = 0 THEN 'never_enqueued'
                    WHEN tasker.step_state_class(ws.state) <> 'out' THEN 'settled'
                    WHEN tasker.task_state_is_terminal(t.state) THEN 'task_finished'
                    WHEN r.attempt IS NOT NULL AND r.attempt <> ws.attempts THEN 'stale_attempt'
                    ELSE 'applied' END AS outcome
        FROM r
        LEFT JOIN locked ws ON ws.step_uuid = r.step_uuid
        LEFT JOIN tasker.tasks t ON t.task_uuid = ws.task_uuid
        LEFT JOIN tasker.namespaces n ON n.name = t.namespace_name
    )
    SELECT array_agg(v.outcome ORDER BY v.i),
           array_agg(CASE v.outcome
                         WHEN 'applied' THEN NULL
                         WHEN 'unknown_step' THEN format('step %s does not exist', v.step_uuid)
                         WHEN 'duplicate' THEN format('result for step "%s" (%s) ignored: the batch has an earlier result for it',
                                                      v.name, v.step_uuid)
                         WHEN 'never_enqueued' THEN format('step "%s" (%s) has never been enqueued; there is no attempt to report on',
                                                           v.name, v.step_uuid)
                         WHEN 'settled' THEN format('result for step "%s" (%s) ignored: the step is %s, attempt %s is already settled',
                                                    v.name, v.step_uuid, v.step_state, v.current_attempt)
                         WHEN 'task_finished' THEN format('result for step "%s" (%s) ignored: its task is %s',
                                                          v.name, v.step_uuid, v.task_state)
                         ELSE format('result for attempt %s of step "%s" (%s) ignored: the current attempt is %s',
                                     v.attempt, v.name, v.step_uuid, v.current_attempt) END ORDER BY v.i),
           array_agg(DISTINCT v.task_uuid) FILTER (WHERE v.outcome = 'applied'),
           array_agg(v.queue_name ORDER BY v.queue_name, v.queue_msg_id) FILTER (WHERE v.outcome = 'applied'),
           array_agg(v.queue_msg_id ORDER BY v.queue_name, v.queue_msg_id) FILTER (WHERE v.outcome = 'applied'),
           array_agg(ROW(v.step_uuid, v.payload, NULL, NULL, v.audit)::tasker.step_change)
               FILTER (WHERE v.outcome = 'applied' AND v.success),
           array_agg(ROW(v.step_uuid, v.success, v.payload, v.attempt, v.message, v.retryable,
                         v.requested_delay_ms, v.audit)::tasker.step_result)
               FILTER (WHERE v.outcome = 'applied' AND NOT v.success),
           array_agg(v.step_uuid) FILTER (WHERE v.outcome = 'applied' AND v.success
                                            AND tasker.step_type_creates_steps(v.step_type))
    INTO v_outcomes, v_notes, v_tasks, v_queues, v_msgs, v_success, v_failed, v_generators
    FROM v;

    IF v_generators IS NOT NULL THEN
        -- a decision's or batchable step's success with an outcome that
        -- cannot be applied is a permanent failure saying why
        SELECT array_agg(c) FILTER (WHERE p.problem IS NULL),
               array_agg(ROW(c.step_uuid, false,
                             jsonb_build_object('message', p.problem, 'error_code', 'invalid_outcome',
                                                'result', c.payload),
                             NULL, p.problem, false, NULL, c.metadata)::tasker.step_result)
                   FILTER (WHERE p.problem IS NOT NULL)
        INTO v_success, v_invalid
        FROM unnest(v_success) c
        LEFT JOIN LATERAL (SELECT tasker._dynamic_plan(c.step_uuid, c.payload) ->> 'problem' AS problem
                           WHERE c.step_uuid = ANY (v_generators)) p ON true;
        v_failed := coalesce(v_failed, '{}') || v_invalid;
        IF cardinality(v_failed) = 0 THEN
            v_failed := NULL;
        END IF;
    END IF;

    IF v_tasks IS NOT NULL THEN
        -- the attempts' messages: done with (one statement per queue)
        IF v_queues[1] = ALL (v_queues) THEN
            v_archived := tasker._pgmq_archive(v_queues[1], v_msgs);
        ELSE
            FOR q IN SELECT a.queue, array_agg(a.msg) AS msgs FROM unnest(v_queues, v_msgs) AS a(queue, msg)
                     GROUP BY a.queue LOOP
                PERFORM tasker._pgmq_archive(q.queue, q.msgs);
            END LOOP;
        END IF;
    END IF;
    IF p_read.qty IS NOT NULL THEN
        -- (tasker.read_request: here, between the archive and the release)
        SELECT r.namespaces, r.msgs INTO p_read.read_namespaces, p_read.read_msgs
        FROM tasker._read_queues(p_read.namespaces, p_read.queues, p_read.worker_id, p_read.qty, p_read.vt) r;
    END IF;
    IF v_tasks IS NOT NULL THEN
        IF v_success IS NOT NULL THEN
            v_moves := tasker._finish_steps(v_success, 'complete', 'completed by worker', v_generators IS NOT NULL);
        END IF;
        IF v_failed IS NOT NULL THEN
            -- the retry policy, per failed attempt
            SELECT array_agg(ROW(f.step_uuid, f.payload, now() + make_interval(secs => d.delay_ms / 1000.0),
                                 f.message,
                                 coalesce(f.audit, '{}') || jsonb_build_object(
                                     'error', f.payload, 'retry_in_ms', d.delay_ms,
                                     'delay_requested_by_handler', d.requested))::tasker.step_change)
                       FILTER (WHERE d.retry),
                   array_agg(ROW(f.step_uuid, f.payload, NULL, f.message,
                                 coalesce(f.audit, '{}') || jsonb_build_object(
                                     'error', f.payload, 'attempts_exhausted', d.exhausted))::tasker.step_change)
                       FILTER (WHERE NOT d.retry)
            INTO v_retry, v_error
            FROM unnest(v_failed) f
            JOIN tasker.workflow_steps s ON s.step_uuid = f.step_uuid
            CROSS JOIN LATERAL tasker._retry_decision(s.retryable, s.max_attempts, s.attempts - s.budget_offset,
                                                      s.backoff::text, s.backoff_base_ms, s.max_backoff_ms,
                                                      s.jitter, f.retryable, f.requested_delay_ms) d;
            IF v_retry IS NOT NULL THEN
                v_moves := v_moves || tasker._move_steps(v_retry, 'waiting_for_retry', 'failed');
                -- a retry due now goes back to the queue at once
                v_moves := v_moves || tasker._enqueue_steps(
                    ARRAY(SELECT ROW(c.step_uuid, 0)::tasker.step_release FROM unnest(v_retry) c), 'retry due');
            END IF;
            IF v_error IS NOT NULL THEN
                v_error_moves := tasker._move_steps(v_error, 'error', 'failed');
                v_moves := v_moves || v_error_moves || tasker._batch_failures(v_error_moves);
            END IF;
        END IF;
        v_settled := tasker._settle_tasks(v_moves, p_reason, v_tasks);
    END IF;

    -- each result's state afterwards: for one applied result (submit_result,
    -- the hot path) its step's last move here, without a query; otherwise
    -- as the rows are now
    IF cardinality(p_results) = 1 AND v_outcomes[1] = 'applied' THEN
        FOREACH v_move IN ARRAY v_moves LOOP
            IF v_move.step_uuid = p_results[1].step_uuid THEN
                v_state := v_move.to_state;
            END IF;
        END LOOP;
        IF v_state IS NOT NULL THEN
            outcomes := ARRAY[ROW(p_results[1].step_uuid, v_state, 'applied', NULL)::tasker.result_outcome];
            RETURN;
        END IF;
    END IF;
    outcomes := ARRAY(
        SELECT ROW(r.step_uuid, ws.state, o.outcome, o.note)::tasker.result_outcome
        FROM unnest(v_outcomes, v_notes) WITH ORDINALITY AS o(outcome, note, i)
        JOIN unnest(p_results) WITH ORDINALITY AS r(step_uuid, success, payload, attempt, message, retryable,
                                                     requested_delay_ms, audit, i) ON r.i = o.i
        LEFT JOIN tasker.workflow_steps ws ON ws.step_uuid = r.step_uuid
        ORDER BY o.i);
END
$$;

-- The audit metadata of a submission: worker, execution time, the caller's
-- metadata. (STABLE like jsonb_build_object: an SQL function declared more
-- strictly than its body is not inlined, and a call per result then costs
-- ~20 µs; tests::orchestration checks that the hot paths inline them all.)
CREATE FUNCTION tasker._submission_audit(p_worker_id text, p_execution_time_ms numeric, p_metadata jsonb)
RETURNS jsonb LANGUAGE sql STABLE
RETURN jsonb_strip_nulls(jsonb_build_object(
    'worker_id', p_worker_id, 'execution_time_ms', p_execution_time_ms, 'metadata', p_metadata));

-- Whether results go the one-statement way when they can
-- (tasker._complete_alone): the setting pg_tasker.one_statement_results,
-- on unless set (a backend that has not loaded the library yet knows it
-- only as set or not).
CREATE FUNCTION tasker._one_statement_results() RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce(current_setting('pg_tasker.one_statement_results', true), 'on')::boolean;

-- Successes whose steps' children have them as their only parent (a
-- chain's next step, a fan-out's branches, none: the last step), the common
-- case, applied in one statement: what tasker._apply_results does for them
-- through tasker._move_steps, tasker._enqueue_steps and tasker._settle_tasks
-- (each step completed with its audit row, its message archived, each child
-- released and enqueued with its audit row and message, each task's
-- counters, state and audit row); a result costs about three quarters of
-- its time the general way (docs/benchmarks.md). The same rules, written a
-- second time in this one statement:
-- tests::orchestration::alone_and_general_paths_leave_the_same_rows runs one
-- workflow both ways (pg_tasker.one_statement_results off: the general path
-- only) and compares every row and message. The caller holds the task locks
-- and gives no step twice (tasker._apply_results, tasker.submit_result).
-- Rows are locked as the general path locks them: the steps first (a batch:
-- in step_uuid order, in a statement of their own), then the children
-- (nobody else can release them: no lock before their UPDATE), then the
-- task rows (in task_uuid order, as they are once locked: a sibling's
-- committed counters). The children's messages take the results from here
-- (dependency_results: the parents' rows are changed by this statement,
-- which sees them as they were). A result is left to the caller, untouched,
-- when it is not one for this path: a failure, a step that creates steps, a
-- child with other parents, a map child or one among the results, and a
-- result the general path would not apply (not for the current attempt of a
-- step out with a worker of an unfinished task: it says why). Returns the
-- steps applied here.
CREATE FUNCTION tasker._complete_alone(p_results tasker.step_result[], p_reason text)
RETURNS uuid[]
LANGUAGE plpgsql AS $$
DECLARE
    v_done uuid[];
    v_enqueued bigint;
    v_tasks integer;
    v_settled integer;
    v_moved tasker.task_state[];
    v_events text[];
    v_sent text[];
    v_due boolean;
BEGIN
    IF cardinality(p_results) > 1 THEN
        -- (one step: its UPDATE locks it)
        PERFORM 1 FROM tasker.workflow_steps ws WHERE ws.step_uuid IN (SELECT r.step_uuid FROM unnest(p_results) r)
        ORDER BY ws.step_uuid
        FOR NO KEY UPDATE;
    END IF;
    -- the results' tasks and queues (what the task locks keep as they are:
    -- a task cannot finish while a step is out; MATERIALIZED: a filter on the
    -- task's state pushed down into it makes a plan walk the index of active
    -- tasks, tasks_active_state_idx)
    WITH st AS MATERIALIZED (
        SELECT r.step_uuid, r.payload, r.attempt, r.audit, t.task_uuid, t.state AS task_state, t.namespace_name,
               t.task_name, t.task_version, t.context, t.correlation_id, t.traceparent, n.queue_name, n.queue_seq
        FROM unnest(p_results) r
        JOIN tasker.workflow_steps s ON s.step_uuid = r.step_uuid
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
        JOIN tasker.namespaces n ON n.name = t.namespace_name
        WHERE r.success
    ), done AS (
        -- (tasker._move_steps to complete; the conditions of the outcome
        -- applied of tasker._apply_results, on the locked rows)
        UPDATE tasker.workflow_steps s
        SET previous_state = s.state,
            state          = 'complete',
            transitions    = s.transitions + 1,
            updated_at     = now(),
            results        = st.payload,
            next_retry_at  = NULL,
            completed_at   = now()
        FROM st
        WHERE s.step_uuid = st.step_uuid
          AND tasker.step_state_class(s.state) = 'out'
          AND (st.attempt IS NULL OR s.attempts = st.attempt)
          AND NOT tasker.task_state_is_terminal(st.task_state)
          AND NOT tasker.step_type_creates_steps(s.step_type)
          AND tasker.step_move_is_legal(s.state, 'complete')
          AND NOT EXISTS (SELECT 1 FROM tasker.step_edges e
                          JOIN tasker.workflow_steps c ON c.step_uuid = e.to_step_uuid
                          WHERE e.from_step_uuid = s.step_uuid
                            AND (c.total_parents > 1 OR c.step_type = 'map'
                                 OR c.step_uuid = ANY (ARRAY(SELECT y.step_uuid FROM unnest(p_results) y))))
        RETURNING s.step_uuid, s.name, s.previous_state, s.attempts, s.queue_msg_id, s.transitions, st.payload,
                  st.audit, st.task_uuid, st.namespace_name, st.task_name, st.task_version, st.context,
                  st.correlation_id, st.traceparent, st.queue_name, st.queue_seq
    ), done_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT d.step_uuid, d.transitions, d.previous_state, 'complete', 'completed by worker',
               coalesce(d.audit, '{}') || jsonb_build_object('attempt', d.attempts)
        FROM done d
    ), archived AS (
        SELECT tasker._pgmq_archive(d.queue_name, array_agg(d.queue_msg_id ORDER BY d.queue_msg_id)) AS n
        FROM done d
        GROUP BY d.queue_name
    ), kids AS (
        -- (tasker._enqueue_steps for candidates with released = 1 = total_parents)
        UPDATE tasker.workflow_steps s
        SET pending_parents = s.pending_parents - 1,
            previous_state  = CASE WHEN r.ready THEN s.state ELSE s.previous_state END,
            state           = CASE WHEN r.ready THEN 'enqueued' ELSE s.state END,
            transitions     = s.transitions + r.ready::integer,
            updated_at      = now(),
            attempts        = s.attempts + r.ready::integer,
            queue_msg_id    = CASE WHEN r.ready THEN nextval(d.queue_seq) ELSE s.queue_msg_id END,
            enqueued_at     = CASE WHEN r.ready THEN now() ELSE s.enqueued_at END,
            started_at      = CASE WHEN r.ready THEN NULL ELSE s.started_at END,
            next_retry_at   = CASE WHEN r.ready THEN NULL ELSE s.next_retry_at END
        FROM done d
        JOIN tasker.step_edges e ON e.from_step_uuid = d.step_uuid
        JOIN tasker.workflow_steps c ON c.step_uuid = e.to_step_uuid
        CROSS JOIN LATERAL (SELECT tasker.step_is_ready(c.state, c.pending_parents - 1, c.next_retry_at, now())
                                   AS ready) r
        WHERE s.step_uuid = c.step_uuid
        RETURNING s.step_uuid, s.previous_state, s.attempts, s.budget_offset, s.queue_msg_id, s.transitions,
                  s.name, s.handler_callable, s.handler_method, s.inputs, s.max_attempts, s.timeout_seconds,
                  s.map_index, s.map_item, s.checkpoint, r.ready, e.gate, d.name AS parent_name,
                  d.payload AS parent_results, d.task_uuid, d.namespace_name, d.task_name, d.task_version,
                  d.context, d.correlation_id, d.traceparent, d.queue_name
    ), kids_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT k.step_uuid, k.transitions, k.previous_state, 'enqueued', 'ready', jsonb_build_object('attempt', k.attempts)
        FROM kids k
        WHERE k.ready
    ), sent AS (
        SELECT e.queue_name,
               tasker._pgmq_send(e.queue_name, array_agg(e.queue_msg_id ORDER BY e.queue_msg_id),
                                 array_agg(tasker._step_message(
                    e.task_uuid, e.step_uuid, e.namespace_name, e.task_name, e.task_version, e.name,
                    e.handler_callable, e.handler_method, e.inputs, e.context, e.map_index, e.map_item,
                    e.checkpoint, e.attempts, e.budget_offset, e.max_attempts, e.timeout_seconds,
                    e.correlation_id, e.traceparent,
                    CASE WHEN e.gate THEN '{}' ELSE jsonb_build_object(e.parent_name, e.parent_results) END)
                ORDER BY e.queue_msg_id)) AS n
        FROM kids e
        WHERE e.ready
        GROUP BY e.queue_name
    ), tally AS (
        SELECT d.task_uuid, count(*)::integer AS completed,
               (SELECT count(*) FROM kids k WHERE k.task_uuid = d.task_uuid AND k.ready)::integer AS enqueued
        FROM done d
        GROUP BY d.task_uuid
    ), locked AS (
        -- the task rows, last (after the messages: sent is evaluated
        -- first), as they are once locked
        SELECT t.task_uuid, t.state, t.steps_total, t.steps_pending, t.steps_out, t.steps_waiting, t.steps_done,
               t.steps_error, t.steps_cancelled, y.completed, y.enqueued
        FROM tally y
        JOIN tasker.tasks t ON t.task_uuid = y.task_uuid
        WHERE (SELECT count(*) FROM sent) >= 0
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE OF t
    ), n AS MATERIALIZED (
        -- (tasker._settle_tasks: the counters take the moves, the state is
        -- decided from them)
        SELECT l.task_uuid, l.state, l.steps_pending - l.enqueued AS pending,
               l.steps_out - l.completed + l.enqueued AS out, l.steps_done + l.completed AS done,
               s.execution_status, s.task_state::tasker.task_state AS to_state
        FROM locked l
        CROSS JOIN LATERAL tasker._task_status(l.steps_total, l.steps_pending - l.enqueued,
                                               l.steps_out - l.completed + l.enqueued, l.steps_waiting,
                                               l.steps_done + l.completed, l.steps_error, l.steps_cancelled, 0) s
    ), settled AS (
        UPDATE tasker.tasks k
        SET steps_pending    = n.pending,
            steps_out        = n.out,
            steps_done       = n.done,
            state            = n.to_state,
            transitions      = k.transitions + (n.to_state <> n.state)::integer,
            updated_at       = now(),
            completed_at     = CASE WHEN n.to_state = n.state THEN k.completed_at
                                    WHEN tasker.task_state_is_terminal(n.to_state) THEN now() END,
            next_action_at   = CASE WHEN tasker.task_state_is_terminal(n.to_state) THEN NULL
                                    WHEN k.steps_waiting = 0 THEN NULL
                                    ELSE (SELECT min(s.next_retry_at) FROM tasker.workflow_steps s
                                          WHERE s.task_uuid = k.task_uuid AND s.next_retry_at IS NOT NULL) END,
            claimed_by       = CASE WHEN tasker.task_state_is_terminal(n.to_state) THEN NULL ELSE k.claimed_by END,
            claim_expires_at = CASE WHEN tasker.task_state_is_terminal(n.to_state) THEN NULL
                                    ELSE k.claim_expires_at END
        FROM n
        WHERE k.task_uuid = n.task_uuid
          AND (n.to_state = n.state OR tasker.task_move_is_legal(n.state, n.to_state))
        RETURNING k.task_uuid, k.namespace_name, n.state AS from_state, k.state AS to_state, k.transitions,
                  n.execution_status, k.next_action_at
    ), settled_audit AS (
        INSERT INTO tasker.task_transitions (task_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT u.task_uuid, u.transitions, u.from_state, u.to_state, p_reason,
               jsonb_build_object('execution_status', u.execution_status)
        FROM settled u
        WHERE u.to_state <> u.from_state
    )
    -- (each aggregate costs its start-up on every call: the steps completed
    -- are counted from the array, their tasks are tally's rows)
    SELECT (SELECT array_agg(d.step_uuid) FROM done d),
           (SELECT count(*) FILTER (WHERE k.ready) FROM kids k),
           (SELECT count(*) FROM tally), count(u.task_uuid),
           array_agg(u.to_state) FILTER (WHERE u.to_state <> u.from_state),
           array_agg(tasker._task_event(u.task_uuid, u.namespace_name, u.to_state, u.from_state))
               FILTER (WHERE u.to_state <> u.from_state AND tasker.task_state_is_event(u.to_state)),
           bool_or(u.next_action_at IS NOT NULL),
           (SELECT array_agg(s.queue_name) FILTER (WHERE s.n > 0) FROM sent s)
    INTO v_done, v_enqueued, v_tasks, v_settled, v_moved, v_events, v_due, v_sent
    FROM (SELECT count(*) FROM archived) a
    LEFT JOIN settled u ON true;
    IF v_done IS NULL THEN
        RETURN '{}';
    ELSIF v_settled <> v_tasks THEN
        RAISE EXCEPTION 'pg_tasker internal error: % of % tasks could not be settled', v_tasks - v_settled, v_tasks
            USING ERRCODE = 'XX000', HINT = 'only moves listed in tasker.task_state_transitions are allowed';
    END IF;
    -- (what tasker._settle_tasks and tasker._enqueue_steps do after their
    -- statements)
    PERFORM tasker._count_moves('step', 'complete', cardinality(v_done));
    IF v_enqueued > 0 THEN
        PERFORM tasker._count_moves('step', 'enqueued', v_enqueued);
        IF tasker._anyone_waits() THEN
            PERFORM tasker._wake_workers(v_sent);
        END IF;
    END IF;
    IF v_moved IS NOT NULL OR v_events IS NOT NULL OR v_due THEN
        PERFORM tasker._after_settle(v_moved, v_events, v_due);
    END IF;
    RETURN v_done;
END
$$;

-- tasker.submit_result(step_uuid, status, result, error, metadata) RETURNS text:
-- a worker reports the outcome of an attempt. In one transaction: the
-- message is archived, the attempt settled, children released and enqueued,
-- the task settled. Returns the step's state afterwards. A late, duplicate
-- or stale result changes nothing (a NOTICE says why).
CREATE FUNCTION tasker.submit_result(step_uuid uuid, status text, result jsonb DEFAULT NULL,
                                     error jsonb DEFAULT NULL, metadata jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    sub tasker.submission;
    r tasker.step_result;
    o tasker.result_outcome;
BEGIN
    IF submit_result.step_uuid IS NULL THEN
        RAISE EXCEPTION 'step_uuid must not be NULL' USING ERRCODE = '22004';
    ELSIF submit_result.status IS NULL THEN
        RAISE EXCEPTION 'status must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM tasker._require_steps(ARRAY[submit_result.step_uuid], 'worker');
    sub := tasker._read_submission(submit_result.status, submit_result.error, submit_result.metadata);
    IF sub.success THEN
        PERFORM tasker._check_payload_size(submit_result.result, 'limits.max_result_bytes', 'the result');
    ELSE
        PERFORM tasker._check_payload_size(submit_result.error, 'limits.max_result_bytes', 'the error');
    END IF;
    r := ROW(submit_result.step_uuid, sub.success,
             CASE WHEN sub.success THEN coalesce(submit_result.result, 'null') ELSE submit_result.error END,
             sub.attempt, sub.message, sub.retryable, sub.requested_delay_ms,
             tasker._submission_audit(sub.worker_id, sub.execution_time_ms, submit_result.metadata));
    -- the hot path: what tasker._apply_results does for one success (its
    -- task's lock, shared; tasker._complete_alone), without its glue
    IF sub.success AND tasker._one_statement_results() THEN
        PERFORM tasker._take_task_lock(ws.task_uuid, true)
        FROM tasker.workflow_steps ws
        WHERE ws.step_uuid = submit_result.step_uuid AND tasker._result_shares_task(true, ws.step_type);
        IF FOUND AND cardinality(tasker._complete_alone(ARRAY[r], 'step completed')) = 1 THEN
            RETURN 'complete';
        END IF;
    END IF;
    o := ((tasker._apply_results(ARRAY[r], CASE WHEN sub.success THEN 'step completed' ELSE 'step failed' END,
                                 NULL, false)).outcomes)[1];
    IF o.outcome = 'unknown_step' THEN
        RAISE EXCEPTION '%', o.note USING ERRCODE = 'P0002';
    ELSIF o.outcome = 'never_enqueued' THEN
        RAISE EXCEPTION '%', o.note USING ERRCODE = '55000';
    ELSIF o.outcome <> 'applied' THEN
        RAISE NOTICE 'pg_tasker: %', o.note;
    END IF;
    RETURN o.state::text;
END
$$;

-- A batch of results (tasker.submit_results, tasker.exchange): a JSON
-- array of {step_uuid, status, result, error, metadata}, read in one
-- statement and applied. Per element, in order, what became of it: one of
-- tasker._apply_results' outcomes, or rejected (the element is not a valid
-- result: the note says why, nothing of it is applied). 22023 when results
-- is not an array; 54000 beyond 1,000 elements; 42501 (nothing applied)
-- when a step belongs to a namespace the caller is no worker in.
CREATE FUNCTION tasker._submit_results(p_results jsonb, p_reason text,
                                       INOUT p_read tasker.read_request DEFAULT NULL,
                                       OUT outcomes tasker.result_outcome[])
LANGUAGE plpgsql AS $$
DECLARE
    lim bigint := tasker._setting('limits.max_result_bytes');
    v_steps uuid[];
    v_problems text[];
    v_results tasker.step_result[];
    v_applied tasker.result_outcome[];
    v_applied_read record;
    k integer := 0;
    v_out tasker.result_outcome[] := '{}';
BEGIN
    IF jsonb_typeof(p_results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'results must be a JSON array, got %', coalesce(jsonb_typeof(p_results), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'results is [{"step_uuid": ..., "status": "success"|"failure", "result": ..., "error": ..., "metadata": ...}, ...]';
    ELSIF jsonb_array_length(p_results) > 1000 THEN
        RAISE EXCEPTION 'a batch holds at most 1000 results, got %', jsonb_array_length(p_results)
            USING ERRCODE = '54000';
    ELSIF jsonb_array_length(p_results) = 0 THEN
        outcomes := v_out;
        RETURN;
    END IF;
    SELECT array_agg(u.step_uuid ORDER BY e.i), array_agg(p.problem ORDER BY e.i),
           array_agg(ROW(u.step_uuid, f.success,
                         CASE WHEN f.success THEN coalesce(e.item -> 'result', 'null') ELSE e.item -> 'error' END,
                         f.attempt, f.message, f.retryable, f.requested_delay_ms,
                         tasker._submission_audit(f.worker_id, f.execution_time_ms, e.item -> 'metadata')
                     )::tasker.step_result ORDER BY e.i) FILTER (WHERE p.problem IS NULL)
    INTO v_steps, v_problems, v_results
    FROM jsonb_array_elements(p_results) WITH ORDINALITY AS e(item, i)
    CROSS JOIN LATERAL (SELECT CASE WHEN jsonb_typeof(e.item) = 'object'
                                    THEN tasker._uuid_or_null(e.item ->> 'step_uuid') END AS step_uuid) u
    LEFT JOIN LATERAL tasker._submission_fields(
        e.item ->> 'status', (e.item -> 'error')::text, (e.item -> 'metadata')::text) f
        ON jsonb_typeof(e.item) = 'object'
    CROSS JOIN LATERAL (SELECT CASE
        WHEN jsonb_typeof(e.item) IS DISTINCT FROM 'object' THEN format('result %s is not a JSON object', e.i)
        WHEN u.step_uuid IS NULL THEN format('result %s: step_uuid must be a uuid, got %s', e.i,
                                             coalesce((e.item -> 'step_uuid')::text, 'nothing'))
        WHEN f.problem IS NOT NULL THEN format('result %s: %s', e.i, f.problem)
        WHEN pg_catalog.pg_column_size(CASE WHEN f.success THEN e.item -> 'result' ELSE e.item -> 'error' END) > lim
            THEN format('result %s: the %s is %s bytes, more than the limit of %s bytes (limits.max_result_bytes)',
                        e.i, CASE WHEN f.success THEN 'result' ELSE 'error' END,
                        pg_catalog.pg_column_size(CASE WHEN f.success THEN e.item -> 'result' ELSE e.item -> 'error' END),
                        lim)
        END AS problem) p;
    -- a result for a step of a namespace the caller does not work in refuses the batch
    PERFORM tasker._require_steps(v_steps, 'worker');
    IF v_results IS NOT NULL THEN
        v_applied_read := tasker._apply_results(v_results, p_reason, p_read);
        p_read := v_applied_read.p_read;
        v_applied := v_applied_read.outcomes;
    END IF;
    -- the applied ones in order, the rejected ones in their places
    FOR i IN 1 .. cardinality(v_problems) LOOP
        IF v_problems[i] IS NULL THEN
            k := k + 1;
            v_out := v_out || v_applied[k];
        ELSE
            v_out := v_out || ROW(v_steps[i], NULL, 'rejected', v_problems[i])::tasker.result_outcome;
        END IF;
    END LOOP;
    outcomes := v_out;
END
$$;

-- tasker.submit_results(results jsonb) RETURNS TABLE (step_uuid, outcome,
-- state, detail): a batch of results (a JSON array of what submit_result
-- takes: {step_uuid, status, result, error, metadata}) in one transaction.
-- Every element gets a row, in order: outcome is one of
-- tasker._apply_results' outcomes, or rejected (the element is not a valid
-- result: detail says why, nothing of it is applied); detail explains every
-- outcome but applied. A rejected or ignored element never stops the
-- others.
CREATE FUNCTION tasker.submit_results(results jsonb)
RETURNS TABLE (step_uuid uuid, outcome text, state text, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT o.step_uuid, o.outcome,
           coalesce(o.state, (SELECT ws.state FROM tasker.workflow_steps ws WHERE ws.step_uuid = o.step_uuid))::text,
           o.note
    FROM unnest((tasker._submit_results(submit_results.results, 'results submitted')).outcomes) o;
END
$$;
