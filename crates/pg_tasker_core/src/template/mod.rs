//! Task templates: parsing (JSON or YAML, including Ruby-style `:key:` symbol
//! keys), validation and the canonical form stored in the database.
//!
//! The accepted format is tasker-core's: `name`, `namespace_name` (alias
//! `namespace`), `version`, `description`, `metadata`, `input_schema`,
//! `task_handler`, `steps`, `environments`, `lifecycle`, plus the informational
//! `system_dependencies` and `domain_events`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind, Result};
use crate::{naming, version};

/// Retry defaults, used where a step's `retry` section leaves a field out.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 1_000;
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 60_000;
/// Upper bounds that keep a typo from parking a step for years.
pub const MAX_MAX_ATTEMPTS: u32 = 1_000;
pub const MAX_BACKOFF_LIMIT_MS: u64 = 7 * 24 * 3_600 * 1_000;
pub const MAX_TIMEOUT_SECONDS: u32 = 7 * 24 * 3_600;
/// Most steps a template may have (54000 above it).
pub const MAX_STEPS: usize = 10_000;
/// Most dependency edges a template may have, all steps together (54000).
pub const MAX_EDGES: usize = 100_000;
/// serde_json's nesting limit: deeper JSON cannot be parsed in Rust.
pub const MAX_JSON_DEPTH: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    None,
    Linear,
    Exponential,
    Fibonacci,
}

impl Backoff {
    pub fn as_str(self) -> &'static str {
        match self {
            Backoff::None => "none",
            Backoff::Linear => "linear",
            Backoff::Exponential => "exponential",
            Backoff::Fibonacci => "fibonacci",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Backoff::None,
            "linear" => Backoff::Linear,
            "exponential" => Backoff::Exponential,
            "fibonacci" => Backoff::Fibonacci,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub retryable: bool,
    /// Counts the first attempt: 3 means one try and two retries.
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub backoff_base_ms: u64,
    pub max_backoff_ms: u64,
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retryable: true,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: Backoff::Exponential,
            backoff_base_ms: DEFAULT_BACKOFF_BASE_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            jitter: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handler {
    pub callable: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Handler configuration handed to the worker with every message.
    #[serde(default)]
    pub initialization: Map<String, Value>,
}

/// A step's type (tasker-core's, plus `map`): how it is created and what
/// its result does (crate::dynamic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    Standard,
    /// Its result's `decision_point_outcome` creates steps of its segment.
    Decision,
    /// Waits for the dependencies that were created, not those never taken.
    DeferredConvergence,
    /// Its result's `batch_processing_outcome` creates batch workers.
    Batchable,
    /// A template for the workers a batchable step creates; never created
    /// as itself.
    BatchWorker,
    /// One attempt per element of an array (its dependency's result, or
    /// the task context at `map_over`); its result is the elements' results.
    Map,
}

impl StepType {
    pub const ALL: &'static [StepType] = &[
        StepType::Standard,
        StepType::Decision,
        StepType::DeferredConvergence,
        StepType::Batchable,
        StepType::BatchWorker,
        StepType::Map,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepType::Standard => "standard",
            StepType::Decision => "decision",
            StepType::DeferredConvergence => "deferred_convergence",
            StepType::Batchable => "batchable",
            StepType::BatchWorker => "batch_worker",
            StepType::Map => "map",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.as_str() == s)
    }

    /// Whether its result creates steps (decision, batchable); mirrored by
    /// `tasker.step_type_creates_steps`.
    pub fn is_generator(self) -> bool {
        matches!(self, StepType::Decision | StepType::Batchable)
    }
}

/// What a batch worker does when one of its siblings fails for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureStrategy {
    /// The other workers go on; the convergence step waits (the task is
    /// blocked by the failure until an operator acts).
    #[default]
    ContinueOnFailure,
    /// The other workers that have not finished are cancelled.
    FailFast,
    /// The failure is the worker's own: the convergence step runs with the
    /// workers that succeeded and sees the failed one's error.
    Isolate,
}

impl FailureStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureStrategy::ContinueOnFailure => "continue_on_failure",
            FailureStrategy::FailFast => "fail_fast",
            FailureStrategy::Isolate => "isolate",
        }
    }
}

