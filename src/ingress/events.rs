//! `POST /v1/orgs/{org}/events`: the platform's events, acknowledged only once durable.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::problem::{ApiResult, Problem};
use crate::event::Envelope;
use crate::spool::Committed;
use crate::store::{new_id, render_path_template, NewEvent, WebhookKind};
use crate::App;

pub fn router() -> Router<App> {
    Router::new().route("/v1/orgs/{org}/events", post(post_event))
}

#[derive(Debug, Deserialize)]
struct IngressClaims {
    /// Absent means "any org"; present it must be the org of the URL. `null` is neither
    /// and is refused, so that it cannot pass for absent.
    #[serde(default, deserialize_with = "present")]
    org: Option<serde_json::Value>,
    exp: i64,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Seconds of clock skew allowed between the platform and hookbridge.
const LEEWAY_SECS: u64 = 30;

/// Refuses a `crit` header (RFC 7515 §4.1.11): it lists extensions the recipient must
/// understand, and hookbridge understands none. jsonwebtoken ignores the member.
fn check_crit(token: &str) -> Result<(), String> {
    use base64::Engine;
    let head = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| "invalid token: the header is not base64url".to_string())?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
        .map_err(|_| "invalid token: the header is not a JSON object".to_string())?;
    match header.get("crit") {
        None => Ok(()),
        Some(c) => Err(format!(
            "token header has `crit` {c}: hookbridge understands no JWS extension"
        )),
    }
}

/// Checks the platform's HS256 token: signature, `exp` (required, at most
/// `ingress.max_token_lifetime` ahead), `nbf` (if present), no `crit` header, and the
/// `org` claim.
pub(crate) fn check_ingress_token(app: &App, headers: &HeaderMap, org: &str) -> ApiResult<()> {
    let token = super::bearer(headers).ok_or_else(|| {
        Problem::unauthorized("missing bearer token: send Authorization: Bearer <JWT HS256>")
    })?;
    let mut v = Validation::new(Algorithm::HS256);
    v.set_required_spec_claims(&["exp"]);
    v.validate_aud = false;
    v.validate_nbf = true;
    v.leeway = LEEWAY_SECS;
    let data = decode::<IngressClaims>(
        token,
        &DecodingKey::from_secret(app.secrets.ingress_jwt.as_bytes()),
        &v,
    )
    .map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        let why = match e.kind() {
            K::ExpiredSignature => "token expired".to_string(),
            K::InvalidSignature => {
                "token signature does not verify with the ingress secret".to_string()
            }
            K::MissingRequiredClaim(c) => format!("token lacks the required `{c}` claim"),
            K::InvalidAlgorithm => "token must be signed with HS256".to_string(),
            K::ImmatureSignature => "token not valid yet (nbf is in the future)".to_string(),
            _ => format!("invalid token: {e}"),
        };
        Problem::unauthorized(why)
    })?;
    // Only after the signature verified: a forged header learns nothing.
    check_crit(token).map_err(Problem::unauthorized)?;
    let max = app.config.ingress.max_token_lifetime.0;
    let now = chrono::Utc::now().timestamp();
    let ahead = data.claims.exp.saturating_sub(now);
    if ahead > (max.as_secs() + LEEWAY_SECS) as i64 {
        return Err(Problem::unauthorized(format!(
            "token `exp` is {ahead}s ahead; tokens may be valid for at most {}s \
             (ingress.max_token_lifetime)",
            max.as_secs()
        )));
    }
    match data.claims.org {
        None => Ok(()),
        Some(serde_json::Value::String(claim)) if claim == org => Ok(()),
        Some(serde_json::Value::String(claim)) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            format!("token is for org {claim:?}, not {org:?}"),
        )),
        Some(other) => Err(Problem::unauthorized(format!(
            "token `org` claim is {other}: it must be an org name, or absent for every org"
        ))),
    }
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

