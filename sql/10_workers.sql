-- The worker side besides submit_result: reading step messages (marking the
-- steps in_progress) and extending a lease.

-- Reads up to p_qty messages of a namespace's queue (leasing each for p_vt
-- seconds) and marks their steps in_progress. The steps these messages are
-- the current attempt of, in this namespace, still enqueued, are locked
-- without waiting: a step someone else holds is being settled or stopped
-- anyway. The move enqueued -> in_progress changes no counter (both are
-- `out`), so no task row is touched. Returns the messages as read.
CREATE FUNCTION tasker._read_steps(p_namespace text, p_queue text, p_worker_id text, p_qty integer, p_vt integer)
RETURNS TABLE (msg_id bigint, read_ct integer, step_uuid uuid, message jsonb)
LANGUAGE plpgsql ROWS 10 AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_counts integer[];
    v_messages jsonb[];
    v_start uuid[];
BEGIN
    SELECT array_agg((r ->> 'msg_id')::bigint ORDER BY i), array_agg((r ->> 'read_ct')::integer ORDER BY i),
           array_agg(r -> 'message' ORDER BY i)
    INTO v_ids, v_counts, v_messages
    FROM unnest(tasker._pgmq_read(p_queue, p_vt, p_qty)) WITH ORDINALITY AS x(r, i);
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(x.step_uuid) INTO v_start FROM (
        SELECT s.step_uuid
        FROM unnest(v_ids, v_messages) AS m(msg_id, message)
        JOIN tasker.workflow_steps s
          ON s.step_uuid = tasker._uuid_or_null(m.message ->> 'step_uuid') AND s.queue_msg_id = m.msg_id
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid AND t.namespace_name = p_namespace
        WHERE s.state = 'enqueued'
        FOR NO KEY UPDATE OF s SKIP LOCKED) x;
    IF v_start IS NOT NULL THEN
        -- (enqueued -> in_progress: both `out`, nothing to settle)
        PERFORM tasker._move_steps(
            ARRAY(SELECT ROW(u, NULL, NULL, NULL, NULL)::tasker.step_change FROM unnest(v_start) u),
            'in_progress', 'read by worker', jsonb_build_object('worker_id', p_worker_id));
    END IF;
    RETURN QUERY
    SELECT m.msg_id, m.read_ct, tasker._uuid_or_null(m.message ->> 'step_uuid'), m.message
    FROM unnest(v_ids, v_counts, v_messages) AS m(msg_id, read_ct, message)
    ORDER BY m.msg_id;
END
$$;

-- The checks of a worker's read: 22004 / 22023 for missing or out-of-range
-- arguments. Returns the visibility timeout to use.
CREATE FUNCTION tasker._check_read(p_worker_id text, p_qty integer, p_vt integer) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_vt integer := coalesce(p_vt, tasker._setting('queues.default_visibility_timeout_seconds')::integer);
BEGIN
    IF p_worker_id IS NULL THEN
        RAISE EXCEPTION 'worker_id must not be NULL' USING ERRCODE = '22004';
    ELSIF p_qty IS NULL OR p_qty NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'qty must be between 1 and 1000, got %', p_qty USING ERRCODE = '22023';
    ELSIF v_vt < 1 THEN
        RAISE EXCEPTION 'visibility_timeout_seconds must be at least 1, got %', v_vt USING ERRCODE = '22023';
    END IF;
    RETURN v_vt;
END
$$;

-- The queues of namespaces, in the order given; 42704 for an unknown one.
CREATE FUNCTION tasker._namespace_queues(p_namespaces text[])
RETURNS TABLE (namespace text, queue_name text)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_missing text;
BEGIN
    SELECT u INTO v_missing FROM unnest(p_namespaces) u
    WHERE u IS NULL OR NOT EXISTS (SELECT 1 FROM tasker.namespaces n WHERE n.name = u) LIMIT 1;
    IF FOUND THEN
        IF v_missing IS NULL THEN
            RAISE EXCEPTION 'namespace must not be NULL' USING ERRCODE = '22004';
        END IF;
        RAISE EXCEPTION 'namespace "%" does not exist', v_missing USING ERRCODE = '42704';
    END IF;
    RETURN QUERY
    SELECT n.name, n.queue_name FROM unnest(p_namespaces) WITH ORDINALITY AS u(name, i)
    JOIN tasker.namespaces n ON n.name = u.name
    ORDER BY u.i;
