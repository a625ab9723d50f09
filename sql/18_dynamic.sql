-- Dynamic steps (docs/templates.md, "Dynamic steps"): what a decision's or
-- batchable step's result creates (the plan: pg_tasker_core::dynamic, via
-- tasker._plan_steps), map steps expanding into elements and completing
-- with their results, batch failure strategies, and checkpoints. Created
-- steps are ordinary steps: their rows, edges, audit rows and the task's
-- counters are written here, in the operation that completed their
-- creator, under its task lock.

-- The outcome a generator step's result states, read from the result
-- (jsonb, never parsed elsewhere), and the plan of what it creates:
-- {"steps": [...], "edges": [...], "cursors": [...]} or {"problem": text}.
CREATE FUNCTION tasker._dynamic_plan(p_step uuid, p_result jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    o jsonb;
    v_kind text;
    v_names text[] := '{}';
    v_worker text;
    v_cursors jsonb;
    v_rows record;
    v_plan jsonb;
BEGIN
    SELECT ws.task_uuid, ws.name, ws.step_type, t.template_uuid, tt.updated_at INTO s
    FROM tasker.workflow_steps ws
    JOIN tasker.tasks t ON t.task_uuid = ws.task_uuid
    JOIN tasker.task_templates tt ON tt.template_uuid = t.template_uuid
    WHERE ws.step_uuid = p_step;
    IF s.step_type = 'decision' THEN
        o := p_result -> 'decision_point_outcome';
        IF jsonb_typeof(o) IS DISTINCT FROM 'object' THEN
            RETURN jsonb_build_object('problem', format(
                'the result of decision step "%s" has no decision_point_outcome object '
                '({"type": "create_steps", "step_names": [...]} or {"type": "no_branches"})', s.name));
        END IF;
        v_kind := o ->> 'type';
        IF v_kind = 'create_steps' THEN
            IF jsonb_typeof(o -> 'step_names') IS DISTINCT FROM 'array'
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(o -> 'step_names') e WHERE jsonb_typeof(e) <> 'string') THEN
                RETURN jsonb_build_object('problem', format(
                    'decision step "%s": decision_point_outcome.step_names must be an array of step names, got %s',
                    s.name, left(coalesce((o -> 'step_names')::text, 'nothing'), 200)));
            END IF;
            v_names := ARRAY(SELECT DISTINCT jsonb_array_elements_text(o -> 'step_names'));
        ELSIF v_kind IS DISTINCT FROM 'no_branches' THEN
            RETURN jsonb_build_object('problem', format(
                'decision step "%s": decision_point_outcome.type must be create_steps or no_branches, got %s',
                s.name, left(coalesce((o -> 'type')::text, 'nothing'), 100)));
        END IF;
    ELSIF s.step_type = 'batchable' THEN
        o := p_result -> 'batch_processing_outcome';
        IF jsonb_typeof(o) IS DISTINCT FROM 'object' THEN
            RETURN jsonb_build_object('problem', format(
                'the result of batchable step "%s" has no batch_processing_outcome object '
                '({"type": "create_batches", "worker_template_name": ..., "cursor_configs": [...]} or {"type": "no_batches"})',
                s.name));
        END IF;
        v_kind := o ->> 'type';
        IF jsonb_typeof(o -> 'worker_template_name') NOT IN ('string', 'null') THEN
            RETURN jsonb_build_object('problem', format(
                'batchable step "%s": worker_template_name must be a string, got %s',
                s.name, left((o -> 'worker_template_name')::text, 100)));
        END IF;
        v_worker := o ->> 'worker_template_name';
        IF v_kind = 'create_batches' THEN
            v_cursors := o -> 'cursor_configs';
            IF jsonb_typeof(v_cursors) IS DISTINCT FROM 'array'
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(v_cursors) c
                          WHERE jsonb_typeof(c) <> 'object'
                             OR coalesce(jsonb_typeof(c -> 'batch_id'), 'null') NOT IN ('string', 'number')) THEN
                RETURN jsonb_build_object('problem', format(
                    'batchable step "%s": cursor_configs must be an array of objects with a batch_id, got %s',
                    s.name, left(coalesce(v_cursors::text, 'nothing'), 200)));
            END IF;
            v_names := ARRAY(SELECT c ->> 'batch_id' FROM jsonb_array_elements(v_cursors) WITH ORDINALITY AS x(c, i)
                             ORDER BY x.i);
        ELSIF v_kind IS DISTINCT FROM 'no_batches' THEN
            RETURN jsonb_build_object('problem', format(
                'batchable step "%s": batch_processing_outcome.type must be create_batches or no_batches, got %s',
                s.name, left(coalesce((o -> 'type')::text, 'nothing'), 100)));
        END IF;
    ELSE
        RETURN jsonb_build_object('problem', format('step "%s" is a %s step; it creates no steps', s.name, s.step_type));
    END IF;
    -- the task's rows as the plan sees them (map elements left out)
    SELECT array_agg(ws.name ORDER BY ws.name) AS names, array_agg(ws.position ORDER BY ws.name) AS positions,
           array_agg(ws.state = 'pending' ORDER BY ws.name) AS pending,
           array_agg(tasker.step_state_class(ws.state) NOT IN ('done', 'cancelled') ORDER BY ws.name) AS unfinished
    INTO v_rows
    FROM tasker.workflow_steps ws
    WHERE ws.task_uuid = s.task_uuid AND ws.map_index IS NULL;
    v_plan := tasker._plan_steps(s.template_uuid, s.updated_at, s.name, v_kind, v_names, v_worker,
                                 v_rows.names, v_rows.positions, v_rows.pending, v_rows.unfinished);
    IF v_cursors IS NOT NULL THEN
        v_plan := v_plan || jsonb_build_object('cursors', v_cursors);
    END IF;
    RETURN v_plan;
