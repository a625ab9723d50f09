//! pg_tasker: DAG workflow orchestration inside PostgreSQL, on pgmq.
//!
//! The state machine and every operation's row work are SQL and PL/pgSQL in
//! `sql/` (numbered by concern, one function per operation). This crate is
//! the thin pgrx layer around it: pure decisions of `pg_tasker_core` exposed
//! to SQL (`decisions`), template registration (`templates`), the pgmq
//! adapter's kept plans (`pgmq`), the background orchestrator (`bgworker`),
//! settings and health.

// Functions return `Result<_, ErrorReport>` so that errors keep their SQLSTATE;
// ErrorReport is large, and errors are the cold path.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod bgworker;
mod caller;
mod decisions;
mod dynamic;
mod errors;
mod guc;
mod health;
mod ids;
mod maintenance;
mod metrics;
mod pgmq;
mod read;
mod relay;
mod settings;
mod subxact;
mod templates;
mod worker_state;

extension_sql_file!("../sql/00_states.sql", name = "states");
extension_sql_file!(
    "../sql/01_pgmq.sql",
    name = "pgmq_adapter",
    requires = ["states"]
);
extension_sql_file!(
    "../sql/02_tables.sql",
    name = "tables",
    requires = [
        "pgmq_adapter",
        ids::uuid_generate_v7,
        decisions::_step_row_check,
        decisions::_task_row_check
    ]
);
extension_sql_file!(
    "../sql/03_privileges.sql",
    name = "privileges",
    requires = [
        "tables",
        caller::_caller,
        caller::_caller_holds_all,
        caller::_caller_namespaces,
        caller::_grants_changed,
        caller::_privileges_including
    ]
);
extension_sql_file!(
    "../sql/04_transitions.sql",
    name = "transitions",
    requires = ["privileges"]
);
extension_sql_file!(
    "../sql/05_payloads.sql",
    name = "payloads",
    requires = ["transitions"]
);
extension_sql_file!(
    "../sql/06_enqueue.sql",
    name = "enqueue",
    requires = ["payloads", pgmq::_pgmq_send]
);
extension_sql_file!(
    "../sql/07_evaluate.sql",
    name = "evaluate",
    requires = ["enqueue", decisions::_task_status]
);
extension_sql_file!(
    "../sql/08_templates.sql",
    name = "templates",
    requires = [
        "evaluate",
        templates::_register_template,
        templates::queue_name
    ]
);
extension_sql_file!(
    "../sql/09_tasks.sql",
    name = "tasks",
    requires = ["templates"]
);
extension_sql_file!(
    "../sql/10_results.sql",
    name = "results",
    requires = ["tasks"]
);
extension_sql_file!(
    "../sql/11_workers.sql",
    name = "workers",
    requires = ["results", ids::_uuid_or_null]
);
extension_sql_file!(
    "../sql/12_operator.sql",
    name = "operator",
    requires = ["workers"]
);
extension_sql_file!(
    "../sql/13_cycle.sql",
    name = "cycle",
    requires = ["operator"]
);
extension_sql_file!(
    "../sql/14_maintenance.sql",
    name = "maintenance",
    requires = ["cycle"]
);
extension_sql_file!(
    "../sql/15_views.sql",
    name = "views",
    requires = ["maintenance"]
);
extension_sql_file!(
    "../sql/16_health.sql",
    name = "health_views",
    requires = ["views", health::health]
);
extension_sql_file!(
    "../sql/17_analytics.sql",
    name = "analytics",
    requires = ["health_views"]
);
extension_sql_file!(
    "../sql/18_dynamic.sql",
    name = "dynamic",
    requires = [
        "analytics",
        dynamic::_plan_steps,
        dynamic::_map_element_name
    ]
);
extension_sql_file!(
    "../sql/98_plans.sql",
    name = "plans",
    requires = ["dynamic"]
);
extension_sql_file!("../sql/99_security.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain flag set by the postmaster while it loads
    // shared_preload_libraries.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    guc::init(preloading);
    if preloading {
        worker_state::init_shmem();
        bgworker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

#[cfg(test)]
mod client_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// The test cluster runs the orchestrator, as a production one would.
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_tasker'",
            "pg_tasker.database = 'pgrx_tests'",
            "pg_tasker.environment = 'test'",
        ]
    }
}
