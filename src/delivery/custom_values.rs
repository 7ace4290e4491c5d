//! Custom Value Request: the platform's bots ask for live fields (a balance, a name…)
//! and hookbridge asks the org's own system, signed like a webhook, with a short timeout.
//!
//! `GET /v1/orgs/{org}/custom-values?customer_id=&channel_id=&fields=a,b` (ingress JWT)
//! → the org's endpoint gets `GET <url>?customer_id=&channel_id=&fields=a,b` with the
//! delivery JWT (`body_sha256` of the empty body) and `webhook-id`/`webhook-timestamp`
//! (no `webhook-signature`: the endpoint has no Standard Webhooks secret). It answers a JSON
//! object keyed by field name; we return `{"values": {...}}` with missing fields `null`.
//! Never cached: the values are live by definition.

use std::time::Instant;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::client::{self, SendError};
use crate::ingress::problem::{ApiResult, Problem};
use crate::store::new_id;
use crate::App;

/// A bot asks for a handful of fields; more is a mistake, not a use case.
const MAX_FIELDS: usize = 50;
/// The `maxLength` of `fields` in the OpenAPI document.
const MAX_FIELDS_LEN: usize = 4096;

pub(super) fn router() -> Router<App> {
    Router::new().route("/v1/orgs/{org}/custom-values", get(custom_values))
}

#[derive(Debug, thiserror::Error)]
pub(super) enum CvError {
    #[error("org {0:?} has no custom-value endpoint")]
    NoEndpoint(String),
    #[error("the org's custom-value endpoint did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the org's custom-value endpoint failed: {0}")]
    Upstream(String),
}

impl From<CvError> for Problem {
    fn from(e: CvError) -> Self {
        let status = match e {
            CvError::NoEndpoint(_) => StatusCode::NOT_FOUND,
            CvError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            CvError::Upstream(_) => StatusCode::BAD_GATEWAY,
        };
        Problem::new(status, e.to_string())
    }
}

pub(super) struct CvQuery {
    pub customer_id: String,
    pub channel_id: String,
    pub fields: Vec<String>,
}

fn parse_query(raw: Option<String>) -> ApiResult<CvQuery> {
    let mut q = CvQuery {
        customer_id: String::new(),
        channel_id: String::new(),
        fields: Vec::new(),
    };
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "customer_id" => q.customer_id = v.into_owned(),
            "channel_id" => q.channel_id = v.into_owned(),
            "fields" => {
                if v.chars().count() > MAX_FIELDS_LEN {
                    return Err(Problem::bad_request(format!(
                        "`fields` is longer than {MAX_FIELDS_LEN} characters"
                    )));
                }
                for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if !q.fields.iter().any(|x| x == f) {
                        q.fields.push(f.to_owned());
                    }
                }
            }
            other => {
                return Err(Problem::bad_request(format!(
                    "unknown query parameter {other:?}; allowed: customer_id, channel_id, fields"
                )))
            }
        }
    }
    if q.fields.is_empty() {
        return Err(Problem::bad_request(
            "`fields` is required: a comma-separated list of field names",
        ));
    }
    if q.fields.len() > MAX_FIELDS {
        return Err(Problem::bad_request(format!(
            "at most {MAX_FIELDS} fields per request"
        )));
    }
    Ok(q)
}

#[tracing::instrument(skip_all, fields(org = %org))]
async fn custom_values(
    State(app): State<App>,
    Path(org): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    crate::ingress::events::check_ingress_token(&app, &headers, &org)?;
    crate::ingress::admin::require_org(&app.store, &org).await?;
    let q = parse_query(raw)?;
    let (_status, values) = fetch(&app, &org, &q).await.inspect_err(|e| {
        if !matches!(e, CvError::NoEndpoint(_)) {
            tracing::info!(error = %e, "custom value request failed");
        }
    })?;
    Ok(Json(json!({ "values": values })))
}

