//! HTTP delivery of events to the org's webhooks.

use axum::http::StatusCode;

use crate::ingress::problem::Problem;
use crate::store::Webhook;
use crate::App;

/// Sends a signed `ping` the endpoint must answer with 2xx before the webhook is saved.
pub async fn verify_endpoint(_app: &App, _hook: &Webhook) -> Result<(), Problem> {
    Err(Problem::new(
        StatusCode::NOT_IMPLEMENTED,
        "endpoint verification is not available in this build; create the webhook with \"verify\": false",
    ))
}
