//! Configuration: TOML files with `{common, orchestration, worker}` contexts
//! and environment overlays (tasker-core's layout, seeds 000/001).
//!
//! ```text
//! config/tasker/base/{common,orchestration,worker}.toml          compiled in as defaults
//! config/tasker/environments/<env>/{common,orchestration,worker}.toml   overlays
//! ```
//! A context reads `common` then its own file; each file is its base then the
//! environment's overlay. Tables merge deeply (siblings survive), scalars and
//! arrays are replaced. `${VAR}` and `${VAR:-default}` are substituted from the
//! process environment before parsing. Unknown keys, wrong types and values
//! out of range are errors that name the file and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Files compiled into the binary: the defaults.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "base/common.toml",
        include_str!("../../../../config/tasker/base/common.toml"),
    ),
    (
        "base/orchestration.toml",
        include_str!("../../../../config/tasker/base/orchestration.toml"),
    ),
    (
        "base/worker.toml",
        include_str!("../../../../config/tasker/base/worker.toml"),
    ),
    (
        "environments/test/orchestration.toml",
        include_str!("../../../../config/tasker/environments/test/orchestration.toml"),
    ),
    (
        "environments/test/worker.toml",
        include_str!("../../../../config/tasker/environments/test/worker.toml"),
    ),
    (
        "environments/development/orchestration.toml",
        include_str!("../../../../config/tasker/environments/development/orchestration.toml"),
    ),
    (
        "environments/production/orchestration.toml",
        include_str!("../../../../config/tasker/environments/production/orchestration.toml"),
    ),
    (
        "environments/production/worker.toml",
        include_str!("../../../../config/tasker/environments/production/worker.toml"),
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Orchestration,
    Worker,
}

impl Context {
    fn files(self) -> [&'static str; 2] {
        match self {
            Context::Orchestration => ["common", "orchestration"],
            Context::Worker => ["common", "worker"],
        }
    }
}

// ---------------------------------------------------------------------------
// Typed configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesConfig {
    pub default_visibility_timeout_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestrationSection {
    pub cycle_interval_ms: u64,
    pub batch_size: u32,
    pub failed_task_backoff_seconds: u32,
    pub recovery: RecoveryConfig,
    pub staleness: StalenessConfig,
    pub retention: RetentionConfig,
    pub task_requests: TaskRequestsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryConfig {
    pub enabled: bool,
    pub interval_seconds: u32,
    pub batch_size: u32,
    /// Deliveries of one attempt's message without a result (each ending
    /// with its lease) after which the attempt counts as lost.
    pub max_deliveries: u32,
}

/// Size limits of user payloads (54000 above them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `create_task` context, in bytes (as stored).
    pub max_context_bytes: u64,
    /// A step's result or error, in bytes (as stored).
    pub max_result_bytes: u64,
    /// Steps one decision may ask for.
    pub max_steps_per_decision: u32,
    /// Workers one batchable step may create.
    pub max_batch_workers: u32,
    /// Elements one map step may have.
    pub max_map_elements: u32,
}