END
$$;

-- Creates what generator step p_step's result asks for (its plan), under
-- its task's lock: the rows (copied from the template's steps; batch
-- workers get their cursor and batch_metadata in initialization), the
-- edges, the parent counters of the rows that take edges, audit rows, the
-- task's counters. 22023 for an invalid outcome (a worker's result was
-- checked before: tasker._apply_results fails such a step instead).
-- Returns the new rows as candidates for enqueueing.
CREATE FUNCTION tasker._create_steps(p_step uuid, p_result jsonb) RETURNS tasker.step_release[]
LANGUAGE plpgsql AS $$
DECLARE
    v_plan jsonb := tasker._dynamic_plan(p_step, p_result);
    g record;
    v_new uuid[];
BEGIN
    IF v_plan ? 'problem' THEN
        RAISE EXCEPTION '%', v_plan ->> 'problem' USING ERRCODE = '22023',
            HINT = 'a decision''s result has decision_point_outcome, a batchable step''s batch_processing_outcome (docs/templates.md)';
    END IF;
    IF jsonb_array_length(v_plan -> 'steps') = 0 AND jsonb_array_length(v_plan -> 'edges') = 0 THEN
        RETURN '{}';
    END IF;
    -- (the steps are copied from the template as the task's environment has them)
    SELECT ws.task_uuid, ws.name, ws.step_type, t.template_uuid, t.environment AS env INTO g
    FROM tasker.workflow_steps ws
    JOIN tasker.tasks t ON t.task_uuid = ws.task_uuid
    WHERE ws.step_uuid = p_step;
    WITH n AS (
        SELECT x.name, x.position, x.batch, x.no_op, x.i, tasker.uuid_generate_v7() AS step_uuid
        FROM ROWS FROM (jsonb_to_recordset(v_plan -> 'steps')
                        AS (name text, position integer, batch integer, no_op boolean))
             WITH ORDINALITY AS x(name, position, batch, no_op, i)
    ), ins AS (
        INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, handler_callable,
                                           handler_method, inputs, retryable, max_attempts, backoff,
                                           backoff_base_ms, max_backoff_ms, jitter, timeout_seconds,
                                           total_parents, pending_parents, step_type, created_by, map_over)
        SELECT n.step_uuid, g.task_uuid, n.name, n.position, ts.handler_callable, ts.handler_method,
               CASE WHEN ts.step_type = 'batch_worker' THEN
                   ts.inputs || jsonb_build_object(
                       'cursor', CASE WHEN n.no_op
                                      THEN jsonb_build_object('batch_id', '000', 'start_cursor', 0,
                                                              'end_cursor', 0, 'batch_size', 0)
                                      ELSE v_plan -> 'cursors' -> n.batch END,
                       'batch_metadata', jsonb_build_object(
                           'cursor_field', ts.batch_config -> 'cursor_field',
                           'failure_strategy', coalesce(ts.batch_config ->> 'failure_strategy', 'continue_on_failure')),
                       'is_no_op', n.no_op)
                    ELSE ts.inputs END,
               ts.retryable, ts.max_attempts, ts.backoff, ts.backoff_base_ms, ts.max_backoff_ms, ts.jitter,
               ts.timeout_seconds, 0, 0, ts.step_type, p_step, ts.map_over
        FROM n
        JOIN tasker.template_steps ts ON ts.template_uuid = g.template_uuid AND ts.environment = g.env
                                     AND ts.position = n.position
        ORDER BY n.i
        RETURNING step_uuid
    ), audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
        SELECT ins.step_uuid, 1, NULL, 'pending', format('created by %s step "%s"', g.step_type, g.name),
               jsonb_build_object('created_by', p_step)
        FROM ins
    )
    SELECT array_agg(ins.step_uuid) INTO v_new FROM ins;
    -- the edges, by name within the task; then the parents of each row
    -- that takes edges (those of a parent not done yet still to wait for)
    WITH e AS (
        INSERT INTO tasker.step_edges (from_step_uuid, to_step_uuid, gate)
        SELECT f.step_uuid, t.step_uuid, x.gate
        FROM jsonb_to_recordset(v_plan -> 'edges') AS x("from" text, "to" text, gate boolean)
        JOIN tasker.workflow_steps f ON f.task_uuid = g.task_uuid AND f.name = x."from"
        JOIN tasker.workflow_steps t ON t.task_uuid = g.task_uuid AND t.name = x."to"
        ON CONFLICT DO NOTHING
        RETURNING from_step_uuid, to_step_uuid
    )
    UPDATE tasker.workflow_steps s
    SET total_parents = s.total_parents + k.total, pending_parents = s.pending_parents + k.pending
    FROM (SELECT e.to_step_uuid, count(*) AS total,
                 count(*) FILTER (WHERE tasker.step_state_class(f.state) <> 'done') AS pending
          FROM e JOIN tasker.workflow_steps f ON f.step_uuid = e.from_step_uuid
          GROUP BY e.to_step_uuid) k
    WHERE s.step_uuid = k.to_step_uuid;
    UPDATE tasker.tasks t
    SET steps_total = t.steps_total + coalesce(cardinality(v_new), 0),
        steps_pending = t.steps_pending + coalesce(cardinality(v_new), 0)
    WHERE t.task_uuid = g.task_uuid;
    RETURN ARRAY(SELECT ROW(u, 0)::tasker.step_release FROM unnest(v_new) u);