/// `batch_config` of a batch_worker step (tasker-core's fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_template: Option<String>,
    #[serde(default)]
    pub failure_strategy: FailureStrategy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTemplate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub dependencies: Vec<String>,
    pub handler: Handler,
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    // (always written: definitions stored before 0.2 have it, and the
    // stored form is compared on re-registration)
    #[serde(rename = "type", default = "standard")]
    pub step_type: StepType,
    /// batch_worker steps: their batch_config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_config: Option<BatchConfig>,
    /// map steps: the path of the array (in the dependency's result, or in
    /// the task context for a map step without dependencies), as keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_over: Option<Vec<String>>,
}

fn standard() -> StepType {
    StepType::Standard
}

/// A validated template. Serializing it gives the canonical definition that
/// is stored, compared on re-registration and read back by `create_task`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub name: String,
    pub namespace_name: String,
    /// Canonical semantic version (`1.0` is stored as `1.0.0`).
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_handler: Option<Handler>,
    /// Steps in a topological order (every step after its dependencies).
    pub steps: Vec<StepTemplate>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub environments: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub lifecycle: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_dependencies: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_events: Option<Value>,
}

// ---------------------------------------------------------------------------
// Raw (as written) forms
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: Option<Value>,
    #[serde(alias = "namespace")]
    namespace_name: Option<Value>,
    version: Option<Value>,
    description: Option<String>,
    metadata: Option<Map<String, Value>>,
    input_schema: Option<Value>,
    task_handler: Option<Value>,
    steps: Option<Value>,
    environments: Option<Map<String, Value>>,
    lifecycle: Option<Map<String, Value>>,
    system_dependencies: Option<Value>,
    domain_events: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[allow(dead_code)]
    name: Value,
    description: Option<String>,
    #[serde(alias = "depends_on")]
    dependencies: Option<Vec<String>>,
    handler: Option<RawHandler>,
    retry: Option<RawRetry>,
    timeout_seconds: Option<u32>,
    #[serde(rename = "type", alias = "step_type")]
    step_type: Option<String>,
    batch_config: Option<Value>,
    map_over: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    callable: Option<String>,
    method: Option<String>,
    initialization: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    retryable: Option<bool>,
    #[serde(alias = "limit")]
    max_attempts: Option<i64>,
    backoff: Option<String>,
    backoff_base_ms: Option<i64>,
    max_backoff_ms: Option<i64>,
    jitter: Option<bool>,
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Parses a YAML template. Ruby-style symbol keys (`:name:`) are accepted:
/// a leading `:` is removed from every mapping key.
pub fn parse_yaml(text: &str) -> Result<TaskTemplate> {
    parse_yaml_with(text, &RetryPolicy::default())
}

/// `parse_yaml` with the retry policy that fills fields a step leaves out.
pub fn parse_yaml_with(text: &str, retry_defaults: &RetryPolicy) -> Result<TaskTemplate> {
    let value: Value = serde_norway::from_str(text).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            Error::new(
                ErrorKind::LimitExceeded,
                format!("the template is nested more than {MAX_JSON_DEPTH} levels deep"),
            )
        } else {
            Error::new(
                ErrorKind::Syntax,
                format!("template is not valid YAML: {e}"),
            )
        }
    })?;
    parse_value_with(strip_symbol_keys(value), retry_defaults)
}

/// Parses JSON text (a template, or a payload to validate against a JSON
/// Schema) into a value. Syntax errors are `Syntax`; numbers outside the
/// range of an f64 are `InvalidValue`; nesting deeper than
/// [`MAX_JSON_DEPTH`] is `LimitExceeded`.
pub fn parse_json_text(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("recursion limit") {
            Error::new(
                ErrorKind::LimitExceeded,
                format!("{what} is nested more than {MAX_JSON_DEPTH} levels deep"),
            )
        } else if msg.contains("number out of range") {
            Error::invalid(format!(
                "{what} contains a number outside the range of a 64-bit float ({msg})"
            ))
        } else {
            Error::new(
                ErrorKind::Syntax,
                format!("{what} is not valid JSON: {msg}"),
            )
        }
    })
}

/// Parses and validates a template given as JSON text.
pub fn parse_json_with(text: &str, retry_defaults: &RetryPolicy) -> Result<TaskTemplate> {
    parse_value_with(parse_json_text(text, "the template")?, retry_defaults)
}

