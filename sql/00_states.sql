-- States of tasks and steps: their one definition.
--
-- Every table, view and function uses these types and the functions below;
-- crates/pg_tasker_core/src/state.rs mirrors them in Rust and
-- src/tests/states.rs compares the two, value by value and class by class.
-- The legal moves between states are rows of the two transition tables at
-- the end; tasker._move_steps, tasker._enqueue_steps and tasker._settle_tasks
-- (04_transitions.sql, 06_enqueue.sql) refuse any other move.

CREATE TYPE tasker.task_state AS ENUM (
    'pending',                   -- created; its first evaluation has not run
    'steps_in_process',          -- work is out with workers (or ready to go)
    'waiting_for_dependencies',  -- nothing runnable and nothing out (unreachable today, kept for tasker-core)
    'waiting_for_retry',         -- only retries remain, due at next_action_at
    'blocked_by_failures',       -- a step is in error and nothing else can progress
    'complete',                  -- every step complete or resolved
    'error',                     -- given up (staleness)
    'cancelled',                 -- cancelled by an operator or application
    'resolved_manually'          -- closed by an operator
);

CREATE TYPE tasker.step_state AS ENUM (
    'pending',            -- waiting for its parents, or runnable
    'enqueued',           -- its current attempt's message is in the namespace queue
    'in_progress',        -- a worker read that message through tasker.read_steps
    'waiting_for_retry',  -- failed, retried at next_retry_at
    'complete',           -- a worker reported success
    'error',              -- failed for good (permanent error or retries exhausted)
    'cancelled',          -- its task was cancelled or closed
    'resolved_manually'   -- an operator supplied its result
);

-- The functions below classify states. They are SQL functions, inlined
-- into the plans (and index predicates) that use them, where they cost
-- nothing per row. Row invariants do not call them: each table has one
-- CHECK calling pg_tasker_core's row check (02_tables.sql), which uses the
-- Rust mirror of these classes.

-- Finished tasks never change again.
CREATE FUNCTION tasker.task_state_is_terminal(state tasker.task_state) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN state IN ('complete', 'error', 'cancelled', 'resolved_manually');

-- A task arriving in these states is an event (NOTIFY on
-- tasker.events_channel(), by tasker._settle_tasks): it finished, or it is
-- blocked by failures and needs someone.
CREATE FUNCTION tasker.task_state_is_event(state tasker.task_state) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN tasker.task_state_is_terminal(state) OR state = 'blocked_by_failures';

-- The channel of task events: LISTEN tasker_events; each notification's
-- payload is {"task_uuid", "namespace", "state", "from_state"} (JSON),
-- sent when the transaction that moved the task commits.
CREATE FUNCTION tasker.events_channel() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'tasker_events';

-- The class of a step state; each class has a counter on its task row
-- (tasks.steps_<class>), kept by tasker._settle_tasks.
--   pending  - pending
--   out      - enqueued, in_progress: an attempt is with the workers
--   waiting  - waiting_for_retry
--   done     - complete, resolved_manually: satisfies its dependents
--   error    - error
--   cancelled
CREATE FUNCTION tasker.step_state_class(state tasker.step_state) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE state
           WHEN 'pending' THEN 'pending'
           WHEN 'enqueued' THEN 'out'
           WHEN 'in_progress' THEN 'out'
           WHEN 'waiting_for_retry' THEN 'waiting'
           WHEN 'complete' THEN 'done'
           WHEN 'resolved_manually' THEN 'done'
           WHEN 'error' THEN 'error'
           WHEN 'cancelled' THEN 'cancelled'
       END;

-- Runnable: could be enqueued as soon as its retry time (if any) has come.
CREATE FUNCTION tasker.step_is_runnable(state tasker.step_state, pending_parents integer)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN state IN ('pending', 'waiting_for_retry') AND pending_parents = 0;

-- Ready: runnable and due at `at`. The one readiness predicate
-- (tasker._enqueue_steps applies it).
CREATE FUNCTION tasker.step_is_ready(state tasker.step_state, pending_parents integer,
                                     next_retry_at timestamptz, at timestamptz)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN tasker.step_is_runnable(state, pending_parents)
       AND (next_retry_at IS NULL OR next_retry_at <= at);

-- Legal moves. `via` names the operations that make them (docs/schema.md).
CREATE TABLE tasker.step_state_transitions (
    from_state tasker.step_state,          -- NULL: the step is created
    to_state   tasker.step_state NOT NULL,
    via        text NOT NULL,
    CONSTRAINT step_state_transitions_key UNIQUE NULLS NOT DISTINCT (from_state, to_state),
    CHECK (from_state IS DISTINCT FROM to_state)
);
COMMENT ON TABLE tasker.step_state_transitions IS
    'The legal step state changes; tasker._move_steps refuses any other.';