END
$$;

-- What the generator steps among p_done (steps that have just become done)
-- create: the candidates for enqueueing.
CREATE FUNCTION tasker._create_steps_of(p_done tasker.step_move[]) RETURNS tasker.step_release[]
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v tasker.step_release[] := '{}';
BEGIN
    FOR r IN SELECT s.step_uuid, s.results FROM unnest(p_done) d
             JOIN tasker.workflow_steps s ON s.step_uuid = d.step_uuid
             WHERE tasker.step_type_creates_steps(s.step_type)
             ORDER BY s.step_uuid LOOP
        v := v || tasker._create_steps(r.step_uuid, r.results);
    END LOOP;
    RETURN v;
END
$$;

-- Map steps that are ready (their parents done, or, once expanded, their
-- elements): a map step not yet expanded takes its array (its dependency's
-- result, or the task context, at map_over) and gets one element step per
-- item, or completes at once with [] for an empty array, or fails for good
-- when the input is not an array or longer than limits.max_map_elements;
-- an expanded one completes with its elements' results in index order.
-- Expanding is the map step's attempt. The caller holds the task lock.
-- Returns the moves (and those of whatever became ready after them).
CREATE FUNCTION tasker._run_maps(p_maps uuid[]) RETURNS tasker.step_move[]
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    v_moves tasker.step_move[] := '{}';
    v_done tasker.step_move[];
    v_new uuid[];
    lim bigint := tasker._setting('limits.max_map_elements');
    v_problem text;
