//! The org console: server-rendered pages under `/console/` for one org's webhooks,
//! connection tests, delivery log, SFTP users and custom values.
//!
//! Every page is a thin adapter over the use cases the admin API runs
//! ([`crate::ingress::admin`], [`crate::provision`], [`crate::delivery`]), so the console
//! can do nothing the API would refuse, and says why with the API's own `detail`.
//! Sign-in is by one-time link ([`auth`]); a session reaches its own org only: any other
//! org's pages answer 404, as if they did not exist.

mod auth;
mod custom_values;
mod deliveries;
mod operator;
mod sftp;
mod view;
mod webhooks;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::Markup;
use serde::Deserialize;
use serde_json::json;

use crate::ingress::admin::{parse_body, require_admin, require_org};
use crate::ingress::problem::{ApiResult, Problem};
use crate::App;
use auth::{Session, Sessions};

/// What the console handlers share: the daemon's state and the console's sessions.
#[derive(Clone)]
struct Console {
    app: App,
    sessions: Arc<Sessions>,
}

/// The console pages and `POST /v1/orgs/{org}/console-links` (admin token), to merge
/// into the HTTP router.
pub fn router<S: Clone + Send + Sync + 'static>(app: App) -> Router<S> {
    let state = Console {
        app: app.clone(),
        sessions: Arc::new(Sessions::default()),
    };
    let max_body = app.config.http.max_body;
    // The same layers as the other admin routes: body limit and JSON (413, 415), then
    // the token, outermost.
    let links = Router::new()
        .route("/v1/orgs/{org}/console-links", post(make_link))
        .route_layer(axum::middleware::from_fn(move |req, next| {
            crate::ingress::json_body(req, next, max_body)
        }))
        .route_layer(axum::extract::DefaultBodyLimit::max(max_body))
        .route_layer(axum::middleware::from_fn_with_state(app, require_admin));
    Router::new()
        .merge(links)
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/static/console.css", get(css))
        .route("/console/login", get(login))
        .route("/console/logout", post(logout))
        .route(
            "/console/operator",
            get(operator::form).post(operator::submit),
        )
        .merge(webhooks::router())
        .merge(deliveries::router())
        .merge(sftp::router())
        .merge(custom_values::router())
        .with_state(state)
}

/// Why a console request is refused; each renders as an HTML page.
enum Refusal {
    /// No session, or an expired one.
    SignedOut,
    /// Another org's page, or a page that does not exist.
    NotFound,
    /// A form without the session's CSRF token.
    Csrf,
    Internal(Problem),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, title, text) = match self {
            Refusal::SignedOut => (
                StatusCode::UNAUTHORIZED,
                "Signed out",
                "Your console session has ended or was never started. Ask your platform for a new sign-in link.".to_owned(),
            ),
            Refusal::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no such page.".to_owned(),
            ),
            Refusal::Csrf => (
                StatusCode::FORBIDDEN,
                "Form refused",
                "The form did not carry this session's security token. Reload the page and send it again.".to_owned(),
            ),
            Refusal::Internal(p) => (p.status, "Error", p.detail),
        };
        (status, view::message(title, &text)).into_response()
    }
}

impl From<Problem> for Refusal {
    fn from(p: Problem) -> Self {
        if p.status == StatusCode::NOT_FOUND {
            Refusal::NotFound
        } else {
            Refusal::Internal(p)
        }
    }
}

type PageResult = Result<Response, Refusal>;

impl Console {
    /// The session of the request, if it may see `org`'s pages. Another org's pages are
    /// 404, the same answer as for an org that does not exist.
    fn session(&self, headers: &HeaderMap, org: &str) -> Result<Session, Refusal> {
        let s = self.sessions.get(headers).ok_or(Refusal::SignedOut)?;
        if s.org != org {
            return Err(Refusal::NotFound);
        }
        Ok(s)
    }

