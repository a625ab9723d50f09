-- Who may do what in which namespace. The one home of the rule: every API
-- function asks tasker._require_namespaces (or its step / task forms), every
-- view and read function filters by tasker._seen_namespaces().
--
-- A privilege in a namespace:
--   worker  read its queue (pgmq.read, read_steps, exchange), report, extend
--           and wait for its steps;
--   app     create, see and cancel its tasks, send it task requests;
--   admin   both, and register its templates, retry and resolve its steps
--           and tasks, see handler initialization in tasker.templates.
-- The cluster-wide roles hold a privilege in every namespace: tasker_worker
-- (worker), tasker_app (app), tasker_admin (admin, and what only the
-- cluster admin does: new namespaces, grants, maintenance, the DLQ).
-- tasker.grant_namespace gives one role one privilege in one namespace (a
-- row here, and the API role it needs: tasker_namespace_worker / _app /
-- _admin, which carry the API's EXECUTE privileges and no namespace).
--
-- The caller is the role the session acts as (SET ROLE included), never the
-- owner of the SECURITY DEFINER function that asks (tasker._caller()).

CREATE TYPE tasker.namespace_privilege AS ENUM ('worker', 'app', 'admin');

CREATE TABLE tasker.namespace_grants (
    namespace_uuid uuid NOT NULL REFERENCES tasker.namespaces ON DELETE CASCADE,
    grantee        regrole NOT NULL,
    privilege      tasker.namespace_privilege NOT NULL,
    granted_by     text NOT NULL DEFAULT session_user,
    granted_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace_uuid, grantee, privilege)
);
CREATE INDEX namespace_grants_grantee_idx ON tasker.namespace_grants (grantee);
COMMENT ON TABLE tasker.namespace_grants IS
    'Privileges of roles in single namespaces (tasker.grant_namespace); the cluster-wide roles hold theirs everywhere.';

