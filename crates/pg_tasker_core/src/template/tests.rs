use super::*;
use serde_json::json;

fn step(name: &str, deps: &[&str]) -> Value {
    json!({"name": name, "dependencies": deps, "handler": {"callable": format!("H::{name}")}})
}

fn tpl(steps: Vec<Value>) -> Value {
    json!({"name": "t", "namespace_name": "ns", "version": "1.0.0", "steps": steps})
}

fn err(v: Value) -> Error {
    parse_value(v).unwrap_err()
}

#[test]
fn minimal_template_gets_defaults() {
    let t = parse_value(tpl(vec![step("a", &[])])).unwrap();
    assert_eq!(t.steps[0].retry, RetryPolicy::default());
    assert_eq!(t.steps[0].retry.max_attempts, 3);
    assert_eq!(t.version, "1.0.0");
}

#[test]
fn steps_come_out_in_topological_order() {
    let t = parse_value(tpl(vec![
        step("d", &["b", "c"]),
        step("b", &["a"]),
        step("c", &["a"]),
        step("a", &[]),
    ]))
    .unwrap();
    let names: Vec<_> = t.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
}

#[test]
fn missing_required_fields() {
    for f in ["name", "namespace_name", "version", "steps"] {
        let mut v = tpl(vec![step("a", &[])]);
        v.as_object_mut().unwrap().remove(f);
        let e = err(v);
        assert_eq!(e.kind, ErrorKind::InvalidValue);
        assert!(e.message.contains(&format!("\"{f}\"")), "{}", e.message);
    }
}

#[test]
fn namespace_alias_and_invalid_namespace() {
    let mut v = tpl(vec![step("a", &[])]);
    let m = v.as_object_mut().unwrap();
    m.remove("namespace_name");
    m.insert("namespace".into(), json!("Bad-NS"));
    assert_eq!(err(v).kind, ErrorKind::InvalidName);
}

#[test]
fn duplicate_step_names() {
    let e = err(tpl(vec![step("a", &[]), step("a", &[])]));
    assert_eq!(e.kind, ErrorKind::Duplicate);
    assert!(e.message.contains("\"a\""));
}

#[test]
fn unknown_dependency_names_the_step() {
    let e = err(tpl(vec![step("a", &[]), step("b", &["zz"])]));
    assert_eq!(e.kind, ErrorKind::Undefined);
    assert_eq!(e.message, "step \"b\" depends on unknown step \"zz\"");
}

#[test]
fn cycles_are_reported_with_their_path() {
    let e = err(tpl(vec![
        step("a", &[]),
        step("b", &["a", "d"]),
        step("c", &["b"]),
        step("d", &["c"]),
    ]));
    assert_eq!(e.kind, ErrorKind::InvalidDefinition);
    // every step of the cycle appears, and it closes on itself
    for n in ["b", "c", "d"] {
        assert!(e.message.contains(n), "{}", e.message);
    }
    assert!(!e.message.contains("a ->"), "{}", e.message);
    let path: Vec<&str> = e
        .message
        .trim_start_matches("dependency cycle: ")
        .split(" -> ")
        .collect();
    assert_eq!(path.first(), path.last());
    assert_eq!(path.len(), 4);
    let self_loop = err(tpl(vec![step("a", &["a"])]));
    assert_eq!(self_loop.message, "dependency cycle: a -> a");
}

#[test]
fn invalid_retry_policies() {
    let cases = [
        json!({"max_attempts": 0}),
        json!({"max_attempts": 100000}),
        json!({"backoff": "quadratic"}),
        json!({"backoff_base_ms": -1}),
        json!({"backoff_base_ms": 5000, "max_backoff_ms": 100}),
        json!({"retries": 3}),
    ];
    for retry in cases {
        let mut s = step("pay", &[]);
        s["retry"] = retry.clone();
        let e = err(tpl(vec![s]));
        assert_eq!(e.kind, ErrorKind::InvalidValue, "{retry}");
        assert!(e.message.starts_with("step \"pay\""), "{}", e.message);
    }
}

#[test]
fn retry_limit_alias_and_full_policy() {
    let mut s = step("pay", &[]);
    s["retry"] = json!({"retryable": true, "limit": 5, "backoff": "fibonacci", "backoff_base_ms": 200, "max_backoff_ms": 900, "jitter": true});
    let t = parse_value(tpl(vec![s])).unwrap();
    let r = &t.steps[0].retry;
    assert_eq!(
        (
            r.max_attempts,
            r.backoff,
            r.backoff_base_ms,
            r.max_backoff_ms,
            r.jitter
        ),
        (5, Backoff::Fibonacci, 200, 900, true)
    );
}