BEGIN
    -- (a map step with a dependency in its template maps over that
    -- dependency's result, never anything else: when the dependency was
    -- not created, there is no input)
    FOR m IN SELECT s.step_uuid, s.task_uuid, s.name, s.map_size, s.map_over,
                    CASE WHEN ts.parents = 0 THEN t.context ELSE p.results END
                        #> coalesce(s.map_over, '{}') AS input,
                    CASE WHEN ts.parents = 0 THEN 'the task context'
                         WHEN p.step_uuid IS NULL THEN 'the result of its dependency, which was never created,'
                         ELSE format('the result of "%s"', p.name) END AS source
             FROM unnest(p_maps) u
             JOIN tasker.workflow_steps s ON s.step_uuid = u
             JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
             JOIN tasker.template_steps ts ON ts.template_uuid = t.template_uuid AND ts.environment = ''
                                          AND ts.position = s.position
             LEFT JOIN LATERAL (
                 SELECT ps.step_uuid, ps.name, ps.results FROM tasker.step_edges e
                 JOIN tasker.workflow_steps ps ON ps.step_uuid = e.from_step_uuid
                 WHERE e.to_step_uuid = s.step_uuid AND NOT e.gate LIMIT 1) p ON s.map_size IS NULL
             WHERE s.step_type = 'map' AND s.state = 'pending' AND s.pending_parents = 0
             ORDER BY s.step_uuid LOOP
        IF m.map_size IS NOT NULL THEN
            -- every element is done
            v_done := tasker._move_steps(ARRAY[ROW(m.step_uuid,
                (SELECT coalesce(jsonb_agg(el.results ORDER BY el.map_index), '[]')
                 FROM tasker.workflow_steps el
                 WHERE el.created_by = m.step_uuid AND el.map_index IS NOT NULL),
                NULL, NULL, jsonb_build_object('elements', m.map_size))::tasker.step_change],
                'complete', 'map elements complete');
            v_moves := v_moves || v_done || tasker._enqueue_steps(tasker._children_of(v_done));
            CONTINUE;
        END IF;
        v_problem := CASE
            WHEN jsonb_typeof(m.input) IS DISTINCT FROM 'array' THEN
                format('map step "%s" maps over %s%s, which is %s, not an array', m.name, m.source,
                       CASE WHEN m.map_over IS NULL THEN '' ELSE ' at ' || array_to_string(m.map_over, '.') END,
                       coalesce(jsonb_typeof(m.input), 'missing'))
            WHEN jsonb_array_length(m.input) > lim THEN
                format('map step "%s" has %s elements, more than the limit of %s (limits.max_map_elements)',
                       m.name, jsonb_array_length(m.input), lim)
            END;
        -- (expanding is the map step's attempt)
        UPDATE tasker.workflow_steps s
        SET attempts = s.attempts + 1,
            map_size = CASE WHEN v_problem IS NULL THEN jsonb_array_length(m.input) END
        WHERE s.step_uuid = m.step_uuid;
        IF v_problem IS NOT NULL THEN
            v_moves := v_moves || tasker._move_steps(ARRAY[ROW(m.step_uuid,
                jsonb_build_object('message', v_problem, 'error_code', 'invalid_map_input'), NULL, v_problem,
                NULL)::tasker.step_change], 'error', 'map input invalid');
            CONTINUE;
        ELSIF jsonb_array_length(m.input) = 0 THEN
            v_done := tasker._move_steps(ARRAY[ROW(m.step_uuid, '[]'::jsonb, NULL, NULL,
                jsonb_build_object('elements', 0))::tasker.step_change], 'complete', 'map over an empty array');
            v_moves := v_moves || v_done || tasker._enqueue_steps(tasker._children_of(v_done));
            CONTINUE;
        END IF;
        WITH ins AS (
            INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, handler_callable,
                                               handler_method, inputs, retryable, max_attempts, backoff,
                                               backoff_base_ms, max_backoff_ms, jitter, timeout_seconds,
                                               created_by, map_index, map_item)
            SELECT tasker.uuid_generate_v7(), s.task_uuid, tasker._map_element_name(s.name, (x.i - 1)::integer),
                   s.position, s.handler_callable, s.handler_method, s.inputs, s.retryable, s.max_attempts,
                   s.backoff, s.backoff_base_ms, s.max_backoff_ms, s.jitter, s.timeout_seconds, s.step_uuid,
                   (x.i - 1)::integer, x.item
            FROM tasker.workflow_steps s, jsonb_array_elements(m.input) WITH ORDINALITY AS x(item, i)
            WHERE s.step_uuid = m.step_uuid
            ORDER BY x.i
            RETURNING step_uuid
        ), edges AS (
            -- (the map step waits for its elements; a gate: it is never sent)
            INSERT INTO tasker.step_edges (from_step_uuid, to_step_uuid, gate)
            SELECT ins.step_uuid, m.step_uuid, true FROM ins
        ), audit AS (
            INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata)
            SELECT ins.step_uuid, 1, NULL, 'pending', format('created by map step "%s"', m.name),
                   jsonb_build_object('created_by', m.step_uuid)
            FROM ins
        )
        SELECT array_agg(ins.step_uuid) INTO v_new FROM ins;
        UPDATE tasker.workflow_steps s
        SET total_parents = s.total_parents + cardinality(v_new),
            pending_parents = s.pending_parents + cardinality(v_new)
        WHERE s.step_uuid = m.step_uuid;
        UPDATE tasker.tasks t
        SET steps_total = t.steps_total + cardinality(v_new), steps_pending = t.steps_pending + cardinality(v_new)
        WHERE t.task_uuid = m.task_uuid;
        v_moves := v_moves || tasker._enqueue_steps(ARRAY(SELECT ROW(u, 0)::tasker.step_release FROM unnest(v_new) u),
                                                    'map element');
    END LOOP;
    RETURN v_moves;
