//! The delivery log of one webhook: each delivery with its attempts (status, latency,
//! error, response excerpt), filtered by state, and replay of one or of a time range.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::html;
use serde::Deserialize;

use super::view::{self, csrf_field, error_for, FieldError, Frame, Notice, Tab};
use super::{html as respond, Console, Form, PageResult};
use crate::ingress::admin::find_hook;
use crate::ingress::problem::Problem;
use crate::store::{Delivery, DeliveryStatus};

pub(super) fn router() -> Router<Console> {
    Router::new()
        .route("/console/o/{org}/webhooks/{id}/deliveries", get(log))
        .route("/console/o/{org}/webhooks/{id}/replay", post(replay))
}

/// How many deliveries the page shows, newest first.
const SHOWN: usize = 100;

#[derive(Deserialize)]
struct Filter {
    status: Option<String>,
}

async fn log(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((org, id)): Path<(String, String)>,
    Query(f): Query<Filter>,
) -> PageResult {
    let s = c.session(&headers, &org)?;
    let status = f.status.as_deref().and_then(DeliveryStatus::parse);
    render(&c, &org, &id, &s.csrf, status, None, None, StatusCode::OK).await
}

#[allow(clippy::too_many_arguments)]
async fn render(
    c: &Console,
    org: &str,
    id: &str,
    csrf: &str,
    status: Option<DeliveryStatus>,
    notice: Option<Notice>,
    err: Option<FieldError>,
    code: StatusCode,
) -> PageResult {
    let hook = find_hook(&c.app, org, id).await?;
    let list = c
        .app
        .store
        .list_deliveries(org, id, status, SHOWN)
        .await
        .map_err(Problem::from)?;
    let base = format!("/console/o/{org}/webhooks/{id}/deliveries");
    let replay = format!("/console/o/{org}/webhooks/{id}/replay");
    let (since_err, since_desc) = error_for(err.as_ref(), "replay", "since");
    let filters = [
        (None, "all"),
        (Some(DeliveryStatus::Failed), "failed"),
        (Some(DeliveryStatus::Dead), "dead"),
        (Some(DeliveryStatus::Pending), "pending"),
        (Some(DeliveryStatus::Delivered), "delivered"),
    ];
    let body = html! {
        @if let Some(n) = &notice { (n.render()) }
        p { "Webhook " strong { (hook.id) } " → " code { (hook.url.as_deref().unwrap_or("")) } }
        nav.filters aria-label="Filter by state" {
            "Show: "
            @for (st, label) in filters {
                @let href = match st { Some(s) => format!("{base}?status={}", s.as_str()), None => base.clone() };
                @if st == status { a href=(href) aria-current="page" { strong { (label) } } }
                @else { a href=(href) { (label) } }
            }
        }
        section.card aria-labelledby="log-h" {
            h2 #log-h { "Deliveries" }
            @if list.is_empty() { p.muted { "No deliveries." } }
            @else {
                div.scroll { table.stack #deliveries {
                    thead { tr { th { "Delivery" } th { "State" } th { "Attempts" } th { "" } } }
                    tbody { @for d in &list { (row(d, csrf, &replay)) } }
                } }
            }
        }
        section.card aria-labelledby="range-h" {
            h2 #range-h { "Replay a time range" }
            form method="post" action=(replay) {
                (csrf_field(csrf))
                label for="replay-since" { "Every delivery created since (UTC)" }
                input #replay-since type="datetime-local" name="since" step="1" aria-describedby=[since_desc];
                (since_err)
                p { button type="submit" { "Replay range" } }
            }
        }
    };
    let frame = Frame {
        org,
        csrf,
        tab: Tab::Webhooks,
    };
    Ok(respond(code, view::page("Delivery log", Some(frame), body)))
}

fn row(d: &Delivery, csrf: &str, replay: &str) -> maud::Markup {
    let badge = match d.status {
        DeliveryStatus::Delivered => "badge ok",
        DeliveryStatus::Pending => "badge muted",
        DeliveryStatus::Failed => "badge warn",
        DeliveryStatus::Dead => "badge bad",
    };
    html! {
        tr data-delivery=(d.id) {
            td data-label="Delivery" {
                code { (d.id) } br;
                span.muted { "event " code { (d.event_id) } } br;
                span.muted { (d.created_at.format("%Y-%m-%d %H:%M:%S UTC")) }
            }
            td data-label="State" {
                span class=(badge) { (d.status.as_str()) }
                @if let Some(n) = d.next_attempt_at { div.muted { "next try " (n.format("%H:%M:%S UTC")) } }
            }
            td data-label="Attempts" {
                @if d.attempt_log.is_empty() { span.muted { "none yet" } }
                ol {
                    @for a in &d.attempt_log {
                        li.attempt {
                            (a.at.format("%H:%M:%S")) " · " (a.result.as_str())
                            @if let Some(s) = a.status() { " · HTTP " (s) }
                            " · " (a.latency_ms) " ms"
                            @if let Some(e) = &a.error { div.error { (e) } }
                            @if let Some(x) = &a.response_excerpt { pre { (x) } }
                        }
                    }
                }
            }
            td {
                form method="post" action=(replay) {
                    (csrf_field(csrf))
                    input type="hidden" name="delivery_id" value=(d.id);
                    button.secondary type="submit" aria-label={ "Replay " (d.id) } { "Replay" }
                }
            }
        }
    }
}

/// `datetime-local` sends `2026-11-28T17:05` or with seconds; the page says it is UTC.
fn parse_since(v: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(v, f).ok())
                .map(|n| n.and_utc())
        })
}

async fn replay(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((org, id)): Path<(String, String)>,
    body: Bytes,
) -> PageResult {
    let form = Form::parse(&body);
    let s = c.form_session(&headers, &org, &form)?;
    let hook = find_hook(&c.app, &org, &id).await?;
    let since = match form.text("since") {
        Some(v) => match parse_since(&v) {
            Some(t) => Some(t),
            None => {
                let err = FieldError {
                    field: "since".into(),
                    detail: format!("since: {v:?} is not a date and time"),
                };
                return render(
                    &c,
                    &org,
                    &id,
                    &s.csrf,
                    None,
                    None,
                    Some(err),
                    StatusCode::BAD_REQUEST,
                )
                .await;
            }
        },
        None => None,
    };
    let delivery = form.text("delivery_id");
    let (notice, err, code) =
        match crate::delivery::replay_deliveries(&c.app, &hook, delivery.as_deref(), since).await {
            Ok(n) => (
                Some(Notice::ok(format!("{n} delivery(ies) queued again."))),
                None,
                StatusCode::OK,
            ),
            Err(p) if p.status.is_client_error() => {
                let field = if delivery.is_some() {
                    "delivery"
                } else {
                    "since"
                };
                let e = FieldError {
                    field: field.into(),
                    detail: p.detail.clone(),
                };
                let n = (field == "delivery").then(|| Notice::bad(p.detail.clone()));
                (n, Some(e), p.status)
            }
            Err(p) => return Err(p.into()),
        };
    render(&c, &org, &id, &s.csrf, None, notice, err, code).await
}
