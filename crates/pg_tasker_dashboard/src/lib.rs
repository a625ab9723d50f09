//! pg-tasker-dashboard: a web dashboard over a pg_tasker database.
//!
//! Pages: `/` (orchestrator, queues, active tasks, the last hour's
//! throughput, recent failures), `/tasks` (filters by namespace, state,
//! template and creation time; keyset paging, so a page costs the same on
//! millions of tasks), `/tasks/{uuid}` (the DAG as SVG, each step's state,
//! attempts, last error and result), `/dlq` (pending entries; requeue and
//! resolve when the dashboard's role is tasker_admin), `/templates`, and
//! `/metrics` (`tasker.metrics()`). It sees what its role sees (namespace
//! privileges apply: docs/security.md); it changes nothing unless that
//! role has tasker_admin. Every value is escaped (maud).

pub mod dag;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use pg_tasker_worker::connection::Database;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

/// Tasks per page of `/tasks`.
pub const PAGE: i64 = 50;

struct Inner {
    db: Database,
    client: Mutex<Option<Arc<Client>>>,
    admin: bool,
}

#[derive(Clone)]
struct App(Arc<Inner>);

type Page = Result<Html<String>, Response>;

fn failure(status: StatusCode, message: String) -> Response {
    (
        status,
        Html(layout("error", html! { p.error { (message) } }).into_string()),
    )
        .into_response()
}