-- Privilege p is 'worker', 'app', 'admin', or 'any' (some privilege: what
-- seeing a namespace's tasks takes). Who holds it where is the rule of
-- pg_tasker_core::privilege: tasker._caller_holds_all(p) (a cluster-wide
-- role: every namespace; no query) and tasker._privileges_including(p)
-- (the granted privileges that include it; admin includes worker and app).

-- The namespaces in which the caller holds privilege p through grants, by
-- name, sorted. Asked by tasker._caller_namespaces(p) (src/caller.rs; NULL
-- when the caller holds p in every namespace), which keeps the answers for
-- the session until a change of the grants (the trigger below) or of role
-- memberships reaches it: the hot path then asks no query. (SECURITY
-- DEFINER: the views call tasker._caller_namespaces, and a function in a
-- view runs with the rights of the view's user.)
CREATE FUNCTION tasker._granted_namespaces(p text) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT ARRAY(SELECT DISTINCT n.name
                 FROM tasker.namespace_grants g
                 JOIN tasker.namespaces n ON n.namespace_uuid = g.namespace_uuid
                 JOIN pg_catalog.pg_roles ro ON ro.oid = g.grantee
                 WHERE g.privilege::text = ANY (tasker._privileges_including(p))
                   AND pg_catalog.pg_has_role(tasker._caller(), g.grantee, 'USAGE')
                 ORDER BY 1)
$$;

-- Every change of the grants reaches the answers each backend keeps
-- (tasker._caller_namespaces): in this transaction at once, in the others
-- when it commits (a relcache invalidation of the table). Row triggers:
-- the deletes of a namespace's grants by its foreign key fire them too.
CREATE FUNCTION tasker._on_grants_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._grants_changed();
    RETURN NULL;
END
$$;
CREATE TRIGGER namespace_grants_changed AFTER INSERT OR UPDATE OR DELETE ON tasker.namespace_grants
    FOR EACH ROW EXECUTE FUNCTION tasker._on_grants_change();
CREATE TRIGGER namespace_grants_truncated AFTER TRUNCATE ON tasker.namespace_grants
    FOR EACH STATEMENT EXECUTE FUNCTION tasker._on_grants_change();
-- (the answers are names: a namespace renamed or deleted by hand, with
-- its grants left behind, reaches them too)
CREATE TRIGGER namespaces_changed AFTER UPDATE OR DELETE ON tasker.namespaces
    FOR EACH STATEMENT EXECUTE FUNCTION tasker._on_grants_change();
-- (also under session_replication_role = replica: a restore, a replication
-- apply worker)
ALTER TABLE tasker.namespace_grants ENABLE ALWAYS TRIGGER namespace_grants_changed,
    ENABLE ALWAYS TRIGGER namespace_grants_truncated;
ALTER TABLE tasker.namespaces ENABLE ALWAYS TRIGGER namespaces_changed;

-- The namespaces whose tasks the caller sees (views, read functions):
-- those it holds any privilege in.
CREATE FUNCTION tasker._seen_namespaces() RETURNS SETOF text
LANGUAGE sql STABLE ROWS 10 SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
    SELECT n.name FROM tasker.namespaces n, tasker._caller_namespaces('any') mine
    WHERE mine IS NULL OR n.name = ANY (mine)
$$;

-- 42501 unless the caller holds privilege p in each of the namespaces.
CREATE FUNCTION tasker._require_namespaces(p_namespaces text[], p text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_mine text[];
    v_denied text;
BEGIN
    IF tasker._caller_holds_all(p) THEN
        RETURN;
    END IF;
    v_mine := tasker._caller_namespaces(p);
    SELECT u INTO v_denied FROM unnest(p_namespaces) u WHERE u IS NOT NULL AND u <> ALL (v_mine) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'permission denied: role "%" has no % privilege in namespace "%"',
            tasker._caller()::regrole, CASE p WHEN 'any' THEN 'pg_tasker' ELSE p END, v_denied
            USING ERRCODE = '42501',
                  HINT = CASE WHEN p = 'admin' AND NOT EXISTS (SELECT 1 FROM tasker.namespaces n WHERE n.name = v_denied)
                              THEN 'creating a namespace takes tasker_admin'
                              ELSE format('tasker_admin grants it: SELECT tasker.grant_namespace(%L, %L, %L)',
                                          v_denied, tasker._caller()::regrole::text,
                                          CASE p WHEN 'any' THEN 'app' ELSE p END) END;
    END IF;
END
$$;

-- 42501 unless the caller holds privilege p in the namespaces of the given
-- tasks (tasks that do not exist are left to the caller to report).
-- (plpgsql, like the others here: its plans are kept for the session)
CREATE FUNCTION tasker._require_tasks(p_tasks uuid[], p text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM tasker._require_namespaces(
        ARRAY(SELECT DISTINCT t.namespace_name FROM tasker.tasks t WHERE t.task_uuid = ANY (p_tasks)), p);
END
$$;

-- 42501 unless the caller holds privilege p in the namespaces of the given
-- steps (steps that do not exist are left to the caller to report). The
-- cluster-wide roles pass without a look at the steps (results take this
-- path: it is the hot one); a granted role pays one query (its namespaces
-- are kept by the session: tasker._caller_namespaces).
CREATE FUNCTION tasker._require_steps(p_steps uuid[], p text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT tasker._caller_holds_all(p) THEN
        PERFORM tasker._require_namespaces(
            ARRAY(SELECT DISTINCT t.namespace_name
                  FROM tasker.workflow_steps s
                  JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
                  WHERE s.step_uuid = ANY (p_steps)), p);
    END IF;
END
$$;

-- The API role a namespace privilege needs (EXECUTE on its functions).
CREATE FUNCTION tasker._api_role(p tasker.namespace_privilege) RETURNS name
LANGUAGE sql IMMUTABLE
RETURN ('tasker_namespace_' || p::text)::name;

-- The checks of grant_namespace / revoke_namespace: the namespace's row
-- (42704 when unknown), the role's oid (42704), the privilege (22023).
CREATE FUNCTION tasker._grant_target(p_namespace text, p_role name, p_privilege text,
                                     OUT namespace_uuid uuid, OUT queue_name text, OUT grantee regrole,
                                     OUT grantee_name name, OUT privilege tasker.namespace_privilege)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_namespace IS NULL OR p_role IS NULL OR p_privilege IS NULL THEN
        RAISE EXCEPTION 'namespace, role and privilege must not be NULL' USING ERRCODE = '22004';
    ELSIF p_privilege NOT IN ('worker', 'app', 'admin') THEN
        RAISE EXCEPTION 'unknown namespace privilege "%"', p_privilege
            USING ERRCODE = '22023', HINT = 'privileges: worker, app, admin';
    END IF;
    privilege := p_privilege::tasker.namespace_privilege;
    SELECT n.namespace_uuid, n.queue_name INTO namespace_uuid, queue_name
    FROM tasker.namespaces n WHERE n.name = p_namespace;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'namespace "%" does not exist', p_namespace
            USING ERRCODE = '42704', HINT = 'register a template in this namespace first';
    END IF;
    SELECT r.oid::regrole, r.rolname INTO grantee, grantee_name FROM pg_catalog.pg_roles r WHERE r.rolname = p_role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = '42704';
    ELSIF p_role ~ '^(tasker_|pg_)' THEN
        -- the cluster-wide and API roles hold what they hold everywhere;
        -- a grant to one would reach every member of it
        RAISE EXCEPTION 'role "%" cannot be given or lose namespace privileges', p_role
            USING ERRCODE = '0LP01', HINT = 'grant to a role of your own (GRANT tasker_worker TO it means every namespace)';
    END IF;
    -- one grantee's grants change one transaction at a time (what each
    -- statement below concludes from the rows left holds until commit)
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pg_tasker.namespace_grants'), grantee::oid::integer);
END
$$;

-- Whether a role still holds a privilege that lets it read the namespace's
-- queue (worker or admin) through a grant.
CREATE FUNCTION tasker._grant_reads_queue(p_namespace uuid, p_role regrole) RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT 1 FROM tasker.namespace_grants g
               WHERE g.namespace_uuid = p_namespace AND g.grantee = p_role
                 AND g.privilege::text = ANY (tasker._privileges_including('worker')));

-- tasker.grant_namespace(namespace, role, privilege) RETURNS boolean: gives
-- a role the privilege worker, app or admin in one namespace (false when it
-- held it already). Workers get what pgmq.read needs on the namespace's
-- queue table, and nothing on others.
CREATE FUNCTION tasker.grant_namespace(namespace text, role name, privilege text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
DECLARE
    g record := tasker._grant_target(grant_namespace.namespace, grant_namespace.role, grant_namespace.privilege);
    v_new boolean;
BEGIN
    INSERT INTO tasker.namespace_grants AS x (namespace_uuid, grantee, privilege)
    VALUES (g.namespace_uuid, g.grantee, g.privilege)
    ON CONFLICT DO NOTHING
    RETURNING true INTO v_new;
    IF NOT pg_catalog.pg_has_role(g.grantee, tasker._api_role(g.privilege), 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', tasker._api_role(g.privilege), g.grantee_name);
    END IF;
    IF tasker._grant_reads_queue(g.namespace_uuid, g.grantee) THEN
        PERFORM tasker._pgmq_grant_reader(g.queue_name, g.grantee_name);
    END IF;
    RETURN coalesce(v_new, false);
END
$$;

-- tasker.revoke_namespace(namespace, role, privilege) RETURNS boolean:
-- takes the privilege back (false when the role did not hold it through a
-- grant). The queue table's privileges go with the last grant that needed
-- them, the API role with the role's last grant of that privilege.
CREATE FUNCTION tasker.revoke_namespace(namespace text, role name, privilege text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = tasker, pg_catalog, pg_temp AS $$
DECLARE
    g record := tasker._grant_target(revoke_namespace.namespace, revoke_namespace.role, revoke_namespace.privilege);
    v_gone boolean;
BEGIN
    DELETE FROM tasker.namespace_grants x
    WHERE x.namespace_uuid = g.namespace_uuid AND x.grantee = g.grantee AND x.privilege = g.privilege
    RETURNING true INTO v_gone;
    IF v_gone IS NULL THEN
        RETURN false;   -- not held through a grant: nothing of it to take back
    END IF;
    IF NOT tasker._grant_reads_queue(g.namespace_uuid, g.grantee) THEN
        PERFORM tasker._pgmq_revoke(g.queue_name, g.grantee_name);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM tasker.namespace_grants x WHERE x.grantee = g.grantee AND x.privilege = g.privilege)
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                   WHERE m.member = g.grantee AND m.roleid = tasker._api_role(g.privilege)::text::regrole) THEN
        EXECUTE format('REVOKE %I FROM %I', tasker._api_role(g.privilege), g.grantee_name);
    END IF;
    RETURN true;
END
$$;

-- Who holds what: one row per grant, and one per direct member of a
-- cluster-wide role (namespace '*').
CREATE VIEW tasker.namespace_privileges AS
SELECT n.name AS namespace, g.grantee::text AS role, g.privilege::text AS privilege, g.granted_by, g.granted_at
FROM tasker.namespace_grants g
JOIN tasker.namespaces n ON n.namespace_uuid = g.namespace_uuid
JOIN pg_catalog.pg_roles r ON r.oid = g.grantee
UNION ALL
SELECT '*', m.member::regrole::text, substr(c.rolname, length('tasker_') + 1), NULL, NULL
FROM pg_catalog.pg_auth_members m
JOIN pg_catalog.pg_roles c ON c.oid = m.roleid
WHERE c.rolname IN ('tasker_worker', 'tasker_app', 'tasker_admin')
  AND m.member::regrole::text NOT IN ('tasker_worker', 'tasker_app', 'tasker_admin');
COMMENT ON VIEW tasker.namespace_privileges IS
    'Who holds which pg_tasker privilege in which namespace (* = every namespace, through a cluster-wide role).';