END
$$;

-- Batch failure strategies, for batch workers that have just failed for
-- good (p_failed: their moves to error): fail_fast stops the siblings that
-- have not finished (error, error_code batch_failed_fast, messages
-- withdrawn: an operator retries them with retry_step or dlq_requeue once
-- the cause is fixed); isolate cuts the failed worker out of what waits for
-- it (its edges go, so the convergence step runs with the others).
-- continue_on_failure does nothing: the convergence step waits. The caller
-- holds the task locks. Returns the moves.
CREATE FUNCTION tasker._batch_failures(p_failed tasker.step_move[]) RETURNS tasker.step_move[]
LANGUAGE plpgsql AS $$
DECLARE
    v_stop tasker.step_change[];
    v_queue text;
    v_msgs bigint[];
    v_isolated tasker.step_release[];
    v_moves tasker.step_move[] := '{}';
BEGIN
    -- (every sibling was enqueued when the batch was created: each has an attempt)
    SELECT array_agg(DISTINCT ROW(sib.step_uuid,
                                  jsonb_build_object('message', format('stopped: batch worker "%s" failed (fail_fast)', f.name),
                                                     'error_code', 'batch_failed_fast'),
                                  NULL, format('fail_fast: batch worker "%s" failed', f.name), NULL)::tasker.step_change),
           min(n.queue_name),
           array_agg(DISTINCT sib.queue_msg_id) FILTER (WHERE tasker.step_state_class(sib.state) = 'out')
    INTO v_stop, v_queue, v_msgs
    FROM unnest(p_failed) d
    JOIN tasker.workflow_steps f ON f.step_uuid = d.step_uuid
    JOIN tasker.workflow_steps sib ON sib.created_by = f.created_by AND sib.step_uuid <> f.step_uuid
                                   AND sib.step_type = 'batch_worker'
    JOIN tasker.tasks t ON t.task_uuid = f.task_uuid
    JOIN tasker.namespaces n ON n.name = t.namespace_name
    WHERE f.step_type = 'batch_worker' AND f.inputs -> 'batch_metadata' ->> 'failure_strategy' = 'fail_fast'
      AND tasker.step_state_class(sib.state) IN ('out', 'waiting');
    IF v_stop IS NOT NULL THEN
        -- (their messages are withdrawn, as cancel_task does; one task, one queue)
        IF v_msgs IS NOT NULL THEN
            PERFORM tasker._pgmq_archive(v_queue, v_msgs);
        END IF;
        v_moves := tasker._move_steps(v_stop, 'error', 'batch failed fast');
    END IF;
    WITH cut AS (
        DELETE FROM tasker.step_edges e
        USING unnest(p_failed) d, tasker.workflow_steps f
        WHERE f.step_uuid = d.step_uuid AND e.from_step_uuid = f.step_uuid
          AND f.step_type = 'batch_worker' AND f.inputs -> 'batch_metadata' ->> 'failure_strategy' = 'isolate'
        RETURNING e.to_step_uuid
    ), upd AS (
        UPDATE tasker.workflow_steps s
        SET total_parents = s.total_parents - k.n, pending_parents = s.pending_parents - k.n
        FROM (SELECT cut.to_step_uuid, count(*) AS n FROM cut GROUP BY cut.to_step_uuid) k
        WHERE s.step_uuid = k.to_step_uuid
        RETURNING s.step_uuid
    )
    SELECT array_agg(ROW(upd.step_uuid, 0)::tasker.step_release) INTO v_isolated FROM upd;
    IF v_isolated IS NOT NULL THEN
        v_moves := v_moves || tasker._enqueue_steps(v_isolated, 'batch worker isolated');
    END IF;
    RETURN v_moves;
