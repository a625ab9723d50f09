//! tasker.health(): truthful (no orchestrator serves another database),
//! side-effect free (no configuration reload), cheap (active tasks only),
//! and the orchestrator's last error for tasker_admin only.

use serde_json::Value;

use super::bgworker::{health, lock, set_system};
use super::*;

#[test]
fn health_in_a_database_no_orchestrator_serves() {
    let mut admin = connect();
    admin
        .batch_execute("DROP DATABASE IF EXISTS tasker_unserved")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE tasker_unserved")
        .unwrap();
    {
        let mut c = connect_db(&mut admin, "tasker_unserved");
        c.batch_execute("CREATE EXTENSION pg_tasker CASCADE")
            .unwrap();
        let h = health(&mut c);
        assert_eq!(h["orchestrator"]["running"], false, "{h}");
        assert!(
            h["orchestrator"]["status"]
                .as_str()
                .unwrap()
                .contains("no orchestrator serves this database"),
            "{h}"
        );
        // orchestrator_status says the same
        let running: Option<bool> = c
            .query_one("SELECT running FROM tasker.orchestrator_status", &[])
            .unwrap()
            .get(0);
        assert_eq!(running, Some(false));
    }
    admin
        .batch_execute("DROP DATABASE tasker_unserved")
        .unwrap();
}

#[test]
fn health_counts_active_tasks_and_shows_the_last_error_to_admins_only() {
    let mut c = connect();
    register_linear(&mut c, "h_count", "flow", 1);
    let t = create(&mut c, "h_count", "flow");
    c.query_one(
        "SELECT tasker.cancel_task($1::text::uuid)",
        &[&t.to_string()],
    )
    .unwrap();
    let h = health(&mut c);
    let states = h["active_tasks_by_state"].as_object().unwrap();
    assert!(
        states.keys().all(|s| !["complete", "cancelled", "error", "resolved_manually"].contains(&s.as_str())),
        "finished tasks are not counted: {h}"
    );
    assert!(
        h["orchestrator"].get("last_error").is_some(),
        "superuser sees it: {h}"
    );
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE h_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT tasker_app TO h_app;
         DO $$ BEGIN CREATE ROLE h_admin LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT tasker_admin TO h_admin",
    )
    .unwrap();
    c.batch_execute("SET ROLE h_app").unwrap();
    let h = health(&mut c);
    assert!(
        h["orchestrator"].get("last_error").is_none(),
        "hidden from apps: {h}"
    );
    assert!(h["orchestrator"]["running"].is_boolean(), "{h}");
    c.batch_execute("RESET ROLE; SET ROLE h_admin").unwrap();
    let h = health(&mut c);
    assert!(
        h["orchestrator"].get("last_error").is_some(),
        "shown to admins: {h}"
    );
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn health_does_not_reload_the_configuration() {
    let _guard = lock();
    let mut c = connect();
    let dir = std::env::temp_dir().join(format!("pg_tasker_health_cfg_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("environments/test")).unwrap();
    let file = dir.join("environments/test/orchestration.toml");
    std::fs::write(&file, "[orchestration]\nbatch_size = 77\n").unwrap();
    set_system(&mut c, "pg_tasker.config_dir", Some(dir.to_str().unwrap()));
    // (the reload is asynchronous: a session started after it sees the setting)
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut s = other_connection(&mut c);
    let before = health(&mut s);
    assert_eq!(before["config"]["valid"], true, "{before}");
    // the file breaks; health() keeps reporting what is in force, config()
    // reads the files and says what is wrong
    std::fs::write(&file, "[orchestration]\nbatch_sizee = 1\n").unwrap();
    let after = health(&mut s);
    assert_eq!(
        after["config"]["valid"], true,
        "health did not reload: {after}"
    );
    let cfg: String = s
        .query_one("SELECT tasker.config()::text", &[])
        .unwrap()
        .get(0);
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["valid"], false, "{cfg}");
    set_system(&mut c, "pg_tasker.config_dir", None);
    let _ = std::fs::remove_dir_all(&dir);
}
