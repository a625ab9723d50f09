-- Orchestration: transitions, enqueueing, readiness, claiming.
-- Internal helpers start with an underscore and are not granted to anyone;
-- they run inside the SECURITY DEFINER API functions.

-- Records that the given steps moved to p_to (from whatever their latest
-- transition says), keeping exactly one most_recent row per step.
CREATE FUNCTION tasker._step_transition(p_steps uuid[], p_to text, p_reason text,
                                        p_metadata jsonb DEFAULT '{}')
-- PL/pgSQL (not SQL: no parse per call), with plans made for the actual
-- array (a generic plan of `= ANY($1)` is several times slower here). This
-- runs for every step state change.
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    WITH prev AS (
        UPDATE tasker.step_transitions st SET most_recent = false
        WHERE st.step_uuid = ANY (p_steps) AND st.most_recent
        RETURNING st.step_uuid, st.to_state, st.sort_key
    )
    INSERT INTO tasker.step_transitions (step_uuid, from_state, to_state, reason, metadata, sort_key)
    SELECT s, prev.to_state, p_to, p_reason, coalesce(p_metadata, '{}'), coalesce(prev.sort_key, 0) + 1
    FROM unnest(p_steps) AS s LEFT JOIN prev ON prev.step_uuid = s;
END
$$;

CREATE FUNCTION tasker._task_transition(p_task uuid, p_to text, p_reason text,
                                        p_metadata jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    WITH prev AS (
        UPDATE tasker.task_transitions tt SET most_recent = false
        WHERE tt.task_uuid = p_task AND tt.most_recent
        RETURNING tt.to_state, tt.sort_key
    )
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, metadata, sort_key)
    SELECT p_task, prev.to_state, p_to, p_reason, coalesce(p_metadata, '{}'), coalesce(prev.sort_key, 0) + 1
    FROM (SELECT 1) one LEFT JOIN prev ON true;
END
$$;

-- Counts of a task's steps by state; `ready` = could be enqueued now.
CREATE FUNCTION tasker._step_counts(p_task uuid)
RETURNS TABLE (total bigint, pending bigint, ready bigint, in_flight bigint,
               waiting_for_retry bigint, complete bigint, error bigint, cancelled bigint,
               next_retry_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT count(*),
           count(*) FILTER (WHERE s.state = 'pending'),
           count(*) FILTER (WHERE s.state IN ('pending', 'waiting_for_retry')
                              AND s.pending_parents = 0
                              AND (s.next_retry_at IS NULL OR s.next_retry_at <= now())),
           count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress', 'enqueued_for_orchestration',
                                              'enqueued_as_error_for_orchestration')),
           count(*) FILTER (WHERE s.state = 'waiting_for_retry'),
           count(*) FILTER (WHERE s.state IN ('complete', 'resolved_manually')),
           count(*) FILTER (WHERE s.state = 'error'),
           count(*) FILTER (WHERE s.state = 'cancelled'),
           min(s.next_retry_at) FILTER (WHERE s.state = 'waiting_for_retry')
    FROM tasker.workflow_steps s
    WHERE s.task_uuid = p_task;
END
$$;