/// Parses and validates a template given as JSON.
pub fn parse_value(value: Value) -> Result<TaskTemplate> {
    parse_value_with(value, &RetryPolicy::default())
}

/// `parse_value` with the retry policy that fills fields a step leaves out
/// (the `[retry]` section of the configuration).
pub fn parse_value_with(value: Value, retry_defaults: &RetryPolicy) -> Result<TaskTemplate> {
    if !value.is_object() {
        return Err(Error::invalid("a template must be a JSON object"));
    }
    let raw: RawTemplate = serde_json::from_value(value)
        .map_err(|e| Error::invalid(format!("invalid template: {e}")))?;

    let name = required_string(raw.name, "name")?;
    let namespace = required_string(raw.namespace_name, "namespace_name")?;
    naming::validate_namespace(&namespace)?;
    let version = match raw.version {
        None | Some(Value::Null) => return Err(missing("version")),
        Some(Value::String(s)) => version::parse(&s)?.to_string(),
        Some(Value::Number(n)) if n.is_u64() => version::parse(&n.to_string())?.to_string(),
        Some(other) => {
            return Err(Error::invalid(format!(
                "template field \"version\" must be a string, got {other}"
            ))
            .with_hint("quote the version in YAML: version: \"1.10.0\""))
        }
    };

    let input_schema = match raw.input_schema {
        None | Some(Value::Null) => None,
        Some(schema) => {
            compile_schema(&schema)?;
            Some(schema)
        }
    };
    let task_handler = match raw.task_handler {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_handler(v, "task_handler")?),
    };

    let raw_steps = match raw.steps {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(Error::invalid("template has no steps")),
        None | Some(Value::Null) => return Err(missing("steps")),
        Some(other) => {
            return Err(Error::invalid(format!(
                "template field \"steps\" must be an array, got {other}"
            )))
        }
    };
    if raw_steps.len() > MAX_STEPS {
        return Err(Error::new(
            ErrorKind::LimitExceeded,
            format!(
                "template has {} steps, more than the limit of {MAX_STEPS}",
                raw_steps.len()
            ),
        ));
    }
    let mut steps = Vec::with_capacity(raw_steps.len());
    for (i, raw_step) in raw_steps.into_iter().enumerate() {
        steps.push(parse_step(raw_step, i, retry_defaults)?);
    }
    let edges: usize = steps.iter().map(|s| s.dependencies.len()).sum();
    if edges > MAX_EDGES {
        return Err(Error::new(
            ErrorKind::LimitExceeded,
            format!("template has {edges} dependencies, more than the limit of {MAX_EDGES}"),
        ));
    }
    let steps = order_steps(steps)?;
    crate::dynamic::validate_types(&steps)?;

    let environments = raw.environments.unwrap_or_default();
    validate_environments(&environments, &steps)?;
    let lifecycle = raw.lifecycle.unwrap_or_default();
    validate_lifecycle(&lifecycle)?;

    let template = TaskTemplate {
        name,
        namespace_name: namespace,
        version,
        description: raw.description,
        metadata: raw.metadata.unwrap_or_default(),
        input_schema,
        task_handler,
        steps,
        environments,
        lifecycle,
        system_dependencies: raw.system_dependencies,
        domain_events: raw.domain_events,
    };
    // Every environment's overrides must produce valid steps.
    for env in template.environments.keys() {
        template.steps_for_environment(env)?;
    }
    Ok(template)
}

impl TaskTemplate {
    /// The canonical JSON definition (what the database stores).
    pub fn to_definition(&self) -> Value {
        serde_json::to_value(self).expect("a template always serializes")
    }

    /// Reads back a stored canonical definition.
    pub fn from_definition(v: Value) -> Result<Self> {
        serde_json::from_value(v)
            .map_err(|e| Error::invalid(format!("stored template definition is unreadable: {e}")))
    }

