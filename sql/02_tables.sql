-- Tables: namespaces, templates (and their materialised steps), tasks,
-- steps, edges, the audit trail, the dead letter queue and the archive.
--
-- Each row's current state lives on the row (`state`); the transition
-- tables are an append-only audit trail keyed by (row, sort_key), where
-- sort_key is the row's own `transitions` counter. Per-task step counters
-- (`steps_<class>`) are kept by tasker._settle_tasks, so a task's status
-- never needs a scan of its steps. Invariants are CHECK constraints: one
-- per table for the rows that change on every step (tasks, workflow_steps),
-- calling pg_tasker_core's row check, since every CHECK costs each UPDATE
-- statement its own preparation; the hot tables leave room on their pages
-- (fillfactor) so that state changes are HOT updates.
-- Primary keys are UUIDv7 (time-ordered), from tasker.uuid_generate_v7().
--
-- Note: CREATE EXTENSION creates the control file's schema `tasker` itself
-- and Postgres forbids making it a member of the extension, so DROP
-- EXTENSION removes every object below but leaves the empty schema.

-- A step's backoff policy (pg_tasker_core::template::Backoff mirrors it).
CREATE TYPE tasker.backoff AS ENUM ('none', 'linear', 'exponential', 'fibonacci');

-- A step's type (pg_tasker_core::template::StepType mirrors it; what each
-- does: pg_tasker_core::dynamic, docs/templates.md).
CREATE TYPE tasker.step_type AS ENUM ('standard', 'decision', 'deferred_convergence', 'batchable',
                                      'batch_worker', 'map');

-- Whether a step's result creates steps (StepType::is_generator mirrors it).
CREATE FUNCTION tasker.step_type_creates_steps(t tasker.step_type) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN t IN ('decision', 'batchable');

CREATE TABLE tasker.namespaces (
    namespace_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    name           text NOT NULL UNIQUE
                   CONSTRAINT namespaces_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,31}$'),
    queue_name     text NOT NULL UNIQUE,
    -- the queue's msg_id sequence (tasker._pgmq_ensure_queue)
    queue_seq      regclass NOT NULL,
    description    text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.namespaces IS
    'A namespace groups templates and owns one pgmq queue (tasker.queue_name(namespace)).';

CREATE TABLE tasker.task_templates (
    template_uuid  uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    namespace_uuid uuid NOT NULL REFERENCES tasker.namespaces,
    name           text NOT NULL CHECK (name <> ''),
    version        text NOT NULL CHECK (version <> ''),
    -- sorts bytewise in semver order (pg_tasker_core::version::sort_key);
    -- create_task without a version takes the highest
    version_key    bytea NOT NULL,
    description    text,
    definition     jsonb NOT NULL CHECK (jsonb_typeof(definition) = 'object'),
    step_count     integer NOT NULL CHECK (step_count >= 1),
    -- the steps create_task creates (the others are created by decisions
    -- and batches: template_steps.initial); set by _replace_template_rows
    initial_steps  integer NOT NULL DEFAULT 1,
    -- environments whose overrides change steps (rows in template_steps)
    environments   text[] NOT NULL DEFAULT '{}',
    has_input_schema boolean NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (namespace_uuid, name, version),
    CHECK (initial_steps BETWEEN 1 AND step_count)
);
COMMENT ON TABLE tasker.task_templates IS
    'Validated templates in canonical form; (namespace, name, version) is unique.';

-- A template's steps as create_task copies them: one set for the base
-- definition (environment '') and one per environment with overrides.
CREATE TABLE tasker.template_steps (
    template_uuid    uuid NOT NULL REFERENCES tasker.task_templates ON DELETE CASCADE,
    environment      text NOT NULL,
    position         integer NOT NULL CHECK (position >= 0),
    name             text NOT NULL,
    handler_callable text NOT NULL,
    handler_method   text,
    inputs           jsonb NOT NULL CHECK (jsonb_typeof(inputs) = 'object'),
    retryable        boolean NOT NULL,
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    backoff          tasker.backoff NOT NULL,
    backoff_base_ms  bigint NOT NULL CHECK (backoff_base_ms >= 0),
    max_backoff_ms   bigint NOT NULL,
    jitter           boolean NOT NULL,
    timeout_seconds  integer CHECK (timeout_seconds > 0),
    parents          integer NOT NULL CHECK (parents >= 0),
    step_type        tasker.step_type NOT NULL,
    -- created by create_task (pg_tasker_core::dynamic::Graph::initial)
    initial          boolean NOT NULL,
    -- map steps: the path of the array (in the dependency's result or the
    -- task context)
    map_over         text[] CHECK (map_over IS NULL OR step_type = 'map'),
    -- batch_worker steps: batch_config
    batch_config     jsonb CHECK (batch_config IS NULL OR step_type = 'batch_worker'),
    PRIMARY KEY (template_uuid, environment, position),
    CHECK (initial OR parents > 0 OR step_type = 'batch_worker'),
    CHECK (max_backoff_ms >= backoff_base_ms)
);

