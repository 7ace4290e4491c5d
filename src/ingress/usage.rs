//! `GET /v1/orgs/{org}/usage`: what the org folder holds against its quota.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::problem::{ApiResult, Problem};
use crate::App;

pub fn router() -> Router<App> {
    Router::new()
        .route("/v1/orgs/{org}/usage", get(usage))
        .route("/v1/orgs/{org}/usage/recount", post(recount))
}

/// The org, its effective limits and its folder's usage: the one path of the
/// admin API and the console.
pub async fn org_usage(
    app: &App,
    org: &str,
) -> ApiResult<(
    crate::store::Org,
    crate::config::EffectiveLimits,
    crate::limits::OrgUsage,
)> {
    let o = super::admin::require_org(&app.store, org).await?;
    let limits = app.current().limits.for_org(&o.limits);
    // Counted in the store as files come and go (on every node); an org never counted
    // yet is counted from a listing once.
    let counted = match app.store.org_usage(org).await {
        Ok(Some(u)) => u,
        Ok(None) => crate::retention::recount(&*app.store, &*app.storage, org, false)
            .await
            .map_err(|e| Problem::internal("usage count failed", e))?,
        Err(e) => return Err(Problem::internal("usage count failed", e)),
    };
    Ok((o, limits, counted))
}

async fn usage(
    State(app): State<App>,
    Path(org): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (o, limits, u) = org_usage(&app, &org).await?;
    Ok(answer(&org, o, limits, u))
}

/// The operator's rebuild: files changed outside hookbridge (on the server's disk, in the
/// bucket by another tool) are not counted as they happen; a listing replaces the count.
/// Events committed during the listing may be missed or counted twice until the next one.
async fn recount(
    State(app): State<App>,
    Path(org): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let o = super::admin::require_org(&app.store, &org).await?;
    let limits = app.current().limits.for_org(&o.limits);
    let u = crate::retention::recount(&*app.store, &*app.storage, &org, true)
        .await
        .map_err(|e| Problem::internal("usage count failed", e))?;
    tracing::info!(org = %org, files = u.files, bytes = u.bytes, "org folder counted again from a listing");
    Ok(answer(&org, o, limits, u))
}

fn answer(
    org: &str,
    o: crate::store::Org,
    limits: crate::config::EffectiveLimits,
    u: crate::limits::OrgUsage,
) -> Json<serde_json::Value> {
    Json(json!({
        "org": org,
        "files": u.files,
        "bytes": u.bytes,
        "quota_files": limits.quota_files,
        "quota_bytes": limits.quota_bytes,
        // Whether the next event's file would be refused (507).
        "full": crate::limits::over_quota(u, crate::limits::Quota::from(&limits), 1, 1).is_some(),
        "limits": limits,
        "overrides": o.limits,
    }))
}
