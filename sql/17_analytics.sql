-- Observability (blog post 05): throughput, failures, slowest steps, and a
-- Mermaid picture of a task's DAG. They read the transition history of the
-- given window; run them on purpose, not in a hot loop. Each counts the
-- namespaces the caller holds a privilege in. Steps are counted under their
-- template step's name: a map step's elements and a batch's workers
-- together.

CREATE FUNCTION tasker.analytics_throughput(since interval DEFAULT '1 hour',
                                            bucket interval DEFAULT '1 minute')
RETURNS TABLE (bucket_start timestamptz, tasks_completed bigint, steps_completed bigint,
               step_failures bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    WITH events AS (
        SELECT date_bin(bucket, st.created_at, 'epoch'::timestamptz) AS b,
               count(*) FILTER (WHERE st.to_state IN ('complete', 'resolved_manually')) AS done,
               count(*) FILTER (WHERE st.to_state IN ('waiting_for_retry', 'error')) AS failed
        FROM tasker.step_transitions st
        JOIN tasker.workflow_steps s USING (step_uuid)
        JOIN tasker.tasks t USING (task_uuid)
        WHERE st.created_at >= now() - since
          AND t.namespace_name IN (SELECT tasker._seen_namespaces())
        GROUP BY 1
    ), tasks AS (
        SELECT date_bin(bucket, t.completed_at, 'epoch'::timestamptz) AS b, count(*) AS n
        FROM tasker.tasks t
        WHERE t.state = 'complete' AND t.completed_at >= now() - since
          AND t.namespace_name IN (SELECT tasker._seen_namespaces())
        GROUP BY 1
    )
    SELECT coalesce(e.b, t.b), coalesce(t.n, 0), coalesce(e.done, 0), coalesce(e.failed, 0)
    FROM events e FULL JOIN tasks t ON t.b = e.b
    ORDER BY 1
$$;

CREATE FUNCTION tasker.analytics_failures(since interval DEFAULT '1 day')
RETURNS TABLE (namespace text, task_name text, step_name text, error_code text, failures bigint,
               permanent bigint, last_message text, last_seen timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT t.namespace_name, t.task_name, ts.name,
           st.metadata -> 'error' ->> 'error_code',
           count(*),
           count(*) FILTER (WHERE st.to_state = 'error'),
           (array_agg(st.reason ORDER BY st.created_at DESC))[1],
           max(st.created_at)
    FROM tasker.step_transitions st
    JOIN tasker.workflow_steps s USING (step_uuid)
    JOIN tasker.tasks t USING (task_uuid)
    JOIN tasker.template_steps ts ON ts.template_uuid = t.template_uuid AND ts.environment = ''
                                 AND ts.position = s.position
    WHERE st.to_state IN ('waiting_for_retry', 'error')
      AND st.created_at >= now() - since
      AND t.namespace_name IN (SELECT tasker._seen_namespaces())
    GROUP BY 1, 2, 3, 4
    ORDER BY 5 DESC, 1, 2, 3
$$;

CREATE FUNCTION tasker.analytics_slowest_steps(since interval DEFAULT '1 day', lim integer DEFAULT 10)
RETURNS TABLE (namespace text, task_name text, step_name text, executions bigint,
               avg_execution_ms numeric, p95_execution_ms numeric, max_execution_ms numeric,
               avg_queue_to_done_ms numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT t.namespace_name, t.task_name, ts.name, count(*),
           round(avg((st.metadata ->> 'execution_time_ms')::numeric), 2),
           round((percentile_cont(0.95) WITHIN GROUP (ORDER BY (st.metadata ->> 'execution_time_ms')::double precision))::numeric, 2),
           round(max((st.metadata ->> 'execution_time_ms')::numeric), 2),
           round(avg(extract(epoch FROM s.completed_at - s.enqueued_at) * 1000)::numeric, 2)
    FROM tasker.step_transitions st
    JOIN tasker.workflow_steps s USING (step_uuid)
    JOIN tasker.tasks t USING (task_uuid)
    JOIN tasker.template_steps ts ON ts.template_uuid = t.template_uuid AND ts.environment = ''
                                 AND ts.position = s.position
    WHERE st.to_state = 'complete' AND st.created_at >= now() - since
      AND t.namespace_name IN (SELECT tasker._seen_namespaces())
    GROUP BY 1, 2, 3
    ORDER BY 5 DESC NULLS LAST
    LIMIT lim
$$;

-- Text as a Mermaid label shows it, whatever it holds: every character but
-- letters, digits, space and _ . : - becomes an entity code (#34; for "),
-- so no step name can end its label or inject Mermaid or HTML.
CREATE FUNCTION tasker._mermaid_text(p text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT string_agg(CASE WHEN c.ch ~ '^[A-Za-z0-9 _.:-]$' THEN c.ch
                                        ELSE '#' || ascii(c.ch) || ';' END, '' ORDER BY c.i)
                 FROM regexp_split_to_table(p, '') WITH ORDINALITY AS c(ch, i)), '');

-- A Mermaid flowchart of a task: one node per step (name, state, attempts),
-- one arrow per dependency (dotted: a gate, pg_tasker_core::dynamic),
-- colour by state. P0002 for an unknown task, 42501 for one of a namespace
-- the caller holds no privilege in.
CREATE FUNCTION tasker.task_graph(task_uuid uuid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    WITH n AS (
        -- node ids in template order (created steps share their template step's position)
        SELECT s.step_uuid, s.name, s.state, s.attempts, s.max_attempts,
               row_number() OVER (ORDER BY s.position, s.map_index NULLS FIRST, s.name) - 1 AS node
        FROM tasker.workflow_steps s WHERE s.task_uuid = tasker._seen_task(task_graph.task_uuid)
    )
    SELECT concat_ws(E'\n',
        'flowchart LR',
        (SELECT string_agg(format('    s%s["%s<br/>%s (%s/%s)"]:::%s', n.node, tasker._mermaid_text(n.name), n.state,
                                  n.attempts, n.max_attempts, n.state), E'\n' ORDER BY n.node)
           FROM n),
        (SELECT string_agg(format('    s%s %s s%s', p.node, CASE WHEN e.gate THEN '-.->' ELSE '-->' END, c.node),
                           E'\n' ORDER BY c.node, p.node)
           FROM tasker.step_edges e
           JOIN n c ON c.step_uuid = e.to_step_uuid
           JOIN n p ON p.step_uuid = e.from_step_uuid),
        '    classDef complete fill:#c8e6c9,stroke:#2e7d32',
        '    classDef resolved_manually fill:#c8e6c9,stroke:#2e7d32,stroke-dasharray: 4',
        '    classDef error fill:#ffcdd2,stroke:#c62828',
        '    classDef waiting_for_retry fill:#ffe0b2,stroke:#ef6c00',
        '    classDef enqueued fill:#bbdefb,stroke:#1565c0',
        '    classDef in_progress fill:#90caf9,stroke:#0d47a1',
        '    classDef pending fill:#eeeeee,stroke:#757575',
        '    classDef cancelled fill:#e0e0e0,stroke:#424242,stroke-dasharray: 4')
    WHERE EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = task_graph.task_uuid)
$$;
