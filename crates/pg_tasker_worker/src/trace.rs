//! W3C trace context (https://www.w3.org/TR/trace-context/): a task created
//! with a `traceparent` carries it in every step message; the worker runs
//! the step's handler in a span of that trace (a new span id, the message's
//! as parent), logs with it, and hands the handler the `traceparent` for
//! the calls it makes ([`TraceContext::traceparent`]).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The trace a step attempt runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 hex digits.
    pub trace_id: String,
    /// The span that created the task (16 hex digits).
    pub parent_id: String,
    /// This attempt's span (16 hex digits).
    pub span_id: String,
    /// 2 hex digits (01: sampled).
    pub flags: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// A new span id: 64 random bits (std's per-process random hasher keys,
/// a counter and the clock), never all zeros.
fn new_span_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish().max(1))
}

impl TraceContext {
    /// A child span of a `traceparent` header (version 00); None when the
    /// header is not one.
    pub fn child_of(traceparent: &str) -> Option<TraceContext> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let [version, trace, parent, flags] = parts[..] else {
            return None;
        };
        if version != "00"
            || !is_hex(trace, 32)
            || !is_hex(parent, 16)
            || flags.len() != 2
            || !flags.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        Some(TraceContext {
            trace_id: trace.to_ascii_lowercase(),
            parent_id: parent.to_ascii_lowercase(),
            span_id: new_span_id(),
            flags: flags.to_ascii_lowercase(),
        })
    }

    /// The `traceparent` header of this span, for the calls it makes.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_keeps_the_trace_and_gets_a_span_of_its_own() {
        let tp = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        let a = TraceContext::child_of(tp).unwrap();
        let b = TraceContext::child_of(tp).unwrap();
        assert_eq!(a.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(a.parent_id, "00f067aa0ba902b7");
        assert_ne!(a.span_id, b.span_id);
        assert!(is_hex(&a.span_id, 16));
        assert_eq!(
            a.traceparent(),
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", a.span_id)
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(TraceContext::child_of(bad), None, "{bad}");
        }
    }
}
