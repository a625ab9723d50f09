//! Template versions are semantic versions; "latest" means semver order.

use crate::error::{Error, Result};

/// Parses a template version. Accepts `1.2.3`, `1.2.3-beta.1`, and the short
/// forms `1` and `1.2` (completed with zeros), which YAML authors often write.
pub fn parse(v: &str) -> Result<semver::Version> {
    let trimmed = v.trim();
    let full = match trimmed
        .split(['-', '+'])
        .next()
        .unwrap_or("")
        .matches('.')
        .count()
    {
        0 => with_rest(trimmed, ".0.0"),
        1 => with_rest(trimmed, ".0"),
        _ => trimmed.to_string(),
    };
    semver::Version::parse(&full).map_err(|e| {
        Error::invalid(format!("invalid template version \"{v}\": {e}"))
            .with_hint("versions follow semantic versioning, e.g. 1.0.0")
    })
}

fn with_rest(v: &str, zeros: &str) -> String {
    match v.find(['-', '+']) {
        Some(i) => format!("{}{}{}", &v[..i], zeros, &v[i..]),
        None => format!("{v}{zeros}"),
    }
}

/// The highest version among `versions` in semver order (unparsable ones are skipped).
pub fn latest<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    versions
        .into_iter()
        .filter_map(|v| parse(v).ok().map(|p| (p, v)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_order_not_text_order() {
        assert_eq!(latest(["1.2.0", "1.10.0", "1.9.9"]), Some("1.10.0"));
        assert_eq!(latest(["2.0.0-rc.1", "1.9.0"]), Some("2.0.0-rc.1"));
        assert_eq!(latest(["2.0.0-rc.1", "2.0.0"]), Some("2.0.0"));
        assert_eq!(latest(Vec::<&str>::new()), None);
    }

    #[test]
    fn short_forms() {
        assert_eq!(parse("1").unwrap().to_string(), "1.0.0");
        assert_eq!(parse("1.2").unwrap().to_string(), "1.2.0");
        assert_eq!(parse("1.2-beta").unwrap().to_string(), "1.2.0-beta");
        assert!(parse("one").is_err());
        assert!(parse("").is_err());
    }
}
