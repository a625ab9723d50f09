-- Maintenance, run by the background worker on its intervals (and by
-- tasker.run_maintenance): lost and timed-out attempts, staleness and the
-- dead letter queue, retention, the task request queue. The configuration
-- comes in as arguments (src/maintenance.rs). Every job handles one item
-- per subtransaction: one bad item is reported, the others go on.

-- Attempts out with workers whose lease has ended without a result, and
-- that either were delivered p_max_deliveries times (LOST_ATTEMPT) or have
-- run longer than their step's timeout_seconds since their first delivery
-- (TIMEOUT), are failed (retryable) and follow the retry policy. Each
-- namespace's queue is joined only with its own steps; an attempt under a
-- live lease is never touched.
CREATE FUNCTION tasker._recover_attempts(p_max_deliveries integer, p_batch integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    ns record;
    c record;
    s tasker.workflow_steps%ROWTYPE;
    l record;
    v_error jsonb;
    v_state tasker.step_state;
    v_recovered jsonb := '[]';
    v_errors jsonb := '[]';
    n integer := 0;
BEGIN
    FOR ns IN SELECT n.name, n.queue_name FROM tasker.namespaces n
              WHERE tasker._pgmq_queue_exists(n.queue_name) ORDER BY n.name LOOP
        EXIT WHEN n >= p_batch;
        FOR c IN
            SELECT x.* FROM (
                SELECT ws.step_uuid, ws.task_uuid, ws.attempts, ws.timeout_seconds, e.msg_id, e.read_ct,
                       CASE WHEN ws.timeout_seconds IS NOT NULL
                                 AND coalesce(ws.started_at, e.last_read_at)
                                     + make_interval(secs => ws.timeout_seconds) <= clock_timestamp()
                            THEN 'TIMEOUT'
                            WHEN e.read_ct >= p_max_deliveries THEN 'LOST_ATTEMPT' END AS kind
                FROM tasker._pgmq_expired_leases(ns.queue_name) e
                JOIN tasker.workflow_steps ws
                  ON ws.step_uuid = tasker._uuid_or_null(e.step_uuid) AND ws.queue_msg_id = e.msg_id
                WHERE tasker.step_state_class(ws.state) = 'out'
                  -- (the namespace per step, by a subquery: a join let the
                  -- orchestrator's plan, made at its start on empty tables,
                  -- walk every task of the namespace on each run)
                  AND (SELECT t.namespace_name FROM tasker.tasks t WHERE t.task_uuid = ws.task_uuid) = ns.name) x
            WHERE x.kind IS NOT NULL
            ORDER BY x.msg_id
            LIMIT p_batch - n
        LOOP
            n := n + 1;
            BEGIN
                PERFORM tasker._lock_task(c.task_uuid);
                SELECT * INTO s FROM tasker.workflow_steps ws WHERE ws.step_uuid = c.step_uuid;
                SELECT * INTO l FROM tasker._pgmq_lease(ns.queue_name, c.msg_id);
                -- still the same attempt, still out, lease still over?
                IF tasker.step_state_class(s.state) = 'out' AND s.attempts = c.attempts
                   AND l.vt IS NOT NULL AND l.vt <= clock_timestamp() THEN
                    v_error := CASE c.kind
                        WHEN 'TIMEOUT' THEN jsonb_build_object(
                            'message', format('attempt %s timed out: no result within timeout_seconds = %s',
                                              s.attempts, c.timeout_seconds),
                            'error_code', 'TIMEOUT', 'retryable', true, 'timeout_seconds', c.timeout_seconds)
                        ELSE jsonb_build_object(
                            'message', format('lost attempt: the step''s message was delivered %s times without a result',
                                              l.read_ct),
                            'error_code', 'LOST_ATTEMPT', 'retryable', true, 'deliveries', l.read_ct) END;
                    -- as a failure the worker would have reported (its message archived)
                    v_state := (((tasker._apply_results(
                        ARRAY[ROW(s.step_uuid, false, v_error, s.attempts, v_error ->> 'message', true, NULL,
                                  jsonb_build_object('recovered_by', 'orchestrator'))::tasker.step_result],
                        'attempt recovered')).outcomes)[1]).state;
                    v_recovered := v_recovered || jsonb_build_object(
                        'step_uuid', c.step_uuid, 'kind', c.kind, 'deliveries', l.read_ct, 'state', v_state);
                END IF;
            EXCEPTION WHEN OTHERS THEN
                v_errors := v_errors || jsonb_build_object('step_uuid', c.step_uuid,
                    'error', jsonb_build_object('message', SQLERRM, 'sqlstate', SQLSTATE));
            END;
        END LOOP;
    END LOOP;
    RETURN jsonb_build_object('recovered', v_recovered, 'errors', v_errors);
END
$$;

-- A task and everything below it as one jsonb value (DLQ, archive).
CREATE FUNCTION tasker._task_snapshot(p_task uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'task', to_jsonb(t),
        'steps', coalesce((SELECT jsonb_agg(to_jsonb(s) ORDER BY s.position)
                           FROM tasker.workflow_steps s WHERE s.task_uuid = t.task_uuid), '[]'),
        'edges', coalesce((SELECT jsonb_agg(jsonb_build_object('from', e.from_step_uuid, 'to', e.to_step_uuid,
                                                               'gate', e.gate))
                           FROM tasker.workflow_steps s
                           JOIN tasker.step_edges e ON e.to_step_uuid = s.step_uuid
                           WHERE s.task_uuid = t.task_uuid), '[]'),
        'task_transitions', coalesce((SELECT jsonb_agg(to_jsonb(tt) ORDER BY tt.sort_key)
                           FROM tasker.task_transitions tt WHERE tt.task_uuid = t.task_uuid), '[]'),
        'step_transitions', coalesce((SELECT jsonb_agg(to_jsonb(st) ORDER BY st.step_uuid, st.sort_key)
                           FROM tasker.workflow_steps s
                           JOIN tasker.step_transitions st ON st.step_uuid = s.step_uuid
                           WHERE s.task_uuid = t.task_uuid), '[]'))
    FROM tasker.tasks t WHERE t.task_uuid = p_task
$$;

-- Active tasks that made no progress (no change to the task or its steps)
-- for longer than the threshold of their state, or that live longer than
-- the maximum lifetime, go to the DLQ and/or to error. A template's
-- `lifecycle` overrides each threshold. A task with an attempt under a live
-- lease is never stale: a worker holds it.
CREATE FUNCTION tasker._detect_stale(p_steps_in_process_minutes numeric, p_waiting_for_dependencies_minutes numeric,
                                     p_waiting_for_retry_minutes numeric, p_blocked_by_failures_minutes numeric,
                                     p_task_max_lifetime_hours numeric, p_to_error boolean, p_to_dlq boolean,
                                     p_batch integer)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    t record;
    v_live bigint[];
    v_error jsonb;
    v_dlq uuid;
    v_handled jsonb := '[]';
    v_errors jsonb := '[]';
    n integer := 0;
BEGIN
    FOR c IN
        SELECT x.* FROM (
            SELECT tk.task_uuid, tk.state, tk.created_at, tk.updated_at, lim.key, lim.minutes, lim.hours,
                   extract(epoch FROM now() - tk.created_at) / 3600 > lim.hours AS too_old,
                   extract(epoch FROM now() - tk.updated_at) / 60 > lim.minutes AS idle
            FROM tasker.tasks tk
            JOIN tasker.task_templates tt ON tt.template_uuid = tk.template_uuid
            CROSS JOIN LATERAL (
                SELECT k.key,
                       coalesce((tt.definition -> 'lifecycle' ->> k.key)::numeric, k.fallback) AS minutes,
                       coalesce((tt.definition -> 'lifecycle' ->> 'task_max_lifetime_hours')::numeric,
                                p_task_max_lifetime_hours) AS hours
                FROM (SELECT CASE tk.state
                                 WHEN 'waiting_for_dependencies' THEN 'waiting_for_dependencies_minutes'
                                 WHEN 'waiting_for_retry' THEN 'waiting_for_retry_minutes'
                                 WHEN 'blocked_by_failures' THEN 'blocked_by_failures_minutes'
                                 ELSE 'steps_in_process_minutes' END AS key,
                             CASE tk.state
                                 WHEN 'waiting_for_dependencies' THEN p_waiting_for_dependencies_minutes
                                 WHEN 'waiting_for_retry' THEN p_waiting_for_retry_minutes
                                 WHEN 'blocked_by_failures' THEN p_blocked_by_failures_minutes
                                 ELSE p_steps_in_process_minutes END AS fallback) k
            ) lim
            WHERE NOT tasker.task_state_is_terminal(tk.state)) x
        WHERE x.too_old OR x.idle
        ORDER BY x.created_at
    LOOP
        EXIT WHEN n >= p_batch;
        BEGIN
            t := tasker._lock_task(c.task_uuid);
            IF t.state <> c.state THEN
                CONTINUE; -- it moved on meanwhile
            END IF;
            SELECT array_agg(l) INTO v_live
            FROM tasker._pgmq_live_leases(t.queue_name,
                     ARRAY(SELECT ws.queue_msg_id FROM tasker.workflow_steps ws
                           WHERE ws.task_uuid = c.task_uuid AND tasker.step_state_class(ws.state) = 'out')) l;
            IF v_live IS NOT NULL THEN
                CONTINUE; -- a worker holds one of its attempts
            END IF;
            n := n + 1;
            v_error := jsonb_build_object(
                'message', CASE WHEN c.too_old
                                THEN format('task stale: alive longer than task_max_lifetime_hours = %s', c.hours)
                                ELSE format('task stale: no progress in state %s for more than %s = %s',
                                            c.state, c.key, c.minutes) END,
                'error_code', 'TASK_STALE', 'state', c.state);
            v_dlq := NULL;
            IF p_to_dlq THEN
                INSERT INTO tasker.dlq AS d (task_uuid, reason, original_state, error, snapshot)
                VALUES (c.task_uuid, CASE WHEN c.too_old THEN 'task_max_lifetime_exceeded' ELSE 'staleness_timeout' END,
                        c.state, v_error, tasker._task_snapshot(c.task_uuid))
                ON CONFLICT (task_uuid) WHERE resolution_status = 'pending' AND task_uuid IS NOT NULL DO NOTHING
                RETURNING d.dlq_uuid INTO v_dlq;
            END IF;
            IF p_to_error THEN
                -- attempts out with workers end in error (a DLQ requeue retries them)
                PERFORM tasker._settle_tasks(
                    tasker._stop_steps(c.task_uuid, t.queue_name, 'error', 'task stale', v_error),
                    v_error ->> 'message', ARRAY[c.task_uuid], 'error', v_error);
            END IF;
            v_handled := v_handled || jsonb_build_object(
                'task_uuid', c.task_uuid, 'state', c.state,
                'reason', CASE WHEN c.too_old THEN 'task_max_lifetime_exceeded' ELSE 'staleness_timeout' END,
                'dlq_uuid', v_dlq, 'to_error', p_to_error);
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors || jsonb_build_object('task_uuid', c.task_uuid,
                'error', jsonb_build_object('message', SQLERRM, 'sqlstate', SQLSTATE));
        END;
    END LOOP;
    RETURN jsonb_build_object('stale', v_handled, 'errors', v_errors);
END
$$;

-- Deletes (or archives, then deletes) one batch of finished tasks older
-- than the retention period, and prunes old rows of the pgmq archives of
-- pg_tasker's queues. `more` says a full batch was removed.
CREATE FUNCTION tasker._apply_retention(p_states tasker.task_state[], p_days numeric, p_batch integer,
                                        p_archive boolean, p_queue_archive_days numeric, p_request_queue text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_removed bigint;
    v_pruned bigint := 0;
    q text;
BEGIN
    WITH victims AS (
        SELECT t.task_uuid FROM tasker.tasks t
        WHERE tasker.task_state_is_terminal(t.state) AND t.state = ANY (p_states)
          AND t.completed_at < now() - p_days * interval '1 day'
          AND NOT EXISTS (SELECT 1 FROM tasker.dlq d
                          WHERE d.task_uuid = t.task_uuid AND d.resolution_status = 'pending')
        ORDER BY t.completed_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), archived AS (
        INSERT INTO tasker.task_archive (task_uuid, namespace_name, task_name, task_version, state,
                                         created_at, completed_at, snapshot)
        SELECT t.task_uuid, t.namespace_name, t.task_name, t.task_version, t.state, t.created_at,
               t.completed_at, tasker._task_snapshot(t.task_uuid)
        FROM tasker.tasks t JOIN victims v ON v.task_uuid = t.task_uuid
        WHERE p_archive
        ON CONFLICT (task_uuid) DO NOTHING
        RETURNING 1
    ), gone AS (
        DELETE FROM tasker.tasks t USING victims v
        WHERE t.task_uuid = v.task_uuid AND (NOT p_archive OR (SELECT count(*) FROM archived) >= 0)
        RETURNING 1
    )
    SELECT count(*) INTO v_removed FROM gone;

    FOR q IN SELECT n.queue_name FROM tasker.namespaces n UNION ALL SELECT p_request_queue LOOP
        IF q IS NOT NULL AND tasker._pgmq_queue_exists(q) THEN
            v_pruned := v_pruned + tasker._pgmq_prune_archive(q, now() - p_queue_archive_days * interval '1 day',
                                                                p_batch);
        END IF;
    END LOOP;
    RETURN jsonb_build_object('tasks_removed', v_removed,
                              'policy', CASE WHEN p_archive THEN 'archive' ELSE 'delete' END,
                              'queue_archive_rows_pruned', v_pruned,
                              'more', v_removed >= p_batch);
END
$$;

-- tasker.request_task(namespace, name, context, version, priority,
-- initiator, source_system, reason, tags, idempotency_key, traceparent)
-- RETURNS bigint:
-- asks the orchestrator to create a task later (the request queue's
-- message; returns its msg_id). For applications that must not fail on a
-- task they ask for: a request that create_task refuses goes to the DLQ.
-- Takes the app privilege in the namespace (pgmq.send to the request
-- queue takes tasker_app); 55000 when task requests are off.
CREATE FUNCTION tasker.request_task(namespace text, name text, context jsonb DEFAULT '{}',
                                    version text DEFAULT NULL, priority integer DEFAULT NULL,
                                    initiator text DEFAULT NULL, source_system text DEFAULT NULL,
                                    reason text DEFAULT NULL, tags text[] DEFAULT NULL,
                                    idempotency_key text DEFAULT NULL, traceparent text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
DECLARE
    v_queue text := tasker._request_queue();
BEGIN
    IF request_task.namespace IS NULL OR request_task.name IS NULL THEN
        RAISE EXCEPTION 'namespace and name must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM tasker._require_namespaces(ARRAY[request_task.namespace], 'app');
    IF v_queue IS NULL THEN
        RAISE EXCEPTION 'task requests are off (orchestration.task_requests.enabled = false)'
            USING ERRCODE = '55000', HINT = 'use tasker.create_task, or turn task requests on';
    END IF;
    PERFORM tasker._check_payload_size(request_task.context, 'limits.max_context_bytes', 'the task context');
    PERFORM tasker._ensure_request_queue(v_queue);
    -- (the context as given, byte for byte: only the optional fields lose their NULLs)
    RETURN tasker._pgmq_send_one(v_queue, jsonb_build_object(
        'namespace', request_task.namespace, 'name', request_task.name,
        'context', coalesce(request_task.context, '{}'))
        || jsonb_strip_nulls(jsonb_build_object(
        'version', request_task.version, 'priority', request_task.priority,
        'initiator', request_task.initiator, 'source_system', request_task.source_system,
        'reason', request_task.reason, 'tags', to_jsonb(request_task.tags),
        'idempotency_key', request_task.idempotency_key,
        'traceparent', tasker._traceparent(request_task.traceparent))));
END
$$;

-- Turns queued task requests into tasks with create_task's checks. Each
-- request is parsed and created in its own subtransaction; one that fails
-- goes to the DLQ with its error. Either way its message is archived, so
-- nothing is dropped silently, retried forever, or blocks the others.
CREATE FUNCTION tasker._ingest_requests(p_queue text, p_vt integer, p_batch integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    v_task uuid;
    v_dlq uuid;
    v_error jsonb;
    v_created jsonb := '[]';
    v_rejected jsonb := '[]';
BEGIN
    PERFORM tasker._ensure_request_queue(p_queue);
    FOR m IN SELECT (r ->> 'msg_id')::bigint AS msg_id, r -> 'message' AS message
             FROM unnest(tasker._pgmq_read(p_queue, p_vt, p_batch)) WITH ORDINALITY AS x(r, i) ORDER BY i LOOP
        BEGIN
            v_task := tasker._create_task_from_request(m.message);
            v_created := v_created || jsonb_build_object('msg_id', m.msg_id, 'task_uuid', v_task);
        EXCEPTION WHEN OTHERS THEN
            v_error := jsonb_build_object('message', SQLERRM, 'sqlstate', SQLSTATE);
            BEGIN
                INSERT INTO tasker.dlq AS d (reason, error, snapshot)
                VALUES ('invalid_task_request', v_error,
                        jsonb_build_object('queue', p_queue, 'msg_id', m.msg_id, 'request', m.message))
                RETURNING d.dlq_uuid INTO v_dlq;
            EXCEPTION WHEN OTHERS THEN
                -- the request itself cannot be kept (e.g. too large for a row):
                -- keep the error and where the message went
                INSERT INTO tasker.dlq AS d (reason, error, snapshot)
                VALUES ('invalid_task_request', v_error || jsonb_build_object('snapshot_error', SQLERRM),
                        jsonb_build_object('queue', p_queue, 'msg_id', m.msg_id, 'archived', true))
                RETURNING d.dlq_uuid INTO v_dlq;
            END;
            v_rejected := v_rejected || jsonb_build_object('msg_id', m.msg_id, 'error', v_error, 'dlq_uuid', v_dlq);
        END;
        PERFORM tasker._pgmq_archive(p_queue, ARRAY[m.msg_id]);
    END LOOP;
    RETURN jsonb_build_object('created', v_created, 'rejected', v_rejected);
END
$$;

-- tasker.dlq_requeue(dlq_uuid, note) RETURNS text: gives a dead-lettered
-- task another chance: its failed steps get a new retry budget, its retries
-- become due, and the task resumes. Returns the task state.
CREATE FUNCTION tasker.dlq_requeue(dlq_uuid uuid, note text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
DECLARE
    e record;
    t record;
    v_note text := coalesce(dlq_requeue.note, 'requeued from the DLQ');
    v_failed uuid[];
    v_moves tasker.step_move[] := '{}';
    v_state tasker.task_state;
BEGIN
    IF dlq_requeue.dlq_uuid IS NULL THEN
        RAISE EXCEPTION 'dlq_uuid must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT d.resolution_status, d.task_uuid INTO e FROM tasker.dlq d WHERE d.dlq_uuid = dlq_requeue.dlq_uuid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'DLQ entry % does not exist', dlq_requeue.dlq_uuid USING ERRCODE = 'P0002';
    ELSIF e.task_uuid IS NULL THEN
        RAISE EXCEPTION 'DLQ entry % has no task to requeue', dlq_requeue.dlq_uuid
            USING ERRCODE = '55000',
                  HINT = 'A rejected task request or a quarantined step message: send a corrected one, '
                         'and close the entry with tasker.dlq_resolve.';
    END IF;
    -- lock order: the task, then the entry
    t := tasker._lock_task(e.task_uuid);
    SELECT d.resolution_status INTO e.resolution_status FROM tasker.dlq d
    WHERE d.dlq_uuid = dlq_requeue.dlq_uuid FOR UPDATE;
    IF e.resolution_status <> 'pending' THEN
        RAISE EXCEPTION 'DLQ entry % is already %', dlq_requeue.dlq_uuid, e.resolution_status USING ERRCODE = '55000';
    ELSIF tasker.task_state_is_terminal(t.state) AND t.state <> 'error' THEN
        RAISE EXCEPTION 'task % is %; nothing to requeue', t.task_uuid, t.state USING ERRCODE = '55000';
    END IF;
    SELECT array_agg(s.step_uuid ORDER BY s.step_uuid) INTO v_failed
    FROM tasker.workflow_steps s WHERE s.task_uuid = t.task_uuid AND s.state = 'error';
    IF t.state = 'error' THEN
        PERFORM tasker._settle_tasks('{}', v_note, ARRAY[t.task_uuid], 'steps_in_process');
    END IF;
    IF v_failed IS NOT NULL THEN
        v_moves := tasker._move_steps(
            ARRAY(SELECT ROW(u, NULL, NULL, NULL, NULL)::tasker.step_change FROM unnest(v_failed) u),
            'pending', v_note);
    END IF;
    UPDATE tasker.workflow_steps s SET next_retry_at = now()
    WHERE s.task_uuid = t.task_uuid AND s.state = 'waiting_for_retry';
    -- every ready step goes to the queue, the moves above are settled
    v_state := tasker._evaluate_task(t.task_uuid, 'requeued from the DLQ', true, v_moves);
    UPDATE tasker.dlq d
    SET resolution_status = 'requeued', resolution_note = v_note, resolved_by = session_user, resolved_at = now()
    WHERE d.dlq_uuid = dlq_requeue.dlq_uuid;
    RETURN v_state::text;
END
$$;

-- tasker.dlq_resolve(dlq_uuid, note, status DEFAULT 'resolved') RETURNS text:
-- closes a DLQ entry as resolved or discarded.
CREATE FUNCTION tasker.dlq_resolve(dlq_uuid uuid, note text DEFAULT NULL, status text DEFAULT 'resolved')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
BEGIN
    IF dlq_resolve.dlq_uuid IS NULL THEN
        RAISE EXCEPTION 'dlq_uuid must not be NULL' USING ERRCODE = '22004';
    ELSIF coalesce(dlq_resolve.status, '') NOT IN ('resolved', 'discarded') THEN
        RAISE EXCEPTION 'status must be ''resolved'' or ''discarded'', got "%"', dlq_resolve.status
            USING ERRCODE = '22023';
    END IF;
    SELECT d.resolution_status INTO v_status FROM tasker.dlq d WHERE d.dlq_uuid = dlq_resolve.dlq_uuid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'DLQ entry % does not exist', dlq_resolve.dlq_uuid USING ERRCODE = 'P0002';
    ELSIF v_status <> 'pending' THEN
        RAISE EXCEPTION 'DLQ entry % is already %', dlq_resolve.dlq_uuid, v_status USING ERRCODE = '55000';
    END IF;
    UPDATE tasker.dlq d
    SET resolution_status = dlq_resolve.status, resolution_note = nullif(dlq_resolve.note, ''),
        resolved_by = session_user, resolved_at = now()
    WHERE d.dlq_uuid = dlq_resolve.dlq_uuid;
    RETURN dlq_resolve.status;
END
$$;
