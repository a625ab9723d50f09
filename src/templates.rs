//! Template registration: validate in Rust, store the canonical definition,
//! create the namespace and its pgmq queue.

use pg_tasker_core::{naming, template, TaskTemplate};
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};

use crate::errors::{err, from_core, internal, ApiResult};

/// `tasker.queue_name(namespace)`: the pgmq queue of a namespace
/// (`tasker_<namespace>_queue`).
#[pg_extern(immutable, parallel_safe)]
fn queue_name(namespace: &str) -> ApiResult<String> {
    naming::queue_name(namespace).map_err(from_core)
}

/// `tasker.register_template(template jsonb) RETURNS uuid`
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn register_template(template: JsonB) -> ApiResult<pgrx::Uuid> {
    let t = template::parse_value_with(template.0, &crate::settings::current().retry)
        .map_err(from_core)?;
    store(&t)
}

/// `tasker.register_template_yaml(template text) RETURNS uuid`; accepts
/// Ruby-style `:key:` symbol keys.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn register_template_yaml(template: &str) -> ApiResult<pgrx::Uuid> {
    let t = template::parse_yaml_with(template, &crate::settings::current().retry)
        .map_err(from_core)?;
    store(&t)
}

/// Creates the namespace (and its queue) if needed, then inserts the
/// template, or returns the existing id when the definition is identical.
fn store(t: &TaskTemplate) -> ApiResult<pgrx::Uuid> {
    let namespace_uuid = ensure_namespace(&t.namespace_name)?;
    // Applications may create tasks through the request queue from now on.
    let requests = crate::settings::current().orchestration.task_requests;
    if requests.enabled {
        crate::maintenance::ensure_request_queue(&requests.queue)?;
    }
    let definition = JsonB(t.to_definition());
    let name = t.name.as_str();
    let version = t.version.as_str();

    // Up to two rounds: a concurrent registration of the same new version
    // makes our INSERT do nothing; the second round then finds its row.
    for _ in 0..2 {
        let existing = Spi::connect(|c| {
            let rows = c.select(
                "SELECT template_uuid, definition = $4 AS same
                   FROM tasker.task_templates
                  WHERE namespace_uuid = $1 AND name = $2 AND version = $3
                    FOR UPDATE",
                Some(1),
                &[
                    namespace_uuid.into(),
                    name.into(),
                    version.into(),
                    JsonB(definition.0.clone()).into(),
                ],
            )?;
            match rows.into_iter().next() {
                None => Ok::<_, pgrx::spi::Error>(None),
                Some(r) => Ok(Some((
                    r.get::<pgrx::Uuid>(1)?.expect("template_uuid is NOT NULL"),
                    r.get::<bool>(2)?.unwrap_or(false),
                ))),
            }
        })
        .map_err(internal)?;

        match existing {
            Some((id, true)) => return Ok(id),
            Some((id, false)) => {
                // Checked after the row lock, in its own statement, so that a
                // task committed by a concurrent create_task is seen.
                let in_use = Spi::get_one_with_args::<bool>(
                    "SELECT EXISTS (SELECT 1 FROM tasker.tasks WHERE template_uuid = $1)",
                    &[id.into()],
                )
                .map_err(internal)?
                .unwrap_or(false);
                if in_use {
                    return Err(err(
                        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!(
                            "template {}/{} version {} is already used by tasks and cannot change",
                            t.namespace_name, name, version
                        ),
                    )
                    .set_hint("register the changed definition under a new version"));
                }
                Spi::run_with_args(
                    "UPDATE tasker.task_templates
                        SET definition = $2, description = $3, updated_at = now()
                      WHERE template_uuid = $1",
                    &[
                        id.into(),
                        JsonB(definition.0.clone()).into(),
                        t.description.clone().into(),
                    ],
                )
                .map_err(internal)?;
                return Ok(id);
            }
            None => {
                let inserted = Spi::get_one_with_args::<pgrx::Uuid>(
                    "INSERT INTO tasker.task_templates (namespace_uuid, name, version, description, definition)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (namespace_uuid, name, version) DO NOTHING
                     RETURNING template_uuid",
                    &[
                        namespace_uuid.into(),
                        name.into(),
                        version.into(),
                        t.description.clone().into(),
                        JsonB(definition.0.clone()).into(),
                    ],
                );
                match inserted {
                    Ok(Some(id)) => return Ok(id),
                    Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => continue,
                    Err(e) => return Err(internal(e)),
                }
            }
        }
    }
    Err(internal(
        "template registration did not settle after a concurrent registration",
    ))
}

/// Returns the namespace's id, creating the namespace row, its pgmq queue and
/// the queue grants for `tasker_worker` the first time.
fn ensure_namespace(ns: &str) -> ApiResult<pgrx::Uuid> {
    let queue = naming::queue_name(ns).map_err(from_core)?;
    let inserted = Spi::get_one_with_args::<pgrx::Uuid>(
        "INSERT INTO tasker.namespaces (name, queue_name) VALUES ($1, $2)
         ON CONFLICT (name) DO NOTHING RETURNING namespace_uuid",
        &[ns.into(), queue.as_str().into()],
    );
    let id = match inserted {
        Ok(Some(id)) => {
            create_queue(&queue)?;
            id
        }
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => Spi::get_one_with_args::<pgrx::Uuid>(
            "SELECT namespace_uuid FROM tasker.namespaces WHERE name = $1",
            &[ns.into()],
        )
        .map_err(internal)?
        .ok_or_else(|| internal("namespace vanished during registration"))?,
        Err(e) => return Err(internal(e)),
    };
    // The queue may have been dropped by hand since; recreate it.
    let exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1)",
        &[queue.as_str().into()],
    )
    .map_err(internal)?
    .unwrap_or(false);
    if !exists {
        create_queue(&queue)?;
    }
    Ok(id)
}

fn create_queue(queue: &str) -> ApiResult<()> {
    // `queue` is `tasker_<validated lowercase identifier>_queue`: safe to
    // splice, but quote it anyway.
    let q = spi::quote_identifier(format!("q_{queue}"));
    let a = spi::quote_identifier(format!("a_{queue}"));
    Spi::run_with_args("SELECT pgmq.create($1)", &[queue.into()]).map_err(internal)?;
    Spi::run(&format!(
        "GRANT SELECT, UPDATE ON pgmq.{q} TO tasker_worker; GRANT SELECT ON pgmq.{a} TO tasker_worker"
    ))
    .map_err(internal)?;
    Ok(())
}
