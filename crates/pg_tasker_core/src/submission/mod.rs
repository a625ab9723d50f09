//! What a worker submits for an attempt (`tasker.submit_result`, each
//! element of `tasker.submit_results`): a status, an error and metadata,
//! checked, and the fields the engine reads from them
//! (`tasker._submission_fields`). The first problem found is reported, in a
//! fixed order (docs/worker-protocol.md lists the fields).
//!
//! The error and metadata arrive as the text of their jsonb and stay the
//! caller's: only their top-level fields (and `headers`, `backoff_hint`) are
//! read, as [`RawValue`]s. Nested values are skipped, never parsed: no depth
//! limit, no number turned into a float; numbers are compared and scaled
//! as decimal text.
//!
//! (In Rust rather than SQL: an SQL statement compiles its whole expression
//! on every execution, ≈ 0.1 ms for these checks on the path of every
//! result; docs/benchmarks.md.)

use std::collections::BTreeMap;

use serde_json::value::RawValue;

/// A submission, checked: `problem` is the first thing wrong with it, and
/// then every other field is `None`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Submission {
    pub problem: Option<String>,
    pub success: Option<bool>,
    /// metadata.attempt: the attempt the worker ran (`None`: unfenced)
    pub attempt: Option<i32>,
    pub worker_id: Option<String>,
    /// metadata.execution_time_ms, as decimal text
    pub execution_time_ms: Option<String>,
    /// failures: error.message (or the error itself when it is a string)
    pub message: Option<String>,
    pub error_code: Option<String>,
    /// failures: error.retryable, default true
    pub retryable: Option<bool>,
    /// failures: the delay the handler asked for, in ms: error.retry_after_seconds,
    /// else the retry-after header of metadata.headers (any case), else
    /// metadata.backoff_hint.seconds; at most 9e15
    pub requested_delay_ms: Option<i64>,
}

/// The largest delay kept (ms), as the SQL API always had it.
const MAX_DELAY_MS: i64 = 9_000_000_000_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

fn kind(raw: &str) -> Kind {
    match raw.as_bytes().first() {
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'n') | None => Kind::Null,
        _ => Kind::Number,
    }
}

type Object<'a> = BTreeMap<String, &'a RawValue>;

/// A JSON document's top level, when it is an object.
fn object(raw: &str) -> Result<Object<'_>, String> {
    serde_json::from_str(raw).map_err(|e| format!("cannot read a submission field: {e}"))
}

/// A field's raw text; `None` when absent or JSON null (as `->` and
/// `jsonb_typeof` see it).
fn field<'a>(o: &Object<'a>, key: &str) -> Option<&'a str> {
    o.get(key)
        .map(|v| v.get())
        .filter(|v| kind(v) != Kind::Null)
}

fn string(raw: &str) -> Result<String, String> {
    serde_json::from_str(raw).map_err(|e| format!("cannot read a string: {e}"))
}

/// A decimal number as text: sign, integer digits, fraction digits (an
/// exponent is applied; jsonb never prints one).
struct Decimal {
    negative: bool,
    int: String,
    frac: String,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let t = text.trim();
        let (negative, t) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (mantissa, exp) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], t[i + 1..].parse::<i64>().ok()?),
            None => (t, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
            || !(-64..=64).contains(&exp)
        {
            return None;
        }
        let mut digits = format!("{int}{frac}");
        let mut point = int.len() as i64 + exp;
        if point < 0 {
            digits = "0".repeat(-point as usize) + &digits;
            point = 0;
        }
        if point as usize > digits.len() {
            digits += &"0".repeat(point as usize - digits.len());
        }
        let (i, f) = digits.split_at(point as usize);
        let int = i.trim_start_matches('0').to_string();
        let frac = f.trim_end_matches('0').to_string();
        let negative = negative && !(int.is_empty() && frac.is_empty());
        Some(Decimal {
            negative,
            int,
            frac,
        })
    }

    fn non_negative(text: &str) -> bool {
        Decimal::parse(text).is_some_and(|d| !d.negative)
    }

    /// round(self × 1000), half away from zero, at most [`MAX_DELAY_MS`]
    /// (self is non-negative).
    fn millis(&self) -> i64 {
        let mut frac = self.frac.clone();
        frac.push_str("0000");
        let whole = format!("{}{}", self.int, &frac[..3]);
        let up = frac.as_bytes()[3] >= b'5';
        let whole = whole.trim_start_matches('0');
        if whole.len() > 16 {
            return MAX_DELAY_MS;
        }
        let n = whole.parse::<i64>().unwrap_or(0) + i64::from(up);
        n.min(MAX_DELAY_MS)
    }
}

/// A non-negative JSON number: `None` when the value is not one.
fn seconds(raw: &str) -> Option<Decimal> {
    (kind(raw) == Kind::Number)
        .then(|| Decimal::parse(raw))
        .flatten()
        .filter(|d| !d.negative)
}

/// The seconds of a retry-after header: a non-negative number, or a string
/// of digits with an optional fraction (surrounding spaces allowed).
fn header_seconds(raw: &str) -> Option<Decimal> {
    match kind(raw) {
        Kind::Number => seconds(raw),
        Kind::String => {
            let s = string(raw).ok()?;
            let s = s.trim_matches(' ');
            let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
            let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            (digits(int) && digits(frac))
                .then(|| Decimal::parse(s))
                .flatten()
        }
        _ => None,
    }
}