fn db_failure(e: tokio_postgres::Error) -> Response {
    let text = pg_tasker_worker::connection::explain(&e);
    let status = match e.code().map(|c| c.code()) {
        Some("42501") => StatusCode::FORBIDDEN,
        // a filter Postgres cannot read (a state, a time)
        Some("22P02" | "22007" | "22008" | "22023") => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    failure(status, text)
}

impl App {
    /// The shared connection (opened again when it broke).
    async fn client(&self) -> Result<Arc<Client>, Response> {
        let mut slot = self.0.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, connection) = self.0.db.connect().await.map_err(|e| {
            failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cannot reach the database: {}",
                    pg_tasker_worker::connection::explain(&e)
                ),
            )
        })?;
        tokio::spawn(connection);
        let c = Arc::new(client);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Response> {
        self.client()
            .await?
            .query(sql, params)
            .await
            .map_err(db_failure)
    }
}

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "pg_tasker — " (title) }
                style { (maud::PreEscaped(CSS)) }
            }
            body {
                nav {
                    strong { "pg_tasker" }
                    a href="/" { "Overview" } a href="/tasks" { "Tasks" } a href="/dlq" { "DLQ" }
                    a href="/templates" { "Templates" } a href="/metrics" { "Metrics" }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

const CSS: &str = "body{font-family:sans-serif;margin:0;color:#212121}nav{background:#263238;padding:10px 16px}\
nav a,nav strong{color:#eceff1;margin-right:18px;text-decoration:none}main{padding:8px 20px}\
table{border-collapse:collapse;margin:8px 0 18px}td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;\
vertical-align:top;font-size:14px}th{background:#f5f5f5}.state{padding:1px 6px;border-radius:4px}\
.error{color:#b71c1c}pre{margin:0;max-width:520px;white-space:pre-wrap;font-size:12px}\
form.inline{display:inline}.cards{display:flex;gap:14px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;\
padding:8px 14px;min-width:140px}.card b{font-size:22px;display:block}";

fn state_badge(state: &str) -> Markup {
    let (fill, stroke) = dag::colors(state);
    html! { span.state style=(format!("background:{fill};border:1px solid {stroke}")) { (state) } }
}

fn json_cell(v: Option<serde_json::Value>) -> Markup {
    html! { @if let Some(v) = v { pre { (serde_json::to_string_pretty(&v).unwrap_or_default()) } } }
}

async fn overview(State(app): State<App>) -> Page {
    let orch = app
        .query(
            "SELECT running, status, ticks, errors, last_tick_at::text, environment FROM tasker.orchestrator_status",
            &[],
        )
        .await?;
    let queues = app
        .query(
            "SELECT namespace, depth, visible, oldest_message_age_seconds FROM tasker.queue_status",
            &[],
        )
        .await?;
    let active = app
        .query(
            "SELECT s.key, s.value::bigint FROM jsonb_each_text(tasker.health() -> 'active_tasks_by_state') s
             ORDER BY 1",
            &[],
        )
        .await?;
    let hour = app
        .query(
            "SELECT coalesce(sum(tasks_completed), 0)::bigint, coalesce(sum(steps_completed), 0)::bigint,
                    coalesce(sum(step_failures), 0)::bigint
             FROM tasker.analytics_throughput('1 hour', '1 hour')",
            &[],
        )
        .await?;
    let failures = app
        .query(
            "SELECT namespace, task_name, step_name, error_code, failures, last_message, last_seen::text
             FROM tasker.analytics_failures('1 day') LIMIT 10",
            &[],
        )
        .await?;
    let h = &hour[0];
    let body = html! {
        div.cards {
            div.card { "tasks completed (1 h)" b { (h.get::<_, i64>(0)) } }
            div.card { "steps completed (1 h)" b { (h.get::<_, i64>(1)) } }
            div.card { "step failures (1 h)" b { (h.get::<_, i64>(2)) } }
            @for r in &active { div.card { "active: " (r.get::<_, String>(0)) b { (r.get::<_, i64>(1)) } } }
        }
        h2 { "Orchestrator" }
        table {
            tr { th { "running" } th { "status" } th { "ticks" } th { "errors" } th { "last tick" } th { "environment" } }
            @for r in &orch {
                tr {
                    td { (r.get::<_, Option<bool>>(0).map_or("?", |b| if b { "yes" } else { "no" })) }
                    td { (r.get::<_, Option<String>>(1).unwrap_or_default()) }
                    td { (r.get::<_, Option<i64>>(2).unwrap_or(0)) }
                    td { (r.get::<_, Option<i64>>(3).unwrap_or(0)) }
                    td { (r.get::<_, Option<String>>(4).unwrap_or_default()) }
                    td { (r.get::<_, Option<String>>(5).unwrap_or_default()) }
                }
            }
        }
        h2 { "Queues" }
        table {
            tr { th { "namespace" } th { "depth" } th { "visible" } th { "oldest message (s)" } }
            @for r in &queues {
                @let ns: String = r.get(0);
                tr {
                    td { a href=(format!("/tasks?namespace={}", urlencode(&ns))) { (ns) } }
                    td { (r.get::<_, Option<i64>>(1).unwrap_or(0)) }
                    td { (r.get::<_, Option<i64>>(2).unwrap_or(0)) }
                    td { (r.get::<_, Option<i32>>(3).map(|a| a.to_string()).unwrap_or_default()) }
                }
            }
        }
        h2 { "Failures (24 h)" }
        table {
            tr { th { "namespace" } th { "task" } th { "step" } th { "code" } th { "failures" } th { "last message" } th { "last seen" } }
            @for r in &failures {
                tr {
                    td { (r.get::<_, String>(0)) } td { (r.get::<_, String>(1)) } td { (r.get::<_, String>(2)) }
                    td { (r.get::<_, Option<String>>(3).unwrap_or_default()) } td { (r.get::<_, i64>(4)) }
                    td { (r.get::<_, Option<String>>(5).unwrap_or_default()) } td { (r.get::<_, Option<String>>(6).unwrap_or_default()) }
                }
            }
        }
    };
    Ok(Html(layout("Overview", body).into_string()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The filters of `/tasks` (empty = any).
#[derive(Debug, Default, Deserialize)]
pub struct TaskFilter {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub template: String,
    /// created at or after (any timestamptz Postgres reads)
    #[serde(default)]
    pub since: String,
    /// the page after this task (keyset: task uuids are time-ordered)
    #[serde(default)]
    pub before: String,
}

fn opt(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

async fn tasks(State(app): State<App>, Query(f): Query<TaskFilter>) -> Page {
    let before = match opt(&f.before).map(uuid::Uuid::parse_str) {
        Some(Err(_)) => {
            return Err(failure(
                StatusCode::BAD_REQUEST,
                "before is not a task uuid".into(),
            ))
        }
        Some(Ok(u)) => Some(u.to_string()),
        None => None,
    };
    let rows = app
        .query(
            "SELECT task_uuid::text, namespace, task_name, task_version, state::text, steps_total, steps_complete,
                    steps_error, created_at::text, completed_at::text
             FROM tasker.list_tasks($1, $2::text::tasker.task_state, $3, $4::text::timestamptz, $5::text::uuid,
                                    $6::integer)",
            &[&opt(&f.namespace), &opt(&f.state), &opt(&f.template), &opt(&f.since), &before, &((PAGE + 1) as i32)],
        )
        .await?;
    let more = rows.len() as i64 > PAGE;
    let shown = &rows[..rows.len().min(PAGE as usize)];
    let next = shown.last().filter(|_| more).map(|r| {
        format!(
            "/tasks?namespace={}&state={}&template={}&since={}&before={}",
            urlencode(&f.namespace),
            urlencode(&f.state),
            urlencode(&f.template),
            urlencode(&f.since),
            r.get::<_, String>(0)
        )
    });
    let body = html! {
        form method="get" action="/tasks" {
            input name="namespace" placeholder="namespace" value=(f.namespace);
            select name="state" {
                option value="" { "any state" }
                @for s in pg_tasker_core::state::TaskState::ALL.iter().map(|s| s.as_str()) {
                    option value=(s) selected[f.state == s] { (s) }
                }
            }
            input name="template" placeholder="template" value=(f.template);
            input name="since" placeholder="created since (2026-12-01 10:00)" value=(f.since);
            button type="submit" { "Filter" }
        }
        table id="tasks" {
            tr { th { "task" } th { "namespace" } th { "template" } th { "state" } th { "steps" } th { "created" } th { "finished" } }
            @for r in shown {
                @let id: String = r.get(0);
                tr {
                    td { a href=(format!("/tasks/{id}")) { (id) } }
                    td { (r.get::<_, String>(1)) }
                    td { (r.get::<_, String>(2)) " " (r.get::<_, String>(3)) }
                    td { (state_badge(&r.get::<_, String>(4))) }
                    td { (r.get::<_, i32>(6)) "/" (r.get::<_, i32>(5)) @if r.get::<_, i32>(7) > 0 { span.error { " (" (r.get::<_, i32>(7)) " in error)" } } }
                    td { (r.get::<_, String>(8)) }
                    td { (r.get::<_, Option<String>>(9).unwrap_or_default()) }
                }
            }
        }
        @if shown.is_empty() { p { "No task matches." } }
        @if let Some(n) = next { a id="next" href=(n) { "older tasks →" } }
    };
    Ok(Html(layout("Tasks", body).into_string()))
}

async fn task(State(app): State<App>, Path(id): Path<String>) -> Page {
    let Ok(id) = uuid::Uuid::parse_str(&id).map(|u| u.to_string()) else {
        return Err(failure(StatusCode::NOT_FOUND, "not a task uuid".into()));
    };
    let t = app
        .query(
            "SELECT namespace, task_name, task_version, state::text, created_at::text, completed_at::text,
                    steps_total, steps_complete, steps_error
             FROM tasker.task_status WHERE task_uuid = $1::text::uuid",
            &[&id],
        )
        .await?;
    let Some(t) = t.first() else {
        return Err(failure(
            StatusCode::NOT_FOUND,
            format!("no task {id} (or this role may not see it)"),
        ));
    };
    let steps = app
        .query(
            "SELECT step_name, state::text, attempts, max_attempts, dependencies, last_error_message, results,
                    last_error, completed_at::text
             FROM tasker.step_status WHERE task_uuid = $1::text::uuid ORDER BY position",
            &[&id],
        )
        .await?;
    let nodes: Vec<dag::Node> = steps
        .iter()
        .map(|s| dag::Node {
            name: s.get(0),
            state: s.get(1),
            attempts: s.get(2),
            max_attempts: s.get(3),
            dependencies: s.get(4),
        })
        .collect();
    let title = format!(
        "{}/{} {}",
        t.get::<_, String>(0),
        t.get::<_, String>(1),
        t.get::<_, String>(2)
    );
    let body = html! {
        p { "task " code { (id) } " " (state_badge(&t.get::<_, String>(3))) " created " (t.get::<_, String>(4))
            @if let Some(c) = t.get::<_, Option<String>>(5) { ", finished " (c) }
            " — " (t.get::<_, i32>(7)) " of " (t.get::<_, i32>(6)) " steps complete" }
        @if nodes.len() <= dag::MAX_NODES { (dag::svg(&nodes)) }
        @else { p { (nodes.len()) " steps: too many to draw; all are listed below." } }
        h2 { "Steps" }
        table id="steps" {
            tr { th { "step" } th { "state" } th { "attempts" } th { "depends on" } th { "last error" } th { "result" } }
            @for (s, n) in steps.iter().zip(&nodes) {
                tr {
                    td { (n.name) } td { (state_badge(&n.state)) } td { (n.attempts) "/" (n.max_attempts) }
                    td { (n.dependencies.join(", ")) }
                    td.error { (s.get::<_, Option<String>>(5).unwrap_or_default()) (json_cell(s.get(7))) }
                    td { (json_cell(s.get(6))) }
                }
            }
        }
    };
    Ok(Html(layout(&title, body).into_string()))
}

async fn dlq(State(app): State<App>) -> Page {
    let rows = app
        .query(
            "SELECT dlq_uuid::text, task_uuid::text, reason, original_state::text, error, created_at::text
             FROM tasker.dlq WHERE resolution_status = 'pending' ORDER BY created_at DESC LIMIT 200",
            &[],
        )
        .await;
    let rows = match rows {
        Ok(r) => r,
        Err(_) if !app.0.admin => {
            return Ok(Html(
                layout(
                    "DLQ",
                    html! { p { "The dead letter queue takes a tasker_admin connection." } },
                )
                .into_string(),
            ))
        }
        Err(e) => return Err(e),
    };
    let body = html! {
        @if rows.is_empty() { p { "Nothing pending." } }
        table id="dlq" {
            tr { th { "entry" } th { "task" } th { "reason" } th { "state" } th { "error" } th { "since" } @if app.0.admin { th { "" } } }
            @for r in &rows {
                @let id: String = r.get(0);
                tr {
                    td { code { (id) } }
                    td { @if let Some(t) = r.get::<_, Option<String>>(1) { a href=(format!("/tasks/{t}")) { (t) } } }
                    td { (r.get::<_, String>(2)) } td { (r.get::<_, Option<String>>(3).unwrap_or_default()) }
                    td.error { (json_cell(r.get(4))) } td { (r.get::<_, String>(5)) }
                    @if app.0.admin {
                        td {
                            @if r.get::<_, Option<String>>(1).is_some() {
                                form.inline method="post" action=(format!("/dlq/{id}/requeue")) { button { "requeue" } }
                            }
                            form.inline method="post" action=(format!("/dlq/{id}/resolve")) { button { "resolve" } }
                        }
                    }
                }
            }
        }
    };
    Ok(Html(layout("DLQ", body).into_string()))
}

async fn dlq_action(
    State(app): State<App>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if !app.0.admin {
        return failure(
            StatusCode::FORBIDDEN,
            "read-only: this dashboard's role is not tasker_admin".into(),
        );
    }
    let Ok(id) = uuid::Uuid::parse_str(&id).map(|u| u.to_string()) else {
        return failure(StatusCode::NOT_FOUND, "not a DLQ entry".into());
    };
    let sql = match action.as_str() {
        "requeue" => "SELECT tasker.dlq_requeue($1::text::uuid, 'from the dashboard')",
        "resolve" => "SELECT tasker.dlq_resolve($1::text::uuid, 'from the dashboard')",
        _ => return failure(StatusCode::NOT_FOUND, "unknown action".into()),
    };
    match app.query(sql, &[&id]).await {
        Ok(_) => Redirect::to("/dlq").into_response(),
        Err(r) => r,
    }
}

async fn templates(State(app): State<App>) -> Page {
    let rows = app
        .query(
            "SELECT namespace, name, version, step_count, coalesce(description, ''), created_at::text
             FROM tasker.templates ORDER BY namespace, name, created_at DESC",
            &[],
        )
        .await?;
    let body = html! {
        table id="templates" {
            tr { th { "namespace" } th { "name" } th { "version" } th { "steps" } th { "description" } th { "registered" } }
            @for r in &rows {
                tr {
                    td { (r.get::<_, String>(0)) } td { (r.get::<_, String>(1)) } td { (r.get::<_, String>(2)) }
                    td { (r.get::<_, i32>(3)) } td { (r.get::<_, String>(4)) } td { (r.get::<_, String>(5)) }
                }
            }
        }
    };
    Ok(Html(layout("Templates", body).into_string()))
}

async fn metrics(State(app): State<App>) -> Response {
    match app.query("SELECT tasker.metrics()", &[]).await {
        Ok(rows) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            rows[0].get::<_, String>(0),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// Connects (refusing a database without pg_tasker), learns whether its
/// role is tasker_admin, binds `listen` and serves until `stop` resolves.
/// Returns the address bound and the server's task.
pub async fn serve(
    db: Database,
    listen: SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let (client, connection) = db.connect().await.map_err(|e| {
        format!(
            "cannot connect to {}: {}",
            pg_tasker_worker::connection::describe(&db),
            pg_tasker_worker::connection::explain(&e)
        )
    })?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT pg_has_role(current_user, 'tasker_admin', 'USAGE'),
                    EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_tasker')",
            &[],
        )
        .await
        .map_err(|e| pg_tasker_worker::connection::explain(&e))?;
    if !row.get::<_, bool>(1) {
        return Err("the pg_tasker extension is not installed in this database".into());
    }
    let app = App(Arc::new(Inner {
        db,
        client: Mutex::new(Some(Arc::new(client))),
        admin: row.get(0),
    }));
    let router = Router::new()
        .route("/", get(overview))
        .route("/tasks", get(tasks))
        .route("/tasks/{id}", get(task))
        .route("/dlq", get(dlq))
        .route("/dlq/{id}/{action}", post(dlq_action))
        .route("/templates", get(templates))
        .route("/metrics", get(metrics))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    Ok((
        addr,
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await;
        }),
    ))
}