/// Staleness thresholds; the same keys may appear in a template's `lifecycle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StalenessConfig {
    pub enabled: bool,
    pub interval_seconds: u32,
    pub batch_size: u32,
    pub steps_in_process_minutes: f64,
    pub waiting_for_dependencies_minutes: f64,
    pub waiting_for_retry_minutes: f64,
    pub blocked_by_failures_minutes: f64,
    pub task_max_lifetime_hours: f64,
    pub transition_to_error: bool,
    pub move_to_dlq: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionPolicy {
    Delete,
    Archive,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub enabled: bool,
    pub interval_seconds: u32,
    pub retention_days: f64,
    pub policy: RetentionPolicy,
    pub states: Vec<String>,
    pub batch_size: u32,
    pub queue_archive_retention_days: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequestsConfig {
    pub enabled: bool,
    pub queue: String,
    pub batch_size: u32,
    pub visibility_timeout_seconds: u32,
}

/// The keys a template's `lifecycle` section may set (staleness overrides).
pub const LIFECYCLE_KEYS: [&str; 5] = [
    "steps_in_process_minutes",
    "waiting_for_dependencies_minutes",
    "waiting_for_retry_minutes",
    "blocked_by_failures_minutes",
    "task_max_lifetime_hours",
];

/// The largest value of each lifecycle key (10 years), so that no threshold
/// can overflow a timestamp computation. `None` for an unknown key.
pub fn lifecycle_max(key: &str) -> Option<f64> {
    match key {
        "task_max_lifetime_hours" => Some(87_600.0),
        k if LIFECYCLE_KEYS.contains(&k) => Some(5_256_000.0),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub namespaces: Vec<String>,
    pub batch_size: u32,
    pub concurrency: u32,
    pub poll_interval_ms: u64,
    pub visibility_timeout_seconds: u32,
    pub shutdown_timeout_seconds: u32,
    pub web: WorkerWebSection,
}

/// The worker web API (`/health`, `/health/ready`, `/health/live`,
/// `/metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerWebSection {
    pub enabled: bool,
    /// host:port to listen on.
    pub bind_address: String,
}

/// The orchestration context: common + orchestration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestrationConfig {
    pub database: DatabaseConfig,
    pub queues: QueuesConfig,
    pub retry: crate::template::RetryPolicy,
    pub limits: LimitsConfig,
    pub orchestration: OrchestrationSection,
}

/// The worker context: common + worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub database: DatabaseConfig,
    pub queues: QueuesConfig,
    pub retry: crate::template::RetryPolicy,
    pub limits: LimitsConfig,
    pub worker: WorkerSection,
}

