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

-- (tasker._uuid_or_null(text), the text of a uuid as a uuid or NULL, is in
-- src/ids.rs.)

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

-- The fields of a submission and its first problem:
-- tasker._submission_fields(status, error::text, metadata::text), in Rust
-- (pg_tasker_core::submission; src/decisions.rs), for one result
-- (tasker._read_submission) and each element of a batch
-- (tasker._submit_results).

-- One submission, checked: 22023 naming its first problem.
CREATE FUNCTION tasker._read_submission(p_status text, p_error jsonb, p_metadata jsonb)
RETURNS tasker.submission
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r tasker.submission;
BEGIN
    r := tasker._submission_fields(p_status, p_error::text, p_metadata::text);
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