    /// The steps as they run in `env`: overrides from `environments.<env>.steps`
    /// are applied, first those named `ALL`, then those naming the step.
    /// `handler.initialization` is merged key by key; `retry` field by field.
    pub fn steps_for_environment(&self, env: &str) -> Result<Vec<StepTemplate>> {
        let overrides: Vec<&Map<String, Value>> = self
            .environments
            .get(env)
            .and_then(|e| e.get("steps"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_object).collect())
            .unwrap_or_default();
        if overrides.is_empty() {
            return Ok(self.steps.clone());
        }
        let mut steps = self.steps.clone();
        for step in &mut steps {
            let ctx = format!("environments.{env}: step \"{}\"", step.name);
            let name = step.name.clone();
            let target = |o: &&&Map<String, Value>, want: &str| {
                o.get("name").and_then(Value::as_str) == Some(want)
            };
            let applicable: Vec<&Map<String, Value>> = overrides
                .iter()
                .filter(|o| target(o, "ALL"))
                .chain(overrides.iter().filter(|o| target(o, &name)))
                .copied()
                .collect();
            for o in applicable {
                apply_override(step, o, &ctx)?;
            }
        }
        Ok(steps)
    }

    /// Validates a task context against the template's `input_schema`,
    /// listing every violation.
    pub fn validate_context(&self, context: &Value) -> Result<()> {
        match &self.input_schema {
            None => Ok(()),
            Some(schema) => validate_against(schema, context),
        }
    }
}

// ---------------------------------------------------------------------------
// Pieces
// ---------------------------------------------------------------------------

fn missing(field: &str) -> Error {
    Error::invalid(format!("template is missing required field \"{field}\""))
}

fn required_string(v: Option<Value>, field: &str) -> Result<String> {
    match v {
        None | Some(Value::Null) => Err(missing(field)),
        Some(Value::String(s)) if s.trim().is_empty() => Err(missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::invalid(format!(
            "template field \"{field}\" must be a string, got {other}"
        ))),
    }
}

fn parse_handler(v: Value, context: &str) -> Result<Handler> {
    let raw: RawHandler = serde_json::from_value(v)
        .map_err(|e| Error::invalid(format!("{context}: invalid handler: {e}")))?;
    let callable = match raw.callable {
        Some(c) if !c.trim().is_empty() => c,
        _ => {
            return Err(Error::invalid(format!(
                "{context}: handler is missing \"callable\""
            )))
        }
    };
    let initialization = match raw.initialization {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(Error::invalid(format!(
                "{context}: handler \"initialization\" must be an object, got {other}"
            )))
        }
    };
    Ok(Handler {
        callable,
        method: raw.method,
        initialization,
    })
}

