-- Views and read functions for people at a psql prompt. The views run with
-- the extension owner's rights, so tasker_app / tasker_worker read them
-- without any access to the tables underneath; each shows the rows of the
-- namespaces the caller holds a privilege in (tasker._seen_namespaces) and
-- is a security barrier, so that no function in a caller's WHERE clause
-- sees the others. Step counts come from the task's counters: a task's row
-- is O(1) whatever its size.

-- A template definition without its handlers' initialization (where
-- secrets end up), in its steps and in its environments' step overrides.
CREATE FUNCTION tasker._without_initialization(p_steps jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN jsonb_typeof(p_steps) = 'array' THEN
    coalesce((SELECT jsonb_agg(CASE WHEN jsonb_typeof(e.s -> 'handler') = 'object'
                                    THEN e.s #- '{handler,initialization}' ELSE e.s END ORDER BY e.i)
              FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS e(s, i)), '[]')
    ELSE p_steps END;

CREATE FUNCTION tasker._redacted_definition(p_definition jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
RETURN p_definition
    || CASE WHEN p_definition ? 'steps'
            THEN jsonb_build_object('steps', tasker._without_initialization(p_definition -> 'steps'))
            ELSE '{}' END
    || CASE WHEN jsonb_typeof(p_definition -> 'environments') = 'object'
            THEN jsonb_build_object('environments', coalesce((
                SELECT jsonb_object_agg(e.k, CASE WHEN jsonb_typeof(e.v) = 'object' AND e.v ? 'steps'
                                                  THEN e.v || jsonb_build_object('steps', tasker._without_initialization(e.v -> 'steps'))
                                                  ELSE e.v END)
                FROM jsonb_each(p_definition -> 'environments') AS e(k, v)), '{}'))
            ELSE '{}' END;

-- The definition in full only for admins of its namespace.
CREATE VIEW tasker.templates WITH (security_barrier) AS
SELECT tt.template_uuid,
       n.name          AS namespace,
       tt.name,
       tt.version,
       tt.description,
       tt.step_count,
       n.queue_name,
       tt.created_at,
       tt.updated_at,
       CASE WHEN n.name = ANY (coalesce(a.mine, ARRAY[n.name])) THEN tt.definition
            ELSE tasker._redacted_definition(tt.definition) END AS definition
FROM tasker.task_templates tt
JOIN tasker.namespaces n USING (namespace_uuid)
CROSS JOIN (SELECT tasker._caller_namespaces('admin') AS mine OFFSET 0) a
WHERE n.name IN (SELECT tasker._seen_namespaces());
COMMENT ON VIEW tasker.templates IS
    'Registered task templates, one row per version (handler initialization shown to the namespace''s admins only).';

-- A task as task_status shows it, for every namespace (not granted: the
-- filtered forms below are the API).
CREATE VIEW tasker._task_rows AS
SELECT t.task_uuid,
       t.namespace_name  AS namespace,
       t.task_name,
       t.task_version,
       t.state,
       t.priority,
       t.steps_total,
       t.steps_pending,
       t.steps_out       AS steps_in_flight,
       t.steps_waiting   AS steps_waiting_for_retry,
       t.steps_done      AS steps_complete,
       t.steps_error,
       t.steps_cancelled,
       t.initiator,
       t.tags,
       t.created_at,
       t.updated_at,
       t.completed_at
FROM tasker.tasks t;

CREATE VIEW tasker.task_status WITH (security_barrier) AS
SELECT r.* FROM tasker._task_rows r
WHERE r.namespace = ANY (ARRAY(SELECT tasker._seen_namespaces()));
COMMENT ON VIEW tasker.task_status IS
    'One row per task: state, priority and step counts by class (complete includes resolved_manually).';

-- tasker.list_tasks(namespace, state, task_name, since, before, lim): a
-- page of task_status rows, newest first, of the namespaces the caller
-- sees, optionally of one namespace, state, template name and created
-- since a time. Keyset paging: `before` is the last task_uuid of the
-- previous page (task uuids are time-ordered). It walks the primary key
-- backwards, so a page costs the same with millions of tasks (a security
-- barrier view cannot take the ORDER BY ... LIMIT into its scan).
CREATE FUNCTION tasker.list_tasks(namespace text DEFAULT NULL, state tasker.task_state DEFAULT NULL,
                                  task_name text DEFAULT NULL, since timestamptz DEFAULT NULL,
                                  before uuid DEFAULT NULL, lim integer DEFAULT 50)
RETURNS SETOF tasker.task_status
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_lim integer := least(greatest(coalesce(lim, 50), 0), 1000);
BEGIN
    IF namespace IS NULL THEN
        -- the primary key backwards
        RETURN QUERY
        SELECT r.* FROM tasker._task_rows r
        WHERE r.namespace = ANY (ARRAY(SELECT tasker._seen_namespaces()))
          AND (state IS NULL OR r.state = state) AND (task_name IS NULL OR r.task_name = task_name)
          AND (since IS NULL OR r.created_at >= since) AND (before IS NULL OR r.task_uuid < before)
        ORDER BY r.task_uuid DESC LIMIT v_lim;
    ELSE
        -- one namespace: tasks_namespace_idx backwards
        RETURN QUERY
        SELECT r.* FROM tasker._task_rows r
        WHERE r.namespace = namespace AND namespace = ANY (ARRAY(SELECT tasker._seen_namespaces()))
          AND (state IS NULL OR r.state = state) AND (task_name IS NULL OR r.task_name = task_name)
          AND (since IS NULL OR r.created_at >= since) AND (before IS NULL OR r.task_uuid < before)
        ORDER BY r.task_uuid DESC LIMIT v_lim;
    END IF;
END
$$;

CREATE VIEW tasker.step_status WITH (security_barrier) AS
SELECT s.task_uuid,
       t.namespace_name AS namespace,
       t.task_name,
       s.step_uuid,
       s.name           AS step_name,
       s.position,
       s.state,
       s.attempts,
       s.attempts - s.budget_offset AS budget_attempts,
       s.max_attempts,
       coalesce((SELECT array_agg(p.name ORDER BY p.position, p.name)
                 FROM tasker.step_edges e
                 JOIN tasker.workflow_steps p ON p.step_uuid = e.from_step_uuid
                 WHERE e.to_step_uuid = s.step_uuid AND NOT e.gate), '{}') AS dependencies,
       CASE jsonb_typeof(s.last_error) WHEN 'string' THEN s.last_error #>> '{}'
                                       ELSE s.last_error ->> 'message' END AS last_error_message,
       s.next_retry_at,
       s.results,
       s.last_error,
       s.enqueued_at,
       s.started_at,
       s.completed_at,
       s.updated_at,
       s.step_type,
       -- steps created after create_task: by which decision, batchable or
       -- map step (and which element)
       s.created_by,
       (SELECT format('%s "%s"', c.step_type, c.name)
               || CASE WHEN s.map_index IS NULL THEN '' ELSE ' element ' || s.map_index END
          FROM tasker.workflow_steps c WHERE c.step_uuid = s.created_by) AS origin,
       s.map_index,
       s.checkpoint
FROM tasker.workflow_steps s
JOIN tasker.tasks t USING (task_uuid)
WHERE t.namespace_name IN (SELECT tasker._seen_namespaces());
COMMENT ON VIEW tasker.step_status IS
    'One row per step: state, attempts, dependencies by name, last error, results, next retry time, type and origin.';

-- The task's uuid, for the read functions: P0002 when there is no such
-- task, 42501 when the caller holds no privilege in its namespace.
CREATE FUNCTION tasker._seen_task(p_task uuid) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task) THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'P0002';
    END IF;
    PERFORM tasker._require_tasks(ARRAY[p_task], 'any');
    RETURN p_task;
END
$$;

-- tasker.step_readiness(task_uuid): per step, what readiness is made of
-- (tasker-core's get_step_readiness_status).
CREATE FUNCTION tasker.step_readiness(task_uuid uuid)
RETURNS TABLE (step_uuid uuid, step_name text, state tasker.step_state, dependencies_satisfied boolean,
               retry_eligible boolean, ready boolean, next_retry_at timestamptz,
               total_parents integer, completed_parents integer, attempts integer,
               max_attempts integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT s.step_uuid, s.name, s.state,
           s.pending_parents = 0,
           s.attempts - s.budget_offset < s.max_attempts,
           tasker.step_is_ready(s.state, s.pending_parents, s.next_retry_at, now()),
           s.next_retry_at,
           s.total_parents,
           s.total_parents - s.pending_parents,
           s.attempts,
           s.max_attempts
    FROM tasker.workflow_steps s
    WHERE s.task_uuid = tasker._seen_task(step_readiness.task_uuid)
    ORDER BY s.position
$$;


-- tasker.task_execution_context(task_uuid): the task's execution status,
-- health and step counts (tasker-core's get_task_execution_context).
CREATE FUNCTION tasker.task_execution_context(task_uuid uuid)
RETURNS TABLE (task_uuid uuid, state tasker.task_state, execution_status text, health text,
               total_steps integer, pending_steps integer, ready_steps integer, in_progress_steps integer,
               waiting_for_retry_steps integer, completed_steps integer, failed_steps integer,
               cancelled_steps integer, completion_percentage double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT t.task_uuid, t.state, d.execution_status, d.health,
           t.steps_total, t.steps_pending, r.ready, t.steps_out, t.steps_waiting, t.steps_done,
           t.steps_error, t.steps_cancelled,
           round((t.steps_done * 10000.0) / t.steps_total) / 100.0
    FROM tasker.tasks t
    CROSS JOIN LATERAL (SELECT count(*)::integer AS ready FROM tasker.workflow_steps s
                        WHERE s.task_uuid = t.task_uuid
                          AND tasker.step_is_ready(s.state, s.pending_parents, s.next_retry_at, now())) r
    CROSS JOIN LATERAL tasker._task_status(t.steps_total, t.steps_pending, t.steps_out, t.steps_waiting,
                                           t.steps_done, t.steps_error, t.steps_cancelled, r.ready) d
    WHERE t.task_uuid = tasker._seen_task($1)
$$;
