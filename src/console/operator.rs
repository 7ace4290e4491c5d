//! The operator page: with the admin token pasted into a form, it lists the orgs and
//! makes console sign-in links for them. Nothing is remembered between requests: the
//! token travels in each form, so this page has no session to steal.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{html, Markup};

use super::view::{self, Notice};
use super::{html as respond, Console, Form};
use crate::ingress::problem::Problem;

fn token_form(err: Option<&str>) -> Markup {
    html! {
        section.card aria-labelledby="op-h" {
            h2 #op-h { "Operator sign-in" }
            form method="post" action="/console/operator" {
                label for="op-token" { "Admin token" }
                input #op-token type="password" name="token" autocomplete="off" aria-describedby=[err.map(|_| "op-token-error")];
                @if let Some(e) = err { p.error #op-token-error role="alert" { (e) } }
                p { button type="submit" { "List orgs" } }
            }
        }
    }
}

pub(super) async fn form() -> Response {
    respond(
        StatusCode::OK,
        view::page("Operator", None, token_form(None)),
    )
}

pub(super) async fn submit(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let f = Form::parse(&body);
    let token = f.get("token").unwrap_or_default();
    if !crate::auth::constant_time_eq(token, &c.app.secrets.admin_token) {
        tracing::info!("operator page: wrong admin token");
        return respond(
            StatusCode::UNAUTHORIZED,
            view::page("Operator", None, token_form(Some("admin token is wrong"))),
        );
    }
    let mut notice = None;
    if let Some(org) = f.text("org") {
        notice = Some(match c.app.store.get_org(&org).await {
            Ok(Some(_)) => {
                let (url, expires) = super::link_url(&c, &org, super::auth::LINK_TTL, &headers);
                Notice {
                    ok: true,
                    text: format!(
                        "Sign-in link for {org}, valid once until {}:",
                        expires.format("%H:%M:%S UTC")
                    ),
                    code: Some(url),
                }
            }
            Ok(None) => Notice::bad(format!("unknown org {org:?}")),
            Err(e) => Notice::bad(Problem::from(e).detail),
        });
    }
    let orgs = match c.app.store.list_orgs().await {
        Ok(o) => o,
        Err(e) => {
            let p = Problem::from(e);
            return respond(p.status, view::message("Error", &p.detail));
        }
    };
    let body = html! {
        @if let Some(n) = &notice { (n.render()) }
        section.card aria-labelledby="orgs-h" {
            h2 #orgs-h { "Orgs" }
            @if orgs.is_empty() { p.muted { "No orgs yet." } }
            div.scroll { table.stack #orgs {
                thead { tr { th { "Org" } th { "Name" } th { "Created" } th { "" } } }
                tbody {
                    @for o in &orgs {
                        tr {
                            td data-label="Org" { code { (o.id) } }
                            td data-label="Name" { (o.name) }
                            td data-label="Created" { (o.created_at.format("%Y-%m-%d")) }
                            td {
                                form method="post" action="/console/operator" {
                                    input type="hidden" name="token" value=(token);
                                    input type="hidden" name="org" value=(o.id);
                                    button.secondary type="submit" aria-label={ "Make a sign-in link for " (o.id) } { "Make sign-in link" }
                                }
                            }
                        }
                    }
                }
            } }
        }
    };
    respond(StatusCode::OK, view::page("Operator", None, body))
}
