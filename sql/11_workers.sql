-- The worker side besides submit_result: reading step messages (marking the
-- steps in_progress) and extending a lease.

-- Reads up to p_qty messages of a namespace's queue (leasing each for p_vt
-- seconds) and marks their steps in_progress. The steps these messages are
-- the current attempt of, in this namespace, still enqueued, are locked
-- without waiting: a step someone else holds is being settled or stopped
-- anyway. The move enqueued -> in_progress changes no counter (both are
-- `out`), so no task row is touched. A message that is not the current
-- attempt of one of this namespace's steps (not a step message, an unknown
-- step, another namespace's step, an attempt that is over) is quarantined:
-- archived, with a DLQ entry (reason invalid_step_message) saying why, and
-- not returned; one bad message never blocks its queue. Returns the other
-- messages as read, as tasker._pgmq_read gives them ({msg_id, read_ct,
-- message}; NULL: none).
CREATE FUNCTION tasker._read_steps(p_namespace text, p_queue text, p_worker_id text, p_qty integer, p_vt integer)
RETURNS jsonb[]
LANGUAGE plpgsql AS $$
DECLARE
    v_read jsonb[] := tasker._pgmq_read(p_queue, p_vt, p_qty);
    v_start tasker.step_change[];
    v_started bigint[];
    v_bad bigint[];
    v_moved tasker.step_move[];
BEGIN
    IF v_read IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(ROW(x.step_uuid, NULL, NULL, NULL, NULL)::tasker.step_change), array_agg(x.queue_msg_id)
    INTO v_start, v_started FROM (
        SELECT s.step_uuid, s.queue_msg_id
        FROM unnest(v_read) AS m(r)
        JOIN tasker.workflow_steps s
          ON s.step_uuid = tasker._uuid_or_null(m.r -> 'message' ->> 'step_uuid')
         AND s.queue_msg_id = (m.r ->> 'msg_id')::bigint
        WHERE s.state = 'enqueued'
          -- (the namespace per step, by a subquery: a join let a plan made
          -- on empty tables walk every task of the namespace on each read,
          -- client_tests::scale::plans_made_on_empty_tables_reach_rows_by_key)
          AND (SELECT t.namespace_name FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid) = p_namespace
        FOR NO KEY UPDATE OF s SKIP LOCKED) x;
    IF v_start IS NOT NULL THEN
        -- (enqueued -> in_progress: both `out`, nothing to settle)
        v_moved := tasker._move_steps(v_start, 'in_progress', 'read by worker',
                                      jsonb_build_object('worker_id', p_worker_id));
    END IF;
    IF coalesce(cardinality(v_start), 0) < cardinality(v_read) THEN
        -- the others: redeliveries (in_progress), steps someone else holds,
        -- and messages that are no step's current attempt here
        WITH bad AS (
            SELECT (m.r ->> 'msg_id')::bigint AS msg_id, m.r, w.problem
            FROM unnest(v_read) AS m(r)
            CROSS JOIN LATERAL (SELECT tasker._uuid_or_null(m.r -> 'message' ->> 'step_uuid') AS step_uuid) u
            LEFT JOIN tasker.workflow_steps s ON s.step_uuid = u.step_uuid
            LEFT JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
            CROSS JOIN LATERAL (SELECT CASE
                WHEN jsonb_typeof(m.r -> 'message') IS DISTINCT FROM 'object' OR u.step_uuid IS NULL THEN
                    format('not a step message: step_uuid is %s',
                           coalesce((m.r -> 'message' -> 'step_uuid')::text, 'missing'))
                WHEN s.step_uuid IS NULL THEN format('step %s does not exist', u.step_uuid)
                WHEN t.namespace_name <> p_namespace THEN
                    format('step %s belongs to namespace %s, not to %s', u.step_uuid, t.namespace_name, p_namespace)
                WHEN s.queue_msg_id IS DISTINCT FROM (m.r ->> 'msg_id')::bigint
                     OR tasker.step_state_class(s.state) <> 'out' THEN
                    format('not the current attempt of step %s (state %s, attempt %s, message %s)',
                           u.step_uuid, s.state, s.attempts, coalesce(s.queue_msg_id::text, 'none'))
                END AS problem) w
            WHERE (m.r ->> 'msg_id')::bigint <> ALL (coalesce(v_started, '{}'))
              AND w.problem IS NOT NULL
        ), dead AS (
            INSERT INTO tasker.dlq (reason, error, snapshot)
            SELECT 'invalid_step_message', jsonb_build_object('message', b.problem),
                   jsonb_build_object('queue', p_queue, 'namespace', p_namespace) || b.r
            FROM bad b
        )
        SELECT array_agg(b.msg_id) INTO v_bad FROM bad b;
        IF v_bad IS NOT NULL THEN
            PERFORM tasker._pgmq_archive(p_queue, v_bad);
            SELECT array_agg(m.r) INTO v_read FROM unnest(v_read) AS m(r)
            WHERE (m.r ->> 'msg_id')::bigint <> ALL (v_bad);
        END IF;
    END IF;
    RETURN v_read;