    /// [`Self::session`] for a form post: the form must carry the session's CSRF token.
    fn form_session(
        &self,
        headers: &HeaderMap,
        org: &str,
        form: &Form,
    ) -> Result<Session, Refusal> {
        let s = self.session(headers, org)?;
        match form.get("csrf") {
            Some(t) if crate::auth::constant_time_eq(t, &s.csrf) => Ok(s),
            _ => Err(Refusal::Csrf),
        }
    }
}

/// An `application/x-www-form-urlencoded` body, keeping repeated names (checkboxes).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &Bytes) -> Form {
        Form(url::form_urlencoded::parse(body).into_owned().collect())
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// A text field, trimmed; `None` when absent or blank.
    fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }
    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn checked(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

fn html(status: StatusCode, m: Markup) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // Everything is served by hookbridge itself; no script runs at all.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        m,
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        view::CSS,
    )
        .into_response()
}

async fn home(State(c): State<Console>, headers: HeaderMap) -> Response {
    match c.sessions.get(&headers) {
        Some(s) => Redirect::to(&format!("/console/o/{}/webhooks", s.org)).into_response(),
        None => Refusal::SignedOut.into_response(),
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

async fn login(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let Some((id, session)) = q.token.as_deref().and_then(|t| c.sessions.redeem(t)) else {
        tracing::info!("console sign-in refused: link unknown, used or expired");
        return html(
            StatusCode::FORBIDDEN,
            view::message(
                "Sign-in link refused",
                "This sign-in link was already used or has expired. Ask your platform for a new one.",
            ),
        );
    };
    tracing::info!(org = %session.org, "console session started");
    let cookie = auth::set_cookie(&id, auth::SESSION_TTL, auth::behind_tls(&headers));
    let to = format!("/console/o/{}/webhooks", session.org);
    let mut resp = html(StatusCode::OK, view::moving_on(&to));
    if let Ok(v) = cookie.parse() {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> PageResult {
    let s = c.sessions.get(&headers).ok_or(Refusal::SignedOut)?;
    c.form_session(&headers, &s.org, &Form::parse(&body))?;
    c.sessions.end(&headers);
    let mut resp = html(
        StatusCode::OK,
        view::message("Signed out", "You are signed out of the console."),
    );
    if let Ok(v) =
        auth::set_cookie("", std::time::Duration::ZERO, auth::behind_tls(&headers)).parse()
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    /// Seconds the link stays valid; at most [`auth::LINK_TTL_MAX`].
    #[serde(default, deserialize_with = "crate::ingress::admin::not_null")]
    ttl_seconds: Option<u64>,
}

/// `POST /v1/orgs/{org}/console-links` → 201 `{"url", "expires_at"}`.
async fn make_link(
    State(c): State<Console>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    require_org(&c.app.store, &org).await?;
    let req: LinkRequest = if body.iter().all(|b| b.is_ascii_whitespace()) {
        LinkRequest::default()
    } else {
        parse_body(&body)?
    };
    let ttl = match req.ttl_seconds {
        None => auth::LINK_TTL,
        Some(s) if (1..=auth::LINK_TTL_MAX.as_secs()).contains(&s) => {
            std::time::Duration::from_secs(s)
        }
        Some(_) => {
            return Err(Problem::bad_request(format!(
                "ttl_seconds: must be 1 to {}",
                auth::LINK_TTL_MAX.as_secs()
            )))
        }
    };
    let (url, expires_at) = link_url(&c, &org, ttl, &headers);
    tracing::info!(org = %org, "console sign-in link made");
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "url": url, "expires_at": expires_at })),
    )
        .into_response())
}

/// A new link for `org`, on the host and scheme the request came in on (the admin's
/// view of hookbridge, which is the one the org's browser should use too).
fn link_url(
    c: &Console,
    org: &str,
    ttl: std::time::Duration,
    headers: &HeaderMap,
) -> (String, chrono::DateTime<chrono::Utc>) {
    let (token, expires_at) = c.sessions.new_link(org, ttl);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| c.app.config.http.listen.to_string());
    let scheme = if auth::behind_tls(headers) {
        "https"
    } else {
        "http"
    };
    (
        format!("{scheme}://{host}/console/login?token={token}"),
        expires_at,
    )
}