CREATE TABLE tasker.template_edges (
    template_uuid uuid NOT NULL REFERENCES tasker.task_templates ON DELETE CASCADE,
    from_position integer NOT NULL,
    to_position   integer NOT NULL,
    PRIMARY KEY (template_uuid, from_position, to_position),
    CHECK (from_position <> to_position)
);

CREATE TABLE tasker.tasks (
    task_uuid        uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    template_uuid    uuid NOT NULL REFERENCES tasker.task_templates,
    namespace_name   text NOT NULL,
    task_name        text NOT NULL,
    task_version     text NOT NULL,
    state            tasker.task_state NOT NULL DEFAULT 'pending',
    context          jsonb NOT NULL DEFAULT '{}',
    priority         integer NOT NULL DEFAULT 0,
    initiator        text,
    source_system    text,
    reason           text,
    tags             text[] NOT NULL DEFAULT '{}',
    idempotency_key  text,
    correlation_id   uuid NOT NULL DEFAULT tasker.uuid_generate_v7(),
    -- the W3C trace context create_task was given (tasker._traceparent
    -- checked it); every step message carries it
    traceparent      text,
    -- the environment whose step overrides the task runs with (a set of
    -- template_steps; '' = none): steps created later are copied from it
    environment      text NOT NULL DEFAULT '',
    -- step counters by class (tasker.step_state_class), kept by tasker._settle_tasks
    steps_total      integer NOT NULL,
    steps_pending    integer NOT NULL,
    steps_out        integer NOT NULL DEFAULT 0,
    steps_waiting    integer NOT NULL DEFAULT 0,
    steps_done       integer NOT NULL DEFAULT 0,
    steps_error      integer NOT NULL DEFAULT 0,
    steps_cancelled  integer NOT NULL DEFAULT 0,
    -- number of state changes so far; the sort_key of the latest transition
    transitions      integer NOT NULL DEFAULT 1,
    -- when the orchestrator must look at this task next (NULL: nothing due)
    next_action_at   timestamptz,
    -- claims of external orchestrators (tasker.claim_ready_tasks)
    claimed_by       text,
    claim_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    -- counters >= 0 adding up to steps_total; complete = every step done;
    -- completed_at exactly when terminal; nothing due and no claim when
    -- terminal; claims with an expiry; priority in -100..100; context an
    -- object (pg_tasker_core::TaskRow::problem)
    CONSTRAINT tasks_invariants CHECK (tasker._task_row_check(
        state::text, steps_total, steps_pending, steps_out, steps_waiting, steps_done, steps_error,
        steps_cancelled, transitions, priority, jsonb_typeof(context) = 'object', completed_at IS NOT NULL,
        next_action_at IS NOT NULL, claimed_by IS NOT NULL, claim_expires_at IS NOT NULL))
) WITH (fillfactor = 80);
-- Idempotency keys are scoped to a template family (namespace + name), so
-- that a new version does not silently duplicate work.
CREATE UNIQUE INDEX tasks_idempotency_key_idx
    ON tasker.tasks (namespace_name, task_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Due work: only tasks with something to do are in this index.
CREATE INDEX tasks_next_action_idx ON tasker.tasks (next_action_at)
    WHERE next_action_at IS NOT NULL;
-- Active tasks by state (health, staleness). Not on updated_at: every
-- step change touches it, and an indexed column would make each of those
-- updates write every index of the table (no HOT update).
CREATE INDEX tasks_active_state_idx ON tasker.tasks (state)
    WHERE NOT tasker.task_state_is_terminal(state);
-- Finished tasks by age (retention).
CREATE INDEX tasks_finished_idx ON tasker.tasks (completed_at)
    WHERE tasker.task_state_is_terminal(state);
CREATE INDEX tasks_template_idx ON tasker.tasks (template_uuid);
-- A namespace's tasks newest first (tasker.list_tasks, the dashboard):
-- neither column ever changes, so state changes stay HOT updates.
CREATE INDEX tasks_namespace_idx ON tasker.tasks (namespace_name, task_uuid);
CREATE INDEX tasks_created_at_idx ON tasker.tasks (created_at);

CREATE TABLE tasker.workflow_steps (
    step_uuid        uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid        uuid NOT NULL REFERENCES tasker.tasks ON DELETE CASCADE,
    name             text NOT NULL,
    position         integer NOT NULL,
    state            tasker.step_state NOT NULL DEFAULT 'pending',
    -- the state before the latest change (what the audit row records as
    -- from_state; set in the same UPDATE as state)
    previous_state   tasker.step_state,
    -- handler and retry policy: copied from template_steps, whose CHECKs
    -- they passed (checks cost every UPDATE of a row: none for what never
    -- changes)
    handler_callable text NOT NULL,
    handler_method   text,
    inputs           jsonb NOT NULL DEFAULT '{}',
    -- retry policy (max_attempts counts the first attempt of a budget)
    retryable        boolean NOT NULL DEFAULT true,
    max_attempts     integer NOT NULL DEFAULT 3,
    -- the number of the latest attempt; only grows (messages carry it, and
    -- a result for any other attempt is ignored)
    attempts         integer NOT NULL DEFAULT 0,
    -- attempts made before the current retry budget (retry_step and
    -- dlq_requeue start a new budget of max_attempts)
    budget_offset    integer NOT NULL DEFAULT 0,
    backoff          tasker.backoff NOT NULL DEFAULT 'exponential',
    backoff_base_ms  bigint NOT NULL DEFAULT 1000,
    max_backoff_ms   bigint NOT NULL DEFAULT 60000,
    jitter           boolean NOT NULL DEFAULT false,
    timeout_seconds  integer,
    -- dependency counters: runnable when pending_parents = 0
    total_parents    integer NOT NULL DEFAULT 0,
    pending_parents  integer NOT NULL DEFAULT 0,
    step_type        tasker.step_type NOT NULL DEFAULT 'standard',
    -- steps created after create_task: the decision, batchable or map step
    -- whose result (or expansion) created them
    created_by       uuid,
    -- map steps: the path of their array; the number of elements once
    -- expanded (NULL before)
    map_over         text[],
    map_size         integer,
    -- map elements: the index and the item (created_by is the map step)
    map_index        integer,
    map_item         jsonb,
    -- the latest checkpoint of the current attempt (tasker.checkpoint);
    -- the next delivery carries it
    checkpoint       jsonb,
    checkpointed_at  timestamptz,
    results          jsonb,
    last_error       jsonb,
    next_retry_at    timestamptz,
    -- the message of the latest attempt, when it was sent, and when a worker
    -- first took it through tasker.read_steps
    queue_msg_id     bigint,
    enqueued_at      timestamptz,
    started_at       timestamptz,
    completed_at     timestamptz,
    -- number of state changes so far; the sort_key of the latest transition
    transitions      integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_uuid, name),
    -- 0 <= pending_parents <= total_parents; 0 <= budget_offset <= attempts;
    -- attempts - budget_offset <= max_attempts; out with workers = has a
    -- message; in_progress = started; waiting_for_retry = next_retry_at set;
    -- done = completed_at set; attempted unless pending/cancelled/resolved
    -- (pg_tasker_core::StepRow::problem)
    CONSTRAINT steps_invariants CHECK (tasker._step_row_check(
        state::text, attempts, budget_offset, max_attempts, pending_parents, total_parents, transitions,
        queue_msg_id IS NOT NULL AND enqueued_at IS NOT NULL, started_at IS NOT NULL,
        next_retry_at IS NOT NULL, completed_at IS NOT NULL))
) WITH (fillfactor = 75);
-- Steps waiting for a retry, by task and due time (next_retry_at is set
-- exactly in waiting_for_retry). No index mentions state or the parent
-- counters, so the changes of every step's life are HOT updates; readiness
-- is found through the counters (tasker._enqueue_steps), not by a scan.
CREATE INDEX workflow_steps_retry_idx ON tasker.workflow_steps (task_uuid, next_retry_at)
    WHERE next_retry_at IS NOT NULL;
