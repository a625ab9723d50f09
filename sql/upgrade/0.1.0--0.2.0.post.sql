-- </pg_tasker 0.2.0 install script>

-- 3. The rows, from 0.1.0's tables into 0.2.0's.

INSERT INTO tasker.namespaces (namespace_uuid, name, queue_name, queue_seq, description, created_at)
SELECT n.namespace_uuid, n.name, n.queue_name, tasker._pgmq_ensure_queue(n.queue_name), n.description, n.created_at
FROM tasker_0_1_0.namespaces n;

INSERT INTO tasker.task_templates (template_uuid, namespace_uuid, name, version, version_key, description,
                                   definition, step_count, environments, has_input_schema, created_at, updated_at)
SELECT t.template_uuid, t.namespace_uuid, t.name, t.version, tasker._version_key(t.version), t.description,
       t.definition, jsonb_array_length(t.definition -> 'steps'), '{}', t.definition ? 'input_schema',
       t.created_at, t.updated_at
FROM tasker_0_1_0.task_templates t;
SELECT tasker._materialise_template(t.template_uuid) FROM tasker.task_templates t;

INSERT INTO tasker.tasks (task_uuid, template_uuid, namespace_name, task_name, task_version, state, context,
                          priority, initiator, source_system, reason, tags, idempotency_key, correlation_id,
                          steps_total, steps_pending, steps_out, steps_waiting, steps_done, steps_error,
                          steps_cancelled, transitions, next_action_at, claimed_by, claim_expires_at,
                          created_at, updated_at, completed_at)
SELECT t.task_uuid, t.template_uuid, t.namespace_name, t.task_name, t.task_version, t.state::tasker.task_state,
       t.context, t.priority, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key, t.correlation_id,
       t.total_steps, c.pending, c.out, c.waiting, c.done, c.error, c.cancelled,
       coalesce(tr.latest, 1),
       CASE WHEN NOT tasker.task_state_is_terminal(t.state::tasker.task_state) THEN t.next_action_at END,
       CASE WHEN NOT tasker.task_state_is_terminal(t.state::tasker.task_state) THEN t.claimed_by END,
       CASE WHEN NOT tasker.task_state_is_terminal(t.state::tasker.task_state) THEN t.claim_expires_at END,
       t.created_at, t.updated_at,
       CASE WHEN tasker.task_state_is_terminal(t.state::tasker.task_state) THEN coalesce(t.completed_at, t.updated_at) END
FROM tasker_0_1_0.tasks t
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE tasker.step_state_class(s.state::tasker.step_state) = 'pending') AS pending,
           count(*) FILTER (WHERE tasker.step_state_class(s.state::tasker.step_state) = 'out') AS out,
           count(*) FILTER (WHERE tasker.step_state_class(s.state::tasker.step_state) = 'waiting') AS waiting,
           count(*) FILTER (WHERE tasker.step_state_class(s.state::tasker.step_state) = 'done') AS done,
           count(*) FILTER (WHERE tasker.step_state_class(s.state::tasker.step_state) = 'error') AS error,
           count(*) FILTER (WHERE tasker.step_state_class(s.state::tasker.step_state) = 'cancelled') AS cancelled
    FROM tasker_0_1_0.workflow_steps s WHERE s.task_uuid = t.task_uuid) c
CROSS JOIN LATERAL (
    SELECT max(x.sort_key) AS latest FROM tasker_0_1_0.task_transitions x WHERE x.task_uuid = t.task_uuid) tr;

INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, state, handler_callable, handler_method,
                                   inputs, retryable, max_attempts, attempts, budget_offset, backoff,
                                   backoff_base_ms, max_backoff_ms, jitter, timeout_seconds, total_parents,
                                   pending_parents, results, last_error, next_retry_at, queue_msg_id,
                                   enqueued_at, started_at, completed_at, transitions, previous_state,
                                   created_at, updated_at)
