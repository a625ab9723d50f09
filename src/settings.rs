//! The orchestration configuration as this process sees it: loaded from the
//! compiled-in files, or from `pg_tasker.config_dir`, for
//! `pg_tasker.environment`. A file that fails to load is reported and the
//! last good configuration stays in force (the compiled-in defaults when
//! there is none yet).

use std::cell::RefCell;

use pg_tasker_core::config::{self, ConfigError, Loaded, Location, OrchestrationConfig};
use serde_json::{json, Value};

use crate::guc;

struct State {
    /// (config_dir, environment) the current value was loaded for.
    key: (Option<String>, String),
    good: Loaded<OrchestrationConfig>,
    error: Option<ConfigError>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn location(dir: &Option<String>) -> Location {
    match dir {
        Some(d) if !d.is_empty() => Location::Dir(d.into()),
        _ => Location::Embedded,
    }
}

fn defaults(env: &str) -> Loaded<OrchestrationConfig> {
    config::load_orchestration(&Location::Embedded, env, &config::process_env)
        .or_else(|_| {
            config::load_orchestration(&Location::Embedded, "development", &config::process_env)
        })
        .expect("the compiled-in configuration is valid")
}

/// Loads again (after SIGHUP, or when the settings changed). Returns the
/// error, if any; the previous good configuration is kept then.
pub fn reload() -> Option<ConfigError> {
    let key = (guc::config_dir(), guc::environment());
    let loaded = config::load_orchestration(&location(&key.0), &key.1, &config::process_env);
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        match loaded {
            Ok(good) => {
                *s = Some(State {
                    key,
                    good,
                    error: None,
                });
                None
            }
            Err(e) => {
                let good = s
                    .take()
                    .map(|st| st.good)
                    .unwrap_or_else(|| defaults(&key.1));
                *s = Some(State {
                    key,
                    good,
                    error: Some(e.clone()),
                });
                Some(e)
            }
        }
    })
}

/// Runs `f` on the configuration in force, loading it on first use or when
/// the settings that select it (config_dir, environment) changed; never
/// reloads otherwise (the background worker reloads on SIGHUP).
pub fn with_current<R>(f: impl FnOnce(&OrchestrationConfig) -> R) -> R {
    let key = (guc::config_dir(), guc::environment());
    let stale = STATE.with(|s| s.borrow().as_ref().is_none_or(|st| st.key != key));
    if stale {
        if let Some(e) = reload() {
            pgrx::warning!("pg_tasker: invalid configuration, keeping the previous one: {e}");
        }
    }
    STATE.with(|s| f(&s.borrow().as_ref().expect("loaded").good.config))
}

/// A copy of the configuration in force (see `with_current`).
pub fn current() -> OrchestrationConfig {
    with_current(Clone::clone)
}

/// `tasker.config()`'s body: the configuration the files give now (they are
/// read again), its sources, and the error that kept it out, if any.
pub fn describe_fresh() -> Value {
    reload();
    describe()
}

/// The configuration in force, its sources and the last load error,
/// without reading any file (what health() reports).
pub fn describe() -> Value {
    with_current(|_| ());
    STATE.with(|s| {
        let s = s.borrow();
        let st = s.as_ref().expect("loaded");
        let mut v = config::describe(&st.good);
        v["valid"] = json!(st.error.is_none());
        v["error"] = match &st.error {
            None => Value::Null,
            Some(e) => {
                json!({"file": e.file, "key": e.key, "message": e.message, "text": e.to_string()})
            }
        };
        v["config_dir"] = json!(st.key.0);
        v
    })
}
