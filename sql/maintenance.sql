-- Maintenance: dead letter queue, archive of finished tasks.

CREATE TABLE tasker.dlq (
    dlq_uuid          uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid         uuid REFERENCES tasker.tasks ON DELETE SET NULL,
    reason            text NOT NULL CHECK (reason IN ('staleness_timeout', 'task_max_lifetime_exceeded',
                                                      'invalid_task_request')),
    original_state    text,
    error             jsonb,
    -- the task and its steps (or the rejected request) as they were
    snapshot          jsonb NOT NULL,
    resolution_status text NOT NULL DEFAULT 'pending'
                      CHECK (resolution_status IN ('pending', 'requeued', 'resolved', 'discarded')),
    resolution_note   text,
    resolved_by       text,
    resolved_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((resolution_status = 'pending') = (resolved_at IS NULL))
);
COMMENT ON TABLE tasker.dlq IS
    'Dead letter queue: stale tasks and rejected task requests, with a snapshot and a resolution status.';
CREATE INDEX dlq_pending_idx ON tasker.dlq (created_at) WHERE resolution_status = 'pending';
-- at most one open entry per task
CREATE UNIQUE INDEX dlq_open_task_idx ON tasker.dlq (task_uuid)
    WHERE resolution_status = 'pending' AND task_uuid IS NOT NULL;

CREATE TABLE tasker.task_archive (
    task_uuid      uuid PRIMARY KEY,
    namespace_name text NOT NULL,
    task_name      text NOT NULL,
    task_version   text NOT NULL,
    state          text NOT NULL,
    created_at     timestamptz NOT NULL,
    completed_at   timestamptz,
    archived_at    timestamptz NOT NULL DEFAULT now(),
    -- task row, steps, edges and transitions as they were
    snapshot       jsonb NOT NULL
);
COMMENT ON TABLE tasker.task_archive IS
    'Finished tasks removed by retention under policy = "archive".';
CREATE INDEX task_archive_archived_at_idx ON tasker.task_archive (archived_at);

-- Finished tasks by age, for retention.
CREATE INDEX tasks_finished_idx ON tasker.tasks (completed_at)
    WHERE state IN ('complete', 'cancelled', 'resolved_manually', 'error');

-- A task and everything below it as one jsonb value.
CREATE FUNCTION tasker._task_snapshot(p_task uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'task', to_jsonb(t),
        'steps', coalesce((SELECT jsonb_agg(to_jsonb(s) ORDER BY s.position)
                           FROM tasker.workflow_steps s WHERE s.task_uuid = t.task_uuid), '[]'),
        'edges', coalesce((SELECT jsonb_agg(jsonb_build_object('from', e.from_step_uuid, 'to', e.to_step_uuid))
                           FROM tasker.step_edges e JOIN tasker.workflow_steps s ON s.step_uuid = e.to_step_uuid
                           WHERE s.task_uuid = t.task_uuid), '[]'),
        'task_transitions', coalesce((SELECT jsonb_agg(to_jsonb(tt) ORDER BY tt.sort_key)
                           FROM tasker.task_transitions tt WHERE tt.task_uuid = t.task_uuid), '[]'),
        'step_transitions', coalesce((SELECT jsonb_agg(to_jsonb(st) ORDER BY st.step_uuid, st.sort_key)
                           FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid)
                           WHERE s.task_uuid = t.task_uuid), '[]'))
    FROM tasker.tasks t WHERE t.task_uuid = p_task
$$;