/// Range checks after typing: (key, problem) pairs.
pub trait Validate {
    fn problems(&self) -> Vec<(&'static str, String)>;
}

fn in_range(out: &mut Vec<(&'static str, String)>, key: &'static str, v: u64, lo: u64, hi: u64) {
    if v < lo || v > hi {
        out.push((key, format!("must be between {lo} and {hi}, got {v}")));
    }
}

fn common_problems(
    out: &mut Vec<(&'static str, String)>,
    queues: &QueuesConfig,
    retry: &crate::template::RetryPolicy,
    limits: &LimitsConfig,
) {
    // jsonb values are at most 255 MB
    in_range(
        out,
        "limits.max_context_bytes",
        limits.max_context_bytes,
        1024,
        255 << 20,
    );
    in_range(
        out,
        "limits.max_result_bytes",
        limits.max_result_bytes,
        1024,
        255 << 20,
    );
    for (key, v) in [
        (
            "limits.max_steps_per_decision",
            limits.max_steps_per_decision,
        ),
        ("limits.max_batch_workers", limits.max_batch_workers),
        ("limits.max_map_elements", limits.max_map_elements),
    ] {
        in_range(out, key, v as u64, 1, 1_000_000);
    }
    in_range(
        out,
        "retry.max_attempts",
        retry.max_attempts as u64,
        1,
        crate::template::MAX_MAX_ATTEMPTS as u64,
    );
    in_range(
        out,
        "retry.backoff_base_ms",
        retry.backoff_base_ms,
        0,
        crate::template::MAX_BACKOFF_LIMIT_MS,
    );
    in_range(
        out,
        "retry.max_backoff_ms",
        retry.max_backoff_ms,
        retry.backoff_base_ms,
        crate::template::MAX_BACKOFF_LIMIT_MS,
    );
    in_range(
        out,
        "queues.default_visibility_timeout_seconds",
        queues.default_visibility_timeout_seconds as u64,
        1,
        86_400,
    );
}

impl Validate for OrchestrationConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        common_problems(&mut out, &self.queues, &self.retry, &self.limits);
        let o = &self.orchestration;
        in_range(
            &mut out,
            "orchestration.cycle_interval_ms",
            o.cycle_interval_ms,
            10,
            3_600_000,
        );
        in_range(
            &mut out,
            "orchestration.batch_size",
            o.batch_size as u64,
            1,
            10_000,
        );
        in_range(
            &mut out,
            "orchestration.failed_task_backoff_seconds",
            o.failed_task_backoff_seconds as u64,
            0,
            86_400,
        );
        maintenance_problems(&mut out, o);
        out
    }
}

fn maintenance_problems(out: &mut Vec<(&'static str, String)>, o: &OrchestrationSection) {
    in_range(
        out,
        "orchestration.recovery.interval_seconds",
        o.recovery.interval_seconds as u64,
        1,
        86_400,
    );
    in_range(
        out,
        "orchestration.recovery.batch_size",
        o.recovery.batch_size as u64,
        1,
        10_000,
    );
    in_range(
        out,
        "orchestration.recovery.max_deliveries",
        o.recovery.max_deliveries as u64,
        1,
        1_000,
    );
    let st = &o.staleness;
    in_range(
        out,
        "orchestration.staleness.interval_seconds",
        st.interval_seconds as u64,
        1,
        86_400,
    );
    in_range(
        out,
        "orchestration.staleness.batch_size",
        st.batch_size as u64,
        1,
        10_000,
    );
    for (key, v) in [
        (
            "orchestration.staleness.steps_in_process_minutes",
            st.steps_in_process_minutes,
        ),
        (
            "orchestration.staleness.waiting_for_dependencies_minutes",
            st.waiting_for_dependencies_minutes,
        ),
        (
            "orchestration.staleness.waiting_for_retry_minutes",
            st.waiting_for_retry_minutes,
        ),
        (
            "orchestration.staleness.blocked_by_failures_minutes",
            st.blocked_by_failures_minutes,
        ),
        (
            "orchestration.staleness.task_max_lifetime_hours",
            st.task_max_lifetime_hours,
        ),
        (
            "orchestration.retention.retention_days",
            o.retention.retention_days,
        ),
        (
            "orchestration.retention.queue_archive_retention_days",
            o.retention.queue_archive_retention_days,
        ),
    ] {
        let max = key
            .rsplit('.')
            .next()
            .and_then(lifecycle_max)
            .unwrap_or(36_500.0);
        if !(v.is_finite() && v > 0.0 && v <= max) {
            out.push((
                key,
                format!("must be a positive number of at most {max}, got {v}"),
            ));
        }
    }
    let r = &o.retention;
    in_range(
        out,
        "orchestration.retention.interval_seconds",
        r.interval_seconds as u64,
        1,
        604_800,
    );
    in_range(
        out,
        "orchestration.retention.batch_size",
        r.batch_size as u64,
        1,
        100_000,
    );
    for state in &r.states {
        if !crate::TaskState::parse(state).is_some_and(crate::TaskState::is_terminal) {
            let finished: Vec<&str> = crate::TaskState::ALL
                .iter()
                .filter(|s| s.is_terminal())
                .map(|s| s.as_str())
                .collect();
            out.push((
                "orchestration.retention.states",
                format!(
                    "\"{state}\" is not a finished state ({})",
                    finished.join(", ")
                ),
            ));
        }
    }
    let q = &o.task_requests;
    in_range(
        out,
        "orchestration.task_requests.batch_size",
        q.batch_size as u64,
        1,
        1000,
    );
    in_range(
        out,
        "orchestration.task_requests.visibility_timeout_seconds",
        q.visibility_timeout_seconds as u64,
        1,
        86_400,
    );
    let name_ok = q.queue.len() <= crate::naming::PGMQ_MAX_QUEUE_NAME
        && q.queue
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
        && q.queue
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let namespace_like = q.queue.starts_with(crate::naming::QUEUE_PREFIX)
        && q.queue.ends_with(crate::naming::QUEUE_SUFFIX);
    if !name_ok || namespace_like {
        out.push((
            "orchestration.task_requests.queue",
            format!(
                "\"{}\" is not a usable queue name (a lowercase identifier of at most 47 characters, not of the namespace pattern tasker_*_queue)",
                q.queue
            ),
        ));
    }
}

impl Validate for WorkerConfig {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        common_problems(&mut out, &self.queues, &self.retry, &self.limits);
        let w = &self.worker;
        in_range(&mut out, "worker.batch_size", w.batch_size as u64, 1, 1000);
        in_range(
            &mut out,
            "worker.concurrency",
            w.concurrency as u64,
            1,
            10_000,
        );
        in_range(
            &mut out,
            "worker.poll_interval_ms",
            w.poll_interval_ms,
            1,
            600_000,
        );
        in_range(
            &mut out,
            "worker.visibility_timeout_seconds",
            w.visibility_timeout_seconds as u64,
            1,
            86_400,
        );
        in_range(
            &mut out,
            "worker.shutdown_timeout_seconds",
            w.shutdown_timeout_seconds as u64,
            0,
            3_600,
        );
        if w.web.bind_address.parse::<std::net::SocketAddr>().is_err() {
            out.push((
                "worker.web.bind_address",
                format!(
                    "must be an address and port such as 0.0.0.0:8081, got \"{}\"",
                    w.web.bind_address
                ),
            ));
        }
        for ns in &w.namespaces {
            if crate::naming::validate_namespace(ns).is_err() {
                out.push(("worker.namespaces", format!("invalid namespace \"{ns}\"")));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault (`embedded:base/common.toml` for compiled-in files).
    pub file: String,
    /// The dotted key at fault, when there is one.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}: {k}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A loaded configuration with where it came from.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub config: T,
    pub environment: String,
    /// Files applied, in order.
    pub files: Vec<String>,
    /// For every leaf key, the file that set it last.
    pub key_sources: BTreeMap<String, String>,
}

/// Where the files are: compiled-in defaults, or a directory laid out like
/// `config/tasker` (missing files there fall back to the compiled-in base;
/// environment overlays come only from the directory).
#[derive(Debug, Clone)]
pub enum Location {
    Embedded,
    Dir(PathBuf),
}

pub fn load_orchestration(
    location: &Location,
    env: &str,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded<OrchestrationConfig>, ConfigError> {
    load(Context::Orchestration, location, env, vars)
}

pub fn load_worker(
    location: &Location,
    env: &str,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded<WorkerConfig>, ConfigError> {
    load(Context::Worker, location, env, vars)
}

/// The process environment, for `vars`.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn load<T: DeserializeOwned + Validate>(
    ctx: Context,
    location: &Location,
    env: &str,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded<T>, ConfigError> {
    let env_ok = !env.is_empty()
        && env.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && env
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !env_ok {
        return Err(ConfigError {
            file: "pg_tasker.environment".into(),
            key: None,
            message: format!(
                "invalid environment name \"{env}\" (lowercase letters, digits, _ and -)"
            ),
        });
    }
    let mut merged = toml::Table::new();
    let mut key_sources = BTreeMap::new();
    let mut files = Vec::new();
    for name in ctx.files() {
        let base = format!("base/{name}.toml");
        let overlay = format!("environments/{env}/{name}.toml");
        let mut layers = Vec::new();
        match location {
            Location::Embedded => {
                layers.push(embedded(&base).expect("base files are compiled in"));
                if let Some(l) = embedded(&overlay) {
                    layers.push(l);
                }
            }
            Location::Dir(dir) => {
                layers.push(
                    read_file(dir, &base)?.unwrap_or_else(|| embedded(&base).expect("compiled in")),
                );
                if let Some(l) = read_file(dir, &overlay)? {
                    layers.push(l);
                }
            }
        }
        for (label, text) in layers {
            let text = substitute(&text, vars).map_err(|message| ConfigError {
                file: label.clone(),
                key: None,
                message,
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError {
                file: label.clone(),
                key: None,
                message: format!("invalid TOML: {}", e.message()),
            })?;
            record_sources(&table, "", &label, &mut key_sources);
            deep_merge(&mut merged, table);
            files.push(label);
        }
    }
    let source_of = |key: &str| -> String {
        key_sources
            .get(key)
            .cloned()
            .or_else(|| {
                key_sources
                    .iter()
                    .find(|(k, _)| k.starts_with(&format!("{key}.")))
                    .map(|(_, f)| f.clone())
            })
            .unwrap_or_else(|| files.last().cloned().unwrap_or_default())
    };
    let config: T = serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner.lines().next().unwrap_or_default().to_string();
        // The path includes an unknown field itself; "." is the root.
        let key = match (path.as_str(), inner.split('`').nth(1)) {
            ("." | "", Some(field)) => field.to_string(),
            _ => path,
        };
        ConfigError {
            file: source_of(&key),
            key: Some(key),
            message: inner,
        }
    })?;
    if let Some((key, message)) = config.problems().into_iter().next() {
        return Err(ConfigError {
            file: source_of(key),
            key: Some(key.to_string()),
            message,
        });
    }
    Ok(Loaded {
        config,
        environment: env.to_string(),
        files,
        key_sources,
    })
}

/// The environments a configuration location knows: those with overlay
/// files compiled in, and (for a directory) those with an
/// `environments/<env>/` directory. Sorted, without duplicates.
pub fn known_environments(location: &Location) -> Vec<String> {
    let mut known: Vec<String> = EMBEDDED
        .iter()
        .filter_map(|(p, _)| p.strip_prefix("environments/")?.split_once('/'))
        .map(|(env, _)| env.to_string())
        .collect();
    if let Location::Dir(dir) = location {
        if let Ok(entries) = std::fs::read_dir(dir.join("environments")) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    known.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    known.sort();
    known.dedup();
    known
}

fn embedded(rel: &str) -> Option<(String, String)> {
    EMBEDDED
        .iter()
        .find(|(p, _)| *p == rel)
        .map(|(p, t)| (format!("embedded:{p}"), t.to_string()))
}

fn read_file(dir: &Path, rel: &str) -> Result<Option<(String, String)>, ConfigError> {
    let path = dir.join(rel);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some((path.display().to_string(), t))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError {
            file: path.display().to_string(),
            key: None,
            message: format!("cannot read: {e}"),
        }),
    }
}

/// `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
fn substitute(text: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${ in a value".to_string())?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable reference ${{{expr}}}"));
            }
            // An empty variable counts as unset when there is a default.
            let value = vars(name).filter(|v| !v.is_empty() || default.is_none());
            match (value, default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set and ${{{name}}} has no default"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn record_sources(
    table: &toml::Table,
    prefix: &str,
    file: &str,
    out: &mut BTreeMap<String, String>,
) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => record_sources(t, &key, file, out),
            _ => {
                out.insert(key, file.to_string());
            }
        }
    }
}

/// Tables merge recursively; anything else in `overlay` replaces `base`.
pub fn deep_merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The effective configuration as JSON, secrets redacted, with sources.
pub fn describe<T: Serialize>(loaded: &Loaded<T>) -> Value {
    let mut config = serde_json::to_value(&loaded.config).expect("config serializes");
    redact(&mut config);
    serde_json::json!({
        "environment": loaded.environment,
        "files": loaded.files,
        "config": config,
        "sources": loaded.key_sources,
    })
}

fn redact(v: &mut Value) {
    if let Value::Object(m) = v {
        for (k, val) in m.iter_mut() {
            let lk = k.to_ascii_lowercase();
            if ["password", "secret", "token"]
                .iter()
                .any(|s| lk.contains(s))
            {
                *val = Value::String("***".into());
            } else if let Value::String(s) = val {
                if let Some(r) = redact_url(s) {
                    *s = r;
                }
            } else {
                redact(val);
            }
        }
    }
}

/// `scheme://user:password@host` → `scheme://user:***@host`.
fn redact_url(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let (auth, host) = rest.split_once('@')?;
    let (user, _) = auth.split_once(':')?;
    Some(format!("{scheme}://{user}:***@{host}"))
}

#[cfg(test)]
mod tests;
