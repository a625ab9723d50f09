//! Template registration: parse and validate in pg_tasker_core, then store
//! the canonical definition and the steps create_task copies (one set per
//! environment with overrides) through `tasker._store_template`
//! (sql/08_templates.sql).

use pg_tasker_core::{naming, template, version, TaskTemplate};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::errors::{from_core, internal, invalid, ApiResult};

/// `tasker.queue_name(namespace)`: the pgmq queue of a namespace
/// (`tasker_<namespace>_queue`).
#[pg_extern(immutable, parallel_safe)]
fn queue_name(namespace: &str) -> ApiResult<String> {
    naming::queue_name(namespace).map_err(from_core)
}

/// `tasker._register_template(text, format)`: the body of
/// tasker.register_template (format 'json') and register_template_yaml
/// ('yaml').
#[pg_extern]
fn _register_template(template: &str, format: &str) -> ApiResult<pgrx::Uuid> {
    let defaults = crate::settings::with_current(|c| c.retry.clone());
    let t = match format {
        "json" => template::parse_json_with(template, &defaults),
        "yaml" => template::parse_yaml_with(template, &defaults),
        other => return Err(invalid(format!("unknown template format \"{other}\""))),
    }
    .map_err(from_core)?;
    store(&t)
}

/// The rows of `tasker.template_steps` for one environment ('' = none).
fn step_rows(t: &TaskTemplate, environment: &str, out: &mut Vec<Value>) -> ApiResult<()> {
    let steps = if environment.is_empty() {
        t.steps.clone()
    } else {
        t.steps_for_environment(environment).map_err(from_core)?
    };
    let initial = pg_tasker_core::dynamic::Graph::new(&steps).initial();
    for (position, s) in steps.iter().enumerate() {
        out.push(json!({
            "environment": environment,
            "position": position,
            "name": s.name,
            "handler_callable": s.handler.callable,
            "handler_method": s.handler.method,
            "inputs": s.handler.initialization,
            "retryable": s.retry.retryable,
            "max_attempts": s.retry.max_attempts,
            "backoff": s.retry.backoff.as_str(),
            "backoff_base_ms": s.retry.backoff_base_ms,
            "max_backoff_ms": s.retry.max_backoff_ms,
            "jitter": s.retry.jitter,
            "timeout_seconds": s.timeout_seconds,
            "parents": s.dependencies.len(),
            "step_type": s.step_type.as_str(),
            "initial": initial[position],
            "map_over": s.map_over,
            "batch_config": s.batch_config,
        }));
    }
    Ok(())
}

/// What `tasker.template_steps` / `template_edges` hold for a template:
/// (steps of every environment, edges, environments with overrides).
fn materialised(t: &TaskTemplate) -> ApiResult<(Value, Value, Vec<String>)> {
    let environments: Vec<String> = t.environments.keys().cloned().collect();
    let mut steps = Vec::with_capacity(t.steps.len() * (environments.len() + 1));
    step_rows(t, "", &mut steps)?;
    for env in &environments {
        step_rows(t, env, &mut steps)?;
    }
    let position: std::collections::HashMap<&str, usize> = t
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let edges: Vec<Value> = t
        .steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            let position = &position;
            s.dependencies
                .iter()
                .map(move |d| json!({"from_position": position[d.as_str()], "to_position": i}))
        })
        .collect();
    Ok((Value::Array(steps), Value::Array(edges), environments))
}

fn store(t: &TaskTemplate) -> ApiResult<pgrx::Uuid> {
    let requests = crate::settings::with_current(|c| c.orchestration.task_requests.clone());
    if requests.enabled {
        // applications may create tasks through the request queue from now on
        Spi::run_with_args(
            "SELECT tasker._ensure_request_queue($1)",
            &[requests.queue.as_str().into()],
        )
        .map_err(internal)?;
    }
    let (steps, edges, environments) = materialised(t)?;
    let key = version::sort_key(&version::parse(&t.version).map_err(from_core)?);
    Spi::get_one_with_args::<pgrx::Uuid>(
        "SELECT tasker._store_template($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            t.namespace_name.as_str().into(),
            t.name.as_str().into(),
            t.version.as_str().into(),
            key.into(),
            t.description.clone().into(),
            JsonB(t.to_definition()).into(),
            JsonB(steps).into(),
            JsonB(edges).into(),
            environments.into(),
            t.input_schema.is_some().into(),
        ],
    )
    .map_err(internal)?
    .ok_or_else(|| internal("template registration returned no uuid"))
}

/// `tasker._version_key(version) RETURNS bytea`: the byte string that sorts
/// versions in semver precedence (`task_templates.version_key`).
#[pg_extern(immutable, parallel_safe)]
fn _version_key(version: &str) -> ApiResult<Vec<u8>> {
    Ok(version::sort_key(
        &version::parse(version).map_err(from_core)?,
    ))
}

/// A stored template, read back from its canonical definition.
pub(crate) fn load(template_uuid: pgrx::Uuid) -> ApiResult<TaskTemplate> {
    let definition = crate::read::one::<JsonB>(
        "SELECT definition FROM tasker.task_templates WHERE template_uuid = $1",
        &[template_uuid.into()],
    )?
    .ok_or_else(|| internal(format!("template {template_uuid} does not exist")))?;
    TaskTemplate::from_definition(definition.0).map_err(from_core)
}

/// `tasker._materialise_template(template_uuid)`: (re)builds a stored
/// template's rows in template_steps / template_edges from its definition
/// (used by the upgrade from 0.1.0).
#[pg_extern]
fn _materialise_template(template_uuid: pgrx::Uuid) -> ApiResult<()> {
    let t = load(template_uuid)?;
    let (steps, edges, environments) = materialised(&t)?;
    Spi::run_with_args(
        "SELECT tasker._replace_template_rows($1, $2, $3, $4)",
        &[
            template_uuid.into(),
            JsonB(steps).into(),
            JsonB(edges).into(),
            environments.into(),
        ],
    )
    .map_err(internal)
}
