//! Identifiers: UUIDv7 (time-ordered, index-friendly) for every primary key.

use pgrx::prelude::*;

/// A new UUIDv7.
pub fn new_v7() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes())
}

/// `tasker.uuid_generate_v7()`: a new time-ordered UUID (RFC 9562 version 7).
#[pg_extern(volatile, parallel_safe)]
fn uuid_generate_v7() -> pgrx::Uuid {
    new_v7()
}

/// `tasker._uuid_or_null(text) RETURNS uuid`: the text of a uuid (32 hex
/// digits, hyphens optional where the canonical form has them) as a uuid;
/// NULL when it is not one (pg_tasker_core::ids). In Rust: the same check
/// as a regular expression cost ~5 µs a call, and every message read and
/// every result of a batch takes one or more.
#[pg_extern(immutable, parallel_safe, strict)]
fn _uuid_or_null(text: &str) -> Option<pgrx::Uuid> {
    pg_tasker_core::ids::uuid_from_text(text).map(pgrx::Uuid::from_bytes)
}