END
$$;

-- tasker.read_steps(namespace, worker_id, qty, visibility_timeout_seconds):
-- reads up to qty step messages of a namespace's queue and marks their steps
-- in_progress, in one transaction. Plain pgmq.read works as well; the steps
-- then stay `enqueued` until their result arrives.
CREATE FUNCTION tasker.read_steps(namespace text, worker_id text, qty integer DEFAULT 10,
                                  visibility_timeout_seconds integer DEFAULT NULL)
RETURNS TABLE (msg_id bigint, read_ct integer, step_uuid uuid, message jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_vt integer := tasker._check_read(read_steps.worker_id, read_steps.qty, read_steps.visibility_timeout_seconds);
    q record;
BEGIN
    IF read_steps.namespace IS NULL THEN
        RAISE EXCEPTION 'namespace must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO q FROM tasker._namespace_queues(ARRAY[read_steps.namespace]);
    RETURN QUERY SELECT * FROM tasker._read_steps(q.namespace, q.queue_name, read_steps.worker_id,
                                                  read_steps.qty, v_vt);
END
$$;

-- tasker.wake_channel(namespace) RETURNS text: the channel to LISTEN on
-- for new messages in a namespace's queue (notified only while a worker is
-- registered as idle with tasker.worker_idle). 42704 for an unknown
-- namespace.
CREATE FUNCTION tasker.wake_channel(namespace text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT tasker.wake_channel_of_queue(q.queue_name)
            FROM tasker._namespace_queues(ARRAY[wake_channel.namespace]) q);
END
$$;

-- tasker.worker_idle(namespaces, worker_id, idle) RETURNS void: a worker
-- that found no work says so before it waits on the namespaces' channels
-- (LISTEN tasker.wake_channel(ns)), and says it is busy again when it
-- wakes. While a worker is idle on a queue, every enqueue into it NOTIFYs
-- its channel. Registrations of backends that are gone are dropped here.
CREATE FUNCTION tasker.worker_idle(namespaces text[], worker_id text, idle boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF worker_idle.worker_id IS NULL OR worker_idle.idle IS NULL THEN
        RAISE EXCEPTION 'worker_id and idle must not be NULL' USING ERRCODE = '22004';
    END IF;
    DELETE FROM tasker.worker_waits w
    WHERE w.worker_id = worker_idle.worker_id
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.backend_pid);
    IF worker_idle.idle THEN
        INSERT INTO tasker.worker_waits (queue_name, worker_id, backend_pid)
        SELECT q.queue_name, worker_idle.worker_id, pg_catalog.pg_backend_pid()
        FROM tasker._namespace_queues(worker_idle.namespaces) q
        ON CONFLICT (queue_name, worker_id) DO UPDATE
        SET backend_pid = EXCLUDED.backend_pid, since = now();
    END IF;
END
$$;

-- tasker.exchange(namespaces, worker_id, results, qty, visibility_timeout_seconds):
-- the batched worker protocol, one round trip and one commit per batch:
-- applies a batch of results (as tasker.submit_results; results that are
-- rejected or ignored are reported as NOTICEs, and never stop the others),
-- then reads up to qty messages from the namespaces' queues (sharing qty
-- among them, in the order given) and marks their steps in_progress (as
-- tasker.read_steps). results may be NULL or [] (only read); qty may be 0
-- (only submit).
CREATE FUNCTION tasker.exchange(namespaces text[], worker_id text, results jsonb DEFAULT NULL,
                                qty integer DEFAULT 10, visibility_timeout_seconds integer DEFAULT NULL)