SELECT s.step_uuid, s.task_uuid, s.name, s.position, s.state::tasker.step_state, s.handler_callable,
       s.handler_method, s.inputs, s.retryable, s.max_attempts, s.attempts, 0, s.backoff::tasker.backoff, s.backoff_base_ms,
       s.max_backoff_ms, s.jitter, s.timeout_seconds, s.total_parents, s.pending_parents, s.results,
       s.last_error,
       CASE WHEN s.state = 'waiting_for_retry' THEN coalesce(s.next_retry_at, now()) END,
       s.queue_msg_id, s.enqueued_at,
       CASE WHEN s.state = 'in_progress' THEN coalesce(
           (SELECT max(x.created_at) FROM tasker_0_1_0.step_transitions x
             WHERE x.step_uuid = s.step_uuid AND x.to_state = 'in_progress'), s.updated_at) END,
       CASE WHEN s.state IN ('complete', 'resolved_manually') THEN coalesce(s.completed_at, s.updated_at) END,
       coalesce((SELECT max(x.sort_key) FROM tasker_0_1_0.step_transitions x WHERE x.step_uuid = s.step_uuid), 1),
       (SELECT x.from_state::tasker.step_state FROM tasker_0_1_0.step_transitions x
         WHERE x.step_uuid = s.step_uuid ORDER BY x.sort_key DESC LIMIT 1),
       s.created_at, s.updated_at
FROM tasker_0_1_0.workflow_steps s;

INSERT INTO tasker.step_edges (from_step_uuid, to_step_uuid)
SELECT e.from_step_uuid, e.to_step_uuid FROM tasker_0_1_0.step_edges e;

INSERT INTO tasker.task_transitions (task_uuid, sort_key, from_state, to_state, reason, metadata, actor, created_at)
SELECT x.task_uuid, x.sort_key, x.from_state::tasker.task_state, x.to_state::tasker.task_state, x.reason,
       x.metadata, x.actor, x.created_at
FROM tasker_0_1_0.task_transitions x;

INSERT INTO tasker.step_transitions (step_uuid, sort_key, from_state, to_state, reason, metadata, actor, created_at)
SELECT x.step_uuid, x.sort_key, x.from_state::tasker.step_state, x.to_state::tasker.step_state, x.reason,
       x.metadata, x.actor, x.created_at
FROM tasker_0_1_0.step_transitions x;

INSERT INTO tasker.dlq (dlq_uuid, task_uuid, reason, original_state, error, snapshot, resolution_status,
                        resolution_note, resolved_by, resolved_at, created_at)
SELECT d.dlq_uuid, d.task_uuid, d.reason, d.original_state::tasker.task_state, d.error, d.snapshot,
       d.resolution_status, d.resolution_note, d.resolved_by, d.resolved_at, d.created_at
FROM tasker_0_1_0.dlq d;

INSERT INTO tasker.task_archive (task_uuid, namespace_name, task_name, task_version, state, created_at,
                                 completed_at, archived_at, snapshot)
SELECT a.task_uuid, a.namespace_name, a.task_name, a.task_version, a.state::tasker.task_state, a.created_at,
       coalesce(a.completed_at, a.archived_at), a.archived_at, a.snapshot
FROM tasker_0_1_0.task_archive a;

DROP SCHEMA tasker_0_1_0 CASCADE;

-- Every active task is evaluated once by 0.2.0's rules: tasks 0.1.0 left
-- stranded (a failed branch beside a finished one, a resolved step whose
-- parent ran on) get their right state, ready steps go to the queue. The
-- new tables are this transaction's own: no lock to wait for.
SELECT tasker._evaluate_task(t.task_uuid, 'upgraded to 0.2.0', true)
FROM tasker.tasks t WHERE NOT tasker.task_state_is_terminal(t.state);

-- 0.1.0 granted whole queue tables (SELECT and UPDATE to tasker_worker,
-- SELECT of their archives; SELECT and INSERT of the request queue to
-- tasker_app); 0.2.0 grants what pgmq.read and pgmq.send need, no more.
SELECT tasker._pgmq_close(n.queue_name), tasker._pgmq_grant_reader(n.queue_name, 'tasker_worker')
FROM tasker.namespaces n;
SELECT tasker._pgmq_close(m.queue_name) FROM pgmq.meta m WHERE m.queue_name = tasker._request_queue();
SELECT tasker._grant_request_queue(m.queue_name) FROM pgmq.meta m WHERE m.queue_name = tasker._request_queue();
