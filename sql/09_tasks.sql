-- Task creation, in the caller's transaction: the task, its steps (copied
-- from the template's materialised steps), edges and first transitions in
-- one statement, then the first evaluation, which enqueues the root steps.
-- O(steps): rows find their step ids by array subscript, never by a join.

-- tasker.create_task(namespace, name, context, version, priority, initiator,
-- source_system, reason, tags, idempotency_key, traceparent) RETURNS uuid
CREATE FUNCTION tasker.create_task(namespace text, name text, context jsonb DEFAULT '{}',
                                   version text DEFAULT NULL, priority integer DEFAULT 0,
                                   initiator text DEFAULT NULL, source_system text DEFAULT NULL,
                                   reason text DEFAULT NULL, tags text[] DEFAULT '{}',
                                   idempotency_key text DEFAULT NULL, traceparent text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_ns text := create_task.namespace;
    v_name text := create_task.name;
    v_context jsonb := coalesce(create_task.context, '{}');
    v_priority integer := coalesce(create_task.priority, 0);
    v_tags text[] := coalesce(create_task.tags, '{}');
    v_key text := create_task.idempotency_key;
    v_trace text := tasker._traceparent(create_task.traceparent);
    v_version text;
    v_namespace_uuid uuid;
    tt record;
    v_env text;
    v_task uuid;
    v_ids uuid[];
    v_initial boolean[];
    v_created uuid;
BEGIN
    IF v_ns IS NULL THEN
        RAISE EXCEPTION 'namespace must not be NULL' USING ERRCODE = '22004';
    ELSIF v_name IS NULL THEN
        RAISE EXCEPTION 'name must not be NULL' USING ERRCODE = '22004';
    ELSIF array_position(v_tags, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'an element of tags must not be NULL' USING ERRCODE = '22004';
    ELSIF jsonb_typeof(v_context) <> 'object' THEN
        RAISE EXCEPTION 'task context must be a JSON object, got %', left(v_context::text, 200)
            USING ERRCODE = '22023';
    ELSIF v_priority NOT BETWEEN -100 AND 100 THEN
        RAISE EXCEPTION 'priority must be between -100 and 100, got %', v_priority USING ERRCODE = '22023';
    ELSIF v_key = '' THEN
        RAISE EXCEPTION 'idempotency_key must not be empty (use NULL for none)' USING ERRCODE = '22023';
    END IF;
    PERFORM tasker._require_namespaces(ARRAY[v_ns], 'app');
    PERFORM tasker._check_payload_size(v_context, 'limits.max_context_bytes', 'the task context');

    SELECT n.namespace_uuid INTO v_namespace_uuid FROM tasker.namespaces n WHERE n.name = v_ns;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'namespace "%" does not exist', v_ns
            USING ERRCODE = '42704', HINT = 'register a template in this namespace first';
    END IF;
    -- The template row is share-locked: a concurrent re-registration of this
    -- version waits for this transaction and then sees the task (and refuses
    -- to change the definition), or commits first and this one reads the new
    -- definition.
    IF create_task.version IS NULL THEN
        SELECT t.template_uuid, t.version, t.updated_at, t.definition, t.step_count, t.initial_steps,
               t.environments, t.has_input_schema
        INTO tt
        FROM tasker.task_templates t
        WHERE t.namespace_uuid = v_namespace_uuid AND t.name = v_name
        ORDER BY t.version_key DESC, t.version DESC LIMIT 1
        FOR SHARE;
    ELSE
        v_version := tasker._canonical_version(create_task.version);
        SELECT t.template_uuid, t.version, t.updated_at, t.definition, t.step_count, t.initial_steps,
               t.environments, t.has_input_schema
        INTO tt
        FROM tasker.task_templates t
        WHERE t.namespace_uuid = v_namespace_uuid AND t.name = v_name AND t.version = v_version
        FOR SHARE;
    END IF;
    IF tt.template_uuid IS NULL THEN
        IF v_version IS NOT NULL AND EXISTS (SELECT 1 FROM tasker.task_templates t
                                             WHERE t.namespace_uuid = v_namespace_uuid AND t.name = v_name) THEN
            RAISE EXCEPTION 'task template "%/%" has no version %', v_ns, v_name, v_version
                USING ERRCODE = '42704',
                      HINT = 'registered versions: ' || (SELECT string_agg(t.version, ', ' ORDER BY t.version_key, t.version)
                                                         FROM tasker.task_templates t
                                                         WHERE t.namespace_uuid = v_namespace_uuid AND t.name = v_name);
        END IF;
        RAISE EXCEPTION 'task template "%/%" does not exist', v_ns, v_name USING ERRCODE = '42704';
    END IF;

    IF v_key IS NOT NULL THEN
        SELECT t.task_uuid INTO v_task FROM tasker.tasks t
        WHERE t.namespace_name = v_ns AND t.task_name = v_name AND t.idempotency_key = v_key;
        IF FOUND THEN
            RETURN v_task;
        END IF;
    END IF;
    IF tt.has_input_schema THEN
        PERFORM tasker._validate_context(tt.template_uuid, tt.updated_at,
                                         (tt.definition -> 'input_schema')::text, v_context::text);
    END IF;
    v_env := tasker._environment();
    IF NOT v_env = ANY (tt.environments) THEN
        v_env := '';
    END IF;

    -- Step ids by position, made up front: every row below finds its ids by
    -- array subscript, so nothing joins on an unindexed intermediate result.
    v_task := tasker.uuid_generate_v7();
    v_ids := ARRAY(SELECT tasker.uuid_generate_v7() FROM generate_series(1, tt.step_count));
    -- which positions create_task creates (NULL: all of them)
    IF tt.initial_steps < tt.step_count THEN
        v_initial := ARRAY(SELECT ts.initial FROM tasker.template_steps ts
                           WHERE ts.template_uuid = tt.template_uuid AND ts.environment = ''
                           ORDER BY ts.position);
    END IF;
    WITH task AS (
        INSERT INTO tasker.tasks AS t (task_uuid, template_uuid, namespace_name, task_name, task_version,
                                       context, priority, initiator, source_system, reason, tags,
                                       idempotency_key, traceparent, environment, steps_total,
                                       steps_pending)
        VALUES (v_task, tt.template_uuid, v_ns, v_name, tt.version, v_context, v_priority,
                create_task.initiator, create_task.source_system, create_task.reason, v_tags, v_key,
                v_trace, v_env, tt.initial_steps, tt.initial_steps)
        ON CONFLICT (namespace_name, task_name, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING t.task_uuid
    ), steps AS (
        INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, handler_callable,
                                           handler_method, inputs, retryable, max_attempts, backoff,
                                           backoff_base_ms, max_backoff_ms, jitter, timeout_seconds,
                                           total_parents, pending_parents, step_type, map_over)
        SELECT v_ids[ts.position + 1], task.task_uuid, ts.name, ts.position, ts.handler_callable,
               ts.handler_method, ts.inputs, ts.retryable, ts.max_attempts, ts.backoff,
               ts.backoff_base_ms, ts.max_backoff_ms, ts.jitter, ts.timeout_seconds, ts.parents, ts.parents,
               ts.step_type, ts.map_over
        FROM task, tasker.template_steps ts
        WHERE ts.template_uuid = tt.template_uuid AND ts.environment = v_env AND ts.initial
        ORDER BY ts.position
        RETURNING step_uuid
    ), edges AS (
        -- (a step created by create_task depends only on such steps:
        -- pg_tasker_core::dynamic::Graph::initial)
        INSERT INTO tasker.step_edges (from_step_uuid, to_step_uuid)
        SELECT v_ids[te.from_position + 1], v_ids[te.to_position + 1]
        FROM task, tasker.template_edges te
        WHERE te.template_uuid = tt.template_uuid AND (v_initial IS NULL OR v_initial[te.to_position + 1])
    ), step_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason)
        SELECT steps.step_uuid, 1, NULL, 'pending', 'task created' FROM steps
    )
    INSERT INTO tasker.task_transitions AS a (task_uuid, sort_key, from_state, to_state, reason, metadata)
    SELECT task.task_uuid, 1, NULL, 'pending', 'task created',
           jsonb_strip_nulls(jsonb_build_object('initiator', create_task.initiator,
                                                'source_system', create_task.source_system,
                                                'reason', create_task.reason))
    FROM task
    RETURNING a.task_uuid INTO v_created;

    IF v_created IS NULL THEN
        -- a concurrent create_task took the idempotency key first
        SELECT t.task_uuid INTO v_task FROM tasker.tasks t
        WHERE t.namespace_name = v_ns AND t.task_name = v_name AND t.idempotency_key = v_key;
        RETURN v_task;
    END IF;
    -- Root steps go to the queue now, in the caller's transaction. (The new
    -- task row is invisible to others until commit: no lock needed.)
    PERFORM tasker._settle_tasks(
        tasker._enqueue_steps(
            ARRAY(SELECT ROW(v_ids[ts.position + 1], 0)::tasker.step_release
                  FROM tasker.template_steps ts
                  WHERE ts.template_uuid = tt.template_uuid AND ts.environment = v_env AND ts.parents = 0
                    AND ts.initial),
            'ready'),
        'task created', ARRAY[v_task]);
    RETURN v_task;
END
$$;
