-- The worker side besides submit_result: reading step messages (marking the
-- steps in_progress) and extending a lease.

-- tasker.read_steps(namespace, worker_id, qty, visibility_timeout_seconds):
-- reads up to qty step messages of a namespace's queue and marks their steps
-- in_progress, in one transaction. Plain pgmq.read works as well; the steps
-- then stay `enqueued` until their result arrives.
CREATE FUNCTION tasker.read_steps(namespace text, worker_id text, qty integer DEFAULT 10,
                                  visibility_timeout_seconds integer DEFAULT NULL)
RETURNS TABLE (msg_id bigint, read_ct integer, step_uuid uuid, message jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_ns text := read_steps.namespace;
    v_vt integer := coalesce(read_steps.visibility_timeout_seconds,
                             tasker._setting('queues.default_visibility_timeout_seconds')::integer);
    v_queue text;
    v_ids bigint[];
    v_counts integer[];
    v_messages jsonb[];
    v_start uuid[];
BEGIN
    IF v_ns IS NULL THEN
        RAISE EXCEPTION 'namespace must not be NULL' USING ERRCODE = '22004';
    ELSIF read_steps.worker_id IS NULL THEN
        RAISE EXCEPTION 'worker_id must not be NULL' USING ERRCODE = '22004';
    ELSIF read_steps.qty IS NULL OR read_steps.qty NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'qty must be between 1 and 1000, got %', read_steps.qty USING ERRCODE = '22023';
    ELSIF v_vt < 1 THEN
        RAISE EXCEPTION 'visibility_timeout_seconds must be at least 1, got %', v_vt USING ERRCODE = '22023';
    END IF;
    SELECT n.queue_name INTO v_queue FROM tasker.namespaces n WHERE n.name = v_ns;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'namespace "%" does not exist', v_ns USING ERRCODE = '42704';
    END IF;

    SELECT array_agg(r.msg_id ORDER BY r.msg_id), array_agg(r.read_ct ORDER BY r.msg_id),
           array_agg(r.message ORDER BY r.msg_id)
    INTO v_ids, v_counts, v_messages
    FROM tasker._pgmq_read(v_queue, v_vt, read_steps.qty) r;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- The steps these messages are the current attempt of, in this namespace,
    -- still enqueued. Locked without waiting: a step someone else holds is
    -- being settled or stopped anyway.
    SELECT array_agg(x.step_uuid) INTO v_start FROM (
        SELECT s.step_uuid
        FROM unnest(v_ids, v_messages) AS m(msg_id, message)
        JOIN tasker.workflow_steps s
          ON s.step_uuid = tasker._uuid_or_null(m.message ->> 'step_uuid') AND s.queue_msg_id = m.msg_id
        JOIN tasker.tasks t ON t.task_uuid = s.task_uuid AND t.namespace_name = v_ns
        WHERE s.state = 'enqueued'
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE OF s SKIP LOCKED) x;
    IF v_start IS NOT NULL THEN
        PERFORM tasker._move_steps(
            ARRAY(SELECT ROW(u, NULL, NULL, NULL, NULL)::tasker.step_change FROM unnest(v_start) u),
            'in_progress', 'read by worker', jsonb_build_object('worker_id', read_steps.worker_id));
    END IF;
    RETURN QUERY
    SELECT m.msg_id, m.read_ct, tasker._uuid_or_null(m.message ->> 'step_uuid'), m.message
    FROM unnest(v_ids, v_counts, v_messages) AS m(msg_id, read_ct, message)
    ORDER BY m.msg_id;
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
SET plan_cache_mode = force_generic_plan AS $$
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
