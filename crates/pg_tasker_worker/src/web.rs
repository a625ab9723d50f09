//! The worker web API (seed 002), served while the worker runs when
//! `WorkerOptions::http` is set (`pg-tasker-worker --http ADDR`):
//!
//! - `GET /health`: JSON — worker id, namespaces with their queue depth,
//!   processing rate, active steps, last processed, uptime, connected;
//! - `GET /health/ready`: 200 while the worker reaches its database, 503
//!   otherwise (a Kubernetes readiness probe);
//! - `GET /health/live`: 200 while its loop goes round, 503 when it has
//!   not for a minute (a liveness probe);
//! - `GET /metrics`: Prometheus text ([`crate::telemetry`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::telemetry::Telemetry;

/// A loop that has not gone round for this long is not alive.
const LIVENESS: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct App {
    telemetry: Arc<Telemetry>,
    db: crate::connection::Database,
}

/// The queue depth of each namespace the worker serves, as its role sees
/// them (tasker.queue_status); None when the database cannot be asked.
async fn queue_depths(
    db: &crate::connection::Database,
    namespaces: &[String],
) -> Option<Vec<(String, i64)>> {
    let connect = tokio::time::timeout(Duration::from_secs(2), db.connect());
    let (client, connection) = connect.await.ok()?.ok()?;
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT namespace, depth FROM tasker.queue_status WHERE namespace = ANY ($1)",
            &[&namespaces],
        )
        .await
        .ok()?;
    Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn health(State(app): State<App>) -> Json<Value> {
    let t = &app.telemetry;
    let depths = queue_depths(&app.db, &t.namespaces).await;
    let namespaces: Vec<Value> = t
        .namespaces
        .iter()
        .map(|ns| {
            let depth = depths
                .as_ref()
                .and_then(|d| d.iter().find(|(n, _)| n == ns).map(|(_, d)| *d));
            let h = t.namespace_health(ns);
            json!({"namespace": ns, "queue_depth": depth,
                   "processing_rate_per_second": (h.processing_rate_per_second * 100.0).round() / 100.0,
                   "active_steps": h.active_steps, "last_processed_at_ms": h.last_processed_ms})
        })
        .collect();
    Json(json!({
        "status": if t.connected() { "healthy" } else { "degraded" },
        "worker_id": t.worker_id,
        "worker_type": "pg_tasker_worker",
        "namespaces": namespaces,
        "active_steps": t.in_flight(),
        "uptime_seconds": t.uptime().as_secs(),
        "connected": t.connected(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

fn probe(ok: bool, what: &str) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ok { what.to_string() } else { format!("not {what}") }})),
    )
        .into_response()
}

async fn ready(State(app): State<App>) -> Response {
    probe(app.telemetry.connected(), "ready")
}

async fn live(State(app): State<App>) -> Response {
    probe(app.telemetry.since_heartbeat() < LIVENESS, "alive")
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.telemetry.encode(),
    )
        .into_response()
}

/// Binds `addr` (an error names it when it cannot) and serves until
/// `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    db: crate::connection::Database,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve the web API on {addr}: {e}"))?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .route("/metrics", get(metrics))
        .with_state(App { telemetry, db });
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await;
    }))
}
