//! Settings (GUCs) under the `pg_tasker.` prefix.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Environment whose template overrides (`environments.<env>`) apply.
pub static ENVIRONMENT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"development"));

pub fn init() {
    GucRegistry::define_string_guc(
        c"pg_tasker.environment",
        c"Environment name (test, development, production, ...).",
        c"Selects the template overrides under environments.<name> applied by create_task.",
        &ENVIRONMENT,
        GucContext::Userset,
        GucFlags::default(),
    );
}

pub fn environment() -> String {
    ENVIRONMENT
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "development".to_string())
}
