-- The orchestration cycle (what the background worker runs; time-driven
-- work: due retries, postponed evaluations) and claims for external
-- orchestrators.

-- Priority with bounded, starvation-free escalation: one point per second
-- spent waiting for the orchestrator, up to the common ceiling 100. A task
-- at the ceiling competes only on age (oldest first), so no stream of
-- high-priority tasks can starve an older one for more than 200 s.
CREATE FUNCTION tasker.effective_priority(priority integer, waiting interval)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN least(100, priority + greatest(0, floor(extract(epoch FROM waiting)))::integer);

-- One pass: locks up to p_max_tasks due tasks nobody holds (SKIP LOCKED, in
-- escalated priority order; no claim columns are written: the row locks are
-- the claim) and evaluates each in a subtransaction. A task whose
-- evaluation fails is rolled back to where it was, postponed by
-- p_failed_backoff_seconds and reported; the others go on.
CREATE FUNCTION tasker._run_cycle(p_orchestrator text, p_max_tasks integer, p_failed_backoff_seconds integer)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_before tasker.task_state;
    v_after tasker.task_state;
    v_claimed integer := 0;
    v_processed integer := 0;
    v_enqueued bigint := 0;
    v_out_before integer;
    v_completed integer := 0;
    v_blocked integer := 0;
    v_errors jsonb := '[]';
BEGIN
    FOR v_task, v_before IN
        SELECT t.task_uuid, t.state FROM tasker.tasks t
        WHERE t.next_action_at <= now()
          AND (t.claimed_by IS NULL OR t.claim_expires_at < now())
        ORDER BY tasker.effective_priority(t.priority, now() - t.next_action_at) DESC, t.next_action_at, t.task_uuid
        LIMIT p_max_tasks
        FOR NO KEY UPDATE OF t SKIP LOCKED
    LOOP
        -- (a task whose results are being applied is passed over, as a
        -- locked row is: the next cycle takes it)
        CONTINUE WHEN NOT tasker._try_lock_task(v_task);
        v_claimed := v_claimed + 1;
        BEGIN
            SELECT t.steps_out INTO v_out_before FROM tasker.tasks t WHERE t.task_uuid = v_task;
            v_after := tasker._evaluate_task(v_task, 'orchestration cycle');
            v_processed := v_processed + 1;
            v_enqueued := v_enqueued + greatest(0,
                (SELECT t.steps_out FROM tasker.tasks t WHERE t.task_uuid = v_task) - v_out_before);
            IF v_after <> v_before AND v_after = 'complete' THEN
                v_completed := v_completed + 1;
            ELSIF v_after <> v_before AND v_after = 'blocked_by_failures' THEN
                v_blocked := v_blocked + 1;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            UPDATE tasker.tasks t
            SET next_action_at = now() + make_interval(secs => p_failed_backoff_seconds)
            WHERE t.task_uuid = v_task;
            v_errors := v_errors || jsonb_build_object('task_uuid', v_task, 'error', SQLERRM, 'sqlstate', SQLSTATE);
        END;
    END LOOP;
    RETURN jsonb_build_object(
        'orchestrator_id', p_orchestrator, 'tasks_claimed', v_claimed, 'tasks_processed', v_processed,
        'steps_enqueued', v_enqueued, 'tasks_completed', v_completed, 'tasks_blocked', v_blocked,
        'errors', v_errors);
END
$$;

-- tasker.run_orchestration_cycle(orchestrator_id, max_tasks) RETURNS jsonb:
-- one pass now, with the configured failed_task_backoff_seconds; for
-- databases without the background worker, and for tests.
CREATE FUNCTION tasker.run_orchestration_cycle(orchestrator_id text DEFAULT 'manual', max_tasks integer DEFAULT 100)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
BEGIN
    IF orchestrator_id IS NULL THEN
        RAISE EXCEPTION 'orchestrator_id must not be NULL' USING ERRCODE = '22004';
    ELSIF max_tasks IS NULL THEN
        RAISE EXCEPTION 'max_tasks must not be NULL' USING ERRCODE = '22004';
    ELSIF max_tasks < 1 THEN
        RAISE EXCEPTION 'max_tasks must be at least 1, got %', max_tasks USING ERRCODE = '22023';
    END IF;
    RETURN tasker._run_cycle(orchestrator_id, max_tasks,
                             tasker._setting('orchestration.failed_task_backoff_seconds')::integer);
END
$$;

-- Tasks with due work that nobody holds (or whose claim expired), of the
-- namespaces the caller holds a privilege in.
CREATE VIEW tasker.ready_tasks WITH (security_barrier) AS
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
  AND (t.claimed_by IS NULL OR t.claim_expires_at < now())
  AND t.namespace_name IN (SELECT tasker._seen_namespaces());
COMMENT ON VIEW tasker.ready_tasks IS
    'Tasks the orchestrator should look at now, with their escalated priority.';

-- Claims for external orchestrators: claim_ready_tasks locks and marks due
-- tasks (concurrent claimers get disjoint sets); the built-in cycle skips
-- tasks under a live claim.
CREATE FUNCTION tasker.claim_ready_tasks(orchestrator_id text, max_tasks integer DEFAULT 10,
                                         namespace text DEFAULT NULL,
                                         claim_timeout_seconds integer DEFAULT 60)
RETURNS TABLE (task_uuid uuid, task_namespace text, task_name text, priority integer,
               effective_priority integer, claim_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
BEGIN
    IF orchestrator_id IS NULL OR orchestrator_id = '' THEN
        RAISE EXCEPTION 'orchestrator_id must not be empty' USING ERRCODE = '22023';
    ELSIF max_tasks IS NULL OR max_tasks < 1 THEN
        RAISE EXCEPTION 'max_tasks must be at least 1, got %', max_tasks USING ERRCODE = '22023';
    ELSIF claim_timeout_seconds IS NULL OR claim_timeout_seconds < 1 THEN
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
        claim_expires_at = now() + make_interval(secs => claim_timeout_seconds)
    FROM candidates c
    WHERE t.task_uuid = c.task_uuid
    RETURNING t.task_uuid, t.namespace_name, t.task_name, t.priority, c.eff, t.claim_expires_at;
END
$$;

CREATE FUNCTION tasker.release_task_claim(task_uuid uuid, orchestrator_id text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
DECLARE
    released boolean;
BEGIN
    UPDATE tasker.tasks t
    SET claimed_by = NULL, claim_expires_at = NULL
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
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp
AS $$
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
