-- Invariants every task must satisfy, as a set of problems (none: the task
-- is consistent). Installed in the test database (src/tests/helpers.rs) and
-- in clusters of the client tests' own.
-- What is wrong with a task, as text rows (none: it is consistent).
CREATE FUNCTION tests.task_problems(p_task uuid) RETURNS SETOF text LANGUAGE sql AS $$
    WITH t AS (SELECT * FROM tasker.tasks WHERE task_uuid = p_task),
    c AS (SELECT count(*) FILTER (WHERE tasker.step_state_class(s.state) = 'pending') AS pending,
                 count(*) FILTER (WHERE tasker.step_state_class(s.state) = 'out') AS out,
                 count(*) FILTER (WHERE tasker.step_state_class(s.state) = 'waiting') AS waiting,
                 count(*) FILTER (WHERE tasker.step_state_class(s.state) = 'done') AS done,
                 count(*) FILTER (WHERE tasker.step_state_class(s.state) = 'error') AS error,
                 count(*) FILTER (WHERE tasker.step_state_class(s.state) = 'cancelled') AS cancelled,
                 count(*) AS total
          FROM tasker.workflow_steps s WHERE s.task_uuid = p_task)
    SELECT format('counters %s != steps %s',
                  row(t.steps_pending, t.steps_out, t.steps_waiting, t.steps_done, t.steps_error, t.steps_cancelled, t.steps_total),
                  row(c.pending, c.out, c.waiting, c.done, c.error, c.cancelled, c.total))
    FROM t, c
    WHERE (t.steps_pending, t.steps_out, t.steps_waiting, t.steps_done, t.steps_error, t.steps_cancelled, t.steps_total)
          <> (c.pending, c.out, c.waiting, c.done, c.error, c.cancelled, c.total)
    UNION ALL
    SELECT format('task is %s with %s steps out', t.state, t.steps_out) FROM t
    WHERE tasker.task_state_is_terminal(t.state) AND t.steps_out > 0
    UNION ALL
    SELECT format('task is %s but no step can progress', t.state) FROM t
    WHERE t.state IN ('steps_in_process', 'pending') AND t.steps_out = 0
      AND NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s WHERE s.task_uuid = p_task
                      AND tasker.step_is_ready(s.state, s.pending_parents, s.next_retry_at, now()))
    UNION ALL
    SELECT format('all %s steps done but the task is %s', t.steps_total, t.state) FROM t
    WHERE t.steps_done = t.steps_total AND t.state <> 'complete' AND NOT tasker.task_state_is_terminal(t.state)
    UNION ALL
    SELECT format('task waits for a retry without next_action_at') FROM t
    WHERE t.state = 'waiting_for_retry' AND t.next_action_at IS NULL
    UNION ALL
    SELECT format('step %s: latest audit row says %s, the row %s', s.name, st.to_state, s.state)
    FROM tasker.workflow_steps s JOIN tasker.step_transitions st
      ON st.step_uuid = s.step_uuid AND st.sort_key = s.transitions
    WHERE s.task_uuid = p_task AND st.to_state <> s.state
    UNION ALL
    SELECT format('step %s: %s audit rows for %s transitions', s.name, count(st.*), s.transitions)
    FROM tasker.workflow_steps s LEFT JOIN tasker.step_transitions st ON st.step_uuid = s.step_uuid
    WHERE s.task_uuid = p_task GROUP BY s.name, s.transitions HAVING count(st.*) <> s.transitions
    UNION ALL
    SELECT format('step %s: previous_state %s, its latest audit row came from %s', s.name, s.previous_state, st.from_state)
    FROM tasker.workflow_steps s JOIN tasker.step_transitions st
      ON st.step_uuid = s.step_uuid AND st.sort_key = s.transitions
    WHERE s.task_uuid = p_task AND s.transitions > 1 AND st.from_state IS DISTINCT FROM s.previous_state
    UNION ALL
    SELECT format('task: latest audit row says %s, the row %s', tt.to_state, t.state)
    FROM t JOIN tasker.task_transitions tt ON tt.task_uuid = t.task_uuid AND tt.sort_key = t.transitions
    WHERE tt.to_state <> t.state
    UNION ALL
    SELECT format('step %s: pending_parents %s but %s parents unfinished', s.name, s.pending_parents, u.n)
    FROM tasker.workflow_steps s
    CROSS JOIN LATERAL (SELECT count(*) AS n FROM tasker.step_edges e
                        JOIN tasker.workflow_steps p ON p.step_uuid = e.from_step_uuid
                        WHERE e.to_step_uuid = s.step_uuid
                          AND tasker.step_state_class(p.state) <> 'done') u
    WHERE s.task_uuid = p_task AND s.pending_parents <> u.n
$$;
GRANT EXECUTE ON FUNCTION tests.task_problems(uuid) TO PUBLIC;

