use super::*;
use std::fs;

fn no_vars(_: &str) -> Option<String> {
    None
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pg_tasker_cfg_{tag}_{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(d.join("base")).unwrap();
    d
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

#[test]
fn embedded_defaults_and_environment_overlays() {
    let dev = load_orchestration(&Location::Embedded, "development", &no_vars).unwrap();
    assert_eq!(dev.config.orchestration.cycle_interval_ms, 500);
    assert_eq!(
        dev.config.orchestration.batch_size, 100,
        "sibling keys of the overlay survive"
    );
    let test = load_orchestration(&Location::Embedded, "test", &no_vars).unwrap();
    assert_eq!(test.config.orchestration.cycle_interval_ms, 200);
    assert_eq!(
        test.key_sources["orchestration.cycle_interval_ms"],
        "embedded:environments/test/orchestration.toml"
    );
    assert_eq!(
        test.key_sources["orchestration.batch_size"],
        "embedded:base/orchestration.toml"
    );
    let w = load_worker(&Location::Embedded, "production", &no_vars).unwrap();
    assert_eq!(
        (w.config.worker.concurrency, w.config.worker.batch_size),
        (16, 10)
    );
    // an environment without overlays is the base
    let other = load_orchestration(&Location::Embedded, "staging", &no_vars).unwrap();
    assert_eq!(other.config.orchestration.cycle_interval_ms, 1000);
}

#[test]
fn deep_merge_keeps_sibling_tables() {
    let mut base: toml::Table = toml::from_str("[a.shared]\nx = 1\n[a.keep]\ny = 2").unwrap();
    let overlay: toml::Table =
        toml::from_str("[a.orchestration]\nz = 3\n[a.shared]\nx = 10").unwrap();
    deep_merge(&mut base, overlay);
    assert_eq!(base["a"]["shared"]["x"].as_integer(), Some(10));
    assert_eq!(base["a"]["keep"]["y"].as_integer(), Some(2));
    assert_eq!(base["a"]["orchestration"]["z"].as_integer(), Some(3));
}

#[test]
fn env_substitution_with_defaults() {
    let vars = |n: &str| match n {
        "SET" => Some("value".to_string()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    assert_eq!(substitute("a=${SET}", &vars).unwrap(), "a=value");
    assert_eq!(substitute("a=${SET:-d}", &vars).unwrap(), "a=value");
    assert_eq!(substitute("a=${UNSET:-d}", &vars).unwrap(), "a=d");
    assert_eq!(substitute("a=${EMPTY:-d}", &vars).unwrap(), "a=d");
    assert_eq!(
        substitute("cost=$$5 and $x", &vars).unwrap(),
        "cost=$5 and $x"
    );
    assert!(substitute("a=${UNSET}", &vars)
        .unwrap_err()
        .contains("UNSET"));
    assert!(substitute("a=${bad-name}", &vars).is_err());
    let url = load_worker(&Location::Embedded, "test", &|n| {
        (n == "DATABASE_URL").then(|| "postgresql://u:pw@h/db".to_string())
    })
    .unwrap();
    assert_eq!(url.config.database.url, "postgresql://u:pw@h/db");
    assert_eq!(
        describe(&url)["config"]["database"]["url"],
        "postgresql://u:***@h/db",
        "secrets are redacted"
    );
    let default = load_worker(&Location::Embedded, "test", &no_vars).unwrap();
    assert!(default
        .config
        .database
        .url
        .starts_with("postgresql://postgres@localhost"));
}

#[test]
fn directory_files_override_and_errors_name_file_and_key() {
    let d = temp_dir("dir");
    write(
        &d,
        "environments/qa/orchestration.toml",
        "[orchestration]\ncycle_interval_ms = 50\n",
    );
    let ok = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap();
    assert_eq!(ok.config.orchestration.cycle_interval_ms, 50);
    assert_eq!(
        ok.files.last().unwrap(),
        &d.join("environments/qa/orchestration.toml")
            .display()
            .to_string()
    );

    // unknown key
    write(
        &d,
        "environments/qa/orchestration.toml",
        "[orchestration]\ncycle_intervall_ms = 50\n",
    );
    let e = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
    assert_eq!(
        e.key.as_deref(),
        Some("orchestration.cycle_intervall_ms"),
        "{e}"
    );
    assert!(
        e.file.ends_with("environments/qa/orchestration.toml"),
        "{e}"
    );
    assert!(e.message.contains("unknown field"), "{e}");

    // bad type
    write(
        &d,
        "environments/qa/orchestration.toml",
        "[orchestration]\nbatch_size = \"many\"\n",
    );
    let e = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("orchestration.batch_size"), "{e}");
    assert!(
        e.file.ends_with("environments/qa/orchestration.toml"),
        "{e}"
    );

    // out of range
    write(
        &d,
        "environments/qa/orchestration.toml",
        "[orchestration]\ncycle_interval_ms = 1\n",
    );
    let e = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("orchestration.cycle_interval_ms"));
    assert!(e.to_string().contains("between 10 and"), "{e}");

    // broken TOML
    write(&d, "environments/qa/orchestration.toml", "[orchestration\n");
    let e = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
    assert!(
        e.file.ends_with("environments/qa/orchestration.toml")
            && e.message.starts_with("invalid TOML"),
        "{e}"
    );

    // a base file on disk replaces the compiled-in one; unknown top-level table
    write(&d, "environments/qa/orchestration.toml", "");
    write(&d, "base/common.toml", "[database]\nurl = \"x\"\n[queues]\ndefault_visibility_timeout_seconds = 5\n[extra]\na = 1\n");
    let e = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("extra"), "{e}");
    assert!(e.file.ends_with("base/common.toml"), "{e}");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn environment_names_are_checked() {
    assert!(load_orchestration(&Location::Embedded, "../etc", &no_vars).is_err());
    assert!(load_orchestration(&Location::Embedded, "", &no_vars).is_err());
}

#[test]
fn known_environments_are_the_overlays_there_are() {
    assert_eq!(
        known_environments(&Location::Embedded),
        ["development", "production", "test"]
    );
    let d = temp_dir("envs");
    fs::create_dir_all(d.join("environments/staging")).unwrap();
    assert_eq!(
        known_environments(&Location::Dir(d.clone())),
        ["development", "production", "staging", "test"]
    );
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn maintenance_settings_are_validated() {
    let d = temp_dir("maint");
    for (text, key) in [
        (
            "[orchestration.retention]\npolicy = \"shred\"\n",
            "orchestration.retention.policy",
        ),
        (
            "[orchestration.retention]\nstates = [\"pending\"]\n",
            "orchestration.retention.states",
        ),
        (
            "[orchestration.staleness]\nsteps_in_process_minutes = 0\n",
            "orchestration.staleness.steps_in_process_minutes",
        ),
        (
            "[orchestration.task_requests]\nqueue = \"Bad Name\"\n",
            "orchestration.task_requests.queue",
        ),
    ] {
        write(&d, "environments/qa/orchestration.toml", text);
        let e = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
    }
    write(
        &d,
        "environments/qa/orchestration.toml",
        "[orchestration.retention]\npolicy = \"archive\"\n",
    );
    let ok = load_orchestration(&Location::Dir(d.clone()), "qa", &no_vars).unwrap();
    assert_eq!(
        ok.config.orchestration.retention.policy,
        RetentionPolicy::Archive
    );
    assert!(
        ok.config.orchestration.staleness.enabled,
        "siblings from the base survive"
    );
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn retry_defaults_come_from_common() {
    let c = load_orchestration(&Location::Embedded, "test", &no_vars).unwrap();
    assert_eq!(c.config.retry, crate::template::RetryPolicy::default());
    assert_eq!(
        c.key_sources["retry.max_attempts"],
        "embedded:base/common.toml"
    );
    let d = temp_dir("retry");
    write(
        &d,
        "environments/qa/common.toml",
        "[retry]\nmax_attempts = 0\n",
    );
    let e = load_worker(&Location::Dir(d.clone()), "qa", &no_vars).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("retry.max_attempts"), "{e}");
    assert!(e.file.ends_with("environments/qa/common.toml"), "{e}");
    let _ = fs::remove_dir_all(&d);
}
