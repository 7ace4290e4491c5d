//! The Webhooks page: the list with each hook's state, add (HTTP with endpoint
//! verification, or SFTP), enable/disable, delete, rotate the secret, connection tests.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};

use super::view::{self, csrf_field, error_for, field_error, FieldError, Frame, Notice, Tab};
use super::{html as respond, Console, Form, PageResult, Refusal};
use crate::event::EventType;
use crate::ingress::admin::{self, find_hook, require_org};
use crate::provision::{HookPatch, HookSpec};
use crate::store::{Webhook, WebhookKind};

pub(super) fn router() -> Router<Console> {
    Router::new()
        .route("/console/o/{org}/webhooks", get(list).post(add))
        .route("/console/o/{org}/webhooks/{id}", post(act))
}

/// What the last action left to show on the page.
#[derive(Default)]
struct Shown {
    notice: Option<Notice>,
    /// A notice shown in the row of one webhook (test result, action error).
    row: Option<(String, Notice)>,
    add_error: Option<FieldError>,
    /// The add form as sent, to fill it again after an error.
    add_form: Option<Form>,
}

async fn list(State(c): State<Console>, headers: HeaderMap, Path(org): Path<String>) -> PageResult {
    let s = c.session(&headers, &org)?;
    render(&c, &org, &s.csrf, Shown::default(), StatusCode::OK).await
}

async fn render(
    c: &Console,
    org: &str,
    csrf: &str,
    shown: Shown,
    status: StatusCode,
) -> PageResult {
    require_org(&c.app.store, org).await?;
    let hooks = c
        .app
        .store
        .list_webhooks(org)
        .await
        .map_err(|e| Refusal::from(crate::ingress::problem::Problem::from(e)))?;
    let body = html! {
        @if let Some(n) = &shown.notice { (n.render()) }
        section.card aria-labelledby="hooks-h" {
            h2 #hooks-h { "Webhooks" }
            @if hooks.is_empty() {
                p.muted { "No webhooks yet. Add one below." }
            } @else {
                div.scroll { table.stack #webhooks {
                    thead { tr { th { "Webhook" } th { "Destination" } th { "Events" } th { "State" } th { "Actions" } } }
                    tbody {
                        @for h in &hooks { (row(org, csrf, h, shown.row.as_ref())) }
                    }
                } }
            }
        }
        (add_form(org, csrf, shown.add_error.as_ref(), shown.add_form.as_ref()))
    };
    let frame = Frame {
        org,
        csrf,
        tab: Tab::Webhooks,
    };
    Ok(respond(status, view::page("Webhooks", Some(frame), body)))
}

fn state_badge(h: &Webhook) -> Markup {
    html! {
        @if !h.enabled {
            span.badge.bad { "disabled" }
            @if let Some(r) = &h.disabled_reason { div.muted { (r) } }
        } @else if let Some(since) = h.failing_since {
            span.badge.warn { "failing" }
            div.muted { "since " (since.format("%Y-%m-%d %H:%M:%S UTC")) }
        } @else {
            span.badge.ok { "enabled" }
        }
    }
}

fn row(org: &str, csrf: &str, h: &Webhook, shown: Option<&(String, Notice)>) -> Markup {
    let action = format!("/console/o/{org}/webhooks/{}", h.id);
    let test_id = format!("test-{}", h.id);
    // After a test, the dropdown keeps the test that ran.
    let last_test = shown
        .filter(|(id, _)| *id == h.id)
        .and_then(|(_, n)| n.text.split_once(':'))
        .map(|(t, _)| t);
    html! {
        tr data-hook=(h.id) {
            td data-label="Webhook" { strong { (h.id) } br; span.muted { (h.kind.as_str()) } }
            td data-label="Destination" {
                @match h.kind {
                    WebhookKind::Http => code { (h.url.as_deref().unwrap_or("")) },
                    WebhookKind::Sftp => @match h.rollup {
                        Some(r) => code { "/rollups/<type>/dt=…" @if r.rollup == crate::rollups::Period::Hour { "/hour=…" } "/ (ndjson.gz)" },
                        None => code { (h.template()) },
                    },
                }
            }
            td data-label="Events" {
                @for (i, e) in h.events.iter().enumerate() { @if i > 0 { ", " } (e.as_str()) }
            }
            td data-label="State" { (state_badge(h)) }
            td data-label="Actions" {
                div.row-actions {
                    form method="post" action=(action) {
                        (csrf_field(csrf))
                        label.inline for=(test_id) { "Test" }
                        select id=(test_id) name="test" {
                            @for t in crate::delivery::TESTS { option value=(t) selected[last_test == Some(t)] { (t) } }
                        }
                        button.secondary type="submit" name="action" value="test" { "Run test" }
                    }
                    form method="post" action=(action) {
                        (csrf_field(csrf))
                        @if h.enabled {
                            button.secondary type="submit" name="action" value="disable" { "Disable" }
                        } @else {
                            button.secondary type="submit" name="action" value="enable" { "Enable" }
                        }
                        @if h.kind == WebhookKind::Http {
                            button.secondary type="submit" name="action" value="rotate" { "Rotate secret" }
                            a href={ "/console/o/" (org) "/webhooks/" (h.id) "/deliveries" } { "Deliveries" }
                        }
                        button.danger type="submit" name="action" value="delete" { "Delete" }
                    }
                    @if h.kind == WebhookKind::Sftp { (rollup_form(&action, csrf, h)) }
                }
                @if let Some((id, n)) = shown { @if *id == h.id { (n.render()) } }
            }
        }
    }
}

