//! The Custom values page: the org's one Custom Value Request endpoint, and the
//! `customValue` connection test against it.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use maud::html;

use super::view::{self, csrf_field, error_for, FieldError, Frame, Notice, Tab};
use super::{html as respond, Console, Form, PageResult};
use crate::ingress::admin::{self, require_org};
use crate::ingress::problem::Problem;

pub(super) fn router() -> Router<Console> {
    Router::new().route("/console/o/{org}/custom-values", get(page).post(act))
}

async fn page(State(c): State<Console>, headers: HeaderMap, Path(org): Path<String>) -> PageResult {
    let s = c.session(&headers, &org)?;
    render(&c, &org, &s.csrf, None, None, None, StatusCode::OK).await
}

async fn render(
    c: &Console,
    org: &str,
    csrf: &str,
    notice: Option<Notice>,
    err: Option<FieldError>,
    sent: Option<&str>,
    status: StatusCode,
) -> PageResult {
    require_org(&c.app.store, org).await?;
    let current = c
        .app
        .store
        .get_custom_value_endpoint(org)
        .await
        .map_err(Problem::from)?;
    let hooks = c
        .app
        .store
        .list_webhooks(org)
        .await
        .map_err(Problem::from)?;
    let (url_err, url_desc) = error_for(err.as_ref(), "cv", "url");
    let value = sent
        .map(str::to_owned)
        .or(current.clone())
        .unwrap_or_default();
    let body = html! {
        @if let Some(n) = &notice { (n.render()) }
        section.card aria-labelledby="cv-h" {
            h2 #cv-h { "Custom Value Request endpoint" }
            p.muted { "The platform asks this endpoint for per-customer values; there is one per org." }
            form #cv-form method="post" action={ "/console/o/" (org) "/custom-values" } {
                (csrf_field(csrf))
                label for="cv-url" { "Endpoint URL" }
                input #cv-url type="url" name="url" value=(value) placeholder="https://example.com/custom-values" aria-describedby=[url_desc];
                (url_err)
                p.row-actions {
                    button type="submit" name="action" value="set" { "Save endpoint" }
                    @if current.is_some() && !hooks.is_empty() {
                        button.secondary type="submit" name="action" value="test" { "Run customValue test" }
                    }
                }
                @if current.is_some() && hooks.is_empty() { p.muted { "Add a webhook to run the customValue test." } }
            }
        }
    };
    let frame = Frame {
        org,
        csrf,
        tab: Tab::CustomValues,
    };
    Ok(respond(
        status,
        view::page("Custom values", Some(frame), body),
    ))
}

async fn act(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(org): Path<String>,
    body: Bytes,
) -> PageResult {
    let form = Form::parse(&body);
    let s = c.form_session(&headers, &org, &form)?;
    if form.get("action") == Some("test") {
        // The test is the one the webhooks' dropdown runs; any of the org's hooks does.
        let hooks = c
            .app
            .store
            .list_webhooks(&org)
            .await
            .map_err(Problem::from)?;
        let notice = match hooks.first() {
            Some(h) => {
                let r = crate::delivery::connection_test(&c.app, h, "customValue").await?;
                super::webhooks::test_notice("customValue", &r)
            }
            None => Notice::bad("Add a webhook to run the customValue test."),
        };
        return render(&c, &org, &s.csrf, Some(notice), None, None, StatusCode::OK).await;
    }
    let url = form.text("url").unwrap_or_default();
    match admin::set_cv_endpoint(&c.app, &org, &url).await {
        Ok(()) => {
            render(
                &c,
                &org,
                &s.csrf,
                Some(Notice::ok("Endpoint saved.")),
                None,
                None,
                StatusCode::OK,
            )
            .await
        }
        Err(p) if p.status.is_client_error() && p.status != StatusCode::NOT_FOUND => {
            let err = FieldError {
                field: "url".into(),
                detail: p.detail.clone(),
            };
            render(&c, &org, &s.csrf, None, Some(err), Some(&url), p.status).await
        }
        Err(p) => Err(p.into()),
    }
}
