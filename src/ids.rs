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
