-- create_task: one statement inserts the task, its steps, its edges and the
-- first transitions. When the idempotency key is taken, the task CTE inserts
-- nothing, every other part follows suit, and no row is returned.
--   $1 task_uuid  $2 template_uuid  $3 namespace  $4 name  $5 version
--   $6 context  $7 priority  $8 initiator  $9 source_system  $10 reason
--   $11 tags  $12 idempotency_key  $13 total_steps  $14 steps  $15 edges
WITH task AS (
    INSERT INTO tasker.tasks (task_uuid, template_uuid, namespace_name, task_name, task_version,
                              context, priority, initiator, source_system, reason, tags,
                              idempotency_key, total_steps)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
    ON CONFLICT (namespace_name, task_name, idempotency_key)
        WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING task_uuid
), steps AS (
    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, handler_callable,
                                       handler_method, inputs, retryable, max_attempts, backoff,
                                       backoff_base_ms, max_backoff_ms, jitter, timeout_seconds,
                                       total_parents, pending_parents)
    SELECT r.step_uuid, task.task_uuid, r.name, r.position, r.handler_callable,
           r.handler_method, r.inputs, r.retryable, r.max_attempts, r.backoff,
           r.backoff_base_ms, r.max_backoff_ms, r.jitter, r.timeout_seconds,
           r.parents, r.parents
    FROM task, jsonb_to_recordset($14) AS r(step_uuid uuid, name text, position int,
            handler_callable text, handler_method text, inputs jsonb, retryable boolean,
            max_attempts int, backoff text, backoff_base_ms bigint, max_backoff_ms bigint,
            jitter boolean, timeout_seconds int, parents int)
    RETURNING step_uuid
), edges AS (
    INSERT INTO tasker.step_edges (from_step_uuid, to_step_uuid)
    SELECT e.parent, e.child
    FROM task, jsonb_to_recordset($15) AS e(parent uuid, child uuid)
), step_transitions AS (
    INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, reason, sort_key)
    SELECT step_uuid, NULL, 'pending', 'task created', 1 FROM steps
)
INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, sort_key, metadata)
SELECT task_uuid, NULL, 'pending', 'task created', 1,
       jsonb_strip_nulls(jsonb_build_object('initiator', $8::text, 'source_system', $9::text, 'reason', $10::text))
FROM task
RETURNING task_uuid
