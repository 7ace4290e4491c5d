//! The HTTP API: platform ingress, admin, operations. Each resource has its own router.

pub mod admin;
pub(crate) mod events;
mod ops;
pub mod problem;

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
    Router::new()
        .merge(events::router())
        .merge(crate::delivery::public_router())
        .merge(
            admin::router()
                .merge(crate::delivery::admin_router())
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
        .with_state(app)
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

pub async fn serve(
    app: App,
    listener: TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let router = router(app);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { cancel.cancelled().await })
    .await
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
