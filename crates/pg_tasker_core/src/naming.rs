//! Names that become part of PostgreSQL object names.

use crate::error::{Error, ErrorKind, Result};

/// pgmq refuses queue names longer than 47 characters.
pub const PGMQ_MAX_QUEUE_NAME: usize = 47;
/// Prefix and suffix of a namespace's step queue: `tasker_<namespace>_queue`.
pub const QUEUE_PREFIX: &str = "tasker_";
pub const QUEUE_SUFFIX: &str = "_queue";
/// Longest namespace whose queue name pgmq accepts, with margin kept for pgmq's
/// own derived names.
pub const MAX_NAMESPACE_LEN: usize = 32;
/// Longest step name.
pub const MAX_STEP_NAME_LEN: usize = 128;

/// A lowercase SQL identifier: `[a-z][a-z0-9_]*`.
fn is_lower_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// Checks a namespace name; it becomes part of a pgmq queue (and table) name.
pub fn validate_namespace(ns: &str) -> Result<()> {
    if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN || !is_lower_identifier(ns) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("invalid namespace \"{ns}\""),
        )
        .with_hint(format!(
            "a namespace is a lowercase identifier ([a-z][a-z0-9_]*) of at most {MAX_NAMESPACE_LEN} characters; it becomes part of its queue name"
        )));
    }
    Ok(())
}

/// The pgmq queue that carries a namespace's step messages.
pub fn queue_name(ns: &str) -> Result<String> {
    validate_namespace(ns)?;
    let q = format!("{QUEUE_PREFIX}{ns}{QUEUE_SUFFIX}");
    debug_assert!(q.len() <= PGMQ_MAX_QUEUE_NAME);
    Ok(q)
}

/// Checks a step name: printable, no surrounding whitespace, bounded length.
pub fn validate_step_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_STEP_NAME_LEN
        || name.trim() != name
        || name.chars().any(|c| c.is_control())
    {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("invalid step name \"{name}\""),
        )
        .with_hint(format!(
            "a step name is 1 to {MAX_STEP_NAME_LEN} characters, without control characters or surrounding spaces"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["ecommerce", "a", "team_1", &"x".repeat(MAX_NAMESPACE_LEN)] {
            validate_namespace(ok).unwrap();
        }
        for bad in [
            "",
            "Ecommerce",
            "1abc",
            "_a",
            "a-b",
            "a b",
            "ä",
            &"x".repeat(MAX_NAMESPACE_LEN + 1),
        ] {
            let e = validate_namespace(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidName, "{bad}");
        }
    }

    #[test]
    fn longest_queue_name_fits_pgmq() {
        let q = queue_name(&"x".repeat(MAX_NAMESPACE_LEN)).unwrap();
        assert!(q.len() <= PGMQ_MAX_QUEUE_NAME);
        assert_eq!(queue_name("payments").unwrap(), "tasker_payments_queue");
    }

    #[test]
    fn step_names() {
        validate_step_name("validate cart").unwrap();
        assert!(validate_step_name(" x").is_err());
        assert!(validate_step_name("").is_err());
        assert!(validate_step_name("a\nb").is_err());
    }
}