-- What a step created (map elements in index order, batch workers).
CREATE INDEX workflow_steps_created_by_idx ON tasker.workflow_steps (created_by, map_index)
    WHERE created_by IS NOT NULL;

CREATE TABLE tasker.step_edges (
    from_step_uuid uuid NOT NULL REFERENCES tasker.workflow_steps ON DELETE CASCADE,
    to_step_uuid   uuid NOT NULL REFERENCES tasker.workflow_steps ON DELETE CASCADE,
    -- a gate: the child waits for a decision or batchable step that may
    -- still create one of its dependencies; it carries no result
    -- (pg_tasker_core::dynamic)
    gate           boolean NOT NULL DEFAULT false,
    PRIMARY KEY (from_step_uuid, to_step_uuid),
    CHECK (from_step_uuid <> to_step_uuid)
);
CREATE INDEX step_edges_to_idx ON tasker.step_edges (to_step_uuid);
COMMENT ON TABLE tasker.step_edges IS 'Dependency edges: from (parent) provides to (child).';

CREATE TABLE tasker.task_transitions (
    task_uuid  uuid NOT NULL REFERENCES tasker.tasks ON DELETE CASCADE,
    sort_key   integer NOT NULL,
    from_state tasker.task_state,
    to_state   tasker.task_state NOT NULL,
    reason     text,
    metadata   jsonb NOT NULL DEFAULT '{}',
    actor      text NOT NULL DEFAULT session_user,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_uuid, sort_key),
    CHECK (sort_key >= 1 AND (from_state IS NULL) = (sort_key = 1))
);
COMMENT ON TABLE tasker.task_transitions IS
    'Audit trail of task state changes, append-only; the latest has sort_key = tasks.transitions.';

