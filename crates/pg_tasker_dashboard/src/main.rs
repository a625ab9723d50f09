//! pg-tasker-dashboard: serves the web dashboard of a pg_tasker database.
//! Read-only unless its role has tasker_admin (then the DLQ can be
//! requeued and resolved). SIGINT or SIGTERM stop it.

use std::process::ExitCode;

use clap::Parser;

/// A web dashboard over a pg_tasker database.
#[derive(Parser, Debug)]
#[command(name = "pg-tasker-dashboard", version, about, long_about = None)]
struct Args {
    /// Database URL or libpq key=value string (sslmode honoured); what it
    /// leaves out comes from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = "")]
    database_url: String,

    /// Address to listen on
    #[arg(
        long,
        env = "PG_TASKER_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let db = match pg_tasker_worker::connection::database_config(&args.database_url) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("pg-tasker-dashboard: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match pg_tasker_dashboard::serve(db, args.listen, stop).await {
        Ok((addr, server)) => {
            eprintln!("pg-tasker-dashboard: serving http://{addr}/");
            let _ = server.await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pg-tasker-dashboard: {e}");
            ExitCode::from(1)
        }
    }
}
