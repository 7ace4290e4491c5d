//! The HTTP API: platform ingress, admin, operations. Each resource has its own router.

pub mod admin;
pub(crate) mod events;
mod ops;
pub mod problem;
mod usage;

use std::time::Duration;

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::App;
use problem::Problem;

pub fn router(app: App) -> Router {
    let timeout = app.config.http.request_timeout.0;
    let max_body = app.config.http.max_body;
    Router::new()
        .merge(events::router())
        .merge(crate::delivery::public_router())
        .merge(
            admin::router()
                .merge(crate::delivery::admin_router())
                .merge(usage::router())
                .route_layer(axum::middleware::from_fn(move |req, next| {
                    json_body(req, next, max_body)
                }))
                .route_layer(axum::extract::DefaultBodyLimit::max(max_body))
                // Last, so outermost: a caller without the token learns nothing else.
                .route_layer(axum::middleware::from_fn_with_state(
                    app.clone(),
                    admin::require_admin,
                )),
        )
        .merge(ops::router())
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| request_timeout(req, next, timeout),
        ))
        .layer(axum::middleware::map_response(problem_everywhere))
        .with_state(app)
}

/// Errors made by axum itself (a path that does not decode, a body over the extractor's
/// limit, …) come as text/plain: re-dress them as problem+json, as every error must be.
async fn problem_everywhere(resp: Response) -> Response {
    use axum::response::IntoResponse;
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return resp;
    }
    let kept: Vec<_> = [axum::http::header::RETRY_AFTER, axum::http::header::ALLOW]
        .into_iter()
        .filter_map(|h| resp.headers().get(&h).cloned().map(|v| (h, v)))
        .collect();
    let body = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = Problem::new(status, detail).into_response();
    out.headers_mut().extend(kept);
    out
}

/// Admin bodies: at most `http.max_body` bytes (413) and JSON (415), like the ingress.
/// An empty body passes, for routes without one; the handlers refuse it where the
/// document marks the body required.
async fn json_body(req: Request, next: Next, max: usize) -> Response {
    use axum::http::{Method, StatusCode};
    use axum::response::IntoResponse;
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, max).await else {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than the limit of {max} bytes (http.max_body)"),
        )
        .into_response();
    };
    if !bytes.iter().all(|b| b.is_ascii_whitespace()) && !events::is_json(&parts.headers) {
        return Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

async fn request_timeout(req: Request, next: Next, limit: Duration) -> Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            Problem::unavailable("request timed out inside hookbridge; retry", 1).into_response()
        }
    }
}

/// Limits a client cannot stretch: slow headers (slowloris) are cut after this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_BYTES: usize = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Own accept loop over hyper-util: header read timeout and header size cap, which
/// `axum::serve` does not expose, and a draining shutdown of every open connection.
pub async fn serve(
    app: App,
    listener: TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    serve_router(router(app), listener, cancel).await
}

/// The router of `http.metrics_listen`: `/metrics` only, without auth.
pub fn metrics_router(app: App) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(ops::metrics))
        .fallback(|| async { Problem::not_found("this address serves only /metrics") })
        .with_state(app)
}

pub async fn serve_router(
    router: Router,
    listener: TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning or dying.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("HTTP connections still open after the drain timeout"),
    }
    Ok(())
}

/// The bearer token of an `Authorization` header, if well-formed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
