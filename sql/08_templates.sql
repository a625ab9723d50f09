-- Namespaces and templates: what tasker.register_template stores once the
-- template has been parsed and validated (src/templates.rs,
-- pg_tasker_core::template).

-- The namespace's row, created with its pgmq queue (readable by
-- tasker_worker, tasker._pgmq_grant_reader) the first time; the queue is
-- recreated when it was dropped by hand since.
CREATE FUNCTION tasker._ensure_namespace(p_namespace text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_queue text := tasker.queue_name(p_namespace);
    v_uuid uuid;
    v_seq regclass;
BEGIN
    SELECT n.namespace_uuid INTO v_uuid FROM tasker.namespaces n WHERE n.name = p_namespace;
    IF FOUND AND tasker._pgmq_queue_exists(v_queue) THEN
        RETURN v_uuid;
    END IF;
    v_seq := tasker._pgmq_ensure_queue(v_queue);
    PERFORM tasker._pgmq_grant_reader(v_queue, 'tasker_worker');
    INSERT INTO tasker.namespaces AS n (name, queue_name, queue_seq) VALUES (p_namespace, v_queue, v_seq)
    ON CONFLICT (name) DO UPDATE SET queue_seq = excluded.queue_seq
    RETURNING n.namespace_uuid INTO v_uuid;
    RETURN v_uuid;
END
$$;

-- The privileges on the task request queue: tasker_app sends (pgmq.send,
-- reading back only msg_ids), tasker_admin reads.
CREATE FUNCTION tasker._grant_request_queue(p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    GRANT USAGE ON SCHEMA pgmq TO tasker_app;
    PERFORM tasker._pgmq_grant_sender(p_queue, 'tasker_app');
    PERFORM tasker._pgmq_revoke(p_queue, 'tasker_admin');
    EXECUTE format('GRANT SELECT ON %s TO tasker_admin', tasker._pgmq_table(p_queue, 'q'));
END
$$;

-- The task request queue (orchestration.task_requests.queue): tasker_app
-- sends task requests to it with pgmq.send (and reads back only msg_ids);
-- tasker_admin may read it; others ask with tasker.request_task.
CREATE FUNCTION tasker._ensure_request_queue(p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF tasker._pgmq_queue_exists(p_queue) THEN
        RETURN;
    END IF;
    PERFORM tasker._pgmq_ensure_queue(p_queue);
    PERFORM tasker._grant_request_queue(p_queue);
END
$$;

-- Replaces a template's rows in template_steps and template_edges (p_steps,
-- p_edges: jsonb arrays of their rows; p_environments: the environments
-- with overrides, each having a full set of steps).
CREATE FUNCTION tasker._replace_template_rows(p_template uuid, p_steps jsonb, p_edges jsonb,
                                              p_environments text[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM tasker.template_steps ts WHERE ts.template_uuid = p_template;
    DELETE FROM tasker.template_edges te WHERE te.template_uuid = p_template;
    INSERT INTO tasker.template_steps
    SELECT p_template, r.environment, r.position, r.name, r.handler_callable, r.handler_method, r.inputs,
           r.retryable, r.max_attempts, r.backoff, r.backoff_base_ms, r.max_backoff_ms, r.jitter,
           r.timeout_seconds, r.parents, r.step_type, r.initial, r.map_over, r.batch_config
    FROM jsonb_to_recordset(p_steps) AS r(environment text, position integer, name text,
         handler_callable text, handler_method text, inputs jsonb, retryable boolean,
         max_attempts integer, backoff tasker.backoff, backoff_base_ms bigint, max_backoff_ms bigint,
         jitter boolean, timeout_seconds integer, parents integer, step_type tasker.step_type,
         initial boolean, map_over text[], batch_config jsonb);
    UPDATE tasker.task_templates tt
    SET environments = p_environments,
        initial_steps = (SELECT count(*) FROM tasker.template_steps ts
                         WHERE ts.template_uuid = p_template AND ts.environment = '' AND ts.initial)
    WHERE tt.template_uuid = p_template;
    INSERT INTO tasker.template_edges
    SELECT p_template, e.from_position, e.to_position
    FROM jsonb_to_recordset(p_edges) AS e(from_position integer, to_position integer);
END
$$;

-- Inserts a template version, or returns the existing id when the
-- definition is identical, or replaces an unused version's definition
-- (55000 when tasks use it). p_steps: rows of template_steps (all
-- environments), p_edges: rows of template_edges, both as jsonb arrays.
CREATE FUNCTION tasker._store_template(p_namespace text, p_name text, p_version text, p_version_key bytea,
                                       p_description text, p_definition jsonb, p_steps jsonb, p_edges jsonb,
                                       p_environments text[], p_has_input_schema boolean)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_ns uuid;
    v_uuid uuid;
    v_same boolean;
    v_count integer := jsonb_array_length(p_steps) / (cardinality(p_environments) + 1);
BEGIN
    -- admins of the namespace register its templates; a new namespace takes tasker_admin
    PERFORM tasker._require_namespaces(ARRAY[p_namespace], 'admin');
    v_ns := tasker._ensure_namespace(p_namespace);
    -- Two rounds: a concurrent registration of the same new version makes
    -- our INSERT do nothing; the second round finds its row.
    FOR round IN 1..2 LOOP
        SELECT tt.template_uuid, tt.definition = p_definition INTO v_uuid, v_same
        FROM tasker.task_templates tt
        WHERE tt.namespace_uuid = v_ns AND tt.name = p_name AND tt.version = p_version
        FOR UPDATE;
        IF FOUND AND v_same THEN
            RETURN v_uuid;
        ELSIF FOUND THEN
            -- Checked after the row lock, in its own statement, so that a task
            -- committed by a concurrent create_task (which share-locks the row)
            -- is seen.
            IF EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.template_uuid = v_uuid) THEN
                RAISE EXCEPTION 'template %/% version % is already used by tasks and cannot change',
                    p_namespace, p_name, p_version
                    USING ERRCODE = '55000', HINT = 'register the changed definition under a new version';
            END IF;
            UPDATE tasker.task_templates tt
            SET definition = p_definition, description = p_description, step_count = v_count,
                environments = p_environments, has_input_schema = p_has_input_schema, updated_at = now()
            WHERE tt.template_uuid = v_uuid;
        ELSE
            INSERT INTO tasker.task_templates AS tt (namespace_uuid, name, version, version_key, description,
                                                     definition, step_count, environments, has_input_schema)
            VALUES (v_ns, p_name, p_version, p_version_key, p_description, p_definition, v_count,
                    p_environments, p_has_input_schema)
            ON CONFLICT (namespace_uuid, name, version) DO NOTHING
            RETURNING tt.template_uuid INTO v_uuid;
            IF v_uuid IS NULL THEN
                CONTINUE;
            END IF;
        END IF;
        PERFORM tasker._replace_template_rows(v_uuid, p_steps, p_edges, p_environments);
        RETURN v_uuid;
    END LOOP;
    RAISE EXCEPTION 'pg_tasker internal error: template registration did not settle after a concurrent registration'
        USING ERRCODE = 'XX000';
END
$$;

-- tasker.register_template(template jsonb) RETURNS uuid
-- tasker.register_template_yaml(template text) RETURNS uuid
-- Validate a template (pg_tasker_core::template), store its canonical form
-- and return its uuid. The jsonb arrives in Rust as text, so that any value
-- jsonb accepts gets a clear error (22023, 54000) rather than a failure to
-- convert.
CREATE FUNCTION tasker.register_template(template jsonb) RETURNS uuid
LANGUAGE sql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
RETURN tasker._register_template(template::text, 'json');

CREATE FUNCTION tasker.register_template_yaml(template text) RETURNS uuid
LANGUAGE sql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
RETURN tasker._register_template(template, 'yaml');