fn parse_step(v: Value, index: usize, retry_defaults: &RetryPolicy) -> Result<StepTemplate> {
    let name = match v.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(Error::invalid(format!(
                "step #{}: \"name\" must be a string, got {other}",
                index + 1
            )))
        }
        None => {
            return Err(Error::invalid(format!(
                "step #{} is missing required field \"name\"",
                index + 1
            )))
        }
    };
    naming::validate_step_name(&name).map_err(|e| Error {
        message: format!("step #{}: {}", index + 1, e.message),
        ..e
    })?;
    let ctx = format!("step \"{name}\"");
    if !v.is_object() {
        return Err(Error::invalid(format!("{ctx} must be an object")));
    }
    let raw: RawStep =
        serde_json::from_value(v).map_err(|e| Error::invalid(format!("{ctx}: {e}")))?;

    let handler = match raw.handler {
        Some(h) => parse_handler(
            serde_json::json!({"callable": h.callable, "method": h.method, "initialization": h.initialization}),
            &ctx,
        )?,
        None => {
            return Err(Error::invalid(format!(
                "{ctx} is missing required field \"handler\""
            )))
        }
    };

    let step_type = match raw.step_type.as_deref() {
        None => StepType::Standard,
        Some(t) => StepType::parse(t).ok_or_else(|| {
            Error::invalid(format!("{ctx}: unknown step type \"{t}\"")).with_hint(format!(
                "step types: {}",
                StepType::ALL
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?,
    };
    let batch_config = match raw.batch_config {
        None | Some(Value::Null) => None,
        Some(_) if step_type != StepType::BatchWorker => {
            return Err(Error::invalid(format!(
                "{ctx}: batch_config belongs to batch_worker steps, this step is {}",
                step_type.as_str()
            )))
        }
        Some(v) => Some(
            serde_json::from_value::<BatchConfig>(v)
                .map_err(|e| Error::invalid(format!("{ctx}: invalid batch_config: {e}")))?,
        ),
    };
    let map_over = match raw.map_over {
        None | Some(Value::Null) => None,
        Some(_) if step_type != StepType::Map => {
            return Err(Error::invalid(format!(
                "{ctx}: map_over belongs to map steps, this step is {}",
                step_type.as_str()
            )))
        }
        Some(Value::String(p)) => Some(parse_path(&p).ok_or_else(|| {
            Error::invalid(format!("{ctx}: invalid map_over path \"{p}\"")).with_hint(
                "map_over is a path of keys: \"items\", \"order.items\" or \"$.order.items\"",
            )
        })?),
        Some(other) => {
            return Err(Error::invalid(format!(
                "{ctx}: map_over must be a string, got {other}"
            )))
        }
    };

    if let Some(t) = raw.timeout_seconds {
        if t == 0 || t > MAX_TIMEOUT_SECONDS {
            return Err(Error::invalid(format!(
                "{ctx}: timeout_seconds must be between 1 and {MAX_TIMEOUT_SECONDS}, got {t}"
            )));
        }
    }

    let retry = parse_retry(raw.retry, retry_defaults.clone(), &ctx)?;
    let dependencies = raw.dependencies.unwrap_or_default();
    let mut seen = HashSet::new();
    for d in &dependencies {
        if !seen.insert(d) {
            return Err(Error::new(
                ErrorKind::Duplicate,
                format!("{ctx} lists dependency \"{d}\" more than once"),
            ));
        }
    }

    Ok(StepTemplate {
        name,
        description: raw.description,
        dependencies,
        handler,
        retry,
        timeout_seconds: raw.timeout_seconds,
        step_type,
        batch_config,
        map_over,
    })
}

/// A `map_over` path: `a.b.c`, optionally after `$.` (`$` alone: the
/// whole value); keys are non-empty.
pub fn parse_path(p: &str) -> Option<Vec<String>> {
    let p = p.trim();
    let rest = if p == "$" {
        return Some(Vec::new());
    } else {
        p.strip_prefix("$.").unwrap_or(p)
    };
    let keys: Vec<String> = rest.split('.').map(str::to_string).collect();
    (!keys.iter().any(String::is_empty)).then_some(keys)
}

fn parse_retry(raw: Option<RawRetry>, base: RetryPolicy, ctx: &str) -> Result<RetryPolicy> {
    let mut p = base;
    let Some(raw) = raw else { return Ok(p) };
    let bad = |msg: String| Error::invalid(format!("{ctx}: invalid retry policy: {msg}"));
    if let Some(r) = raw.retryable {
        p.retryable = r;
    }
    if let Some(m) = raw.max_attempts {
        if m < 1 || m > MAX_MAX_ATTEMPTS as i64 {
            return Err(bad(format!(
                "max_attempts must be between 1 and {MAX_MAX_ATTEMPTS}, got {m}"
            ))
            .with_hint("max_attempts counts the first attempt"));
        }
        p.max_attempts = m as u32;
    }
    if let Some(b) = raw.backoff {
        p.backoff = Backoff::parse(&b).ok_or_else(|| {
            bad(format!("unknown backoff \"{b}\""))
                .with_hint("backoff is one of none, linear, exponential, fibonacci")
        })?;
    }
    let ms = |v: i64, field: &str| -> Result<u64> {
        if v < 0 || v as u64 > MAX_BACKOFF_LIMIT_MS {
            Err(bad(format!(
                "{field} must be between 0 and {MAX_BACKOFF_LIMIT_MS}, got {v}"
            )))
        } else {
            Ok(v as u64)
        }
    };
    if let Some(v) = raw.backoff_base_ms {
        p.backoff_base_ms = ms(v, "backoff_base_ms")?;
    }
    if let Some(v) = raw.max_backoff_ms {
        p.max_backoff_ms = ms(v, "max_backoff_ms")?;
    } else if p.backoff_base_ms > p.max_backoff_ms {
        p.max_backoff_ms = p.backoff_base_ms;
    }
    if p.backoff_base_ms > p.max_backoff_ms {
        return Err(bad(format!(
            "backoff_base_ms ({}) exceeds max_backoff_ms ({})",
            p.backoff_base_ms, p.max_backoff_ms
        )));
    }
    if let Some(j) = raw.jitter {
        p.jitter = j;
    }
    Ok(p)
}

/// Checks names and dependencies and returns the steps in a stable
/// topological order (template order among steps that are ready together).
fn order_steps(steps: Vec<StepTemplate>) -> Result<Vec<StepTemplate>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if index.insert(&s.name, i).is_some() {
            return Err(Error::new(
                ErrorKind::Duplicate,
                format!("duplicate step name \"{}\"", s.name),
            ));
        }
    }
    for s in &steps {
        for d in &s.dependencies {
            if !index.contains_key(d.as_str()) {
                return Err(Error::new(
                    ErrorKind::Undefined,
                    format!("step \"{}\" depends on unknown step \"{d}\"", s.name),
                ));
            }
        }
    }
    // Kahn's algorithm, always taking the lowest template index that is ready.
    let n = steps.len();
    let mut indegree: Vec<usize> = steps.iter().map(|s| s.dependencies.len()).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in steps.iter().enumerate() {
        for d in &s.dependencies {
            children[index[d.as_str()]].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &c in &children[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.insert(c);
            }
        }
    }
    if order.len() < n {
        let cycle = find_cycle(&steps, &index, &indegree);
        return Err(Error::new(
            ErrorKind::InvalidDefinition,
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    let mut slots: Vec<Option<StepTemplate>> = steps.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .map(|i| slots[i].take().expect("each index once"))
        .collect())
}

/// Finds one concrete cycle among the steps Kahn's algorithm could not order,
/// returned as names with the first repeated at the end.
fn find_cycle(
    steps: &[StepTemplate],
    index: &HashMap<&str, usize>,
    indegree: &[usize],
) -> Vec<String> {
    // Every unordered step has an unordered dependency; walking dependencies
    // from any unordered step must revisit a step.
    let start = (0..steps.len())
        .find(|&i| indegree[i] > 0)
        .expect("a step is unordered");
    let mut pos: HashMap<usize, usize> = HashMap::new();
    let mut path = Vec::new();
    let mut cur = start;
    loop {
        if let Some(&p) = pos.get(&cur) {
            // path[p..] is the cycle, in "depends on" direction; print it in
            // execution direction (dependency first).
            let mut names: Vec<String> = path[p..]
                .iter()
                .rev()
                .map(|&i: &usize| steps[i].name.clone())
                .collect();
            names.push(names[0].clone());
            return names;
        }
        pos.insert(cur, path.len());
        path.push(cur);
        cur = steps[cur]
            .dependencies
            .iter()
            .map(|d| index[d.as_str()])
            .find(|&d| indegree[d] > 0)
            .expect("an unordered step has an unordered dependency");
    }
}

fn apply_override(step: &mut StepTemplate, o: &Map<String, Value>, ctx: &str) -> Result<()> {
    if let Some(h) = o.get("handler") {
        let raw: RawHandler = serde_json::from_value(h.clone())
            .map_err(|e| Error::invalid(format!("{ctx}: invalid handler override: {e}")))?;
        if let Some(c) = raw.callable {
            step.handler.callable = c;
        }
        if raw.method.is_some() {
            step.handler.method = raw.method;
        }
        match raw.initialization {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => step.handler.initialization.extend(m),
            Some(other) => {
                return Err(Error::invalid(format!(
                    "{ctx}: handler \"initialization\" must be an object, got {other}"
                )))
            }
        }
    }
    if let Some(r) = o.get("retry") {
        let raw: RawRetry = serde_json::from_value(r.clone())
            .map_err(|e| Error::invalid(format!("{ctx}: invalid retry policy: {e}")))?;
        step.retry = parse_retry(Some(raw), step.retry.clone(), ctx)?;
    }
    if let Some(t) = o.get("timeout_seconds") {
        match t.as_u64() {
            Some(t) if t >= 1 && t <= MAX_TIMEOUT_SECONDS as u64 => {
                step.timeout_seconds = Some(t as u32)
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{ctx}: timeout_seconds must be between 1 and {MAX_TIMEOUT_SECONDS}, got {t}"
                )))
            }
        }
    }
    Ok(())
}

