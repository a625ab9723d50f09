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

-- A non-negative jsonb number as numeric, or 22023 naming the field.
CREATE FUNCTION tasker._non_negative(p_value jsonb, p_what text) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(p_value) = 'number' AND p_value::numeric >= 0 THEN
        RETURN p_value::numeric;
    END IF;
    RAISE EXCEPTION '% must be a non-negative number, got %', p_what, p_value USING ERRCODE = '22023';
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

-- What a worker submits for an attempt (tasker.submit_result), checked.
CREATE TYPE tasker.submission AS (
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

CREATE FUNCTION tasker._read_submission(p_status text, p_error jsonb, p_metadata jsonb)
RETURNS tasker.submission
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    r tasker.submission;
    v jsonb;
    header record;
    error_secs numeric;
    header_secs numeric;
    hint_secs numeric;
BEGIN
    IF p_status = 'success' THEN
        IF p_error IS NOT NULL AND jsonb_typeof(p_error) <> 'null' THEN
            RAISE EXCEPTION 'a successful result carries no error (status is ''success'')' USING ERRCODE = '22023';
        END IF;
        r.success := true;
    ELSIF p_status = 'failure' THEN
        r.success := false;
        IF p_error IS NULL OR jsonb_typeof(p_error) = 'null' THEN
            RAISE EXCEPTION 'a failure needs an error object' USING ERRCODE = '22023',
                HINT = 'error is {"message": text, "error_code": text, "retryable": bool, "retry_after_seconds": number}';
        ELSIF jsonb_typeof(p_error) = 'string' THEN
            r.message := p_error #>> '{}';
        ELSIF jsonb_typeof(p_error) = 'object' THEN
            v := p_error -> 'message';
            IF v IS NOT NULL AND jsonb_typeof(v) NOT IN ('string', 'null') THEN
                RAISE EXCEPTION 'error.message must be a string, got %', v USING ERRCODE = '22023';
            END IF;
            r.message := v #>> '{}';
            r.error_code := tasker._string_field(p_error, 'error_code', 'error.error_code');
            v := p_error -> 'retryable';
            IF v IS NOT NULL AND jsonb_typeof(v) NOT IN ('boolean', 'null') THEN
                RAISE EXCEPTION 'error.retryable must be a boolean, got %', v USING ERRCODE = '22023';
            END IF;
            r.retryable := (v #>> '{}')::boolean;
            v := p_error -> 'retry_after_seconds';
            IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
                error_secs := tasker._non_negative(v, 'error.retry_after_seconds');
            END IF;
        ELSE
            RAISE EXCEPTION 'error must be an object, got %', p_error USING ERRCODE = '22023';
        END IF;
        IF r.message IS NULL OR r.message = '' THEN
            RAISE EXCEPTION 'error.message is required' USING ERRCODE = '22023';
        END IF;
        r.retryable := coalesce(r.retryable, true);
    ELSE
        RAISE EXCEPTION 'invalid status "%"', p_status USING ERRCODE = '22023',
            HINT = 'status is ''success'' or ''failure''';
    END IF;

    IF p_metadata IS NOT NULL AND jsonb_typeof(p_metadata) <> 'null' THEN
        IF jsonb_typeof(p_metadata) <> 'object' THEN
            RAISE EXCEPTION 'metadata must be an object, got %', p_metadata USING ERRCODE = '22023';
        END IF;
        v := p_metadata -> 'execution_time_ms';
        IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
            r.execution_time_ms := tasker._non_negative(v, 'metadata.execution_time_ms');
        END IF;
        r.worker_id := tasker._string_field(p_metadata, 'worker_id', 'metadata.worker_id');
        v := p_metadata -> 'attempt';
        IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
            IF jsonb_typeof(v) <> 'number' OR v::numeric < 1 OR v::numeric > 2147483647
               OR v::numeric <> trunc(v::numeric) THEN
                RAISE EXCEPTION 'metadata.attempt must be a positive integer, got %', v USING ERRCODE = '22023';
            END IF;
            r.attempt := v::numeric::integer;
        END IF;
        v := p_metadata -> 'headers';
        IF v IS NOT NULL AND jsonb_typeof(v) NOT IN ('object', 'null') THEN
            RAISE EXCEPTION 'metadata.headers must be an object, got %', v USING ERRCODE = '22023';
        ELSIF jsonb_typeof(v) = 'object' THEN
            SELECT h.key, h.value INTO header FROM jsonb_each(v) h
            WHERE lower(h.key) = 'retry-after' ORDER BY h.key LIMIT 1;
            IF FOUND THEN
                IF jsonb_typeof(header.value) = 'number' AND header.value::numeric >= 0 THEN
                    header_secs := header.value::numeric;
                ELSIF jsonb_typeof(header.value) = 'string'
                      AND btrim(header.value #>> '{}') ~ '^[0-9]+(\.[0-9]+)?$' THEN
                    header_secs := btrim(header.value #>> '{}')::numeric;
                ELSE
                    RAISE EXCEPTION 'metadata.headers.retry-after must be a number of seconds, got %', header.value
                        USING ERRCODE = '22023';
                END IF;
            END IF;
        END IF;
        v := p_metadata -> 'backoff_hint';
        IF v IS NOT NULL AND jsonb_typeof(v) NOT IN ('object', 'null') THEN
            RAISE EXCEPTION 'metadata.backoff_hint must be an object, got %', v USING ERRCODE = '22023';
        ELSIF jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'seconds') IS DISTINCT FROM 'null'
              AND v -> 'seconds' IS NOT NULL THEN
            hint_secs := tasker._non_negative(v -> 'seconds', 'metadata.backoff_hint.seconds');
        END IF;
    END IF;
    IF NOT r.success THEN
        -- (least() would turn a NULL into the bound)
        r.requested_delay_ms := CASE WHEN coalesce(error_secs, header_secs, hint_secs) IS NOT NULL THEN
            least(round(coalesce(error_secs, header_secs, hint_secs) * 1000), 9000000000000000)::bigint END;
    END IF;
    RETURN r;
END
$$;

-- The fields of a task request (the task request queue's message format):
-- what tasker.create_task takes, as one object.
CREATE FUNCTION tasker._request_fields() RETURNS text[]
LANGUAGE sql IMMUTABLE
RETURN ARRAY['namespace', 'name', 'context', 'version', 'priority', 'initiator', 'source_system',
             'reason', 'tags', 'idempotency_key'];

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
        idempotency_key => tasker._string_field(p_request, 'idempotency_key', 'idempotency_key'));
END
$$;
