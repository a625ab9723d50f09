-- pgmq behind one adapter.
--
-- This file and src/pgmq.rs are the only places that know pgmq's tables,
-- columns and sequences. Table names come from pgmq's own naming helper
-- (pgmq.format_table_name); the hot-path send, read and archive statements
-- are kept plans in src/pgmq.rs (tasker._pgmq_send, tasker._pgmq_read,
-- tasker._pgmq_archive).

-- The pgmq versions pg_tasker works with. Checked at CREATE EXTENSION,
-- ALTER EXTENSION UPDATE and whenever a queue is created.
CREATE FUNCTION tasker._pgmq_check_version() RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v text;
    parts int[];
BEGIN
    SELECT e.extversion INTO v FROM pg_catalog.pg_extension e WHERE e.extname = 'pgmq';
    IF v IS NULL THEN
        RAISE EXCEPTION 'pg_tasker requires the pgmq extension'
            USING ERRCODE = '55000', HINT = 'CREATE EXTENSION pg_tasker CASCADE installs it';
    END IF;
    IF v !~ '^\d+\.\d+\.\d+' THEN
        RAISE EXCEPTION 'pgmq version "%" is not understood by pg_tasker', v USING ERRCODE = '0A000';
    END IF;
    parts := string_to_array(substring(v FROM '^\d+\.\d+\.\d+'), '.')::int[];
    IF parts < ARRAY[1, 10, 0] OR parts >= ARRAY[2, 0, 0] THEN
        RAISE EXCEPTION 'pgmq % is not supported by pg_tasker', v
            USING ERRCODE = '0A000',
                  HINT = 'pg_tasker needs pgmq >= 1.10.0 and < 2.0.0 (tested with 1.11.1)';
    END IF;
    RETURN v;
END
$$;

-- The qualified, quoted name of a queue's table: kind 'q' (live messages)
-- or 'a' (archive).
CREATE FUNCTION tasker._pgmq_table(queue text, kind text) RETURNS text
LANGUAGE sql STABLE
RETURN 'pgmq.' || pg_catalog.quote_ident(pgmq.format_table_name(queue, kind));

-- The channel an enqueue into a queue NOTIFYs while workers wait on it
-- (tasker.worker_idle). Clients get it from tasker.wake_channel(namespace).
CREATE FUNCTION tasker.wake_channel_of_queue(queue text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN queue;

CREATE FUNCTION tasker._pgmq_queue_exists(queue text) RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = queue);

-- Creates the queue when it does not exist, checks that its table has the
-- columns pg_tasker reads and writes, and returns its msg_id sequence.
CREATE FUNCTION tasker._pgmq_ensure_queue(queue text) RETURNS regclass
LANGUAGE plpgsql AS $$
DECLARE
    missing text[];
BEGIN
    PERFORM tasker._pgmq_check_version();
    IF NOT tasker._pgmq_queue_exists(queue) THEN
        PERFORM pgmq.create(queue);
    END IF;
    PERFORM tasker._pgmq_close(queue);
    SELECT array_agg(c ORDER BY c) INTO missing
    FROM unnest(ARRAY['msg_id', 'read_ct', 'enqueued_at', 'last_read_at', 'vt', 'message', 'headers']) c
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = tasker._pgmq_table(queue, 'q')::regclass
                        AND a.attname = c AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'the pgmq table of queue "%" lacks columns pg_tasker needs: %', queue, missing
            USING ERRCODE = '0A000';
    END IF;
    RETURN pg_catalog.pg_get_serial_sequence(tasker._pgmq_table(queue, 'q'), 'msg_id')::regclass;
END
$$;

-- Nobody reads pg_tasker's queues but the roles granted below: pgmq gives
-- pg_monitor SELECT on every queue table (its default privileges), which
-- would show every namespace's messages and task requests to monitoring.
CREATE FUNCTION tasker._pgmq_close(queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE ALL ON %s, %s FROM PUBLIC, pg_monitor', tasker._pgmq_table(queue, 'q'),
                   tasker._pgmq_table(queue, 'a'));
END
$$;

-- Takes every privilege on a queue's tables from a role.
CREATE FUNCTION tasker._pgmq_revoke(queue text, grantee name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE ALL ON %s, %s FROM %I', tasker._pgmq_table(queue, 'q'),
                   tasker._pgmq_table(queue, 'a'), grantee);
END
$$;

