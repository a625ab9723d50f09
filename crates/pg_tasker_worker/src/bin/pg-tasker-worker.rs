//! pg-tasker-worker: runs the example handlers (or a subset) against the
//! namespace queues of a pg_tasker database. `pg-tasker-worker --help`
//! lists every flag, its default and its environment variable.
//!
//! Settings come from the `worker` context of the configuration
//! (compiled-in files, or --config-dir), for --environment; flags (or their
//! environment variables) override them. The database URL may leave out
//! anything libpq's variables give (PGHOST, PGPORT, PGUSER, PGPASSWORD,
//! PGDATABASE). Misconfiguration ends the worker at once with exit code 1
//! and the cause; SIGINT or SIGTERM shut it down gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pg_tasker_core::config::{self, Location};
use pg_tasker_worker::{examples, run, WorkerOptions};

/// Runs pg_tasker's example step handlers for the given namespaces.
#[derive(Parser, Debug)]
#[command(name = "pg-tasker-worker", version, about, long_about = None)]
struct Args {
    /// Namespace whose queue to serve (repeat the flag, or comma-separate
    /// the variable); default: the configuration's worker.namespaces
    #[arg(
        long = "namespace",
        short = 'n',
        env = "PG_TASKER_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,

    /// Which example handlers to run
    #[arg(long, env = "PG_TASKER_HANDLERS", default_value = "all",
          value_parser = ["all", "ecommerce", "pipeline", "microservices", "teams", "dynamic"])]
    handlers: String,

    /// Database URL or libpq key=value string; default: the configuration's
    /// database.url (${DATABASE_URL:-...}); what it leaves out comes from
    /// PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// Directory with base/ and environments/<env>/ TOML files; default: the
    /// compiled-in configuration
    #[arg(long, env = "PG_TASKER_CONFIG_DIR")]
    config_dir: Option<PathBuf>,

    /// Configuration environment (an environments/<env>/ overlay must exist)
    #[arg(long, env = "PG_TASKER_ENV", default_value = "development")]
    environment: String,

    /// Worker id recorded with every read and result; default: host and pid
    #[arg(long, env = "PG_TASKER_WORKER_ID")]
    worker_id: Option<String>,

    /// Handlers running at the same time; default: worker.concurrency
    #[arg(long, env = "PG_TASKER_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=10000))]
    concurrency: Option<u32>,

    /// Messages asked for per exchange, at most; default: worker.batch_size
    #[arg(long, env = "PG_TASKER_BATCH_SIZE", value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch_size: Option<u32>,

    /// Lease on a message in seconds; default: worker.visibility_timeout_seconds
    #[arg(long = "visibility-timeout", env = "PG_TASKER_VISIBILITY_TIMEOUT",
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    visibility_timeout: Option<u64>,

    /// Serve the web API (/health, /health/ready, /health/live, /metrics)
    /// on this address, e.g. 0.0.0.0:8081; default: worker.web when enabled
    #[arg(long, env = "PG_TASKER_HTTP")]
    http: Option<std::net::SocketAddr>,

    /// Log lines on stderr as text or as JSON objects (one per line; a
    /// step's lines carry its ids and trace id)
    #[arg(long, env = "PG_TASKER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn fail(message: impl std::fmt::Display, code: u8) -> ExitCode {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "pg-tasker-worker: {message}");
    ExitCode::from(code)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // --help and --version on stdout with status 0, usage errors on
            // stderr with 2; a closed pipe is not a panic
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    if args.log_format == "json" {
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        logs.init();
    }
    let location = args
        .config_dir
        .clone()
        .map(Location::Dir)
        .unwrap_or(Location::Embedded);
    let known = config::known_environments(&location);
    if !known.contains(&args.environment) {
        return fail(
            format!(
                "unknown environment \"{}\" (known: {})",
                args.environment,
                known.join(", ")
            ),
            2,
        );
    }
    let cfg = match config::load_worker(&location, &args.environment, &config::process_env) {
        Ok(c) => c,
        Err(e) => return fail(format!("invalid configuration: {e}"), 2),
    };
    let mut options = WorkerOptions::from_config(&cfg.config);
    if !args.namespaces.is_empty() {
        options.namespaces = args.namespaces;
    }
    if options.namespaces.is_empty() {
        return fail(
            "no namespace to serve: give --namespace (or worker.namespaces)",
            2,
        );
    }
    if let Some(u) = args.database_url {
        options.database_url = u;
    }
    if let Some(i) = args.worker_id {
        options.worker_id = i;
    }
    if let Some(n) = args.concurrency {
        options.concurrency = n;
    }
    if let Some(n) = args.batch_size {
        options.batch_size = n;
    }
    if let Some(s) = args.visibility_timeout {
        options.visibility_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(a) = args.http {
        options.http = Some(a);
    }
    let registry = examples::by_name(&args.handlers).expect("the parser allows known sets only");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match run(options, registry, shutdown).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}