#[test]
fn invalid_input_schema() {
    let mut v = tpl(vec![step("a", &[])]);
    v["input_schema"] = json!({"type": "objekt"});
    let e = err(v);
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(
        e.message.starts_with("invalid input_schema"),
        "{}",
        e.message
    );
    let mut v = tpl(vec![step("a", &[])]);
    v["input_schema"] = json!(42);
    assert!(err(v).message.starts_with("invalid input_schema"));
}

#[test]
fn context_validation_lists_all_violations() {
    let mut v = tpl(vec![step("a", &[])]);
    v["input_schema"] = json!({"type": "object", "required": ["order_id"], "properties": {"amount": {"type": "number"}}});
    let t = parse_value(v).unwrap();
    t.validate_context(&json!({"order_id": 1, "amount": 2.5}))
        .unwrap();
    let e = t.validate_context(&json!({"amount": "x"})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(e.message.contains("order_id"), "{}", e.message);
    assert!(e.message.contains("/amount"), "{}", e.message);
}

#[test]
fn unknown_fields_are_rejected_with_context() {
    let mut s = step("pay", &[]);
    s["handlr"] = json!({});
    let e = err(tpl(vec![s]));
    assert!(
        e.message
            .starts_with("step \"pay\": unknown field `handlr`"),
        "{}",
        e.message
    );
    let mut v = tpl(vec![step("a", &[])]);
    v["stepz"] = json!([]);
    assert!(err(v).message.contains("unknown field `stepz`"));
}

#[test]
fn step_types_need_their_shape() {
    let mut s = step("decide", &[]);
    s["type"] = json!("decision");
    let e = err(tpl(vec![s]));
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(
        e.message.contains("at least one dependency"),
        "{}",
        e.message
    );
}

#[test]
fn ruby_symbol_yaml() {
    let yaml = r#"
:name: process_order
:namespace_name: ecommerce
:version: 1.0.0
:task_handler:
  :callable: Ecommerce::OrderProcessingHandler
:input_schema:
  type: object
  required: [cart_items]
:steps:
  - :name: validate_cart
    :handler:
      :callable: Ecommerce::StepHandlers::ValidateCartHandler
      :initialization: { validation_timeout: 10 }
    :retry:
      :retryable: true
      :limit: 3
      :backoff: exponential
  - :name: process_payment
    :depends_on: [validate_cart]
    :handler:
      :callable: Ecommerce::StepHandlers::ProcessPaymentHandler
"#;
    let t = parse_yaml(yaml).unwrap();
    assert_eq!(t.name, "process_order");
    assert_eq!(t.namespace_name, "ecommerce");
    assert_eq!(t.steps[1].dependencies, ["validate_cart"]);
    assert_eq!(t.steps[0].handler.initialization["validation_timeout"], 10);
    // the same template as JSON gives the same canonical definition
    let again = parse_value(t.to_definition()).unwrap();
    assert_eq!(again, t);
}

#[test]
fn yaml_syntax_error_and_float_version() {
    assert_eq!(
        parse_yaml("name: [unclosed").unwrap_err().kind,
        ErrorKind::Syntax
    );
    let e = parse_yaml(
        "name: t\nnamespace_name: ns\nversion: 1.10\nsteps: [{name: a, handler: {callable: X}}]",
    )
    .unwrap_err();
    assert!(e.message.contains("version"), "{}", e.message);
    assert!(e.hint.unwrap().contains("quote"));
}

#[test]
fn environment_overrides_must_name_real_steps() {
    let mut v = tpl(vec![step("a", &[])]);
    v["environments"] = json!({"test": {"steps": [{"name": "ALL", "retry": {"max_attempts": 1}}, {"name": "a", "timeout_seconds": 5}]}});
    parse_value(v.clone()).unwrap();
    v["environments"] = json!({"test": {"steps": [{"name": "nope"}]}});
    assert_eq!(err(v).kind, ErrorKind::Undefined);
}

#[test]
fn environment_overrides_apply_all_then_named() {
    let mut a = step("a", &[]);
    a["handler"]["initialization"] = json!({"url": "prod", "keep": 1});
    let mut v = tpl(vec![a, step("b", &["a"])]);
    v["environments"] = json!({"test": {"steps": [
        {"name": "ALL", "retry": {"max_attempts": 1}},
        {"name": "a", "handler": {"initialization": {"url": "mock"}}, "timeout_seconds": 5}
    ]}});
    let t = parse_value(v).unwrap();
    let test = t.steps_for_environment("test").unwrap();
    assert_eq!(test[0].retry.max_attempts, 1);
    assert_eq!(test[1].retry.max_attempts, 1);
    assert_eq!(test[0].handler.initialization["url"], "mock");
    assert_eq!(test[0].handler.initialization["keep"], 1);
    assert_eq!(test[0].timeout_seconds, Some(5));
    assert_eq!(
        test[0].retry.backoff,
        Backoff::Exponential,
        "unspecified retry fields are kept"
    );
    // other environments see the base template
    assert_eq!(t.steps_for_environment("production").unwrap(), t.steps);
}

#[test]
fn invalid_environment_override_is_rejected_at_registration() {
    let mut v = tpl(vec![step("a", &[])]);
    v["environments"] = json!({"test": {"steps": [{"name": "a", "retry": {"max_attempts": 0}}]}});
    assert_eq!(err(v).kind, ErrorKind::InvalidValue);
}

#[test]
fn lifecycle_overrides_are_validated() {
    let mut v = tpl(vec![step("a", &[])]);
    v["lifecycle"] = json!({"steps_in_process_minutes": 5, "task_max_lifetime_hours": 0.5});
    parse_value(v.clone()).unwrap();
    v["lifecycle"] = json!({"stale_after": 5});
    assert!(err(v.clone()).message.contains("unknown key"));
    v["lifecycle"] = json!({"steps_in_process_minutes": -1});
    assert!(err(v).message.contains("positive"));
}

#[test]
fn configured_retry_defaults_fill_missing_fields() {
    let defaults = RetryPolicy {
        max_attempts: 7,
        backoff: Backoff::Linear,
        ..RetryPolicy::default()
    };
    let mut s = step("a", &[]);
    s["retry"] = json!({"backoff": "fibonacci"});
    let t = parse_value_with(tpl(vec![s, step("b", &[])]), &defaults).unwrap();
    assert_eq!(
        (t.steps[0].retry.max_attempts, t.steps[0].retry.backoff),
        (7, Backoff::Fibonacci)
    );
    assert_eq!(
        (t.steps[1].retry.max_attempts, t.steps[1].retry.backoff),
        (7, Backoff::Linear)
    );
}

#[test]
fn step_count_limit() {
    let steps: Vec<Value> = (0..=MAX_STEPS)
        .map(|i| step(&format!("s{i}"), &[]))
        .collect();
    let e = err(tpl(steps));
    assert_eq!(e.kind, ErrorKind::LimitExceeded);
    assert!(e.message.contains("10001 steps"), "{}", e.message);
    // Exactly at the limit is accepted.
    let steps: Vec<Value> = (0..MAX_STEPS)
        .map(|i| step(&format!("s{i}"), &[]))
        .collect();
    assert_eq!(parse_value(tpl(steps)).unwrap().steps.len(), MAX_STEPS);
}

#[test]
fn lifecycle_bounds() {
    let with = |k: &str, v: Value| {
        let mut t = tpl(vec![step("a", &[])]);
        t["lifecycle"] = json!({ k: v });
        parse_value(t)
    };
    assert!(with("task_max_lifetime_hours", json!(24)).is_ok());
    for bad in [json!(1e300), json!(0), json!(-1), json!("5")] {
        let e = with("task_max_lifetime_hours", bad.clone()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidValue, "{bad}");
    }
    let e = with("no_such_key", json!(1)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(e.hint.unwrap().contains("task_max_lifetime_hours"));
}

#[test]
fn json_text_errors_have_kinds() {
    let deep = "[".repeat(MAX_JSON_DEPTH + 10) + &"]".repeat(MAX_JSON_DEPTH + 10);
    assert_eq!(
        parse_json_text(&deep, "x").unwrap_err().kind,
        ErrorKind::LimitExceeded
    );
    assert_eq!(
        parse_json_text("[1e400]", "x").unwrap_err().kind,
        ErrorKind::InvalidValue
    );
    assert_eq!(
        parse_json_text("{nope", "x").unwrap_err().kind,
        ErrorKind::Syntax
    );
    assert_eq!(parse_json_text("[[1]]", "x").unwrap(), json!([[1]]));
}