CREATE TABLE tasker.step_transitions (
    step_uuid  uuid NOT NULL REFERENCES tasker.workflow_steps ON DELETE CASCADE,
    sort_key   integer NOT NULL,
    from_state tasker.step_state,
    to_state   tasker.step_state NOT NULL,
    reason     text,
    metadata   jsonb NOT NULL DEFAULT '{}',
    actor      text NOT NULL DEFAULT session_user,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step_uuid, sort_key),
    CHECK (sort_key >= 1 AND (from_state IS NULL) = (sort_key = 1))
);
COMMENT ON TABLE tasker.step_transitions IS
    'Audit trail of step state changes, append-only; the latest has sort_key = workflow_steps.transitions.';

CREATE TABLE tasker.dlq (
    dlq_uuid          uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid         uuid REFERENCES tasker.tasks ON DELETE SET NULL,
    reason            text NOT NULL CHECK (reason IN ('staleness_timeout', 'task_max_lifetime_exceeded',
                                                      'invalid_task_request', 'invalid_step_message')),
    original_state    tasker.task_state,
    error             jsonb,
    -- the task and its steps (or the rejected request) as they were
    snapshot          jsonb NOT NULL,
    resolution_status text NOT NULL DEFAULT 'pending'
                      CHECK (resolution_status IN ('pending', 'requeued', 'resolved', 'discarded')),
    resolution_note   text,
    resolved_by       text,
    resolved_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((resolution_status = 'pending') = (resolved_at IS NULL)),
    -- rejected requests and quarantined step messages have no task
    CHECK ((task_uuid IS NULL AND original_state IS NULL)
           OR reason NOT IN ('invalid_task_request', 'invalid_step_message'))
);
COMMENT ON TABLE tasker.dlq IS
    'Dead letter queue: stale tasks, rejected task requests and quarantined step messages, with a snapshot and a resolution status.';
CREATE INDEX dlq_pending_idx ON tasker.dlq (created_at) WHERE resolution_status = 'pending';
CREATE INDEX dlq_task_idx ON tasker.dlq (task_uuid);
-- at most one open entry per task
CREATE UNIQUE INDEX dlq_open_task_idx ON tasker.dlq (task_uuid)
    WHERE resolution_status = 'pending' AND task_uuid IS NOT NULL;

CREATE TABLE tasker.task_archive (
    task_uuid      uuid PRIMARY KEY,
    namespace_name text NOT NULL,
    task_name      text NOT NULL,
    task_version   text NOT NULL,
    state          tasker.task_state NOT NULL CHECK (tasker.task_state_is_terminal(state)),
    created_at     timestamptz NOT NULL,
    completed_at   timestamptz NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now(),
    -- task row, steps, edges and transitions as they were
    snapshot       jsonb NOT NULL
);
COMMENT ON TABLE tasker.task_archive IS
    'Finished tasks removed by retention under policy = "archive".';
CREATE INDEX task_archive_archived_at_idx ON tasker.task_archive (archived_at);

-- Workers waiting for work (tasker.worker_idle): an enqueue NOTIFYs a
-- queue's channel only while someone waits on it, so that busy systems do
-- not pay for notifications (each NOTIFYing commit takes a cluster-wide
-- lock). Unlogged: after a crash every worker re-registers when idle.
CREATE UNLOGGED TABLE tasker.worker_waits (
    queue_name  text NOT NULL,
    worker_id   text NOT NULL,
    backend_pid integer NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_name, worker_id)
);
COMMENT ON TABLE tasker.worker_waits IS
    'Idle workers LISTENing on a queue''s channel (tasker.wake_channel); kept by tasker.worker_idle.';