-- Per-step readiness of one task (tasker-core's get_step_readiness_status).
CREATE FUNCTION tasker.step_readiness(task_uuid uuid)
RETURNS TABLE (step_uuid uuid, step_name text, state text, dependencies_satisfied boolean,
               retry_eligible boolean, ready boolean, next_retry_at timestamptz,
               total_parents integer, completed_parents integer, attempts integer,
               max_attempts integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT s.step_uuid, s.name, s.state,
           s.pending_parents = 0,
           (s.attempts = 0 OR (s.retryable AND s.attempts < s.max_attempts)),
           s.state IN ('pending', 'waiting_for_retry')
               AND s.pending_parents = 0
               AND (s.attempts = 0 OR (s.retryable AND s.attempts < s.max_attempts))
               AND (s.next_retry_at IS NULL OR s.next_retry_at <= now()),
           s.next_retry_at,
           s.total_parents,
           s.total_parents - s.pending_parents,
           s.attempts,
           s.max_attempts
    FROM tasker.workflow_steps s
    WHERE s.task_uuid = step_readiness.task_uuid
    ORDER BY s.position
$$;

-- Priority with bounded, starvation-free escalation: one point per second
-- spent waiting for the orchestrator, up to the common ceiling 100. A task
-- at the ceiling competes only on age (oldest first), so no stream of
-- high-priority tasks can starve an older one for more than 200 s.
CREATE FUNCTION tasker.effective_priority(priority integer, waiting interval)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(100, priority + greatest(0, floor(extract(epoch FROM waiting)))::integer)
$$;

-- Tasks with due work that nobody holds (or whose claim expired).
CREATE VIEW tasker.ready_tasks AS
SELECT t.task_uuid,
       t.namespace_name AS namespace,
       t.task_name,
       t.task_version,
       t.state,
       t.priority,
       tasker.effective_priority(t.priority, now() - t.next_action_at) AS effective_priority,
       t.next_action_at,
       now() - t.next_action_at AS waiting_for,
       t.claimed_by,
       t.claim_expires_at
FROM tasker.tasks t
WHERE t.next_action_at <= now()
  AND (t.claimed_by IS NULL OR t.claim_expires_at < now());
COMMENT ON VIEW tasker.ready_tasks IS
    'Tasks the orchestrator should look at now, with their escalated priority.';

CREATE FUNCTION tasker.claim_ready_tasks(orchestrator_id text, max_tasks integer DEFAULT 10,
                                         namespace text DEFAULT NULL,
                                         claim_timeout_seconds integer DEFAULT 60)
RETURNS TABLE (task_uuid uuid, task_namespace text, task_name text, priority integer,
               effective_priority integer, claim_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
BEGIN
    IF orchestrator_id IS NULL OR orchestrator_id = '' THEN
        RAISE EXCEPTION 'orchestrator_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF max_tasks IS NULL OR max_tasks < 1 THEN
        RAISE EXCEPTION 'max_tasks must be at least 1, got %', max_tasks USING ERRCODE = '22023';
    END IF;
    IF claim_timeout_seconds IS NULL OR claim_timeout_seconds < 1 THEN
        RAISE EXCEPTION 'claim_timeout_seconds must be at least 1, got %', claim_timeout_seconds
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    WITH candidates AS (
        SELECT t.task_uuid,
               tasker.effective_priority(t.priority, now() - t.next_action_at) AS eff
        FROM tasker.tasks t
        WHERE t.next_action_at <= now()
          AND (t.claimed_by IS NULL OR t.claim_expires_at < now())
          AND (claim_ready_tasks.namespace IS NULL OR t.namespace_name = claim_ready_tasks.namespace)
        ORDER BY eff DESC, t.next_action_at, t.task_uuid
        LIMIT max_tasks
        FOR NO KEY UPDATE OF t SKIP LOCKED
    )
    UPDATE tasker.tasks t
    SET claimed_by = orchestrator_id,
        claimed_at = now(),
        claim_expires_at = now() + make_interval(secs => claim_timeout_seconds)
    FROM candidates c
    WHERE t.task_uuid = c.task_uuid
    RETURNING t.task_uuid, t.namespace_name, t.task_name, t.priority, c.eff, t.claim_expires_at;
END
$$;

CREATE FUNCTION tasker.release_task_claim(task_uuid uuid, orchestrator_id text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
DECLARE
    released boolean;
BEGIN
    UPDATE tasker.tasks t
    SET claimed_by = NULL, claimed_at = NULL, claim_expires_at = NULL
    WHERE t.task_uuid = release_task_claim.task_uuid AND t.claimed_by = orchestrator_id
    RETURNING true INTO released;
    IF released IS NULL AND NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = release_task_claim.task_uuid) THEN
        RAISE EXCEPTION 'task % does not exist', task_uuid USING ERRCODE = 'P0002';
    END IF;
    RETURN coalesce(released, false);
END
$$;

CREATE FUNCTION tasker.extend_task_claim(task_uuid uuid, orchestrator_id text,
                                         claim_timeout_seconds integer DEFAULT 60)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
DECLARE
    extended boolean;
BEGIN
    IF claim_timeout_seconds IS NULL OR claim_timeout_seconds < 1 THEN
        RAISE EXCEPTION 'claim_timeout_seconds must be at least 1, got %', claim_timeout_seconds
            USING ERRCODE = '22023';
    END IF;
    UPDATE tasker.tasks t
    SET claim_expires_at = now() + make_interval(secs => claim_timeout_seconds)
    WHERE t.task_uuid = extend_task_claim.task_uuid
      AND t.claimed_by = orchestrator_id
      AND t.claim_expires_at >= now()
    RETURNING true INTO extended;
    IF extended IS NULL AND NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = extend_task_claim.task_uuid) THEN
        RAISE EXCEPTION 'task % does not exist', task_uuid USING ERRCODE = 'P0002';
    END IF;
    RETURN coalesce(extended, false);
END
$$;
