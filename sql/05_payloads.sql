-- User payloads: size limits, the shape of a submission, the shape of a
-- task request. Payloads stay jsonb from end to end: they are checked here
-- with jsonb operators and stored as given, never parsed into floats.

-- 54000 when a payload is larger than its limit (limits.* in the
-- configuration, read with tasker._setting).
CREATE FUNCTION tasker._check_payload_size(p_value jsonb, p_setting text, p_what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lim bigint;
    size bigint;
BEGIN
    IF p_value IS NULL THEN
        RETURN;
    END IF;
    lim := tasker._setting(p_setting);
    size := pg_catalog.pg_column_size(p_value);
    IF size > lim THEN
        RAISE EXCEPTION '% is % bytes, more than the limit of % bytes', p_what, size, lim
            USING ERRCODE = '54000', HINT = format('the limit is %s in the configuration', p_setting);
    END IF;
END
$$;

-- A string field of an object (NULL when absent or null), or 22023.
CREATE FUNCTION tasker._string_field(p_object jsonb, p_key text, p_what text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v jsonb := p_object -> p_key;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        RETURN NULL;
    ELSIF jsonb_typeof(v) = 'string' THEN
        RETURN v #>> '{}';
    END IF;
    RAISE EXCEPTION '% must be a string, got %', p_what, v USING ERRCODE = '22023';
END
$$;

-- The text of a uuid, as a uuid; NULL when it is not one.
CREATE FUNCTION tasker._uuid_or_null(p_text text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_text ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$'
            THEN p_text::uuid END;

-- What a worker submits for an attempt (tasker.submit_result, one element
-- of tasker.submit_results), checked.
CREATE TYPE tasker.submission AS (
    -- the first thing wrong with it (NULL: nothing); the rest is then NULL
    problem            text,
    success            boolean,
    -- metadata.attempt: the attempt the worker ran (NULL: unfenced)
    attempt            integer,
    worker_id          text,
    execution_time_ms  numeric,
    -- failures: error.message (or the error itself when it is a string)
    message            text,
    error_code         text,
    -- error.retryable, default true
    retryable          boolean,
    -- the delay the handler asked for: error.retry_after_seconds, else the
    -- metadata.headers retry-after header (any case), else
    -- metadata.backoff_hint.seconds
    requested_delay_ms bigint
);

-- The fields of a submission and its first problem, as one SELECT: an SQL
-- function that the planner inlines, into the one statement that reads a
-- whole batch (tasker.submit_results) as into tasker._read_submission.
CREATE FUNCTION tasker._submission_fields(p_status text, p_error jsonb, p_metadata jsonb)
RETURNS SETOF tasker.submission
-- (STABLE, not IMMUTABLE: format() is stable, and an IMMUTABLE function
-- with a stable body is not inlined)
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT y.problem,
           CASE WHEN y.problem IS NULL THEN p_status = 'success' END,
           CASE WHEN y.problem IS NULL THEN (p_metadata ->> 'attempt')::numeric::integer END,
           CASE WHEN y.problem IS NULL THEN p_metadata ->> 'worker_id' END,
           CASE WHEN y.problem IS NULL THEN (p_metadata ->> 'execution_time_ms')::numeric END,
           CASE WHEN y.problem IS NULL AND p_status = 'failure' THEN y.message END,
           CASE WHEN y.problem IS NULL AND p_status = 'failure' THEN p_error ->> 'error_code' END,
           CASE WHEN y.problem IS NULL AND p_status = 'failure'
                THEN coalesce((p_error ->> 'retryable')::boolean, true) END,
           -- error.retry_after_seconds, else the retry-after header, else the
           -- backoff hint (least() would turn a NULL into the bound)
           CASE WHEN y.problem IS NULL AND p_status = 'failure'
                     AND coalesce((p_error ->> 'retry_after_seconds')::numeric, y.header_seconds,
                                  (p_metadata -> 'backoff_hint' ->> 'seconds')::numeric) IS NOT NULL
                THEN least(round(coalesce((p_error ->> 'retry_after_seconds')::numeric, y.header_seconds,
                                          (p_metadata -> 'backoff_hint' ->> 'seconds')::numeric) * 1000),
                           9000000000000000)::bigint END
    FROM (
    SELECT
        CASE
            WHEN p_status IS DISTINCT FROM 'success' AND p_status IS DISTINCT FROM 'failure' THEN
                format('invalid status "%s"', p_status)
            WHEN p_status = 'success' AND coalesce(a.et, 'null') <> 'null' THEN
                'a successful result carries no error (status is ''success'')'
            WHEN p_status = 'failure' AND coalesce(a.et, 'null') = 'null' THEN
                'a failure needs an error object'
            WHEN p_status = 'failure' AND a.et NOT IN ('string', 'object') THEN
                format('error must be an object, got %s', p_error)
            WHEN a.et = 'object' AND coalesce(jsonb_typeof(p_error -> 'message'), 'null') NOT IN ('string', 'null') THEN
                format('error.message must be a string, got %s', p_error -> 'message')
            WHEN p_status = 'failure' AND coalesce(a.message, '') = '' THEN
                'error.message is required'
            WHEN a.et = 'object' AND coalesce(jsonb_typeof(p_error -> 'error_code'), 'null') NOT IN ('string', 'null') THEN
                format('error.error_code must be a string, got %s', p_error -> 'error_code')
            WHEN a.et = 'object' AND coalesce(jsonb_typeof(p_error -> 'retryable'), 'null') NOT IN ('boolean', 'null') THEN
                format('error.retryable must be a boolean, got %s', p_error -> 'retryable')
            WHEN a.et = 'object' AND coalesce(jsonb_typeof(p_error -> 'retry_after_seconds'), 'null') <> 'null'
                 AND NOT (CASE WHEN jsonb_typeof(p_error -> 'retry_after_seconds') = 'number' THEN (p_error -> 'retry_after_seconds')::numeric >= 0 ELSE false END) THEN
                format('error.retry_after_seconds must be a non-negative number, got %s', p_error -> 'retry_after_seconds')
            WHEN coalesce(a.mt, 'null') NOT IN ('object', 'null') THEN
                format('metadata must be an object, got %s', p_metadata)
            WHEN coalesce(jsonb_typeof(p_metadata -> 'execution_time_ms'), 'null') <> 'null'
                 AND NOT (CASE WHEN jsonb_typeof(p_metadata -> 'execution_time_ms') = 'number' THEN (p_metadata -> 'execution_time_ms')::numeric >= 0 ELSE false END) THEN
                format('metadata.execution_time_ms must be a non-negative number, got %s', p_metadata -> 'execution_time_ms')
            WHEN coalesce(jsonb_typeof(p_metadata -> 'worker_id'), 'null') NOT IN ('string', 'null') THEN
                format('metadata.worker_id must be a string, got %s', p_metadata -> 'worker_id')
            WHEN coalesce(jsonb_typeof(p_metadata -> 'attempt'), 'null') <> 'null'
                 AND NOT (CASE WHEN jsonb_typeof(p_metadata -> 'attempt') = 'number'
                               THEN (p_metadata -> 'attempt')::numeric BETWEEN 1 AND 2147483647
                                    AND (p_metadata -> 'attempt')::numeric = trunc((p_metadata -> 'attempt')::numeric)
                               ELSE false END) THEN
                format('metadata.attempt must be a positive integer, got %s', p_metadata -> 'attempt')
            WHEN coalesce(jsonb_typeof(p_metadata -> 'headers'), 'null') NOT IN ('object', 'null') THEN
                format('metadata.headers must be an object, got %s', p_metadata -> 'headers')
            WHEN h.value IS NOT NULL AND h.seconds IS NULL THEN
                format('metadata.headers.retry-after must be a number of seconds, got %s', h.value)
            WHEN coalesce(jsonb_typeof(p_metadata -> 'backoff_hint'), 'null') NOT IN ('object', 'null') THEN
                format('metadata.backoff_hint must be an object, got %s', p_metadata -> 'backoff_hint')
            WHEN coalesce(jsonb_typeof(p_metadata -> 'backoff_hint' -> 'seconds'), 'null') <> 'null'
                 AND NOT (CASE WHEN jsonb_typeof(p_metadata -> 'backoff_hint' -> 'seconds') = 'number' THEN (p_metadata -> 'backoff_hint' -> 'seconds')::numeric >= 0 ELSE false END) THEN
                format('metadata.backoff_hint.seconds must be a non-negative number, got %s',
                       p_metadata -> 'backoff_hint' -> 'seconds')
        END AS problem,
        a.message,
        h.seconds AS header_seconds
    FROM (SELECT jsonb_typeof(p_error) AS et, jsonb_typeof(p_metadata) AS mt,
                 CASE jsonb_typeof(p_error) WHEN 'string' THEN p_error #>> '{}'
                                            WHEN 'object' THEN p_error ->> 'message' END AS message) a
    LEFT JOIN LATERAL (
        -- the retry-after header (any case), and its seconds when valid
        SELECT e.value,
               CASE WHEN jsonb_typeof(e.value) = 'number'
                    THEN CASE WHEN e.value::numeric >= 0 THEN e.value::numeric END
                    WHEN jsonb_typeof(e.value) = 'string'
                    THEN CASE WHEN btrim(e.value #>> '{}') ~ '^[0-9]+(\.[0-9]+)?$'
                              THEN btrim(e.value #>> '{}')::numeric END END AS seconds
        FROM jsonb_each(CASE WHEN jsonb_typeof(p_metadata -> 'headers') = 'object'
                             THEN p_metadata -> 'headers' ELSE '{}' END) e
        WHERE lower(e.key) = 'retry-after'
        ORDER BY e.key LIMIT 1) h ON true
    -- (OFFSET 0: computed once, not copied into every column that uses it)
    OFFSET 0) y
$$;

-- One submission, checked: 22023 naming its first problem.
CREATE FUNCTION tasker._read_submission(p_status text, p_error jsonb, p_metadata jsonb)
RETURNS tasker.submission
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r tasker.submission;
BEGIN
    SELECT * INTO r FROM tasker._submission_fields(p_status, p_error, p_metadata);
    IF r.problem IS NOT NULL THEN
        RAISE EXCEPTION '%', r.problem USING ERRCODE = '22023', HINT = tasker._submission_hint(r.problem);
    END IF;
    RETURN r;
END
$$;

-- The hint that goes with a submission problem.
CREATE FUNCTION tasker._submission_hint(p_problem text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_problem LIKE 'invalid status%' THEN 'status is ''success'' or ''failure'''
            WHEN p_problem LIKE 'a failure needs%'
            THEN 'error is {"message": text, "error_code": text, "retryable": bool, "retry_after_seconds": number}'
            ELSE '' END;

-- A W3C trace context header (https://www.w3.org/TR/trace-context/):
-- version 00, a 32-hex trace id and a 16-hex parent id that are not all
-- zeros, 2-hex flags; returned lowercase. 22023 for anything else.
CREATE FUNCTION tasker._traceparent(p text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v text := lower(p);
BEGIN
    IF v IS NULL THEN
        RETURN NULL;
    ELSIF v !~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
          OR substr(v, 4, 32) = repeat('0', 32) OR substr(v, 37, 16) = repeat('0', 16) THEN
        RAISE EXCEPTION 'traceparent is not a W3C trace context: %', left(p, 100)
            USING ERRCODE = '22023',
                  HINT = 'traceparent is 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, ids not all zeros';
    END IF;
    RETURN v;
END
$$;

-- The fields of a task request (the task request queue's message format):
-- what tasker.create_task takes, as one object.
CREATE FUNCTION tasker._request_fields() RETURNS text[]
LANGUAGE sql IMMUTABLE
RETURN ARRAY['namespace', 'name', 'context', 'version', 'priority', 'initiator', 'source_system',
             'reason', 'tags', 'idempotency_key', 'traceparent'];

-- Creates the task a request asks for, with create_task's checks; 22023 for
-- a request that is not of the documented shape.
CREATE FUNCTION tasker._create_task_from_request(p_request jsonb) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    unknown text[];
    v jsonb;
    v_priority integer;
    v_tags text[];
    v_context jsonb;
BEGIN
    IF jsonb_typeof(p_request) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'a task request must be a JSON object, got %', left(p_request::text, 200)
            USING ERRCODE = '22023';
    END IF;
    SELECT array_agg(k ORDER BY k) INTO unknown
    FROM jsonb_object_keys(p_request) k WHERE k <> ALL (tasker._request_fields());
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'invalid task request: unknown field(s) %', array_to_string(unknown, ', ')
            USING ERRCODE = '22023', HINT = 'fields: ' || array_to_string(tasker._request_fields(), ', ');
    END IF;
    v := p_request -> 'priority';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
        IF jsonb_typeof(v) <> 'number' OR v::numeric <> trunc(v::numeric)
           OR v::numeric NOT BETWEEN -2147483648 AND 2147483647 THEN
            RAISE EXCEPTION 'invalid task request: priority must be an integer, got %', v USING ERRCODE = '22023';
        END IF;
        v_priority := v::numeric::integer;
    END IF;
    v := p_request -> 'tags';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
        IF jsonb_typeof(v) <> 'array'
           OR EXISTS (SELECT 1 FROM jsonb_array_elements(v) e WHERE jsonb_typeof(e) <> 'string') THEN
            RAISE EXCEPTION 'invalid task request: tags must be an array of strings, got %', v USING ERRCODE = '22023';
        END IF;
        v_tags := ARRAY(SELECT jsonb_array_elements_text(v));
    END IF;
    v_context := p_request -> 'context';
    IF jsonb_typeof(v_context) = 'null' THEN
        v_context := NULL;
    END IF;
    IF tasker._string_field(p_request, 'namespace', 'namespace') IS NULL
       OR tasker._string_field(p_request, 'name', 'name') IS NULL THEN
        RAISE EXCEPTION 'invalid task request: namespace and name are required'
            USING ERRCODE = '22023', HINT = 'fields: ' || array_to_string(tasker._request_fields(), ', ');
    END IF;
    RETURN tasker.create_task(
        namespace       => tasker._string_field(p_request, 'namespace', 'namespace'),
        name            => tasker._string_field(p_request, 'name', 'name'),
        context         => coalesce(v_context, '{}'),
        version         => tasker._string_field(p_request, 'version', 'version'),
        priority        => coalesce(v_priority, 0),
        initiator       => tasker._string_field(p_request, 'initiator', 'initiator'),
        source_system   => tasker._string_field(p_request, 'source_system', 'source_system'),
        reason          => tasker._string_field(p_request, 'reason', 'reason'),
        tags            => coalesce(v_tags, '{}'),
        idempotency_key => tasker._string_field(p_request, 'idempotency_key', 'idempotency_key'),
        traceparent     => tasker._string_field(p_request, 'traceparent', 'traceparent'));
END
$$;
