//! Health, readiness and metrics for operators and load balancers.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
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

/// Ready when the state store and the org storage answer.
async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let store_ok = app.store.list_orgs().await.is_ok();
    let tmp_ok = app.storage.ready().await.is_ok();
    let status = if store_ok && tmp_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"status": if status == StatusCode::OK { "ready" } else { "not ready" },
        "store": store_ok, "data_dir": tmp_ok}),
        ),
    )
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
