//! A task request: what `tasker.create_task` takes, as one JSON object (the
//! message format of the task request queue).

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub context: Option<Value>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub initiator: Option<String>,
    #[serde(default)]
    pub source_system: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

pub fn parse(v: Value) -> Result<TaskRequest> {
    if !v.is_object() {
        return Err(Error::invalid(format!(
            "a task request must be a JSON object, got {v}"
        )));
    }
    serde_json::from_value(v).map_err(|e| {
        Error::invalid(format!("invalid task request: {e}")).with_hint(
            "fields: namespace, name (required), context, version, priority, initiator, source_system, reason, tags, idempotency_key",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests() {
        let r = parse(json!({"namespace": "a", "name": "b", "context": {"x": 1}, "tags": ["t"]}))
            .unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.tags.unwrap()),
            ("a", vec!["t".to_string()])
        );
        assert!(parse(json!({"name": "b"}))
            .unwrap_err()
            .message
            .contains("namespace"));
        assert!(parse(json!({"namespace": "a", "name": "b", "colour": 1}))
            .unwrap_err()
            .message
            .contains("colour"));
        assert!(parse(json!([1])).is_err());
    }
}
