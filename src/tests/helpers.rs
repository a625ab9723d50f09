//! The one helper module of the SQL-level tests.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

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

    extension_sql_file!(
        "invariants.sql",
        name = "test_invariants",
        requires = ["test_helpers", "views"]
    );

    /// Used by the client tests to boot the shared cluster.
    #[pg_test]
    fn cluster_boots() {
        assert_eq!(Spi::get_one::<bool>("SELECT true").unwrap(), Some(true));
    }
}

pub fn sql_value<T: FromDatum + IntoDatum>(q: &str) -> Option<T> {
    Spi::get_one::<T>(q).unwrap_or_else(|e| panic!("{q}: {e}"))
}

pub fn text(q: &str) -> String {
    sql_value::<String>(q).unwrap_or_else(|| panic!("{q}: NULL"))
}

pub fn count(q: &str) -> i64 {
    sql_value::<i64>(q).unwrap_or_else(|| panic!("{q}: NULL"))
}

pub fn json_of(q: &str) -> Value {
    sql_value::<JsonB>(q).map(|j| j.0).unwrap_or(Value::Null)
}

/// How often the current transaction has called a tasker function (with
/// track_functions at 'pl' or 'all').
pub fn function_calls(name: &str) -> i64 {
    count(&format!(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_catalog.pg_stat_xact_user_functions
         WHERE schemaname = 'tasker' AND funcname = '{name}'"
    ))
}

/// The SQLSTATE and message a statement fails with.
pub fn failure(stmt: &str) -> String {
    Spi::get_one_with_args::<String>("SELECT tests.sqlstate_of($1)", &[stmt.into()])
        .unwrap()
        .unwrap_or_else(|| panic!("expected an error from: {stmt}"))
}

pub fn assert_fails(stmt: &str, sqlstate: &str, needle: &str) {
    let f = failure(stmt);
    assert!(
        f.starts_with(&format!("{sqlstate}: ")),
        "expected {sqlstate} from {stmt}, got {f}"
    );
    assert!(f.contains(needle), "expected {needle:?} in: {f}");
}

/// A SQL literal of a JSON value.
pub fn quote(v: &Value) -> String {
    format!("'{}'::jsonb", v.to_string().replace('\'', "''"))
}

pub fn template(ns: &str, name: &str, version: &str, steps: Value) -> Value {
    json!({"name": name, "namespace_name": ns, "version": version, "steps": steps})
}

pub fn step(name: &str, deps: &[&str]) -> Value {
    json!({"name": name, "dependencies": deps, "handler": {"callable": format!("Test::{name}")}})
}

pub fn diamond(ns: &str) -> Value {
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

pub fn register(t: &Value) -> pgrx::Uuid {
    Spi::get_one_with_args::<pgrx::Uuid>(
        "SELECT tasker.register_template($1)",
        &[JsonB(t.clone()).into()],
    )
    .unwrap()
    .unwrap()
}

pub fn register_sql(t: &Value) -> String {
    format!("SELECT tasker.register_template({})", quote(t))
}

pub fn create(ns: &str, name: &str, ctx: Value) -> pgrx::Uuid {
    Spi::get_one_with_args::<pgrx::Uuid>(
        "SELECT tasker.create_task($1, $2, $3)",
        &[ns.into(), name.into(), JsonB(ctx).into()],
    )
    .unwrap()
    .unwrap()
}

/// Reads every visible message of a namespace queue, as a worker would.
pub fn read_all(ns: &str) -> Vec<Value> {
    json_of(&format!(
        "SELECT coalesce(jsonb_agg(message ORDER BY msg_id), '[]') FROM pgmq.read('tasker_{ns}_queue', 30, 100)"
    ))
    .as_array()
    .unwrap()
    .clone()
}

/// submit_result with JSON arguments (`Value::Null` is passed as SQL NULL).
pub fn submit(step: &str, status: &str, result: Value, error: Value, metadata: Value) -> String {
    let arg = |v: Value| if v.is_null() { None } else { Some(JsonB(v)) };
    Spi::get_one_with_args::<String>(
        "SELECT tasker.submit_result($1::uuid, $2, $3, $4, $5)",
        &[
            step.into(),
            status.into(),
            arg(result).into(),
            arg(error).into(),
            arg(metadata).into(),
        ],
    )
    .unwrap()
    .unwrap()
}

/// An expression over one step of a task, as text.
pub fn step_field(task: impl std::fmt::Display, name: &str, expr: &str) -> String {
    sql_value::<String>(&format!(
        "SELECT ({expr})::text FROM tasker.workflow_steps WHERE task_uuid = '{task}' AND name = '{name}'"
    ))
    .unwrap_or_default()
}

pub fn task_state(task: impl std::fmt::Display) -> String {
    text(&format!(
        "SELECT state::text FROM tasker.tasks WHERE task_uuid = '{task}'"
    ))
}

/// Every invariant a task must keep, checked against its rows: counters
/// equal the steps by class, complete means all done, terminal means
/// nothing out with workers, the audit trail matches each row's state.
pub fn assert_task_consistent(task: impl std::fmt::Display) {
    let problems = json_of(&format!(
        "SELECT coalesce(jsonb_agg(p), '[]') FROM tests.task_problems('{task}') p"
    ));
    assert_eq!(problems, json!([]), "task {task}");
}
