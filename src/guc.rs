//! Settings (GUCs) under the `pg_tasker.` prefix.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Environment whose template overrides (`environments.<env>`) apply.
pub static ENVIRONMENT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"development"));

/// Database the background worker connects to (postmaster start only).
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Turns the background worker's work off and on without a restart.
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Whether task events go through the orchestrator (crate::relay).
pub static RELAY_NOTIFICATIONS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Read in SQL (tasker._one_statement_results), not here.
pub static ONE_STATEMENT_RESULTS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Directory laid out like config/tasker; unset: the compiled-in files.
pub static CONFIG_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Defines the settings. `preloading`: the library is being loaded through
/// shared_preload_libraries; only then may the postmaster-only setting
/// (which database the background worker serves) be defined: loading the
/// library later, in a backend, must not (Postgres refuses with FATAL).
pub fn init(preloading: bool) {
    if preloading {
        GucRegistry::define_string_guc(
            c"pg_tasker.database",
            c"Database the pg_tasker background worker connects to.",
            c"The orchestrator serves the pg_tasker extension installed in this database.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_bool_guc(
        c"pg_tasker.enabled",
        c"Whether the pg_tasker background worker does any work.",
        c"When off, the worker keeps running but performs no orchestration.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tasker.relay_notifications",
        c"Whether task events are sent by the background worker after commit.",
        c"When off, a transaction NOTIFYs its task events itself (strict commit order, a cluster-wide lock at commit).",
        &RELAY_NOTIFICATIONS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tasker.one_statement_results",
        c"Whether common successes are applied in one statement.",
        c"A success whose step's children have no other parent is applied by tasker._complete_alone; off: every result goes the general way (the same rows, slower).",
        &ONE_STATEMENT_RESULTS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_tasker.config_dir",
        c"Directory with pg_tasker TOML configuration (base/, environments/<env>/).",
        c"Unset: the configuration files compiled into the extension.",
        &CONFIG_DIR,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_tasker.environment",
        c"Environment name (test, development, production, ...).",
        c"Selects the template overrides under environments.<name> applied by create_task, and the configuration overlays under config_dir/environments/<name>.",
        &ENVIRONMENT,
        // it changes what create_task builds: set by superusers and the
        // server's configuration only
        GucContext::Suset,
        GucFlags::default(),
    );
}

pub fn database() -> String {
    DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".into())
}

pub fn config_dir() -> Option<String> {
    CONFIG_DIR
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

pub fn environment() -> String {
    ENVIRONMENT
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "development".to_string())
}