END
$$;

-- The rows of messages as tasker._read_steps returns them.
CREATE FUNCTION tasker._message_rows(p_read jsonb[])
RETURNS TABLE (msg_id bigint, read_ct integer, step_uuid uuid, message jsonb)
LANGUAGE sql IMMUTABLE ROWS 10 AS $$
    SELECT (m.r ->> 'msg_id')::bigint, (m.r ->> 'read_ct')::integer,
           tasker._uuid_or_null(m.r -> 'message' ->> 'step_uuid'), m.r -> 'message'
    FROM unnest(p_read) WITH ORDINALITY AS m(r, i)
    ORDER BY m.i
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

-- The queues of namespaces the caller works in, in the order given; 42501
-- for a namespace it is no worker in, 42704 for an unknown one.
CREATE FUNCTION tasker._worker_queues(p_namespaces text[]) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queues text[];
    v_missing text;
BEGIN
    IF cardinality(p_namespaces) = 0 THEN
        RETURN '{}';
    END IF;
    PERFORM tasker._require_namespaces(p_namespaces, 'worker');
    SELECT array_agg(n.queue_name ORDER BY u.i), (array_agg(u.name ORDER BY u.i) FILTER (WHERE n.queue_name IS NULL))[1]
    INTO v_queues, v_missing
    FROM unnest(p_namespaces) WITH ORDINALITY AS u(name, i)
    LEFT JOIN tasker.namespaces n ON n.name = u.name;
    IF cardinality(v_queues) IS DISTINCT FROM cardinality(p_namespaces) OR v_missing IS NOT NULL
       OR array_position(p_namespaces, NULL) IS NOT NULL THEN
        IF array_position(p_namespaces, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'namespace must not be NULL' USING ERRCODE = '22004';
        END IF;
        RAISE EXCEPTION 'namespace "%" does not exist', v_missing USING ERRCODE = '42704';
    END IF;
    RETURN v_queues;
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
BEGIN
    IF read_steps.namespace IS NULL THEN
        RAISE EXCEPTION 'namespace must not be NULL' USING ERRCODE = '22004';
    END IF;
    RETURN QUERY SELECT * FROM tasker._message_rows(tasker._read_steps(
        read_steps.namespace, (tasker._worker_queues(ARRAY[read_steps.namespace]))[1], read_steps.worker_id,
        read_steps.qty, v_vt));
END
$$;

-- tasker.wake_channel(namespace) RETURNS text: the channel to LISTEN on
-- for new messages in a namespace's queue (notified only while a worker is
-- registered as idle with tasker.worker_idle). 42704 for an unknown
-- namespace.
CREATE FUNCTION tasker.wake_channel(namespace text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
BEGIN
    RETURN tasker.wake_channel_of_queue((tasker._worker_queues(ARRAY[wake_channel.namespace]))[1]);
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
DECLARE
    v_queues text[];
BEGIN
    IF worker_idle.worker_id IS NULL OR worker_idle.idle IS NULL THEN
        RAISE EXCEPTION 'worker_id and idle must not be NULL' USING ERRCODE = '22004';
    END IF;
    -- (checked first: a worker changes registrations of its own namespaces only)
    v_queues := tasker._worker_queues(coalesce(worker_idle.namespaces, '{}'));
    DELETE FROM tasker.worker_waits w
    WHERE (w.worker_id = worker_idle.worker_id AND w.queue_name = ANY (v_queues))
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.backend_pid);
    IF worker_idle.idle THEN
        -- (counted before the rows exist: an enqueue that does not see the
        -- count cannot see the rows either)
        PERFORM tasker._set_waiting(true);
        INSERT INTO tasker.worker_waits (queue_name, worker_id, backend_pid)
        SELECT q, worker_idle.worker_id, pg_catalog.pg_backend_pid()
        FROM unnest(v_queues) q
        ON CONFLICT (queue_name, worker_id) DO UPDATE
        SET backend_pid = EXCLUDED.backend_pid, since = now();
    ELSE
        PERFORM tasker._set_waiting(EXISTS (SELECT 1 FROM tasker.worker_waits w
                                            WHERE w.backend_pid = pg_catalog.pg_backend_pid()));
    END IF;