-- Gives a role exactly what reading a queue as a worker takes: pgmq.read
-- and pgmq.set_vt select every column and update the lease columns (vt,
-- read_ct, last_read_at). The message cannot be changed, nothing inserted
-- or deleted, the archive is not readable.
CREATE FUNCTION tasker._pgmq_grant_reader(queue text, grantee name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._pgmq_revoke(queue, grantee);
    EXECUTE format('GRANT SELECT, UPDATE (vt, read_ct, last_read_at) ON %s TO %I',
                   tasker._pgmq_table(queue, 'q'), grantee);
END
$$;

-- Gives a role exactly what sending to a queue with pgmq.send takes: it
-- inserts vt, message and headers (msg_id is always the queue's own) and
-- reads back msg_id; the messages of others are not readable.
CREATE FUNCTION tasker._pgmq_grant_sender(queue text, grantee name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._pgmq_revoke(queue, grantee);
    EXECUTE format('GRANT INSERT (vt, message, headers), SELECT (msg_id) ON %s TO %I',
                   tasker._pgmq_table(queue, 'q'), grantee);
END
$$;

-- Sends one message with pgmq.send; returns its msg_id (for queues whose
-- msg_ids pg_tasker does not make itself: the task request queue).
CREATE FUNCTION tasker._pgmq_send_one(queue text, msg jsonb) RETURNS bigint
LANGUAGE sql
RETURN (SELECT s FROM pgmq.send(queue, msg) s);

-- (tasker._pgmq_read(queue, vt, qty), pgmq.read's statement as a kept
-- plan, is in src/pgmq.rs.)

-- Messages that were delivered and whose lease has ended without an
-- archive: candidates for lost-attempt and timeout recovery.
CREATE FUNCTION tasker._pgmq_expired_leases(queue text)
RETURNS TABLE (msg_id bigint, read_ct integer, last_read_at timestamptz, step_uuid text)
LANGUAGE plpgsql STABLE ROWS 10 AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT m.msg_id, m.read_ct, m.last_read_at, m.message ->> ''step_uuid''
           FROM %s m
          WHERE m.vt <= clock_timestamp() AND m.read_ct > 0
          ORDER BY m.msg_id', tasker._pgmq_table(queue, 'q'));
END
$$;

-- Which of the given messages are under a live lease (read, vt not passed).
CREATE FUNCTION tasker._pgmq_live_leases(queue text, msg_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql STABLE ROWS 1 AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT m.msg_id FROM %s m
          WHERE m.msg_id = ANY ($1) AND m.read_ct > 0 AND m.vt > clock_timestamp()',
        tasker._pgmq_table(queue, 'q')) USING msg_ids;
END
$$;

-- The lease of one message: (read_ct, last_read_at, vt), no row when the
-- message is gone.
CREATE FUNCTION tasker._pgmq_lease(queue text, msg bigint)
RETURNS TABLE (read_ct integer, last_read_at timestamptz, vt timestamptz)
LANGUAGE plpgsql STABLE ROWS 1 AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT m.read_ct, m.last_read_at, m.vt FROM %s m WHERE m.msg_id = $1',
        tasker._pgmq_table(queue, 'q')) USING msg;
END
$$;

-- Moves a message's lease end to `until` (pgmq.set_vt); NULL when gone.
CREATE FUNCTION tasker._pgmq_set_lease(queue text, msg bigint, until timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT r.vt FROM pgmq.set_vt(queue, msg, until) r);
END
$$;

-- Merges p_patch into a message's body (a checkpoint for its redelivery);
-- whether the message is still there.
CREATE FUNCTION tasker._pgmq_merge_message(queue text, msg bigint, p_patch jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    EXECUTE format('UPDATE %s SET message = message || $2 WHERE msg_id = $1', tasker._pgmq_table(queue, 'q'))
    USING msg, p_patch;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END
$$;

-- Depth and age of a queue (pgmq.metrics).
CREATE FUNCTION tasker._pgmq_metrics(queue text)
RETURNS TABLE (depth bigint, visible bigint, oldest_message_age_seconds integer, total_messages bigint)
LANGUAGE sql AS $$
    SELECT m.queue_length, m.queue_visible_length, m.oldest_msg_age_sec, m.total_messages
    FROM pgmq.metrics(queue) m
$$;

-- Deletes up to lim archived messages archived before `before`; returns how many.
CREATE FUNCTION tasker._pgmq_prune_archive(queue text, before timestamptz, lim integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format(
        'WITH gone AS (
            DELETE FROM %1$s WHERE msg_id IN (
                SELECT a.msg_id FROM %1$s a WHERE a.archived_at < $1 ORDER BY a.msg_id LIMIT $2)
            RETURNING 1)
         SELECT count(*) FROM gone', tasker._pgmq_table(queue, 'a')) INTO n USING before, lim;
    RETURN n;
END
$$;

-- The version check of CREATE EXTENSION / ALTER EXTENSION UPDATE.
SELECT tasker._pgmq_check_version();