INSERT INTO tasker.step_state_transitions (from_state, to_state, via) VALUES
    (NULL,                'pending',           'create_task'),
    ('pending',           'enqueued',          'evaluation: parents done'),
    ('pending',           'complete',          'map step: every element complete (or none)'),
    ('pending',           'error',             'map step: its input is not an array, or too long'),
    ('waiting_for_retry', 'enqueued',          'evaluation: retry due'),
    ('enqueued',          'in_progress',       'read_steps'),
    ('enqueued',          'complete',          'submit_result success'),
    ('in_progress',       'complete',          'submit_result success'),
    ('enqueued',          'waiting_for_retry', 'submit_result failure; recovery (lost attempt, timeout)'),
    ('in_progress',       'waiting_for_retry', 'submit_result failure; recovery (lost attempt, timeout)'),
    ('enqueued',          'error',             'submit_result failure; recovery; staleness'),
    ('in_progress',       'error',             'submit_result failure; recovery; staleness'),
    ('waiting_for_retry', 'error',             'fail_fast: a sibling batch worker failed'),
    ('error',             'pending',           'retry_step, dlq_requeue (a new retry budget)'),
    ('pending',           'resolved_manually', 'resolve_step_manually'),
    ('enqueued',          'resolved_manually', 'resolve_step_manually'),
    ('in_progress',       'resolved_manually', 'resolve_step_manually'),
    ('waiting_for_retry', 'resolved_manually', 'resolve_step_manually'),
    ('error',             'resolved_manually', 'resolve_step_manually'),
    ('pending',           'cancelled',         'cancel_task, resolve_task_manually'),
    ('enqueued',          'cancelled',         'cancel_task, resolve_task_manually'),
    ('in_progress',       'cancelled',         'cancel_task, resolve_task_manually'),
    ('waiting_for_retry', 'cancelled',         'cancel_task, resolve_task_manually');

CREATE TABLE tasker.task_state_transitions (
    from_state tasker.task_state,          -- NULL: the task is created
    to_state   tasker.task_state NOT NULL,
    via        text NOT NULL,
    CONSTRAINT task_state_transitions_key UNIQUE NULLS NOT DISTINCT (from_state, to_state),
    CHECK (from_state IS DISTINCT FROM to_state)
);
COMMENT ON TABLE tasker.task_state_transitions IS
    'The legal task state changes; tasker._settle_tasks refuses any other.';
INSERT INTO tasker.task_state_transitions (from_state, to_state, via)
SELECT NULL, 'pending', 'create_task'
UNION ALL
-- evaluation moves an active task between the active states, and to complete
SELECT f, t, 'evaluation'
FROM unnest(enum_range(NULL::tasker.task_state)) f, unnest(enum_range(NULL::tasker.task_state)) t
WHERE NOT tasker.task_state_is_terminal(f) AND f <> t
  AND (NOT tasker.task_state_is_terminal(t) OR t = 'complete') AND t <> 'pending'
UNION ALL
SELECT f, 'cancelled', 'cancel_task' FROM unnest(enum_range(NULL::tasker.task_state)) f
WHERE NOT tasker.task_state_is_terminal(f)
UNION ALL
SELECT f, 'resolved_manually', 'resolve_task_manually' FROM unnest(enum_range(NULL::tasker.task_state)) f
WHERE NOT tasker.task_state_is_terminal(f)
UNION ALL
SELECT f, 'error', 'staleness' FROM unnest(enum_range(NULL::tasker.task_state)) f
WHERE NOT tasker.task_state_is_terminal(f)
UNION ALL
SELECT 'error', 'steps_in_process', 'dlq_requeue';

-- The legal moves as predicates, for the statements that make them (one
-- per machine):
--   tasker.step_move_is_legal(from_state, to_state)
--   tasker.task_move_is_legal(from_state, to_state)
-- tasker._write_move_predicates() writes them from the two tables above,
-- which stay the one home of the moves: each is a constant SQL expression
-- (a CASE over from_state), inlined into the UPDATE that moves rows, so a
-- move is checked without reading a table (no lock, nothing to plan).
-- Whatever changes a transition table (an upgrade script) calls it again;
-- src/tests/states.rs compares predicates and tables pair by pair.
CREATE FUNCTION tasker._write_move_predicates() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    v_cases text;
BEGIN
    FOR m IN SELECT * FROM (VALUES ('step', 'tasker.step_state_transitions'::regclass),
                                   ('task', 'tasker.task_state_transitions'::regclass)) x(machine, tab) LOOP
        EXECUTE format('SELECT string_agg(format(''WHEN %%L THEN to_state = ANY (%%L::tasker.%s_state[])'', '
                       'from_state, moves), '' '' ORDER BY from_state) '
                       'FROM (SELECT from_state, array_agg(to_state ORDER BY to_state) AS moves FROM %s '
                       'WHERE from_state IS NOT NULL GROUP BY from_state) g', m.machine, m.tab)
        INTO v_cases;
        EXECUTE format('CREATE OR REPLACE FUNCTION tasker.%1$s_move_is_legal('
                       'from_state tasker.%1$s_state, to_state tasker.%1$s_state) RETURNS boolean '
                       'LANGUAGE sql IMMUTABLE PARALLEL SAFE '
                       'RETURN coalesce(CASE from_state %2$s END, false)', m.machine, v_cases);
        EXECUTE format('COMMENT ON FUNCTION tasker.%1$s_move_is_legal(tasker.%1$s_state, tasker.%1$s_state) IS %2$L',
                       m.machine, format('Whether %s lists the move; written from it by tasker._write_move_predicates().',
                                         m.tab));
    END LOOP;
END
$$;
SELECT tasker._write_move_predicates();