RETURNS TABLE (namespace text, msg_id bigint, read_ct integer, step_uuid uuid, message jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_vt integer := tasker._check_read(exchange.worker_id, greatest(exchange.qty, 1),
                                       exchange.visibility_timeout_seconds);
    v_queues record;
    o record;
    v_left integer := exchange.qty;
    v_share integer;
    v_n integer;
    v_read integer;
BEGIN
    IF exchange.namespaces IS NULL OR cardinality(exchange.namespaces) = 0 THEN
        RAISE EXCEPTION 'namespaces must name at least one namespace' USING ERRCODE = '22023';
    ELSIF exchange.qty IS NULL OR exchange.qty NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'qty must be between 0 and 1000, got %', exchange.qty USING ERRCODE = '22023';
    END IF;
    PERFORM tasker._namespace_queues(exchange.namespaces);
    IF exchange.results IS NOT NULL AND exchange.results <> '[]' THEN
        FOR o IN SELECT * FROM tasker._submit_results(exchange.results, 'results submitted') r
                 WHERE r.outcome <> 'applied' LOOP
            RAISE NOTICE 'pg_tasker: %', o.detail;
        END LOOP;
    END IF;
    v_n := cardinality(exchange.namespaces);
    FOR v_queues IN SELECT * FROM tasker._namespace_queues(exchange.namespaces) LOOP
        EXIT WHEN v_left <= 0;
        v_share := ceil(v_left::numeric / v_n)::integer;
        v_n := v_n - 1;
        RETURN QUERY SELECT v_queues.namespace, r.* FROM tasker._read_steps(
            v_queues.namespace, v_queues.queue_name, exchange.worker_id, v_share, v_vt) r;
        GET DIAGNOSTICS v_read = ROW_COUNT;
        v_left := v_left - v_read;
    END LOOP;
END
$$;

-- tasker.extend_lease(step_uuid, attempt, seconds) RETURNS timestamptz: a
-- worker running the given attempt keeps its message invisible to others
-- for `seconds` more. Never beyond the step's timeout_seconds (counted from
-- the attempt's first delivery). Returns the new end of the lease, or NULL
-- when the attempt is no longer current (settled, stopped, retried).
CREATE FUNCTION tasker.extend_lease(step_uuid uuid, attempt integer, seconds integer)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    s record;
    l record;
    v_until timestamptz;
BEGIN
    IF extend_lease.step_uuid IS NULL OR extend_lease.attempt IS NULL OR extend_lease.seconds IS NULL THEN
        RAISE EXCEPTION 'step_uuid, attempt and seconds must not be NULL' USING ERRCODE = '22004';
    ELSIF extend_lease.seconds NOT BETWEEN 1 AND 86400 THEN
        RAISE EXCEPTION 'seconds must be between 1 and 86400, got %', extend_lease.seconds USING ERRCODE = '22023';
    END IF;
    SELECT ws.state, ws.attempts, ws.queue_msg_id, ws.started_at, ws.timeout_seconds, n.queue_name INTO s
    FROM tasker.workflow_steps ws
    JOIN tasker.tasks t ON t.task_uuid = ws.task_uuid
    JOIN tasker.namespaces n ON n.name = t.namespace_name
    WHERE ws.step_uuid = extend_lease.step_uuid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'step % does not exist', extend_lease.step_uuid USING ERRCODE = 'P0002';
    END IF;
    IF tasker.step_state_class(s.state) <> 'out' OR s.attempts <> extend_lease.attempt THEN
        RETURN NULL;
    END IF;
    SELECT * INTO l FROM tasker._pgmq_lease(s.queue_name, s.queue_msg_id);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_until := clock_timestamp() + make_interval(secs => extend_lease.seconds);
    IF s.timeout_seconds IS NOT NULL THEN
        v_until := least(v_until, coalesce(s.started_at, l.last_read_at, clock_timestamp())
                                  + make_interval(secs => s.timeout_seconds));
    END IF;
    RETURN tasker._pgmq_set_lease(s.queue_name, s.queue_msg_id, greatest(v_until, l.vt));
END
$$;
