//! SQL-level tests (`#[pg_test]`): everything goes through the SQL API, as a
//! user would. Each test runs inside a transaction that is rolled back, in
//! parallel with the others, so every test uses namespaces of its own.
//! Client-side tests (real connections, commits, concurrency, processes)
//! are in `src/client_tests/`.

mod batches;
mod dynamic;
pub mod helpers;
mod maintenance;
mod orchestration;
mod payloads;
mod reads;
mod states;
mod tasks;
mod templates;