/// The roll-up settings of an `sftp` hook (format, period, grace, part size), changed by
/// the same patch as `PATCH …/webhooks/{id}`; blank fields keep the current value.
fn rollup_form(action: &str, csrf: &str, h: &Webhook) -> Markup {
    let id = |f: &str| format!("{f}-{}", h.id);
    let period = h.rollup.map(|r| r.rollup.as_str());
    let close_after = h
        .rollup
        .map(|r| humantime::format_duration(r.close_after).to_string())
        .unwrap_or_default();
    let max_part = h
        .rollup
        .map(|r| r.max_part_bytes.to_string())
        .unwrap_or_default();
    html! {
        details.rollup {
            summary { "Roll-up settings" }
            form method="post" action=(action) {
                (csrf_field(csrf))
                label for=(id("format")) { "Format" }
                select id=(id("format")) name="format" {
                    option value="json" selected[h.rollup.is_none()] { "json (one file per event)" }
                    option value="ndjson.gz" selected[h.rollup.is_some()] { "ndjson.gz (roll-ups under /rollups)" }
                }
                label for=(id("rollup")) { "Period" }
                select id=(id("rollup")) name="rollup" {
                    option value="" selected[period.is_none()] { "—" }
                    option value="hour" selected[period == Some("hour")] { "hour" }
                    option value="day" selected[period == Some("day")] { "day" }
                }
                label for=(id("close_after")) { "Close after (grace, e.g. 5m)" }
                input id=(id("close_after")) type="text" name="close_after" value=(close_after) placeholder="5m";
                label for=(id("max_part_bytes")) { "Most bytes per part" }
                input id=(id("max_part_bytes")) type="number" name="max_part_bytes" value=(max_part) placeholder="134217728";
                p { button.secondary type="submit" name="action" value="rollup" { "Save roll-up settings" } }
            }
        }
    }
}

fn add_form(org: &str, csrf: &str, err: Option<&FieldError>, sent: Option<&Form>) -> Markup {
    let val = |k: &str| sent.and_then(|f| f.get(k)).unwrap_or("").to_owned();
    let kind = sent.and_then(|f| f.get("kind")).unwrap_or("http");
    let events: Vec<String> = sent.map(|f| f.all("events")).unwrap_or_default();
    let verify = sent.is_none_or(|f| f.checked("verify"));
    let (id_err, id_desc) = error_for(err, "add", "id");
    let (url_err, url_desc) = error_for(err, "add", "url");
    let (tpl_err, tpl_desc) = error_for(err, "add", "path_template");
    let (ev_err, _) = error_for(err, "add", "events");
    let (kind_err, _) = error_for(err, "add", "kind");
    html! {
        section.card aria-labelledby="add-h" {
            h2 #add-h { "Add a webhook" }
            form #add-webhook method="post" action={ "/console/o/" (org) "/webhooks" } {
                (csrf_field(csrf))
                fieldset {
                    legend { "Kind" }
                    label.inline { input type="radio" name="kind" value="http" checked[kind == "http"]; "HTTP (signed POST to your endpoint)" }
                    label.inline { input type="radio" name="kind" value="sftp" checked[kind == "sftp"]; "SFTP (a file in the org folder)" }
                    (kind_err)
                }
                label for="add-id" { "Name (optional)" }
                input #add-id type="text" name="id" value=(val("id")) aria-describedby=[id_desc] autocomplete="off";
                (id_err)
                label for="add-url" { "Endpoint URL (HTTP)" }
                input #add-url type="url" name="url" value=(val("url")) placeholder="https://example.com/hooks" aria-describedby=[url_desc];
                (url_err)
                label for="add-path" { "Path template (SFTP, optional)" }
                input #add-path type="text" name="path_template" value=(val("path_template")) placeholder=(crate::store::DEFAULT_PATH_TEMPLATE) aria-describedby=[tpl_desc];
                (tpl_err)
                fieldset {
                    legend { "Event types" }
                    @for e in EventType::ALL {
                        label.inline { input type="checkbox" name="events" value=(e.as_str()) checked[events.iter().any(|x| x == e.as_str())]; (e.as_str()) }
                    }
                    (ev_err)
                }
                label.inline { input type="checkbox" name="verify" value="1" checked[verify]; "Verify the endpoint with a signed ping before saving" }
                p { button type="submit" { "Add webhook" } }
            }
        }
    }
}

