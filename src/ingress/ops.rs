//! Health, readiness and metrics for operators and load balancers.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::problem::Problem;
use crate::App;

pub fn router() -> Router<App> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_with_token))
        .route("/openapi.json", get(openapi))
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

/// Ready when the state store and the org storage answer within [`READY_TIMEOUT`], so a
/// load balancer stops sending work to a node that lost either. The body names this node
/// and what is down; a hung store counts as down rather than hanging the health check.
async fn readyz(State(app): State<App>) -> Response {
    let (store, storage) = tokio::join!(
        within(async { app.store.ping().await.map_err(|e| e.to_string()) }),
        within(async { app.storage.ready().await.map_err(|e| e.to_string()) }),
    );
    let mut down = serde_json::Map::new();
    if let Some(e) = &store {
        tracing::warn!(error = %e, "not ready: the state store does not answer");
        down.insert("store".into(), json!(e));
    }
    if let Some(e) = &storage {
        tracing::warn!(error = %e, storage = %app.storage.describe(), "not ready: the org storage does not answer");
        down.insert("storage".into(), json!(e));
    }
    if !down.is_empty() {
        let what: Vec<&str> = down.keys().map(String::as_str).collect();
        return Problem::unavailable(
            format!(
                "node {} is not ready: {} down",
                app.config.node_id,
                what.join(" and ")
            ),
            5,
        )
        .with("node_id", &app.config.node_id)
        .with("store", store.is_none())
        .with("storage", storage.is_none())
        .with("data_dir", storage.is_none())
        .with("down", down)
        .into_response();
    }
    Json(json!({
        "status": "ready",
        "node_id": app.config.node_id,
        "store": true,
        // `data_dir` is the older name of `storage`, kept for existing checks.
        "storage": true,
        "data_dir": true,
    }))
    .into_response()
}

const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What went wrong with one readiness check, if anything.
async fn within(f: impl std::future::Future<Output = Result<(), String>>) -> Option<String> {
    match tokio::time::timeout(READY_TIMEOUT, f).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("no answer within {READY_TIMEOUT:?}")),
    }
}

/// `/metrics` on the API address: it names every org and counts their files, auth
/// failures and bans, so it needs the admin token or `http.metrics_token`.
async fn metrics_with_token(State(app): State<App>, headers: HeaderMap) -> Response {
    let ok = super::bearer(&headers).is_some_and(|t| {
        crate::auth::constant_time_eq(t, &app.secrets.admin_token)
            | app
                .config
                .http
                .metrics_token
                .as_deref()
                .is_some_and(|m| crate::auth::constant_time_eq(t, m))
    });
    if !ok {
        return Problem::unauthorized(
            "/metrics needs Authorization: Bearer <admin token or http.metrics_token>, \
             or scrape http.metrics_listen instead",
        )
        .into_response();
    }
    metrics(State(app)).await.into_response()
}

pub(super) async fn metrics(State(app): State<App>) -> impl IntoResponse {
    if let Ok((depth, oldest)) = app.store.queue_stats().await {
        metrics::gauge!("hookbridge_delivery_queue_depth").set(depth as f64);
        let age = oldest
            .map(|t| (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0)
            .unwrap_or(0.0);
        metrics::gauge!("hookbridge_delivery_oldest_pending_seconds").set(age.max(0.0));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}
