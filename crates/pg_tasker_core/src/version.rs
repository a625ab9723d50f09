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

/// A byte string that sorts (bytewise, as `bytea` does) in semver precedence
/// order: major, minor, patch, then a release after its pre-releases, whose
/// identifiers compare numerically when numeric, in ASCII order otherwise,
/// numeric before alphanumeric, and a shorter list first. Build metadata
/// does not count (the stored version text breaks ties).
pub fn sort_key(v: &semver::Version) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    for n in [v.major, v.minor, v.patch] {
        key.extend_from_slice(&n.to_be_bytes());
    }
    if v.pre.is_empty() {
        key.push(0xFF);
        return key;
    }
    for ident in v.pre.as_str().split('.') {
        match ident.parse::<u64>() {
            Ok(n) if !ident.is_empty() => {
                key.push(0x01);
                key.extend_from_slice(&n.to_be_bytes());
            }
            _ => {
                key.push(0x02);
                key.extend_from_slice(ident.as_bytes());
                key.push(0x00);
            }
        }
    }
    key.push(0x00);
    key
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

    #[test]
    fn sort_key_follows_semver_precedence() {
        let versions = [
            "0.9.9",
            "1.0.0-0",
            "1.0.0-1",
            "1.0.0-10",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-alpha1",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.2.0",
            "1.10.0",
            "2.0.0-rc.1",
            "2.0.0",
            "10.0.0",
        ];
        for pair in versions.windows(2) {
            let (a, b) = (parse(pair[0]).unwrap(), parse(pair[1]).unwrap());
            assert!(a < b, "{a} < {b} in semver");
            assert!(sort_key(&a) < sort_key(&b), "{a} sorts before {b}");
        }
    }
}
