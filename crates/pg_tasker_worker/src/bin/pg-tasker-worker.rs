//! pg-tasker-worker: runs the example handlers (or a subset) against the
//! namespace queues of a pg_tasker database.
//!
//! ```text
//! pg-tasker-worker --namespace ecommerce [--namespace data_pipeline ...]
//!                  [--handlers all|ecommerce|pipeline|microservices|teams]
//!                  [--database-url URL] [--config-dir DIR] [--environment ENV]
//!                  [--worker-id ID] [--concurrency N] [--visibility-timeout SECONDS]
//! ```
//! Settings come from the `worker` context of the configuration
//! (compiled-in files, or --config-dir), for --environment (default: the
//! PG_TASKER_ENV variable, else development); flags override them. SIGINT or
//! SIGTERM shut it down gracefully.

use std::process::ExitCode;

use pg_tasker_core::config::{self, Location};
use pg_tasker_worker::{examples, run, WorkerOptions};

fn usage() -> ExitCode {
    eprintln!(
        "usage: pg-tasker-worker --namespace NS [--namespace NS ...] [--handlers all|ecommerce|pipeline|microservices|teams]\n\
         \x20                       [--database-url URL] [--config-dir DIR] [--environment ENV] [--worker-id ID] [--concurrency N] [--visibility-timeout SECONDS]"
    );
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut namespaces, mut handlers, mut url, mut dir, mut env, mut id, mut concurrency) =
        (Vec::new(), "all".to_string(), None, None, None, None, None);
    let mut lease: Option<u64> = None;
    while let Some(a) = args.next() {
        let mut value = || args.next();
        match a.as_str() {
            "--namespace" => match value() {
                Some(v) => namespaces.push(v),
                None => return usage(),
            },
            "--handlers" => handlers = value().unwrap_or_default(),
            "--database-url" => url = value(),
            "--config-dir" => dir = value(),
            "--environment" => env = value(),
            "--worker-id" => id = value(),
            "--concurrency" => match value().and_then(|v| v.parse::<u32>().ok()) {
                Some(n) if n > 0 => concurrency = Some(n),
                _ => return usage(),
            },
            "--visibility-timeout" => match value().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n > 0 => lease = Some(n),
                _ => return usage(),
            },
            "-h" | "--help" => return usage(),
            other => {
                eprintln!("unknown argument {other}");
                return usage();
            }
        }
    }
    let env = env
        .or_else(|| std::env::var("PG_TASKER_ENV").ok())
        .unwrap_or_else(|| "development".into());
    let location = dir
        .map(|d| Location::Dir(d.into()))
        .unwrap_or(Location::Embedded);
    let cfg = match config::load_worker(&location, &env, &config::process_env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let mut options = WorkerOptions::from_config(&cfg.config);
    if !namespaces.is_empty() {
        options.namespaces = namespaces;
    }
    if let Some(u) = url {
        options.database_url = u;
    }
    if let Some(i) = id {
        options.worker_id = i;
    }
    if let Some(n) = concurrency {
        options.concurrency = n;
    }
    if let Some(s) = lease {
        options.visibility_timeout = std::time::Duration::from_secs(s);
    }
    let Some(registry) = examples::by_name(&handlers) else {
        eprintln!("unknown handler set \"{handlers}\"");
        return usage();
    };
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
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
