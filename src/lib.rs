//! pg_tasker: DAG workflow orchestration inside PostgreSQL, on pgmq.
//!
//! This crate is the thin pgrx layer: SQL-callable functions that parse their
//! arguments, call the plain-Rust logic of `pg_tasker_core`, and run SQL
//! through SPI. Tables, views and privileges live in `sql/`.

// Functions return `Result<_, ErrorReport>` so that errors keep their SQLSTATE;
// ErrorReport is large, and errors are the cold path.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod bgworker;
mod errors;
mod guc;
mod health;
mod ids;
mod maintenance;
mod orchestration;
mod settings;
mod spi_util;
mod subxact;
mod tasks;
mod templates;
mod worker_state;

extension_sql_file!(
    "../sql/schema.sql",
    name = "schema",
    requires = [ids::uuid_generate_v7]
);
extension_sql_file!("../sql/views.sql", name = "views", requires = ["schema"]);
extension_sql_file!(
    "../sql/orchestration.sql",
    name = "orchestration",
    requires = ["schema"]
);
extension_sql_file!(
    "../sql/health.sql",
    name = "health_views",
    requires = ["orchestration", health::health]
);
extension_sql_file!(
    "../sql/maintenance.sql",
    name = "maintenance",
    requires = ["orchestration"]
);
extension_sql_file!(
    "../sql/analytics.sql",
    name = "analytics",
    requires = ["schema"]
);
extension_sql_file!("../sql/security.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    // SAFETY: a plain flag set by the postmaster while it loads
    // shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        worker_state::init_shmem();
        bgworker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;
#[cfg(any(test, feature = "pg_test"))]
mod tests_maintenance;
#[cfg(any(test, feature = "pg_test"))]
mod tests_orchestration;

#[cfg(test)]
mod client_bgworker_tests;
#[cfg(test)]
mod client_crash_tests;
#[cfg(test)]
mod client_orchestration_tests;
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