END
$$;

-- Reads up to p_qty messages from queues (p_queues, of p_namespaces, in
-- the order given, sharing p_qty among them) and marks their steps
-- in_progress (tasker._read_steps): each message as jsonb
-- ({msg_id, read_ct, message}), with its namespace.
CREATE FUNCTION tasker._read_queues(p_namespaces text[], p_queues text[], p_worker_id text, p_qty integer,
                                    p_vt integer, OUT namespaces text[], OUT msgs jsonb[])
LANGUAGE plpgsql AS $$
DECLARE
    v_read jsonb[];
    v_left integer := p_qty;
    n integer := cardinality(p_queues);
BEGIN
    namespaces := '{}';
    msgs := '{}';
    FOR i IN 1 .. cardinality(p_queues) LOOP
        EXIT WHEN v_left <= 0;
        v_read := tasker._read_steps(p_namespaces[i], p_queues[i], p_worker_id,
                                     ceil(v_left::numeric / n)::integer, p_vt);
        n := n - 1;
        IF v_read IS NOT NULL THEN
            msgs := msgs || v_read;
            namespaces := namespaces || array_fill(p_namespaces[i], ARRAY[cardinality(v_read)]);
            v_left := v_left - cardinality(v_read);
        END IF;
    END LOOP;
END
$$;

-- tasker.exchange(namespaces, worker_id, results, qty, visibility_timeout_seconds):
-- the batched worker protocol, one round trip and one commit per batch:
-- applies a batch of results (as tasker.submit_results; results that are
-- rejected or ignored are reported as NOTICEs, and never stop the others)
-- and reads up to qty messages from the namespaces' queues (sharing qty
-- among them, in the order given), marking their steps in_progress (as
-- tasker.read_steps): in the middle of applying the results
-- (tasker.read_request), and with room left, once more after (what the
-- results made ready). results may be NULL or [] (only read); qty may be 0
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
    v_queues text[];
    v_outcomes tasker.result_outcome[];
    v_read tasker.read_request;
    v_submitted record;
    v_more record;
    v_ns text[];
    v_msgs jsonb[];
BEGIN
    IF exchange.namespaces IS NULL OR cardinality(exchange.namespaces) = 0 THEN
        RAISE EXCEPTION 'namespaces must name at least one namespace' USING ERRCODE = '22023';
    ELSIF exchange.qty IS NULL OR exchange.qty NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'qty must be between 0 and 1000, got %', exchange.qty USING ERRCODE = '22023';
    END IF;
    v_queues := tasker._worker_queues(exchange.namespaces);
    v_read := ROW(exchange.namespaces, v_queues, exchange.worker_id, exchange.qty, v_vt, NULL, NULL);
    IF exchange.results IS NOT NULL THEN
        v_submitted := tasker._submit_results(exchange.results, 'results submitted', v_read);
        v_read := v_submitted.p_read;
        v_outcomes := v_submitted.outcomes;
        FOR i IN 1 .. coalesce(cardinality(v_outcomes), 0) LOOP
            IF (v_outcomes[i]).outcome <> 'applied' THEN
                RAISE NOTICE 'pg_tasker: %', (v_outcomes[i]).note;
            END IF;
        END LOOP;
    END IF;
    v_ns := coalesce(v_read.read_namespaces, '{}');
    v_msgs := coalesce(v_read.read_msgs, '{}');
    IF cardinality(v_msgs) < exchange.qty THEN
        v_more := tasker._read_queues(exchange.namespaces, v_queues, exchange.worker_id,
                                      exchange.qty - cardinality(v_msgs), v_vt);
        v_ns := v_ns || v_more.namespaces;
        v_msgs := v_msgs || v_more.msgs;
    END IF;
    IF cardinality(v_msgs) > 0 THEN
        RETURN QUERY
        SELECT x.ns, (x.r ->> 'msg_id')::bigint, (x.r ->> 'read_ct')::integer,
               tasker._uuid_or_null(x.r -> 'message' ->> 'step_uuid'), x.r -> 'message'
        FROM unnest(v_ns, v_msgs) WITH ORDINALITY AS x(ns, r, i)
        ORDER BY x.i;
    END IF;
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
    PERFORM tasker._require_steps(ARRAY[extend_lease.step_uuid], 'worker');
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