/// `lifecycle`: staleness threshold overrides, positive numbers within
/// the bounds of `config::lifecycle_max`.
fn validate_lifecycle(lifecycle: &Map<String, Value>) -> Result<()> {
    for (k, v) in lifecycle {
        let Some(max) = crate::config::lifecycle_max(k) else {
            return Err(
                Error::invalid(format!("lifecycle: unknown key \"{k}\"")).with_hint(format!(
                    "lifecycle keys: {}",
                    crate::config::LIFECYCLE_KEYS.join(", ")
                )),
            );
        };
        if !v.as_f64().is_some_and(|f| f > 0.0 && f <= max) {
            return Err(Error::invalid(format!(
                "lifecycle.{k} must be a positive number of at most {max}, got {v}"
            )));
        }
    }
    Ok(())
}

/// `environments.<env>.steps[]` overrides: each entry names a step (or `ALL`).
fn validate_environments(envs: &Map<String, Value>, steps: &[StepTemplate]) -> Result<()> {
    let names: HashSet<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    for (env, v) in envs {
        let ctx = format!("environments.{env}");
        let Some(obj) = v.as_object() else {
            return Err(Error::invalid(format!("{ctx} must be an object")));
        };
        for key in obj.keys() {
            if key != "steps" {
                return Err(Error::invalid(format!(
                    "{ctx}: unknown field \"{key}\", expected \"steps\""
                )));
            }
        }
        let Some(list) = obj.get("steps") else {
            continue;
        };
        let Some(list) = list.as_array() else {
            return Err(Error::invalid(format!("{ctx}.steps must be an array")));
        };
        for o in list {
            let target = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                Error::invalid(format!(
                    "{ctx}.steps: every override needs a \"name\" (a step name or ALL)"
                ))
            })?;
            if target != "ALL" && !names.contains(target) {
                return Err(Error::new(
                    ErrorKind::Undefined,
                    format!("{ctx} overrides unknown step \"{target}\""),
                ));
            }
            for key in o.as_object().into_iter().flat_map(|m| m.keys()) {
                if !matches!(
                    key.as_str(),
                    "name" | "handler" | "retry" | "timeout_seconds"
                ) {
                    return Err(Error::invalid(format!(
                        "{ctx} override of \"{target}\": unsupported field \"{key}\", expected handler, retry or timeout_seconds"
                    )));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// JSON Schema
// ---------------------------------------------------------------------------

fn compile_schema(schema: &Value) -> Result<jsonschema::Validator> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(Error::invalid(
            "invalid input_schema: a JSON Schema must be an object or a boolean",
        ));
    }
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(Error::invalid(format!(
            "invalid input_schema: {e} (at {})",
            pointer_or_root(&e.instance_path().to_string())
        )));
    }
    jsonschema::validator_for(schema)
        .map_err(|e| Error::invalid(format!("invalid input_schema: {e}")))
}