/// Asks the org's endpoint; the answer holds the endpoint's (2xx) status and exactly the
/// requested fields.
pub(super) async fn fetch(
    app: &App,
    org: &str,
    q: &CvQuery,
) -> Result<(u16, Map<String, Value>), CvError> {
    let started = Instant::now();
    let res = fetch_inner(app, org, q).await;
    let outcome = match &res {
        Ok(_) => "ok",
        Err(CvError::NoEndpoint(_)) => "no_endpoint",
        Err(CvError::Timeout(_)) => "timeout",
        Err(CvError::Upstream(_)) => "error",
    };
    metrics::histogram!("hookbridge_custom_value_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    res
}

async fn fetch_inner(
    app: &App,
    org: &str,
    q: &CvQuery,
) -> Result<(u16, Map<String, Value>), CvError> {
    let cfg = &app.config.delivery;
    let endpoint = app
        .store
        .get_custom_value_endpoint(org)
        .await
        .map_err(|e| CvError::Upstream(format!("state store: {e}")))?
        .ok_or_else(|| CvError::NoEndpoint(org.to_owned()))?;
    let mut url = client::check_destination(&endpoint, cfg.allow_private_destinations)
        .map_err(|e| CvError::Upstream(e.to_string()))?;
    url.query_pairs_mut()
        .append_pair("customer_id", &q.customer_id)
        .append_pair("channel_id", &q.channel_id)
        .append_pair("fields", &q.fields.join(","));
    let id = new_id("cvr");
    let signed = app
        .delivery
        .signer
        .sign(org, &endpoint, &id, b"", None)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot sign a custom value request");
            CvError::Upstream("hookbridge could not sign the request".into())
        })?;
    let uri = client::uri_of(&url).map_err(|e| CvError::Upstream(e.to_string()))?;
    let mut headers = client::base_headers();
    headers.insert(
        header::ACCEPT,
        header::HeaderValue::from_static("application/json"),
    );
    signed
        .apply(&mut headers)
        .map_err(|e| CvError::Upstream(format!("a signed header is not valid: {e}")))?;
    let ex = app
        .delivery
        .client
        .exchange(
            axum::http::Method::GET,
            uri,
            headers,
            bytes::Bytes::new(),
            cfg.custom_value_timeout.0,
        )
        .await;
    let status = match (&ex.error, ex.status) {
        (Some(SendError::Timeout(t)), _) => return Err(CvError::Timeout(*t)),
        (Some(e), _) => return Err(CvError::Upstream(e.to_string())),
        (None, Some(s)) if (200..300).contains(&s) => s,
        (None, s) => {
            return Err(CvError::Upstream(format!(
                "it answered HTTP {}",
                s.unwrap_or_default()
            )))
        }
    };
    let answer: Value = serde_json::from_slice(&ex.body).map_err(|_| {
        CvError::Upstream(format!(
            "its answer is not JSON (or longer than {} bytes)",
            client::BODY_CAP
        ))
    })?;
    let Value::Object(mut obj) = answer else {
        return Err(CvError::Upstream(
            "its answer is not a JSON object keyed by field name".into(),
        ));
    };
    let values = q
        .fields
        .iter()
        .map(|f| (f.clone(), obj.remove(f).unwrap_or(Value::Null)))
        .collect();
    Ok((status, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(Some(
            "customer_id=&channel_id=%2B1555&fields=a,%20b,a".into(),
        ))
        .unwrap();
        assert_eq!(q.customer_id, "");
        assert_eq!(q.channel_id, "+1555");
        assert_eq!(q.fields, ["a", "b"]);
        assert!(parse_query(Some("customer_id=1".into())).is_err());
        assert!(parse_query(Some("fields=a&x=1".into())).is_err());
        assert!(parse_query(Some(format!("fields={}", "a".repeat(4097)))).is_err());
        assert!(parse_query(Some(format!("fields={}", "a".repeat(4096)))).is_ok());
    }
}
