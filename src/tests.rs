//! SQL-level tests: everything goes through the SQL API, as a user would.
//! `#[pg_test]`s run inside a transaction that is rolled back, in parallel,
//! so every test uses its own namespaces.

use pgrx::prelude::*;

#[pg_schema]
pub mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    extension_sql!(
        r#"
        CREATE SCHEMA IF NOT EXISTS tests;
        -- Runs a statement and returns 'SQLSTATE: message' if it fails, NULL if not.
        CREATE FUNCTION tests.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE stmt;
            RETURN NULL;
        EXCEPTION WHEN OTHERS THEN
            RETURN SQLSTATE || ': ' || SQLERRM;
        END
        $$;
        -- the role tests call the helper while SET ROLE'd to tasker_* roles
        GRANT USAGE ON SCHEMA tests TO PUBLIC;
        GRANT EXECUTE ON FUNCTION tests.sqlstate_of(text) TO PUBLIC;
        "#,
        name = "test_helpers",
    );

    // ---------------------------------------------------------------- helpers

    pub fn sql_value<T: FromDatum + IntoDatum>(q: &str) -> Option<T> {
        Spi::get_one::<T>(q).unwrap_or_else(|e| panic!("{q}: {e}"))
    }

    fn count(q: &str) -> i64 {
        sql_value::<i64>(q).unwrap()
    }

    /// The SQLSTATE (and message) a statement fails with.
    pub fn failure(stmt: &str) -> String {
        Spi::get_one_with_args::<String>("SELECT tests.sqlstate_of($1)", &[stmt.into()])
            .unwrap()
            .unwrap_or_else(|| panic!("expected an error from: {stmt}"))
    }

    fn assert_fails(stmt: &str, sqlstate: &str, needle: &str) {
        let f = failure(stmt);
        assert!(
            f.starts_with(&format!("{sqlstate}: ")),
            "expected {sqlstate} from {stmt}, got {f}"
        );
        assert!(f.contains(needle), "expected {needle:?} in: {f}");
    }

    fn quote(v: &Value) -> String {
        format!("'{}'::jsonb", v.to_string().replace('\'', "''"))
    }

    pub fn template(ns: &str, name: &str, version: &str, steps: Value) -> Value {
        json!({"name": name, "namespace_name": ns, "version": version, "steps": steps})
    }

    pub fn step(name: &str, deps: &[&str]) -> Value {
        json!({"name": name, "dependencies": deps, "handler": {"callable": format!("Test::{name}")}})
    }

    pub fn register(t: &Value) -> pgrx::Uuid {
        Spi::get_one_with_args::<pgrx::Uuid>(
            "SELECT tasker.register_template($1)",
            &[JsonB(t.clone()).into()],
        )
        .unwrap()
        .unwrap()
    }

    fn register_sql(t: &Value) -> String {
        format!("SELECT tasker.register_template({})", quote(t))
    }

    fn diamond(ns: &str) -> Value {
        template(
            ns,
            "diamond",
            "1.0.0",
            json!([
                step("start", &[]),
                step("left", &["start"]),
                step("right", &["start"]),
                step("end", &["left", "right"])
            ]),
        )
    }

    // -------------------------------------------------------------- templates

    #[pg_test]
    fn register_creates_namespace_queue_and_view_row() {
        let id = register(&diamond("t_reg"));
        assert_eq!(
            sql_value::<String>("SELECT tasker.queue_name('t_reg')").unwrap(),
            "tasker_t_reg_queue"
        );
        assert_eq!(
            count("SELECT count(*) FROM pgmq.meta WHERE queue_name = 'tasker_t_reg_queue'"),
            1
        );
        let row = Spi::get_three::<String, String, i32>(
            "SELECT namespace || '/' || name, version, step_count FROM tasker.templates WHERE namespace = 't_reg'",
        )
        .unwrap();
        assert_eq!(
            row,
            (Some("t_reg/diamond".into()), Some("1.0.0".into()), Some(4))
        );
        // identical re-registration: same id, nothing new
        assert_eq!(register(&diamond("t_reg")), id);
        assert_eq!(
            count("SELECT count(*) FROM tasker.templates WHERE namespace = 't_reg'"),
            1
        );
        // a second template in the namespace reuses the queue
        register(&template("t_reg", "other", "1", json!([step("a", &[])])));
        assert_eq!(
            count("SELECT count(*) FROM pgmq.meta WHERE queue_name = 'tasker_t_reg_queue'"),
            1
        );
    }

    #[pg_test]
    fn yaml_with_ruby_symbols_equals_json() {
        let yaml = include_str!("../tests/fixtures/process_order.yaml");
        let id = Spi::get_one_with_args::<pgrx::Uuid>(
            "SELECT tasker.register_template_yaml($1)",
            &[yaml.into()],
        )
        .unwrap()
        .unwrap();
        let def = sql_value::<JsonB>(&format!(
            "SELECT definition FROM tasker.templates WHERE template_uuid = '{id}'"
        ))
        .unwrap()
        .0;
        assert_eq!(def["namespace_name"], "ecommerce_fixture");
        assert_eq!(def["steps"][1]["retry"]["max_attempts"], 5);
        assert_eq!(
            def["steps"][0]["handler"]["initialization"]["validation_timeout"],
            10
        );
        // the canonical JSON registers as the very same template
        assert_eq!(register(&def), id);
    }

    #[pg_test]
    fn invalid_templates_have_specific_sqlstates() {
        let ok = template("t_bad", "t", "1.0.0", json!([step("a", &[])]));
        let mut missing = ok.clone();
        missing.as_object_mut().unwrap().remove("version");
        assert_fails(
            &register_sql(&missing),
            "22023",
            "missing required field \"version\"",
        );
        let mut missing = ok.clone();
        missing.as_object_mut().unwrap().remove("name");
        assert_fails(
            &register_sql(&missing),
            "22023",
            "missing required field \"name\"",
        );
        let mut missing = ok.clone();
        missing.as_object_mut().unwrap().remove("namespace_name");
        assert_fails(
            &register_sql(&missing),
            "22023",
            "missing required field \"namespace_name\"",
        );

        for bad_ns in [
            "Bad",
            "with-dash",
            "1st",
            "a_very_long_namespace_name_that_cannot_fit_in_a_queue",
        ] {
            let t = template(bad_ns, "t", "1.0.0", json!([step("a", &[])]));
            assert_fails(&register_sql(&t), "42602", "invalid namespace");
        }
        assert_fails(
            &register_sql(&template(
                "t_bad",
                "t",
                "1.0.0",
                json!([step("a", &[]), step("a", &[])]),
            )),
            "42710",
            "duplicate step name \"a\"",
        );
        assert_fails(
            &register_sql(&template(
                "t_bad",
                "t",
                "1.0.0",
                json!([step("a", &[]), step("b", &["ghost"])]),
            )),
            "42704",
            "step \"b\" depends on unknown step \"ghost\"",
        );
        assert_fails(
            &register_sql(&template(
                "t_bad",
                "t",
                "1.0.0",
                json!([
                    step("a", &["c"]),
                    step("b", &["a"]),
                    step("c", &["b"]),
                    step("d", &[])
                ]),
            )),
            "42P17",
            "dependency cycle: ",
        );
        let cycle = failure(&register_sql(&template(
            "t_bad",
            "t",
            "1.0.0",
            json!([step("a", &["b"]), step("b", &["a"])]),
        )));
        assert!(
            cycle.ends_with("a -> b -> a") || cycle.ends_with("b -> a -> b"),
            "{cycle}"
        );

        let mut s = step("pay", &[]);
        s["retry"] = json!({"backoff": "sometimes"});
        assert_fails(
            &register_sql(&template("t_bad", "t", "1.0.0", json!([s]))),
            "22023",
            "step \"pay\": invalid retry policy",
        );
        let mut s = step("pay", &[]);
        s["retry"] = json!({"max_attempts": 0});
        assert_fails(
            &register_sql(&template("t_bad", "t", "1.0.0", json!([s]))),
            "22023",
            "max_attempts",
        );

        let mut t = ok.clone();
        t["input_schema"] = json!({"type": "no-such-type"});
        assert_fails(&register_sql(&t), "22023", "invalid input_schema");

        let mut s = step("decide", &[]);
        s["type"] = json!("decision");
        assert_fails(
            &register_sql(&template("t_bad", "t", "1.0.0", json!([s]))),
            "0A000",
            "not supported",
        );

        assert_fails(
            "SELECT tasker.register_template_yaml('name: [oops')",
            "22P02",
            "not valid YAML",
        );
        assert_fails(
            "SELECT tasker.register_template('[1,2]')",
            "22023",
            "must be a JSON object",
        );
        assert_fails(
            &register_sql(&template("t_bad", "t", "one", json!([step("a", &[])]))),
            "22023",
            "invalid template version",
        );

        // nothing was stored by any of the failures
        assert_eq!(
            count("SELECT count(*) FROM tasker.namespaces WHERE name = 't_bad'"),
            0
        );
    }

    #[pg_test]
    fn changing_a_registered_version() {
        let v1 = template("t_change", "flow", "1.0.0", json!([step("a", &[])]));
        let id = register(&v1);
        // not used by any task yet: the definition may change in place
        let v1b = template(
            "t_change",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        );
        assert_eq!(register(&v1b), id);
        assert_eq!(
            count("SELECT step_count::bigint FROM tasker.templates WHERE namespace = 't_change'"),
            2
        );
        // once a task uses it, a different definition is refused ...
        Spi::run("SELECT tasker.create_task('t_change', 'flow')").unwrap();
        let f = failure(&register_sql(&v1));
        assert!(
            f.starts_with("55000: ") && f.contains("already used by tasks"),
            "{f}"
        );
        // ... but the identical one is still a no-op
        assert_eq!(register(&v1b), id);
    }

    // ------------------------------------------------------------------ tasks

    #[pg_test]
    fn create_task_builds_steps_edges_and_transitions() {
        register(&diamond("t_create"));
        let task = sql_value::<pgrx::Uuid>(
            "SELECT tasker.create_task('t_create', 'diamond', '{\"order\": 7}', initiator => 'tests', tags => ARRAY['a','b'])",
        )
        .unwrap();
        let q = |sql: &str| sql.replace("$T", &format!("'{task}'"));
        assert_eq!(
            count(&q(
                "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = $T"
            )),
            4
        );
        assert_eq!(
            count(&q("SELECT count(*) FROM tasker.step_edges e JOIN tasker.workflow_steps s ON s.step_uuid = e.to_step_uuid WHERE s.task_uuid = $T")),
            4
        );
        assert_eq!(
            sql_value::<String>(&q("SELECT state || ',' || steps_total || ',' || steps_pending || ',' || steps_in_flight || ',' || array_to_string(tags, '+') FROM tasker.task_status WHERE task_uuid = $T")).unwrap(),
            "steps_in_process,4,3,1,a+b"
        );
        assert_eq!(
            sql_value::<String>(&q("SELECT array_to_string(dependencies, ',') FROM tasker.step_status WHERE task_uuid = $T AND step_name = 'end'")).unwrap(),
            "left,right"
        );
        // dependency counters
        assert_eq!(
            sql_value::<String>(&q("SELECT string_agg(name || '=' || pending_parents, ',' ORDER BY position) FROM tasker.workflow_steps WHERE task_uuid = $T")).unwrap(),
            "start=0,left=1,right=1,end=2"
        );
        // the root step went to the namespace queue in the same transaction
        assert_eq!(
            sql_value::<String>(&q("SELECT string_agg(name || ':' || state || ':' || attempts, ',' ORDER BY position) FROM tasker.workflow_steps WHERE task_uuid = $T")).unwrap(),
            "start:enqueued:1,left:pending:0,right:pending:0,end:pending:0"
        );
        assert_eq!(count(&q("SELECT count(*) FROM pgmq.q_tasker_t_create_queue WHERE message->>'task_uuid' = $T::text")), 1);
        // the task's history: created pending, then steps_in_process; one most_recent row
        assert_eq!(
            sql_value::<String>(&q("SELECT string_agg(coalesce(from_state, '-') || '>' || to_state || ':' || most_recent, ',' ORDER BY sort_key) FROM tasker.task_transitions WHERE task_uuid = $T")).unwrap(),
            "->pending:false,pending>steps_in_process:true"
        );
        assert_eq!(
            sql_value::<String>(&q("SELECT string_agg(st.to_state || ':' || st.sort_key, ',' ORDER BY st.sort_key) FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid) WHERE s.task_uuid = $T AND s.name = 'start'")).unwrap(),
            "pending:1,enqueued:2"
        );
        assert_eq!(
            count(&q("SELECT count(*) FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid) WHERE s.task_uuid = $T AND st.most_recent")),
            4
        );
        assert_eq!(
            sql_value::<String>(&q("SELECT metadata->>'initiator' FROM tasker.task_transitions WHERE task_uuid = $T AND sort_key = 1")).unwrap(),
            "tests"
        );
        // UUIDv7 keys
        assert_eq!(count(&q("SELECT get_byte(uuid_send($T), 6) >> 4")), 7);
    }

    #[pg_test]
    fn latest_version_is_semver_highest() {
        for v in ["1.2.0", "1.10.0", "1.9.3"] {
            register(&template("t_semver", "flow", v, json!([step("a", &[])])));
        }
        // (two statements: a query does not see rows its own function call inserts)
        let version_of = |call: &str| {
            let id = sql_value::<pgrx::Uuid>(call).unwrap();
            sql_value::<String>(&format!(
                "SELECT task_version FROM tasker.tasks WHERE task_uuid = '{id}'"
            ))
            .unwrap()
        };
        assert_eq!(
            version_of("SELECT tasker.create_task('t_semver', 'flow')"),
            "1.10.0"
        );
        assert_eq!(
            version_of("SELECT tasker.create_task('t_semver', 'flow', version => '1.2.0')"),
            "1.2.0"
        );
        assert_eq!(
            version_of("SELECT tasker.create_task('t_semver', 'flow', version => '1.9.3')"),
            "1.9.3"
        );
    }

    #[pg_test]
    fn invalid_create_task_calls_have_specific_sqlstates() {
        let mut t = template("t_inv", "order", "1.0.0", json!([step("a", &[])]));
        t["input_schema"] = json!({"type": "object", "required": ["order_id"], "properties": {"amount": {"type": "number", "minimum": 0}}});
        register(&t);
        assert_fails(
            "SELECT tasker.create_task('t_nope', 'order')",
            "42704",
            "namespace \"t_nope\" does not exist",
        );
        assert_fails(
            "SELECT tasker.create_task('t_inv', 'nope')",
            "42704",
            "\"t_inv/nope\" does not exist",
        );
        assert_fails(
            "SELECT tasker.create_task('t_inv', 'order', '{\"order_id\":1}', version => '2.0.0')",
            "42704",
            "has no version 2.0.0",
        );
        assert_fails(
            "SELECT tasker.create_task('t_inv', 'order', '{\"order_id\":1}', priority => 101)",
            "22023",
            "priority must be between -100 and 100",
        );
        assert_fails(
            "SELECT tasker.create_task('t_inv', 'order', '{\"order_id\":1}', priority => -101)",
            "22023",
            "priority",
        );
        let f = failure("SELECT tasker.create_task('t_inv', 'order', '{\"amount\": -5}')");
        assert!(f.starts_with("22023: task context does not match"), "{f}");
        assert!(
            f.contains("order_id") && f.contains("/amount"),
            "every violation is listed: {f}"
        );
        assert_fails(
            "SELECT tasker.create_task('t_inv', 'order', '[1]')",
            "22023",
            "must be a JSON object",
        );
        assert_fails(
            "SELECT tasker.create_task(NULL, 'order')",
            "22004",
            "namespace must not be NULL",
        );
        assert_fails("SELECT tasker.create_task('t_inv', 'order', '{\"order_id\":1}', tags => ARRAY['x', NULL])", "22004", "tags");
        assert_fails("SELECT tasker.create_task('t_inv', 'order', '{\"order_id\":1}', idempotency_key => '')", "22023", "idempotency_key");
        assert_eq!(
            count("SELECT count(*) FROM tasker.tasks WHERE namespace_name = 't_inv'"),
            0
        );
        // and the valid call works
        Spi::run("SELECT tasker.create_task('t_inv', 'order', '{\"order_id\": 1, \"amount\": 3}')")
            .unwrap();
    }

    #[pg_test]
    fn idempotency_key_returns_the_existing_task() {
        register(&template(
            "t_idem",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        ));
        let a = sql_value::<pgrx::Uuid>(
            "SELECT tasker.create_task('t_idem', 'flow', idempotency_key => 'order-1')",
        )
        .unwrap();
        let b = sql_value::<pgrx::Uuid>("SELECT tasker.create_task('t_idem', 'flow', '{\"other\": true}', idempotency_key => 'order-1')").unwrap();
        assert_eq!(a, b);
        // a newer version does not escape the key either
        register(&template(
            "t_idem",
            "flow",
            "2.0.0",
            json!([step("a", &[])]),
        ));
        let c = sql_value::<pgrx::Uuid>(
            "SELECT tasker.create_task('t_idem', 'flow', idempotency_key => 'order-1')",
        )
        .unwrap();
        assert_eq!(a, c);
        assert_eq!(
            count("SELECT count(*) FROM tasker.tasks WHERE namespace_name = 't_idem'"),
            1
        );
        assert_eq!(count("SELECT count(*) FROM tasker.workflow_steps s JOIN tasker.tasks t USING (task_uuid) WHERE t.namespace_name = 't_idem'"), 2);
        let d = sql_value::<pgrx::Uuid>(
            "SELECT tasker.create_task('t_idem', 'flow', idempotency_key => 'order-2')",
        )
        .unwrap();
        assert_ne!(a, d);
    }

    #[pg_test]
    fn environment_overrides_apply_at_creation() {
        let mut t = template("t_env", "flow", "1.0.0", json!([step("a", &[])]));
        t["environments"] =
            json!({"test": {"steps": [{"name": "ALL", "retry": {"max_attempts": 1}}]}});
        register(&t);
        Spi::run("SET LOCAL pg_tasker.environment = 'production'").unwrap();
        let prod = sql_value::<pgrx::Uuid>("SELECT tasker.create_task('t_env', 'flow')").unwrap();
        Spi::run("SET LOCAL pg_tasker.environment = 'test'").unwrap();
        let test = sql_value::<pgrx::Uuid>("SELECT tasker.create_task('t_env', 'flow')").unwrap();
        let max = |id: pgrx::Uuid| {
            count(&format!(
                "SELECT max_attempts::bigint FROM tasker.workflow_steps WHERE task_uuid = '{id}'"
            ))
        };
        assert_eq!((max(prod), max(test)), (3, 1));
    }

    #[pg_test]
    fn step_rows_carry_the_retry_policy_and_handler() {
        let yaml = include_str!("../tests/fixtures/process_order.yaml");
        Spi::run_with_args("SELECT tasker.register_template_yaml($1)", &[yaml.into()]).unwrap();
        let ctx = json!({"customer_info": {"email": "a@b.c"}, "cart_items": [{"sku": 1}], "payment_info": {"token": "tok"}});
        let task = sql_value::<pgrx::Uuid>(&format!(
            "SELECT tasker.create_task('ecommerce_fixture', 'process_order', {})",
            quote(&ctx)
        ))
        .unwrap();
        let row = sql_value::<String>(&format!(
            "SELECT concat_ws(',', handler_callable, retryable, max_attempts, backoff, backoff_base_ms, max_backoff_ms, timeout_seconds, attempts)
               FROM tasker.workflow_steps WHERE task_uuid = '{task}' AND name = 'process_payment'"
        ))
        .unwrap();
        assert_eq!(
            row,
            "Ecommerce::StepHandlers::ProcessPaymentHandler,t,5,exponential,500,30000,30,0"
        );
        assert_eq!(
            sql_value::<String>(&format!("SELECT inputs::text FROM tasker.workflow_steps WHERE task_uuid = '{task}' AND name = 'validate_cart'")).unwrap(),
            "{\"validation_timeout\": 10}"
        );
        // the schema rejects a cart without items
        let bad = json!({"customer_info": {"email": "a@b.c"}, "cart_items": [], "payment_info": {"token": "tok"}});
        assert_fails(
            &format!(
                "SELECT tasker.create_task('ecommerce_fixture', 'process_order', {})",
                quote(&bad)
            ),
            "22023",
            "/cart_items",
        );
    }

    #[pg_test]
    fn check_constraints_guard_state_values() {
        register(&template(
            "t_check",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        let task = sql_value::<pgrx::Uuid>("SELECT tasker.create_task('t_check', 'flow')").unwrap();
        assert_fails(
            &format!("UPDATE tasker.tasks SET state = 'bogus' WHERE task_uuid = '{task}'"),
            "23514",
            "tasks_state_check",
        );
        assert_fails(
            &format!("UPDATE tasker.workflow_steps SET state = 'done' WHERE task_uuid = '{task}'"),
            "23514",
            "workflow_steps_state_check",
        );
        assert_fails(
            &format!("INSERT INTO tasker.task_transitions (task_uuid, to_state, sort_key) VALUES ('{task}', 'pending', 2)"),
            "23505",
            "task_transitions_most_recent_idx",
        );
    }

    // --------------------------------------------------------------- security

    #[pg_test]
    fn app_role_creates_tasks_but_cannot_touch_tables() {
        register(&template("t_app", "flow", "1.0.0", json!([step("a", &[])])));
        Spi::run("SET LOCAL ROLE tasker_app").unwrap();
        let task = sql_value::<pgrx::Uuid>("SELECT tasker.create_task('t_app', 'flow')").unwrap();
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM tasker.task_status WHERE task_uuid = '{task}'"
            )),
            1
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM tasker.step_status WHERE task_uuid = '{task}'"
            )),
            1
        );
        assert_fails(
            "SELECT count(*) FROM tasker.tasks",
            "42501",
            "permission denied",
        );
        assert_fails(
            &format!("UPDATE tasker.tasks SET priority = 5 WHERE task_uuid = '{task}'"),
            "42501",
            "permission denied",
        );
        assert_fails(
            "DELETE FROM tasker.workflow_steps",
            "42501",
            "permission denied",
        );
        assert_fails(
            "INSERT INTO tasker.namespaces (name, queue_name) VALUES ('x', 'y')",
            "42501",
            "permission denied",
        );
        assert_fails(
            &register_sql(&template("t_app", "x", "1", json!([step("a", &[])]))),
            "42501",
            "permission denied",
        );
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn worker_role_reads_queues_but_cannot_create_templates_or_tasks() {
        register(&template("t_wrk", "flow", "1.0.0", json!([step("a", &[])])));
        Spi::run("SELECT pgmq.send('tasker_t_wrk_queue', '{\"hello\": 1}')").unwrap();
        Spi::run("SET LOCAL ROLE tasker_worker").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM pgmq.read('tasker_t_wrk_queue', 30, 10)"),
            1
        );
        assert_fails(
            &register_sql(&template("t_wrk", "x", "1", json!([step("a", &[])]))),
            "42501",
            "permission denied",
        );
        assert_fails(
            "SELECT tasker.create_task('t_wrk', 'flow')",
            "42501",
            "permission denied",
        );
        assert_fails(
            "SELECT count(*) FROM tasker.workflow_steps",
            "42501",
            "permission denied",
        );
        assert_fails(
            "SELECT pgmq.send('tasker_t_wrk_queue', '{}')",
            "42501",
            "permission denied",
        );
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn public_has_no_access_and_definer_functions_pin_search_path() {
        Spi::run("CREATE ROLE t_nobody NOLOGIN").unwrap();
        Spi::run("SET LOCAL ROLE t_nobody").unwrap();
        assert_fails(
            "SELECT tasker.create_task('x', 'y')",
            "42501",
            "permission denied",
        );
        assert_fails(
            "SELECT * FROM tasker.task_status",
            "42501",
            "permission denied",
        );
        Spi::run("RESET ROLE").unwrap();
        // every SECURITY DEFINER function of the extension pins search_path
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname = 'tasker' AND p.prosecdef
                    AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')"
            ),
            0
        );
        assert!(count("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'tasker' AND p.prosecdef") >= 3);
    }
}
