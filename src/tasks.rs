//! Task creation: resolve the template, validate the request, and insert the
//! task, its steps, edges and first transitions in one statement, inside the
//! caller's transaction.

use std::collections::HashMap;

use pg_tasker_core::request::TaskRequest;
use pg_tasker_core::{template::TaskTemplate, version};
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::{json, Value};

use crate::errors::{err, from_core, internal, invalid, null_arg, undefined, ApiResult};
use crate::{guc, ids};

pub const MIN_PRIORITY: i32 = -100;
pub const MAX_PRIORITY: i32 = 100;

/// `tasker.create_task(...) RETURNS uuid`
#[allow(clippy::too_many_arguments)]
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn create_task(
    namespace: Option<&str>,
    name: Option<&str>,
    context: default!(Option<JsonB>, "'{}'"),
    version: default!(Option<&str>, "NULL"),
    priority: default!(Option<i32>, 0),
    initiator: default!(Option<&str>, "NULL"),
    source_system: default!(Option<&str>, "NULL"),
    reason: default!(Option<&str>, "NULL"),
    tags: default!(Option<Vec<Option<String>>>, "'{}'"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> ApiResult<pgrx::Uuid> {
    let request = TaskRequest {
        namespace: namespace.ok_or_else(|| null_arg("namespace"))?.to_string(),
        name: name.ok_or_else(|| null_arg("name"))?.to_string(),
        context: context.map(|j| j.0),
        version: version.map(str::to_string),
        priority,
        initiator: initiator.map(str::to_string),
        source_system: source_system.map(str::to_string),
        reason: reason.map(str::to_string),
        tags: Some(
            tags.unwrap_or_default()
                .into_iter()
                .map(|t| t.ok_or_else(|| null_arg("an element of tags")))
                .collect::<ApiResult<_>>()?,
        ),
        idempotency_key: idempotency_key.map(str::to_string),
    };
    create(&request)
}

/// Creates a task from a request (create_task's body, also used for the
/// task request queue).
pub fn create(request: &TaskRequest) -> ApiResult<pgrx::Uuid> {
    let namespace = request.namespace.as_str();
    let name = request.name.as_str();
    let version = request.version.as_deref();
    let (initiator, source_system, reason) = (
        request.initiator.as_deref(),
        request.source_system.as_deref(),
        request.reason.as_deref(),
    );
    let idempotency_key = request.idempotency_key.as_deref();
    let tags = request.tags.clone().unwrap_or_default();
    let context = request.context.clone().unwrap_or_else(|| json!({}));
    if !context.is_object() {
        return Err(invalid(format!(
            "task context must be a JSON object, got {context}"
        )));
    }
    let priority = request.priority.unwrap_or(0);
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(invalid(format!(
            "priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {priority}"
        )));
    }
    if idempotency_key == Some("") {
        return Err(invalid(
            "idempotency_key must not be empty (use NULL for none)",
        ));
    }

    let (template_uuid, template) = resolve_template(namespace, name, version)?;
    template.validate_context(&context).map_err(from_core)?;
    let steps = template
        .steps_for_environment(&guc::environment())
        .map_err(from_core)?;

    // Ids are made here so that edges can be built without a round trip.
    let step_ids: HashMap<&str, pgrx::Uuid> = steps
        .iter()
        .map(|s| (s.name.as_str(), ids::new_v7()))
        .collect();
    let step_rows: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(position, s)| {
            json!({
                "step_uuid": step_ids[s.name.as_str()].to_string(),
                "name": s.name,
                "position": position,
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
            })
        })
        .collect();
    let mut edge_rows: Vec<Value> = Vec::new();
    for s in &steps {
        let child = step_ids[s.name.as_str()].to_string();
        for d in &s.dependencies {
            edge_rows.push(json!({"parent": step_ids[d.as_str()].to_string(), "child": child}));
        }
    }

    let task_uuid = ids::new_v7();
    let created = Spi::get_one_with_args::<pgrx::Uuid>(
        include_str!("../sql/queries/create_task.sql"),
        &[
            task_uuid.into(),
            template_uuid.into(),
            template.namespace_name.as_str().into(),
            template.name.as_str().into(),
            template.version.as_str().into(),
            JsonB(context).into(),
            priority.into(),
            initiator.into(),
            source_system.into(),
            reason.into(),
            tags.into(),
            idempotency_key.into(),
            (steps.len() as i32).into(),
            JsonB(Value::Array(step_rows)).into(),
            JsonB(Value::Array(edge_rows)).into(),
        ],
    );
    match created {
        Ok(Some(id)) => {
            // Root steps go to the queue now, in the caller's transaction.
            crate::orchestration::refresh_task(
                uuid::Uuid::from_bytes(*id.as_bytes()),
                "task created",
            )?;
            Ok(id)
        }
        // Nothing inserted: the idempotency key already names a task.
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => Spi::get_one_with_args::<pgrx::Uuid>(
            "SELECT task_uuid FROM tasker.tasks
              WHERE namespace_name = $1 AND task_name = $2 AND idempotency_key = $3",
            &[
                template.namespace_name.as_str().into(),
                template.name.as_str().into(),
                idempotency_key.into(),
            ],
        )
        .map_err(internal)?
        .ok_or_else(|| internal("idempotent task vanished")),
        Err(e) => Err(internal(e)),
    }
}

/// Finds the template: an exact (canonical) version, or the highest version
/// in semver order when `version` is NULL.
fn resolve_template(
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> ApiResult<(pgrx::Uuid, TaskTemplate)> {
    let known_ns = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM tasker.namespaces WHERE name = $1)",
        &[namespace.into()],
    )
    .map_err(internal)?
    .unwrap_or(false);
    if !known_ns {
        return Err(
            undefined(format!("namespace \"{namespace}\" does not exist"))
                .set_hint("register a template in this namespace first"),
        );
    }
    let versions: Vec<(pgrx::Uuid, String)> = Spi::connect(|c| {
        c.select(
            "SELECT tt.template_uuid, tt.version
               FROM tasker.task_templates tt JOIN tasker.namespaces n USING (namespace_uuid)
              WHERE n.name = $1 AND tt.name = $2",
            None,
            &[namespace.into(), name.into()],
        )?
        .map(|r| {
            Ok((
                r.get::<pgrx::Uuid>(1)?.expect("not null"),
                r.get::<String>(2)?.expect("not null"),
            ))
        })
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .map_err(internal)?;
    if versions.is_empty() {
        return Err(undefined(format!(
            "task template \"{namespace}/{name}\" does not exist"
        )));
    }
    let wanted = match version {
        None => version::latest(versions.iter().map(|(_, v)| v.as_str()))
            .ok_or_else(|| internal("no parsable template version"))?
            .to_string(),
        Some(v) => version::parse(v).map_err(from_core)?.to_string(),
    };
    let Some((id, _)) = versions.iter().find(|(_, v)| *v == wanted) else {
        let mut known: Vec<&str> = versions.iter().map(|(_, v)| v.as_str()).collect();
        known.sort();
        return Err(err(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("task template \"{namespace}/{name}\" has no version {wanted}"),
        )
        .set_hint(format!("registered versions: {}", known.join(", "))));
    };
    let definition = Spi::get_one_with_args::<JsonB>(
        "SELECT definition FROM tasker.task_templates WHERE template_uuid = $1",
        &[(*id).into()],
    )
    .map_err(internal)?
    .ok_or_else(|| internal("template definition missing"))?;
    let template = TaskTemplate::from_definition(definition.0).map_err(from_core)?;
    Ok((*id, template))
}
