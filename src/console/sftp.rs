//! The SFTP page: the org's SFTP users (add or change, remove; password, public keys,
//! upload right), how to connect (host-key fingerprint, a ready-to-paste `sftp` command)
//! and the folder's usage against its quota.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};

use super::view::{self, csrf_field, error_for, field_error, FieldError, Frame, Notice, Tab};
use super::{html as respond, Console, Form, PageResult};
use crate::ingress::admin::{self, require_org};
use crate::ingress::problem::Problem;
use crate::provision::{self, UserSpec};

pub(super) fn router() -> Router<Console> {
    Router::new()
        .route("/console/o/{org}/sftp", get(page).post(save_user))
        .route(
            "/console/o/{org}/sftp/users/{user}/delete",
            post(delete_user),
        )
}

#[derive(Default)]
struct Shown {
    notice: Option<Notice>,
    error: Option<FieldError>,
    form: Option<Form>,
}

async fn page(State(c): State<Console>, headers: HeaderMap, Path(org): Path<String>) -> PageResult {
    let s = c.session(&headers, &org)?;
    render(
        &c,
        &headers,
        &org,
        &s.csrf,
        Shown::default(),
        StatusCode::OK,
    )
    .await
}

/// The host name the browser used, without its port: the SFTP server listens on the
/// same host (that is how hookbridge is deployed), on `sftp.listen`'s port.
fn host_of(headers: &HeaderMap) -> String {
    let h = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_owned(),
        _ => h.to_owned(),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn render(
    c: &Console,
    headers: &HeaderMap,
    org: &str,
    csrf: &str,
    shown: Shown,
    status: StatusCode,
) -> PageResult {
    require_org(&c.app.store, org).await?;
    let users = c
        .app
        .store
        .list_sftp_users(org)
        .await
        .map_err(Problem::from)?;
    let (_, limits, usage) = crate::ingress::usage::org_usage(&c.app, org).await?;
    let cfg = c.app.current();
    let fingerprint = crate::identity::host_key_fingerprint(&c.app.identity).await;
    let host = host_of(headers);
    let port = cfg.sftp.listen.port();
    let example_user = users.first().map(|u| u.name.as_str()).unwrap_or("USER");
    let command = format!("sftp -P {port} {example_user}@{host}");
    let body = html! {
        @if let Some(n) = &shown.notice { (n.render()) }
        section.card aria-labelledby="conn-h" {
            h2 #conn-h { "Connect" }
            @if !cfg.sftp.enabled { p.error { "The SFTP server is turned off on this hookbridge (sftp.enabled)." } }
            p { "Command: " code #sftp-command { (command) } }
            p { "Host key fingerprint: " code #host-key { (fingerprint.as_deref().unwrap_or("not created yet (the SFTP server makes it at start)")) } }
            p.muted { "Check that the fingerprint OpenSSH shows on first connection is this one." }
        }
        section.card aria-labelledby="usage-h" {
            h2 #usage-h { "Usage" }
            p #usage {
                (usage.files) " files"
                @if limits.quota_files > 0 { " of " (limits.quota_files) } @else { " (no file quota)" }
                " · " (human_bytes(usage.bytes))
                @if limits.quota_bytes > 0 { " of " (human_bytes(limits.quota_bytes)) } @else { " (no byte quota)" }
            }
            @let pct = usage.bytes.saturating_mul(100).checked_div(limits.quota_bytes).unwrap_or(0).min(100);
            @if limits.quota_bytes > 0 {
                meter min="0" max="100" value=(pct) aria-label="Share of the byte quota used" { (pct) "%" }
            }
        }
        section.card aria-labelledby="users-h" {
            h2 #users-h { "SFTP users" }
            @if users.is_empty() { p.muted { "No SFTP users yet." } }
            @else {
                div.scroll { table.stack #sftp-users {
                    thead { tr { th { "User" } th { "Sign-in" } th { "Upload" } th { "" } } }
                    tbody {
                        @for u in &users {
                            tr data-user=(u.name) {
                                td data-label="User" { strong { (u.name) } }
                                td data-label="Sign-in" {
                                    @if u.has_password { "password" }
                                    @if u.has_password && !u.public_keys.is_empty() { " + " }
                                    @if !u.public_keys.is_empty() { (u.public_keys.len()) " public key(s)" }
                                }
                                td data-label="Upload" { @if u.upload { "yes" } @else { "read-only" } }
                                td {
                                    form method="post" action={ "/console/o/" (org) "/sftp/users/" (u.name) "/delete" } {
                                        (csrf_field(csrf))
                                        button.danger type="submit" aria-label={ "Remove " (u.name) } { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                } }
            }
        }
        (user_form(org, csrf, shown.error.as_ref(), shown.form.as_ref()))
    };
    let frame = Frame {
        org,
        csrf,
        tab: Tab::Sftp,
    };
    Ok(respond(status, view::page("SFTP", Some(frame), body)))
}

fn user_form(org: &str, csrf: &str, err: Option<&FieldError>, sent: Option<&Form>) -> Markup {
    let val = |k: &str| sent.and_then(|f| f.get(k)).unwrap_or("").to_owned();
    let (name_err, name_desc) = error_for(err, "user", "name");
    let (pw_err, pw_desc) = error_for(err, "user", "password");
    let (keys_err, keys_desc) = error_for(err, "user", "public_keys");
    html! {
        section.card aria-labelledby="user-h" {
            h2 #user-h { "Add or change a user" }
            p.muted { "Saving an existing name changes that user; a blank password or key list keeps the current one." }
            form #add-user method="post" action={ "/console/o/" (org) "/sftp" } {
                (csrf_field(csrf))
                label for="user-name" { "User name" }
                input #user-name type="text" name="name" value=(val("name")) autocomplete="off" aria-describedby=[name_desc];
                (name_err)
                label for="user-password" { "Password (8 characters or more)" }
                input #user-password type="password" name="password" autocomplete="new-password" aria-describedby=[pw_desc];
                (pw_err)
                label for="user-keys" { "Public keys (OpenSSH format, one per line)" }
                textarea #user-keys name="public_keys" aria-describedby=[keys_desc] { (val("public_keys")) }
                (keys_err)
                label.inline { input type="checkbox" name="upload" value="1" checked[sent.is_some_and(|f| f.checked("upload"))]; "May upload and delete files" }
                p { button type="submit" { "Save user" } }
            }
        }
    }
}

async fn save_user(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(org): Path<String>,
    body: Bytes,
) -> PageResult {
    let form = Form::parse(&body);
    let s = c.form_session(&headers, &org, &form)?;
    require_org(&c.app.store, &org).await?;
    let name = form.text("name").unwrap_or_default();
    let keys: Vec<String> = form
        .get("public_keys")
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let spec = UserSpec {
        password: form
            .get("password")
            .filter(|p| !p.is_empty())
            .map(str::to_owned),
        password_hash: None,
        public_keys: (!keys.is_empty()).then_some(keys),
        upload: Some(form.checked("upload")),
        complete: false,
    };
    match provision::put_user(&c.app.store, &org, &name, spec).await {
        Ok((u, created)) => {
            let verb = if created { "added" } else { "saved" };
            let shown = Shown {
                notice: Some(Notice::ok(format!("SFTP user {} {verb}.", u.name))),
                ..Default::default()
            };
            render(&c, &headers, &org, &s.csrf, shown, StatusCode::OK).await
        }
        Err(e) => {
            let p = Problem::from(e);
            if !p.status.is_client_error() {
                return Err(p.into());
            }
            let err = field_error(
                &p,
                &["name", "password", "password_hash", "public_keys"],
                "name",
            );
            let status = p.status;
            let shown = Shown {
                error: Some(err),
                form: Some(form),
                ..Default::default()
            };
            render(&c, &headers, &org, &s.csrf, shown, status).await
        }
    }
}

async fn delete_user(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((org, user)): Path<(String, String)>,
    body: Bytes,
) -> PageResult {
    let form = Form::parse(&body);
    let s = c.form_session(&headers, &org, &form)?;
    admin::remove_user(&c.app, &org, &user).await?;
    let shown = Shown {
        notice: Some(Notice::ok(format!("SFTP user {user} removed."))),
        ..Default::default()
    };
    render(&c, &headers, &org, &s.csrf, shown, StatusCode::OK).await
}
