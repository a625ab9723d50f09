//! Maintenance jobs with the configuration in force: the row work is in
//! sql/14_maintenance.sql; this module hands each job its settings. Run by
//! the background worker on its intervals and by `tasker.run_maintenance()`.

use pg_tasker_core::config::{OrchestrationSection, RetentionPolicy};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::errors::{internal, invalid, null_arg, ApiResult};

pub const JOBS: [&str; 4] = ["recovery", "staleness", "retention", "task_requests"];

fn json(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> ApiResult<Value> {
    Ok(Spi::get_one_with_args::<JsonB>(sql, args)
        .map_err(internal)?
        .map(|j| j.0)
        .unwrap_or_default())
}

/// Runs one job now, regardless of its `enabled` flag and interval.
pub fn run_job(job: &str, o: &OrchestrationSection) -> ApiResult<Value> {
    match job {
        "recovery" => json(
            "SELECT tasker._recover_attempts($1, $2)",
            &[
                (o.recovery.max_deliveries as i32).into(),
                (o.recovery.batch_size as i32).into(),
            ],
        ),
        "staleness" => {
            let st = &o.staleness;
            json(
                "SELECT tasker._detect_stale($1::numeric, $2::numeric, $3::numeric, $4::numeric, $5::numeric, $6, $7, $8)",
                &[
                    st.steps_in_process_minutes.into(),
                    st.waiting_for_dependencies_minutes.into(),
                    st.waiting_for_retry_minutes.into(),
                    st.blocked_by_failures_minutes.into(),
                    st.task_max_lifetime_hours.into(),
                    st.transition_to_error.into(),
                    st.move_to_dlq.into(),
                    (st.batch_size as i32).into(),
                ],
            )
        }
        "retention" => {
            let r = &o.retention;
            json(
                "SELECT tasker._apply_retention($1::text[]::tasker.task_state[], $2::numeric, $3, $4, $5::numeric, $6)",
                &[
                    r.states.clone().into(),
                    r.retention_days.into(),
                    (r.batch_size as i32).into(),
                    (r.policy == RetentionPolicy::Archive).into(),
                    r.queue_archive_retention_days.into(),
                    o.task_requests.queue.as_str().into(),
                ],
            )
        }
        "task_requests" => {
            let q = &o.task_requests;
            json(
                "SELECT tasker._ingest_requests($1, $2, $3)",
                &[
                    q.queue.as_str().into(),
                    (q.visibility_timeout_seconds as i32).into(),
                    (q.batch_size as i32).into(),
                ],
            )
        }
        other => Err(invalid(format!("unknown maintenance job \"{other}\""))
            .set_hint(format!("jobs: {}", JOBS.join(", ")))),
    }
}

/// `tasker.run_maintenance(jobs text[] DEFAULT NULL) RETURNS jsonb`: runs the
/// given maintenance jobs (all when NULL) now, with the configuration in
/// force; what the background worker does on its own schedule.
#[pg_extern(security_definer)]
#[search_path(@extschema@, pg_catalog, pg_temp)]
fn run_maintenance(jobs: default!(Option<Vec<Option<String>>>, "NULL")) -> ApiResult<JsonB> {
    let o = crate::settings::current().orchestration;
    let jobs: Vec<String> = match jobs {
        None => JOBS.iter().map(|s| s.to_string()).collect(),
        Some(list) => list
            .into_iter()
            .map(|j| j.ok_or_else(|| null_arg("a job name")))
            .collect::<ApiResult<_>>()?,
    };
    let mut out = serde_json::Map::new();
    for job in jobs {
        let v = run_job(&job, &o)?;
        out.insert(job, v);
    }
    Ok(JsonB(Value::Object(out)))
}
