-- Stale tasks: active tasks whose last progress (the latest change to the
-- task or any of its steps) is older than the threshold of their state, or
-- that exist longer than the maximum lifetime. A template's `lifecycle`
-- section overrides the configured thresholds.
--   $1 steps_in_process_minutes  $2 waiting_for_dependencies_minutes
--   $3 waiting_for_retry_minutes $4 blocked_by_failures_minutes
--   $5 task_max_lifetime_hours   $6 batch size
WITH active AS (
    SELECT t.task_uuid, t.state, t.created_at,
           greatest(t.updated_at, (SELECT max(s.updated_at) FROM tasker.workflow_steps s
                                    WHERE s.task_uuid = t.task_uuid)) AS last_progress,
           CASE t.state
               WHEN 'waiting_for_dependencies' THEN 'waiting_for_dependencies_minutes'
               WHEN 'waiting_for_retry' THEN 'waiting_for_retry_minutes'
               WHEN 'blocked_by_failures' THEN 'blocked_by_failures_minutes'
               ELSE 'steps_in_process_minutes'
           END AS key,
           tt.definition -> 'lifecycle' AS lifecycle
    FROM tasker.tasks t
    JOIN tasker.task_templates tt USING (template_uuid)
    WHERE t.state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
), limits AS (
    SELECT a.*,
           coalesce((a.lifecycle ->> a.key)::double precision,
                    CASE a.key WHEN 'waiting_for_dependencies_minutes' THEN $2
                               WHEN 'waiting_for_retry_minutes' THEN $3
                               WHEN 'blocked_by_failures_minutes' THEN $4
                               ELSE $1 END) AS minutes,
           coalesce((a.lifecycle ->> 'task_max_lifetime_hours')::double precision, $5) AS lifetime_hours
    FROM active a
)
SELECT coalesce(jsonb_agg(jsonb_build_object(
           'task_uuid', task_uuid, 'state', state,
           'reason', CASE WHEN created_at < now() - make_interval(secs => lifetime_hours * 3600)
                          THEN 'task_max_lifetime_exceeded' ELSE 'staleness_timeout' END,
           'threshold', CASE WHEN created_at < now() - make_interval(secs => lifetime_hours * 3600)
                             THEN format('alive longer than task_max_lifetime_hours = %s', lifetime_hours)
                             ELSE format('no progress in state %s for more than %s = %s', state, key, minutes) END)), '[]')
FROM (SELECT * FROM limits
      WHERE last_progress < now() - make_interval(secs => minutes * 60)
         OR created_at < now() - make_interval(secs => lifetime_hours * 3600)
      ORDER BY created_at
      LIMIT $6) stale
