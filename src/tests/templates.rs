//! Template registration through SQL: canonical form, YAML, every
//! validation error with its SQLSTATE, limits, re-registration.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    use crate::tests::helpers::*;

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
        let yaml = include_str!("../../tests/fixtures/process_order.yaml");
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
            "22023",
            "needs at least one dependency",
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

    #[pg_test]
    fn limits_and_bounds_are_enforced_at_registration() {
        // steps per template: 10,000 is fine (see client_tests::scale), 10,001 is not
        let steps: Vec<Value> = (0..10_001).map(|i| step(&format!("s{i}"), &[])).collect();
        assert_fails(
            &register_sql(&template("t_limit", "big", "1.0.0", Value::Array(steps))),
            "54000",
            "more than the limit of 10000",
        );
        // lifecycle values are bounded (a huge one used to break staleness for everyone)
        let mut t = template("t_limit", "life", "1.0.0", json!([step("a", &[])]));
        t["lifecycle"] = json!({"task_max_lifetime_hours": 1e300});
        assert_fails(
            &register_sql(&t),
            "22023",
            "lifecycle.task_max_lifetime_hours must be a positive number of at most",
        );
        t["lifecycle"] = json!({"steps_in_process_minutes": 0});
        assert_fails(
            &register_sql(&t),
            "22023",
            "lifecycle.steps_in_process_minutes",
        );
        t["lifecycle"] = json!({"steps_in_process_minutes": 90, "task_max_lifetime_hours": 48});
        register(&t);
        // timeouts are bounded too
        let mut s = step("a", &[]);
        s["timeout_seconds"] = json!(0);
        assert_fails(
            &register_sql(&template("t_limit", "to", "1.0.0", json!([s]))),
            "22023",
            "timeout_seconds",
        );
        assert_eq!(
            count("SELECT count(*) FROM tasker.templates WHERE namespace = 't_limit'"),
            1
        );
    }

    #[pg_test]
    fn any_jsonb_gets_a_clear_error_never_xx000() {
        // numbers beyond a double's range and deep nesting are valid jsonb
        let big = "SELECT tasker.register_template('{\"name\": \"t\", \"namespace_name\": \"t_json\", \"version\": \"1.0.0\", \"steps\": [{\"name\": \"a\", \"handler\": {\"callable\": \"A\", \"initialization\": {\"x\": 1e400}}}]}')";
        assert_fails(big, "22023", "outside the range of a 64-bit float");
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let deep_sql = format!(
            "SELECT tasker.register_template('{{\"name\": \"t\", \"namespace_name\": \"t_json\", \"version\": \"1.0.0\", \"metadata\": {{\"x\": {deep}}}, \"steps\": [{{\"name\": \"a\", \"handler\": {{\"callable\": \"A\"}}}}]}}')"
        );
        assert_fails(&deep_sql, "54000", "nested more than 128 levels");
        let deep_yaml = format!("SELECT tasker.register_template_yaml('x: {deep}')");
        let f = failure(&deep_yaml);
        assert!(f.starts_with("54000") || f.starts_with("22P02"), "{f}");
        assert_eq!(
            count("SELECT count(*) FROM tasker.namespaces WHERE name = 't_json'"),
            0
        );
    }

    #[pg_test]
    fn latest_version_follows_semver_precedence() {
        for v in [
            "1.2.0",
            "1.10.0",
            "1.9.3",
            "1.10.0-rc.1",
            "1.10.0-rc.10",
            "1.10.0-rc.2",
        ] {
            register(&template("t_semver", "flow", v, json!([step("a", &[])])));
        }
        let version_of = |call: &str| {
            let id = sql_value::<pgrx::Uuid>(call).unwrap();
            text(&format!(
                "SELECT task_version FROM tasker.tasks WHERE task_uuid = '{id}'"
            ))
        };
        assert_eq!(
            version_of("SELECT tasker.create_task('t_semver', 'flow')"),
            "1.10.0"
        );
        assert_eq!(
            version_of("SELECT tasker.create_task('t_semver', 'flow', version => '1.2')"),
            "1.2.0"
        );
        assert_eq!(
            version_of("SELECT tasker.create_task('t_semver', 'flow', version => '1.9.3')"),
            "1.9.3"
        );
        // the hint lists versions in precedence order
        let f = failure("SELECT tasker.create_task('t_semver', 'flow', version => '3.0.0')");
        assert!(
            f.contains("has no version 3.0.0") && f.starts_with("42704"),
            "{f}"
        );
        assert_eq!(
            text("SELECT string_agg(version, ',' ORDER BY version_key) FROM tasker.task_templates WHERE name = 'flow' AND namespace_uuid = (SELECT namespace_uuid FROM tasker.namespaces WHERE name = 't_semver')"),
            "1.2.0,1.9.3,1.10.0-rc.1,1.10.0-rc.2,1.10.0-rc.10,1.10.0"
        );
    }

    #[pg_test]
    fn environments_are_materialised_per_template() {
        let mut t = template(
            "t_envrows",
            "flow",
            "1.0.0",
            json!([step("a", &[]), step("b", &["a"])]),
        );
        t["environments"] =
            json!({"test": {"steps": [{"name": "b", "retry": {"max_attempts": 9}}]}});
        let id = register(&t);
        assert_eq!(
            text(&format!("SELECT string_agg(environment || ':' || name || ':' || max_attempts, ',' ORDER BY environment, position) FROM tasker.template_steps WHERE template_uuid = '{id}'")),
            ":a:3,:b:3,test:a:3,test:b:9"
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM tasker.template_edges WHERE template_uuid = '{id}'"
            )),
            1
        );
    }
}