async fn add(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(org): Path<String>,
    body: Bytes,
) -> PageResult {
    let form = Form::parse(&body);
    let s = c.form_session(&headers, &org, &form)?;
    let kind = form.text("kind").unwrap_or_default();
    let spec = HookSpec {
        id: form.text("id"),
        url: if kind == "http" {
            form.text("url")
        } else {
            None
        },
        path_template: if kind == "sftp" {
            form.text("path_template")
        } else {
            None
        },
        kind,
        events: form.all("events"),
        enabled: None,
        // Roll-ups are set up through the admin API or the config file.
        format: None,
        rollup: None,
        close_after: None,
        max_part_bytes: None,
    };
    match admin::create_webhook(&c.app, &org, spec, form.checked("verify")).await {
        Ok(h) => {
            let mut n = Notice::ok(format!("Webhook {} added.", h.id));
            if let Some(secret) = &h.secret {
                n.text
                    .push_str(" Its signing secret (shown once, copy it now):");
                n.code = Some(secret.clone());
            }
            let shown = Shown {
                notice: Some(n),
                ..Default::default()
            };
            render(&c, &org, &s.csrf, shown, StatusCode::OK).await
        }
        Err(p) if p.status.is_client_error() && p.status != StatusCode::NOT_FOUND => {
            let err = field_error(&p, &["id", "kind", "url", "events", "path_template"], "url");
            let shown = Shown {
                add_error: Some(err),
                add_form: Some(form),
                ..Default::default()
            };
            render(&c, &org, &s.csrf, shown, p.status).await
        }
        Err(p) => Err(p.into()),
    }
}

async fn act(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((org, id)): Path<(String, String)>,
    body: Bytes,
) -> PageResult {
    let form = Form::parse(&body);
    let s = c.form_session(&headers, &org, &form)?;
    let hook = find_hook(&c.app, &org, &id).await?;
    let patch = |enabled: Option<bool>, rotate_secret| HookPatch {
        enabled,
        rotate_secret,
        ..Default::default()
    };
    let outcome: Result<Notice, crate::ingress::problem::Problem> = match form.get("action") {
        Some("enable") => admin::update_webhook(&c.app, hook, patch(Some(true), false), false)
            .await
            .map(|_| Notice::ok("Enabled.")),
        Some("disable") => admin::update_webhook(&c.app, hook, patch(Some(false), false), false)
            .await
            .map(|_| Notice::ok("Disabled.")),
        Some("rotate") => admin::update_webhook(&c.app, hook, patch(None, true), false)
            .await
            .map(|(h, _)| Notice {
                ok: true,
                text: "New signing secret (shown once, copy it now):".into(),
                code: h.secret,
            }),
        Some("rollup") => match rollup_patch(&form) {
            Ok(p) => admin::update_webhook(&c.app, hook, p, false)
                .await
                .map(|_| Notice::ok("Roll-up settings saved.")),
            Err(p) => Err(p),
        },
        Some("delete") => {
            admin::remove_webhook(&c.app, &org, &id).await?;
            let shown = Shown {
                notice: Some(Notice::ok(format!("Webhook {id} deleted."))),
                ..Default::default()
            };
            return render(&c, &org, &s.csrf, shown, StatusCode::OK).await;
        }
        Some("test") => {
            let test = form.get("test").unwrap_or_default();
            crate::delivery::connection_test(&c.app, &hook, test)
                .await
                .map(|r| test_notice(test, &r))
        }
        _ => Err(crate::ingress::problem::Problem::bad_request(
            "unknown action",
        )),
    };
    let (n, status) = match outcome {
        Ok(n) => (n, StatusCode::OK),
        Err(p) if p.status.is_client_error() => (Notice::bad(p.detail.clone()), p.status),
        Err(p) => return Err(p.into()),
    };
    let shown = Shown {
        row: Some((id, n)),
        ..Default::default()
    };
    render(&c, &org, &s.csrf, shown, status).await
}

/// The roll-up form as a patch: with "json" the roll-up fields are left out (they only
/// go with "ndjson.gz"); blank fields keep the hook's current values.
fn rollup_patch(form: &Form) -> Result<HookPatch, crate::ingress::problem::Problem> {
    let format = form.text("format");
    let json = format.as_deref() == Some("json");
    let max_part_bytes = match form.text("max_part_bytes").filter(|_| !json) {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            crate::ingress::problem::Problem::bad_request(format!(
                "max_part_bytes: {v:?} is not a whole number of bytes"
            ))
        })?),
    };
    Ok(HookPatch {
        format,
        rollup: form.text("rollup").filter(|_| !json),
        close_after: form.text("close_after").filter(|_| !json),
        max_part_bytes,
        ..Default::default()
    })
}

/// `payment: ok · HTTP 200 · 12 ms · the endpoint answered HTTP 200`.
pub(super) fn test_notice(test: &str, r: &crate::delivery::TestResult) -> Notice {
    let mut text = format!("{test}: {}", if r.ok { "ok" } else { "failed" });
    if let Some(s) = r.status {
        text.push_str(&format!(" · HTTP {s}"));
    }
    text.push_str(&format!(" · {} ms · {}", r.latency_ms, r.detail));
    Notice {
        ok: r.ok,
        text,
        code: None,
    }
}
