//! HTTP delivery of events to the org's webhooks, the Custom Value Request, and the
//! connection tests. The surface is small: [`run`] (the worker supervisor),
//! [`verify_endpoint`], [`Delivery`] (keys and clients kept in the `App`), the hand-off of
//! committed jobs from the spool ([`handoff`]), and the routers.

mod client;
mod custom_values;
mod handoff;
pub mod keyring;
mod queues;
mod recorder;
mod retry;
pub mod signing;
mod tests;
mod worker;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingress::admin::{find_hook, not_null, parse_body};
use crate::ingress::problem::{ApiResult, Problem};
use crate::store::{new_id, DeliveryStatus, Webhook, WebhookKind};
use crate::App;

pub use client::SendError;
pub use handoff::{hand_back_node_leases, handoff, Announcements, Announcer, HandBack, Handed};
pub use tests::{connection_test, TestResult, TESTS};

/// Signing keys and HTTP clients, built once at start and shared by handlers and workers.
pub struct Delivery {
    pub signer: signing::Signer,
    /// One pooled client for deliveries, connection tests and custom value requests; each
    /// exchange gets its own total timeout.
    client: client::Client,
}

impl Delivery {
    /// The signer from the key ring `keeper` holds (made on first start).
    pub async fn new(config: &Config, keeper: &crate::identity::Keeper) -> Result<Self, String> {
        let d = &config.delivery;
        let signer = keyring::load(keeper, &d.jwt_issuer)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            signer,
            client: client::build(d)?,
        })
    }
}

/// Runs the delivery workers until `cancel`; in-flight attempts finish first. Jobs the
/// spool announces on the other end of `announced` are sent without waiting for a poll.
pub async fn run(
    app: App,
    announced: Announcements,
    cancel: CancellationToken,
) -> Result<(), String> {
    tokio::spawn(keyring::follow(app.clone(), cancel.clone()));
    worker::run(app, announced, cancel).await
}

/// POSTs `body` to `url`, signed with the JWT and (given a secret) Standard Webhooks.
/// Never fails: every problem is described in the returned [`client::Exchange`].
pub(crate) async fn post_signed(
    app: &App,
    org: &str,
    url: &str,
    secret: Option<&str>,
    id: &str,
    body: Vec<u8>,
) -> client::Exchange {
    let timeout = app.config.delivery.request_timeout.0;
    // The URL parsed (and checked) once per URL string; the cached request URI is shared.
    let uri = match client::destination_uri(url, app.config.delivery.allow_private_destinations) {
        Ok(u) => u,
        Err(e) => return client::Exchange::failed(std::time::Instant::now(), e),
    };
    let signed = match app.delivery.signer.sign(org, url, id, &body, secret) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign a delivery");
            return client::Exchange::failed(
                std::time::Instant::now(),
                SendError::Other("hookbridge could not sign the request".into()),
            );
        }
    };
    let mut headers = client::base_headers();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if let Err(e) = signed.apply(&mut headers) {
        return client::Exchange::failed(
            std::time::Instant::now(),
            SendError::Other(format!("a signed header is not a valid header value: {e}")),
        );
    }
    app.delivery
        .client
        .exchange(
            axum::http::Method::POST,
            uri,
            headers,
            Bytes::from(body),
            timeout,
        )
        .await
}

/// Sends a signed `ping` the endpoint must answer with 2xx before the webhook is saved.
/// 400 when the destination is refused (SSRF guard), 422 when the endpoint fails; the
/// detail names the cause (DNS, TLS, connect, timeout or the status it answered).
pub async fn verify_endpoint(app: &App, hook: &Webhook) -> Result<(), Problem> {
    let url = hook
        .url
        .as_deref()
        .ok_or_else(|| Problem::bad_request("`url` is required for kind \"http\""))?;
    let id = new_id("dlv");
    let body = tests::ping_envelope(&hook.org, &hook.id, &id);
    let ex = post_signed(app, &hook.org, url, hook.secret.as_deref(), &id, body).await;
    let skip = "(create the webhook with \"verify\": false to skip this check)";
    match (&ex.error, ex.status) {
        (Some(SendError::Forbidden(m)), _) => Err(Problem::bad_request(format!("url: {m}"))),
        (Some(e), _) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("endpoint verification failed: {e} {skip}"),
        )),
        (None, Some(s)) if (200..300).contains(&s) => Ok(()),
        (None, s) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "endpoint verification failed: the endpoint answered HTTP {} to a signed ping; it must answer 2xx {skip}",
                s.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
            ),
        )),
    }
}

/// Admin routes; the caller puts them behind the admin token.
pub fn admin_router() -> Router<App> {
    Router::new()
        .route(
            "/v1/orgs/{org}/webhooks/{id}/deliveries",
            get(list_deliveries),
        )
        .route("/v1/orgs/{org}/webhooks/{id}/replay", post(replay))
        .route("/v1/orgs/{org}/webhooks/{id}/test", post(tests::run_test))
        .route("/v1/signing-keys/rotate", post(rotate_keys))
}

