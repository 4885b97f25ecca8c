//! The admin HTTP server: `/metrics`, the status page (`/`), the JSON status and the admin
//! API (backend state and weight, reload), `/healthz` and `/readyz`. It runs on its own task
//! with its own socket and only reads the shared snapshot and atomics, so it never sits on
//! the data path. axum on the existing tokio runtime: routing, JSON bodies and graceful
//! shutdown without writing an HTTP server.
//!
//! Mutating calls (`POST`) need `Authorization: Bearer <token>` when `admin.token_env` is
//! set, and a JSON content type always, so a cross-site form cannot post to a loopback
//! admin port.

pub mod exporter;
mod page;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::AdminState;
use crate::config::AdminToken;
use crate::control::{AdminError, Control, ReloadError};

pub use exporter::render as render_metrics;

/// Binds the admin socket (before the runtime starts, so a busy port fails startup).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    crate::listener::tcp::bind(addr, false)
}

struct AdminCtx {
    control: Arc<Control>,
    token: Option<AdminToken>,
}

type Ctx = State<Arc<AdminCtx>>;

/// The routes, for a server or a test.
pub fn router(control: Arc<Control>) -> Router {
    let token = control
        .shared
        .snapshot()
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.clone());
    let ctx = Arc::new(AdminCtx { control, token });
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status_json))
        .route(
            "/api/v1/pools/{pool}/backends/{backend}/state",
            post(set_state),
        )
        .route(
            "/api/v1/pools/{pool}/backends/{backend}/weight",
            post(set_weight),
        )
        .route("/api/v1/reload", post(reload))
        .with_state(ctx)
}

/// Serves the admin API on `socket` until `stop` fires.
pub fn serve(
    socket: std::net::TcpListener,
    control: Arc<Control>,
    stop: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send> {
    let listener = tokio::net::TcpListener::from_std(socket)?;
    let addr = listener.local_addr()?;
    let app = router(control);
    info!(bind = %addr, "admin server listening");
    Ok(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "admin server stopped");
        }
    })
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

/// Checks the bearer token (when one is configured) and the content type of a `POST`;
/// Some(response) refuses the call.
fn authorize(ctx: &AdminCtx, headers: &HeaderMap) -> Option<Response> {
    if let Some(token) = &ctx.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !presented.is_some_and(|p| token.matches(p)) {
            ctx.control.shared.metrics.ops.admin_auth_failures.inc();
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token; send Authorization: Bearer <token>",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return Some(r);
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    (!json).then(|| {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        )
    })
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page::HTML,
    )
        .into_response()
}

async fn metrics(State(ctx): Ctx) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        exporter::render(&ctx.control.shared),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): Ctx) -> Response {
    if ctx.control.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn status_json(State(ctx): Ctx) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(status::status(&ctx.control, ctx.token.is_some())),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    /// null returns to the config's weight.
    weight: Option<u32>,
}

fn bad_body(e: JsonRejection) -> Response {
    error(StatusCode::BAD_REQUEST, e.body_text())
}

fn admin_error(e: AdminError) -> Response {
    let code = match e {
        AdminError::NotFound { .. } => StatusCode::NOT_FOUND,
        AdminError::BadWeight(_) => StatusCode::BAD_REQUEST,
    };
    error(code, e.to_string())
}

fn backend_json(ctx: &AdminCtx, pool: &str, backend: &str) -> Response {
    let snapshot = ctx.control.shared.snapshot();
    let found = snapshot.pools.get(pool).and_then(|p| {
        status::pool_status(p, crate::clock::now_ms())
            .backends
            .into_iter()
            .find(|b| b.name == backend)
    });
    match found {
        Some(b) => Json(b).into_response(),
        None => error(StatusCode::NOT_FOUND, "backend gone"),
    }
}

async fn set_state(
    State(ctx): Ctx,
    Path((pool, backend)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<StateBody>, JsonRejection>,
) -> Response {
    if let Some(r) = authorize(&ctx, &headers) {
        return r;
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return bad_body(e),
    };
    let state = match body.state.as_str() {
        "ready" => AdminState::Ready,
        "drain" => AdminState::Drain,
        "maint" => AdminState::Maint,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown state \"{other}\", expected one of ready, drain, maint"),
            )
        }
    };
    match ctx.control.set_admin_state(&pool, &backend, state) {
        Ok(()) => backend_json(&ctx, &pool, &backend),
        Err(e) => admin_error(e),
    }
}

async fn set_weight(
    State(ctx): Ctx,
    Path((pool, backend)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<WeightBody>, JsonRejection>,
) -> Response {
    if let Some(r) = authorize(&ctx, &headers) {
        return r;
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return bad_body(e),
    };
    match ctx.control.set_weight(&pool, &backend, body.weight).await {
        Ok(()) => backend_json(&ctx, &pool, &backend),
        Err(e) => admin_error(e),
    }
}

async fn reload(State(ctx): Ctx, headers: HeaderMap) -> Response {
    if let Some(r) = authorize(&ctx, &headers) {
        return r;
    }
    match ctx.control.reload().await {
        Ok(changes) => Json(json!({
            "result": "ok",
            "listeners_added": changes.added,
            "listeners_removed": changes.removed,
            "listeners_kept": changes.kept,
        }))
        .into_response(),
        Err(e @ (ReloadError::NoConfigFile | ReloadError::ShuttingDown)) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}
