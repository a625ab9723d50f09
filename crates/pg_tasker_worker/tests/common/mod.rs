//! Helpers shared by the end-to-end test files.

use postgres::Client;

/// A task's state, as text.
pub fn task_state(db: &mut Client, task: &str) -> String {
    db.query_one(
        "SELECT state::text FROM tasker.tasks WHERE task_uuid = $1::text::uuid",
        &[&task],
    )
    .unwrap()
    .get(0)
}