fn pointer_or_root(p: &str) -> String {
    if p.is_empty() {
        "/".to_string()
    } else {
        p.to_string()
    }
}

/// A template's input_schema, compiled once, checking many contexts.
pub struct ContextValidator(jsonschema::Validator);

impl ContextValidator {
    pub fn new(schema: &Value) -> Result<Self> {
        compile_schema(schema).map(ContextValidator)
    }

    /// 22023-class error listing every violation, with its JSON pointer.
    pub fn validate(&self, instance: &Value) -> Result<()> {
        report_violations(&self.0, instance)
    }
}

fn validate_against(schema: &Value, instance: &Value) -> Result<()> {
    report_violations(&compile_schema(schema)?, instance)
}

fn report_violations(validator: &jsonschema::Validator, instance: &Value) -> Result<()> {
    let violations: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", pointer_or_root(&e.instance_path().to_string())))
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "task context does not match the template's input_schema: {}",
            violations.join("; ")
        )))
    }
}

// ---------------------------------------------------------------------------
// YAML helpers
// ---------------------------------------------------------------------------

/// Removes one leading `:` from every mapping key, recursively, so that YAML
/// written with Ruby symbol keys (`:name: x`) reads like plain YAML.
pub fn strip_symbol_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let k = k.strip_prefix(':').map(str::to_string).unwrap_or(k);
                    (k, strip_symbol_keys(v))
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_symbol_keys).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