END
$$;

-- tasker.checkpoint(step_uuid, checkpoint, attempt) RETURNS boolean: a
-- worker saves the progress of its current attempt (a batch worker's
-- cursor, say); the step's next delivery (the same message redelivered
-- after a crash or an expired lease, or a new attempt) carries it as
-- `checkpoint`. False (nothing saved) when the step is not out with a
-- worker or attempt is not its current one. 54000 above
-- limits.max_result_bytes.
CREATE FUNCTION tasker.checkpoint(step_uuid uuid, checkpoint jsonb, attempt integer DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t record;
    s record;
BEGIN
    IF checkpoint.step_uuid IS NULL OR checkpoint.checkpoint IS NULL THEN
        RAISE EXCEPTION 'step_uuid and checkpoint must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM tasker._require_steps(ARRAY[checkpoint.step_uuid], 'worker');
    PERFORM tasker._check_payload_size(checkpoint.checkpoint, 'limits.max_result_bytes', 'the checkpoint');
    -- lock order: the task, then the step (P0002 when there is no such step)
    t := tasker._lock_task_of_step(checkpoint.step_uuid);
    SELECT ws.state, ws.attempts, ws.queue_msg_id INTO s
    FROM tasker.workflow_steps ws WHERE ws.step_uuid = checkpoint.step_uuid;
    IF tasker.step_state_class(s.state) <> 'out' OR s.attempts <> coalesce(checkpoint.attempt, s.attempts) THEN
        RETURN false;
    END IF;
    UPDATE tasker.workflow_steps ws
    SET checkpoint = checkpoint.checkpoint, checkpointed_at = now()
    WHERE ws.step_uuid = checkpoint.step_uuid;
    -- the message as it will be redelivered
    PERFORM tasker._pgmq_merge_message(t.queue_name, s.queue_msg_id,
                                       jsonb_build_object('checkpoint', checkpoint.checkpoint));
    RETURN true;
END
$$;