/// Public routes: the JWKS, and the Custom Value Request (which checks the ingress JWT).
pub fn public_router() -> Router<App> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .merge(custom_values::router())
}

async fn jwks(State(app): State<App>) -> Response {
    (
        // Receivers cache the set; a rotated-out key stays published far longer than this.
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(app.delivery.signer.jwks()),
    )
        .into_response()
}

async fn rotate_keys(State(app): State<App>) -> ApiResult<Json<serde_json::Value>> {
    let kid = keyring::rotate(&app.identity, &app.delivery.signer)
        .await
        .map_err(|e| match e {
            keyring::KeyringError::Identity(crate::identity::IdentityError::Store(s)) => {
                Problem::from(s)
            }
            e => Problem::internal("signing key rotation failed", e),
        })?;
    tracing::info!(kid = %kid, "webhook signing key rotated");
    let published: Vec<_> = app
        .delivery
        .signer
        .jwks()
        .keys
        .into_iter()
        .filter_map(|k| k.common.key_id)
        .collect();
    Ok(Json(json!({ "kid": kid, "published": published })))
}

async fn list_deliveries(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    let hook = find_hook(&app, &org, &id).await?;
    let mut status = None;
    let mut limit = 100usize;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "status" => {
                status = Some(DeliveryStatus::parse(&v).ok_or_else(|| {
                    Problem::bad_request(format!(
                        "status {v:?}: allowed: pending, delivered, failed, dead"
                    ))
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| Problem::bad_request("limit must be 1 to 1000"))?
            }
            other => {
                return Err(Problem::bad_request(format!(
                    "unknown query parameter {other:?}; allowed: status, limit"
                )))
            }
        }
    }
    let deliveries = app
        .store
        .list_deliveries(&org, &hook.id, status, limit)
        .await?;
    Ok(Json(json!({ "deliveries": deliveries })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default, deserialize_with = "not_null")]
    since: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "not_null")]
    delivery_id: Option<String>,
    /// End of the range (exclusive), roll-up hooks only.
    #[serde(default, deserialize_with = "not_null")]
    until: Option<DateTime<Utc>>,
}

async fn replay(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let hook = find_hook(&app, &org, &id).await?;
    if hook.rollup.is_some() {
        let req: ReplayRequest = parse_body(&body)?;
        if req.delivery_id.is_some() {
            return Err(Problem::bad_request(
                "a roll-up webhook has no deliveries: give `since` (and `until`) to rebuild \
                 the partitions of that range",
            ));
        }
        let parts =
            crate::rollups::replay::rebuild_range(&app, &hook, req.since, req.until).await?;
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "replayed": parts.len(), "partitions": parts })),
        )
            .into_response());
    }
    // Before the body, so that a disabled hook says so whatever was sent.
    replayable(&hook)?;
    let req: ReplayRequest = parse_body(&body)?;
    if req.until.is_some() {
        return Err(Problem::bad_request(
            "`until` is for roll-up webhooks; replay deliveries with `since` or `delivery_id`",
        ));
    }
    let n = replay_deliveries(&app, &hook, req.delivery_id.as_deref(), req.since).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": n }))).into_response())
}

/// Queues again one delivery (`delivery_id`) or every one since `since` of `hook`: the
/// one path of the admin API and the console. Returns how many were queued.
pub async fn replay_deliveries(
    app: &App,
    hook: &Webhook,
    delivery_id: Option<&str>,
    since: Option<DateTime<Utc>>,
) -> Result<u64, Problem> {
    let (org, id) = (&hook.org, &hook.id);
    replayable(hook)?;
    let n = match (delivery_id, since) {
        (Some(d), None) => {
            let n = app.store.replay(org, id, Some(d), None).await?;
            if n == 0 {
                return Err(Problem::not_found(format!(
                    "no delivery {d:?} for webhook {id:?}"
                )));
            }
            n
        }
        (None, Some(since)) => app.store.replay(org, id, None, Some(since)).await?,
        _ => {
            return Err(Problem::bad_request(
                "give either `since` (RFC 3339) or `delivery_id`",
            ))
        }
    };
    if n > 0 {
        app.delivery_wakeup();
    }
    tracing::info!(org = %org, webhook = %id, deliveries = n, "replay requested");
    Ok(n)
}

fn replayable(hook: &Webhook) -> Result<(), Problem> {
    let id = &hook.id;
    if hook.kind != WebhookKind::Http {
        return Err(Problem::bad_request(
            "only webhooks of kind \"http\" have deliveries to replay",
        ));
    }
    if !hook.enabled {
        return Err(Problem::conflict(format!(
            "webhook {id:?} is disabled ({}); PATCH it with \"enabled\": true first",
            hook.disabled_reason.as_deref().unwrap_or("by an admin")
        )));
    }
    Ok(())
}

/// How long to wait for in-flight attempts at shutdown: one request plus a margin.
fn drain_limit(app: &App) -> Duration {
    app.config.delivery.request_timeout.0 + Duration::from_secs(2)
}
