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

mod errors;
mod guc;
mod ids;
mod orchestration;
mod spi_util;
mod subxact;
mod tasks;
mod templates;

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
extension_sql_file!("../sql/security.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;
#[cfg(any(test, feature = "pg_test"))]
mod tests_orchestration;

#[cfg(test)]
mod client_orchestration_tests;
#[cfg(test)]
mod client_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