#[tracing::instrument(skip_all, fields(org = %org, event_id))]
async fn post_event(
    State(app): State<App>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let res = ingest(&app, &org, &headers, body).await;
    let outcome = match &res {
        Ok((StatusCode::ACCEPTED, _)) => "accepted",
        Ok(_) => "duplicate",
        Err(p) => status_label(p.status),
    };
    metrics::counter!("hookbridge_ingest_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("hookbridge_ingest_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    match res {
        Ok((status, json)) => (status, json).into_response(),
        Err(p) => {
            if p.status.is_client_error() {
                tracing::debug!(status = p.status.as_u16(), detail = %p.detail, "event refused");
            }
            p.into_response()
        }
    }
}

/// Status codes are a small closed set: static labels keep metric cardinality bounded.
fn status_label(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        413 => "413",
        415 => "415",
        429 => "429",
        503 => "503",
        507 => "507",
        _ => "other",
    }
}

async fn ingest(
    app: &App,
    org: &str,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::store::IngestResult>)> {
    check_ingress_token(app, headers, org)?;
    let Some(org_row) = app.store.get_org(org).await? else {
        return Err(Problem::not_found(format!("unknown org {org:?}")));
    };
    let limits = app.current().limits.for_org(&org_row.limits);
    if let Err(wait) = app.rate.check(org, limits.ingest_rate, limits.ingest_burst) {
        metrics::counter!("hookbridge_ingest_rate_limited_total").increment(1);
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "org {org:?} posts faster than its limit of {} events/s; retry later",
                limits.ingest_rate
            ),
        )
        .retry_after(wait));
    }
    if !is_json(headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ));
    }
    // Follows SIGHUP reloads.
    let max = app.current().http.max_body;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than the limit of {max} bytes"),
        )
    })?;
    let env = Envelope::from_request(&bytes, org, chrono::Utc::now())
        .map_err(|e| Problem::bad_request(e.to_string()))?;
    tracing::Span::current().record("event_id", env.id.as_str());

    let hooks = app.store.list_webhooks(org).await?;
    let mut files: Vec<String> = Vec::new();
    let mut deliveries = Vec::new();
    let mut http_hooks = Vec::new();
    let mut rollups = Vec::new();
    for h in hooks.into_iter().filter(|h| h.subscribed(env.kind)) {
        match h.kind {
            WebhookKind::Sftp if h.rollup.is_some() => {
                if let Some(spec) = h.rollup {
                    rollups.push(crate::rollups::Target {
                        hook: h.id.clone(),
                        spec,
                    });
                }
            }
            WebhookKind::Sftp => {
                let p = render_path_template(h.template(), &env);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            WebhookKind::Http => {
                deliveries.push((new_id("dlv"), h.id.clone()));
                http_hooks.push(h);
            }
        }
    }
    let envelope_json = env.to_json();
    let new = NewEvent {
        org: org.to_owned(),
        id: env.id.clone(),
        envelope_json,
        files,
        deliveries,
        // Checked and reserved by the committer, atomically with the commit.
        quota: Some(crate::limits::Quota::from(&limits)),
        kind: Some(env.kind),
        rollups,
        lines: Vec::new(),
        accepted_at: None,
    };
    match app.spool.submit(new, http_hooks).await? {
        // Their delivery jobs were handed to the scheduler by the spool.
        Committed::New(r) => Ok((StatusCode::ACCEPTED, Json(r))),
        Committed::Known(r) => Ok((StatusCode::OK, Json(r))),
        Committed::Deferred(r, why) => {
            metrics::counter!("hookbridge_ingest_over_quota_total").increment(1);
            tracing::warn!(org = %org, event_id = %r.id, reason = %why,
                "org over quota: event recorded, its files wait until it is posted again with room");
            Err(Problem::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("{why}; no file was written (HTTP deliveries go on). Post the event again once files were removed"),
            )
            .with("id", &r.id)
            .with("deliveries", &r.deliveries)
            .retry_after(60))
        }
    }
}
