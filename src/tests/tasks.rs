//! Task creation through SQL: rows, edges, transitions, the first
//! evaluation, idempotency, versions, environments, validation errors.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::json;

    use crate::tests::helpers::*;

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
        // the task's history: created pending, then steps_in_process
        assert_eq!(
            sql_value::<String>(&q("SELECT string_agg(coalesce(from_state::text, '-') || '>' || to_state, ',' ORDER BY sort_key) FROM tasker.task_transitions WHERE task_uuid = $T")).unwrap(),
            "->pending,pending>steps_in_process"
        );
        assert_eq!(
            sql_value::<String>(&q("SELECT string_agg(st.to_state || ':' || st.sort_key, ',' ORDER BY st.sort_key) FROM tasker.step_transitions st JOIN tasker.workflow_steps s USING (step_uuid) WHERE s.task_uuid = $T AND s.name = 'start'")).unwrap(),
            "pending:1,enqueued:2"
        );
        assert_task_consistent(task);
        assert_eq!(
            sql_value::<String>(&q("SELECT metadata->>'initiator' FROM tasker.task_transitions WHERE task_uuid = $T AND sort_key = 1")).unwrap(),
            "tests"
        );
        // UUIDv7 keys
        assert_eq!(count(&q("SELECT get_byte(uuid_send($T), 6) >> 4")), 7);
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
        let yaml = include_str!("../../tests/fixtures/process_order.yaml");
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
    fn template_rows_are_share_locked_while_a_task_is_created() {
        // create_task reads the definition under FOR SHARE, so a concurrent
        // re-registration waits (client_tests::concurrency races them for real)
        register(&template(
            "t_lock",
            "flow",
            "1.0.0",
            json!([step("a", &[])]),
        ));
        Spi::run("SELECT tasker.create_task('t_lock', 'flow')").unwrap();
        let locked = count(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
              WHERE c.relname = 'task_templates' AND l.pid = pg_backend_pid() AND l.mode = 'RowShareLock'",
        );
        assert_eq!(locked, 1);
    }
}
