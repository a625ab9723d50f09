//! Throwaway PostgreSQL clusters with pg_tasker preloaded, for end-to-end
//! tests and benchmarks (wraps scripts/cluster.sh; needs PostgreSQL 15 with
//! pg_tasker and pgmq installed, as scripts/setup.sh and `cargo pgrx
//! install` leave them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

static NEXT: AtomicU16 = AtomicU16::new(0);

/// A cluster in its own directory, listening on a Unix socket only. Stopped
/// and removed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    script: PathBuf,
    preload: String,
}

impl Cluster {
    /// Starts a new cluster with pg_tasker preloaded (its orchestrator runs).
    /// `repo` is the repository root (for scripts/cluster.sh); `tag` names
    /// its directory.
    pub fn start(repo: &Path, tag: &str) -> Cluster {
        Self::start_with_preload(repo, tag, "pg_tasker")
    }

    /// Starts a new cluster with the given shared_preload_libraries (empty:
    /// none, so no orchestrator).
    pub fn start_with_preload(repo: &Path, tag: &str, preload: &str) -> Cluster {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let c = Cluster {
            dir: std::env::temp_dir().join(format!("pg_tasker_{tag}_{}_{n}", std::process::id())),
            port: 30000 + ((std::process::id() % 500) as u16) * 10 + n % 10,
            script: repo.join("scripts/cluster.sh"),
            preload: preload.to_string(),
        };
        c.run("destroy");
        c.run("start");
        c
    }

    fn run(&self, action: &str) {
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(action)
            .env("PG_TASKER_CLUSTER_DIR", &self.dir)
            .env("PG_TASKER_PORT", self.port.to_string())
            .env("PG_TASKER_PRELOAD", &self.preload)
            .output()
            .expect("cluster.sh runs");
        assert!(
            out.status.success(),
            "cluster.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A libpq connection string for the `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        )
    }

    /// Stops the server (`pg_ctl stop -m fast`): connections are refused
    /// until [`Cluster::start_again`].
    pub fn stop(&self) {
        self.run("stop");
    }

    /// Starts a stopped server again.
    pub fn start_again(&self) {
        self.run("start");
    }

    /// `pg_ctl restart -m immediate` (crash recovery, no shutdown checkpoint).
    pub fn restart_immediate(&self) {
        self.restart("immediate");
    }

    /// `pg_ctl restart -m fast` (a clean restart, e.g. after ALTER SYSTEM).
    pub fn restart_fast(&self) {
        self.restart("fast");
    }

    fn restart(&self, mode: &str) {
        let mut cmd = if is_root() {
            let mut c = Command::new("sudo");
            c.args(["-u", "postgres", "/usr/lib/postgresql/15/bin/pg_ctl"]);
            c
        } else {
            Command::new("/usr/lib/postgresql/15/bin/pg_ctl")
        };
        let status = cmd
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "-l"])
            .arg(self.dir.join("postgres.log"))
            .arg("restart")
            .status()
            .expect("pg_ctl runs");
        assert!(status.success(), "pg_ctl restart -m {mode} failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.run("destroy");
    }
}