fn problem(p: String) -> Result<Submission, String> {
    Ok(Submission {
        problem: Some(p),
        ..Submission::default()
    })
}

/// Checks a submission: `status` is 'success' or 'failure', `error` and
/// `metadata` the text of their jsonb (`None`: SQL NULL). Err only when a
/// text is not JSON at all (the caller passes jsonb, so: never).
pub fn check(
    status: Option<&str>,
    error: Option<&str>,
    metadata: Option<&str>,
) -> Result<Submission, String> {
    let failure = match status {
        Some("success") => false,
        Some("failure") => true,
        other => return problem(format!("invalid status \"{}\"", other.unwrap_or(""))),
    };
    let error = error.filter(|e| kind(e) != Kind::Null);
    let metadata = metadata.filter(|m| kind(m) != Kind::Null);

    let mut message = None;
    let mut error_code = None;
    let mut retryable = None;
    let mut retry_after = None;
    match (failure, error) {
        (false, Some(_)) => {
            return problem("a successful result carries no error (status is 'success')".into())
        }
        (false, None) => {}
        (true, None) => return problem("a failure needs an error object".into()),
        (true, Some(e)) => {
            let o = match kind(e) {
                Kind::String => {
                    message = Some(string(e)?);
                    None
                }
                Kind::Object => {
                    let o = object(e)?;
                    if let Some(m) = field(&o, "message") {
                        if kind(m) != Kind::String {
                            return problem(format!("error.message must be a string, got {m}"));
                        }
                        message = Some(string(m)?);
                    }
                    Some(o)
                }
                _ => return problem(format!("error must be an object, got {e}")),
            };
            if message.as_deref().unwrap_or("").is_empty() {
                return problem("error.message is required".into());
            }
            if let Some(o) = o {
                if let Some(c) = field(&o, "error_code") {
                    if kind(c) != Kind::String {
                        return problem(format!("error.error_code must be a string, got {c}"));
                    }
                    error_code = Some(string(c)?);
                }
                if let Some(r) = field(&o, "retryable") {
                    if kind(r) != Kind::Bool {
                        return problem(format!("error.retryable must be a boolean, got {r}"));
                    }
                    retryable = Some(r == "true");
                }
                if let Some(s) = field(&o, "retry_after_seconds") {
                    match seconds(s) {
                        Some(d) => retry_after = Some(d),
                        None => {
                            return problem(format!(
                                "error.retry_after_seconds must be a non-negative number, got {s}"
                            ))
                        }
                    }
                }
            }
        }
    }

    let mut out = Submission {
        success: Some(!failure),
        ..Submission::default()
    };
    let mut header = None;
    let mut backoff = None;
    if let Some(m) = metadata {
        if kind(m) != Kind::Object {
            return problem(format!("metadata must be an object, got {m}"));
        }
        let o = object(m)?;
        if let Some(t) = field(&o, "execution_time_ms") {
            if !(kind(t) == Kind::Number && Decimal::non_negative(t)) {
                return problem(format!(
                    "metadata.execution_time_ms must be a non-negative number, got {t}"
                ));
            }
            out.execution_time_ms = Some(t.to_string());
        }
        if let Some(w) = field(&o, "worker_id") {
            if kind(w) != Kind::String {
                return problem(format!("metadata.worker_id must be a string, got {w}"));
            }
            out.worker_id = Some(string(w)?);
        }
        if let Some(a) = field(&o, "attempt") {
            let n = seconds(a)
                .filter(|d| d.frac.is_empty() && d.int.len() <= 10)
                .and_then(|d| d.int.parse::<i64>().ok())
                .filter(|n| (1..=i64::from(i32::MAX)).contains(n));
            match n {
                Some(n) => out.attempt = Some(n as i32),
                None => {
                    return problem(format!(
                        "metadata.attempt must be a positive integer, got {a}"
                    ))
                }
            }
        }
        if let Some(h) = field(&o, "headers") {
            if kind(h) != Kind::Object {
                return problem(format!("metadata.headers must be an object, got {h}"));
            }
            // the retry-after header in any case (the first such key)
            let headers = object(h)?;
            if let Some((_, v)) = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
            {
                let v = v.get();
                match header_seconds(v) {
                    Some(s) => header = Some(s),
                    None => {
                        return problem(format!(
                            "metadata.headers.retry-after must be a number of seconds, got {v}"
                        ))
                    }
                }
            }
        }
        if let Some(b) = field(&o, "backoff_hint") {
            if kind(b) != Kind::Object {
                return problem(format!("metadata.backoff_hint must be an object, got {b}"));
            }
            if let Some(s) = field(&object(b)?, "seconds") {
                match seconds(s) {
                    Some(d) => backoff = Some(d),
                    None => {
                        return problem(format!(
                            "metadata.backoff_hint.seconds must be a non-negative number, got {s}"
                        ))
                    }
                }
            }
        }
    }
    if failure {
        out.message = message;
        out.error_code = error_code;
        out.retryable = Some(retryable.unwrap_or(true));
        out.requested_delay_ms = retry_after.or(header).or(backoff).map(|d| d.millis());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
