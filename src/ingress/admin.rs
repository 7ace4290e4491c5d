//! Admin API: orgs, SFTP users, webhooks and the custom-value endpoint.
//! Also applies the orgs declared in the config file, idempotently.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::problem::{ApiResult, Problem};
use crate::config::Config;
use crate::event::EventType;
use crate::store::{
    new_id, validate_name, validate_path_template, validate_url, SftpUser, Store, Webhook,
    WebhookKind,
};
use crate::App;

pub fn router() -> Router<App> {
    Router::new()
        .route("/v1/orgs", get(list_orgs))
        .route(
            "/v1/orgs/{org}",
            put(put_org).get(get_org).delete(delete_org),
        )
        .route("/v1/orgs/{org}/sftp-users", get(list_users))
        .route(
            "/v1/orgs/{org}/sftp-users/{user}",
            put(put_user).get(get_user).delete(delete_user),
        )
        .route("/v1/orgs/{org}/webhooks", get(list_hooks).post(create_hook))
        .route(
            "/v1/orgs/{org}/webhooks/{id}",
            get(get_hook).patch(patch_hook).delete(delete_hook),
        )
        .route(
            "/v1/orgs/{org}/custom-value-endpoint",
            put(put_cv_endpoint).get(get_cv_endpoint),
        )
}

/// Rejects requests without the admin bearer token (compared in constant time).
pub async fn require_admin(State(app): State<App>, req: Request, next: Next) -> Response {
    match super::bearer(req.headers()) {
        Some(t) if crate::auth::constant_time_eq(t, &app.secrets.admin_token) => {
            next.run(req).await
        }
        Some(_) => Problem::unauthorized("admin token is wrong").into_response(),
        None => {
            Problem::unauthorized("missing bearer token: send Authorization: Bearer <admin token>")
                .into_response()
        }
    }
}

/// Parses a JSON body into `T`, with a 400 that says what is wrong. Every admin body is
/// required (the OpenAPI document says so): an empty one is refused, not taken as `{}`.
/// Content type and size were checked by [`crate::ingress::json_body`].
pub fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Problem::bad_request(
            "a JSON object body is required (send {} for none of the optional fields)",
        ));
    }
    // serde would fill a struct from an array too (`["pw"]` as `{"password":"pw"}`).
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(Problem::bad_request("the body must be a JSON object"));
    }
    serde_json::from_slice(body)
        .map_err(|e| Problem::bad_request(format!("invalid JSON body: {e}")))
}

/// For optional object fields: like [`not_null`], and only a JSON object (serde would
/// otherwise fill a struct from an array).
pub fn object_only<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
        .map(Some)
}

/// For optional body fields: absent is `None`, `null` is refused (the document types them
/// as strings, booleans… never null), so that `null` cannot pass for "absent".
pub fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

fn check_name(what: &str, name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|m| Problem::bad_request(format!("invalid {what} name: {m}")))
}

pub async fn require_org(store: &Arc<dyn Store>, org: &str) -> ApiResult<crate::store::Org> {
    store
        .get_org(org)
        .await?
        .ok_or_else(|| Problem::not_found(format!("unknown org {org:?}")))
}

async fn list_orgs(State(app): State<App>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({ "orgs": app.store.list_orgs().await? })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutOrg {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<String>,
    /// Overrides of `[limits]`; absent keeps the current ones.
    #[serde(default, deserialize_with = "object_only")]
    limits: Option<crate::config::OrgLimits>,
}

async fn put_org(
    State(app): State<App>,
    Path(org): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    check_name("org", &org)?;
    let req: PutOrg = parse_body(&body)?;
    let display = req.name.unwrap_or_else(|| org.clone());
    // Characters, not bytes, as JSON Schema's maxLength counts them.
    let chars = display.chars().count();
    if chars == 0 || chars > 200 || display.chars().any(char::is_control) {
        return Err(Problem::bad_request(
            "`name` must be 1 to 200 printable characters",
        ));
    }
    if let Some(l) = &req.limits {
        l.validate()
            .map_err(|m| Problem::bad_request(format!("limits: {m}")))?;
    }
    let (mut o, created) = app.store.put_org(&org, &display).await?;
    if let Some(l) = req.limits {
        app.store.set_org_limits(&org, &l).await?;
        o.limits = l;
    }
    tokio::fs::create_dir_all(app.layout.org_dir(&org))
        .await
        .map_err(|e| Problem::internal("cannot create org folder", e))?;
    if created {
        tracing::info!(org = %org, "org created");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(o)).into_response())
}

async fn get_org(
    State(app): State<App>,
    Path(org): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let o = require_org(&app.store, &org).await?;
    let users = app.store.list_sftp_users(&org).await?;
    let hooks = app.store.list_webhooks(&org).await?;
    let cv = app.store.get_custom_value_endpoint(&org).await?;
    Ok(Json(json!({
        "id": o.id, "name": o.name, "created_at": o.created_at,
        "sftp_users": users, "webhooks": hooks, "custom_value_endpoint": cv,
    })))
}

async fn delete_org(State(app): State<App>, Path(org): Path<String>) -> ApiResult<StatusCode> {
    if !app.store.delete_org(&org).await? {
        return Err(Problem::not_found(format!("unknown org {org:?}")));
    }
    // The name was validated when the org was made, so this stays inside orgs/.
    if validate_name(&org).is_ok() {
        let dir = app.layout.org_dir(&org);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(org = %org, dir = %dir.display(), error = %e, "org deleted but its folder could not be removed");
            }
        }
    }
    tracing::info!(org = %org, "org deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_users(
    State(app): State<App>,
    Path(org): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_org(&app.store, &org).await?;
    Ok(Json(
        json!({ "sftp_users": app.store.list_sftp_users(&org).await? }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutUser {
    #[serde(default, deserialize_with = "not_null")]
    password: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    password_hash: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    public_keys: Option<Vec<String>>,
    #[serde(default, deserialize_with = "not_null")]
    upload: Option<bool>,
}

async fn put_user(
    State(app): State<App>,
    Path((org, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_name("user", &user)?;
    require_org(&app.store, &org).await?;
    let req: PutUser = parse_body(&body)?;
    // The document's `anyOf`: every PUT names a credential; ones it leaves out are kept.
    if req.password.is_none()
        && req.password_hash.is_none()
        && req.public_keys.as_ref().is_none_or(|k| k.is_empty())
    {
        return Err(Problem::bad_request(
            "an SFTP user needs a `password`, a `password_hash` or at least one of `public_keys`",
        ));
    }
    let existing = app
        .store
        .get_sftp_user(&user)
        .await?
        .filter(|u| u.org == org);
    let public_keys = match req.public_keys {
        Some(keys) => {
            for (i, k) in keys.iter().enumerate() {
                crate::auth::parse_public_key(k)
                    .map_err(|m| Problem::bad_request(format!("public_keys[{i}]: {m}")))?;
            }
            keys.into_iter().map(|k| k.trim().to_owned()).collect()
        }
        None => existing
            .as_ref()
            .map(|u| u.public_keys.clone())
            .unwrap_or_default(),
    };
    let password_hash = match (req.password, req.password_hash) {
        (Some(_), Some(_)) => {
            return Err(Problem::bad_request(
                "give `password` or `password_hash`, not both",
            ))
        }
        (Some(p), None) => {
            let chars = p.chars().count();
            if !(8..=1024).contains(&chars) {
                return Err(Problem::bad_request(
                    "`password` must be 8 to 1024 characters",
                ));
            }
            let h = tokio::task::spawn_blocking(move || crate::auth::hash_password(&p))
                .await
                .map_err(|e| Problem::internal("password hashing failed", e))?
                .map_err(|e| Problem::internal("password hashing failed", e))?;
            Some(h)
        }
        (None, Some(h)) => {
            crate::auth::check_hash_format(&h)
                .map_err(|m| Problem::bad_request(format!("password_hash: {m}")))?;
            Some(h)
        }
        (None, None) => existing.as_ref().and_then(|u| u.password_hash.clone()),
    };
    if password_hash.is_none() && public_keys.is_empty() {
        return Err(Problem::bad_request(
            "an SFTP user needs a `password` or at least one of `public_keys`",
        ));
    }
    let upload = req
        .upload
        .or(existing.as_ref().map(|u| u.upload))
        .unwrap_or(false);
    let u = SftpUser {
        org: org.clone(),
        name: user.clone(),
        has_password: password_hash.is_some(),
        password_hash,
        public_keys,
        upload,
    };
    let created = app.store.put_sftp_user(&u).await?;
    tracing::info!(org = %org, user = %user, created, "SFTP user saved");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(u)).into_response())
}

async fn get_user(
    State(app): State<App>,
    Path((org, user)): Path<(String, String)>,
) -> ApiResult<Json<SftpUser>> {
    require_org(&app.store, &org).await?;
    app.store
        .get_sftp_user(&user)
        .await?
        .filter(|u| u.org == org)
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no SFTP user {user:?} in org {org:?}")))
}

async fn delete_user(
    State(app): State<App>,
    Path((org, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_org(&app.store, &org).await?;
    if !app.store.delete_sftp_user(&org, &user).await? {
        return Err(Problem::not_found(format!(
            "no SFTP user {user:?} in org {org:?}"
        )));
    }
    tracing::info!(org = %org, user = %user, "SFTP user deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateHook {
    #[serde(default, deserialize_with = "not_null")]
    id: Option<String>,
    kind: String,
    #[serde(default, deserialize_with = "not_null")]
    url: Option<String>,
    #[serde(default)]
    events: Vec<String>,
    #[serde(default, deserialize_with = "not_null")]
    path_template: Option<String>,
    #[serde(default = "yes")]
    verify: bool,
    #[serde(default, deserialize_with = "not_null")]
    enabled: Option<bool>,
}

fn yes() -> bool {
    true
}

pub fn hook_json(h: &Webhook, with_secret: bool) -> serde_json::Value {
    let mut v = serde_json::to_value(h).unwrap_or_default();
    if with_secret {
        if let Some(s) = &h.secret {
            v["secret"] = json!(s);
        }
    }
    v
}

pub fn new_webhook_secret() -> String {
    let mut b = [0u8; 24];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    format!(
        "whsec_{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b)
    )
}

/// Validates kind-specific fields of a webhook about to be stored.
fn check_hook(h: &Webhook, allow_private: bool) -> ApiResult<()> {
    match h.kind {
        WebhookKind::Sftp => {
            if h.url.is_some() {
                return Err(Problem::bad_request(
                    "`url` is only for webhooks of kind \"http\"",
                ));
            }
            if let Some(t) = &h.path_template {
                validate_path_template(t)
                    .map_err(|m| Problem::bad_request(format!("path_template: {m}")))?;
            }
        }
        WebhookKind::Http => {
            let u = h
                .url
                .as_deref()
                .ok_or_else(|| Problem::bad_request("`url` is required for kind \"http\""))?;
            let parsed = validate_url(u).map_err(|m| Problem::bad_request(format!("url: {m}")))?;
            if h.path_template.is_some() {
                return Err(Problem::bad_request(
                    "`path_template` is only for webhooks of kind \"sftp\"",
                ));
            }
            crate::ssrf::check_literal(&parsed, allow_private)
                .map_err(|m| Problem::bad_request(format!("url: {m}")))?;
        }
    }
    Ok(())
}

async fn create_hook(
    State(app): State<App>,
    Path(org): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    require_org(&app.store, &org).await?;
    let req: CreateHook = parse_body(&body)?;
    let kind = WebhookKind::parse(&req.kind).ok_or_else(|| {
        Problem::bad_request(format!(
            "kind {:?} is not allowed; use \"sftp\" or \"http\"",
            req.kind
        ))
    })?;
    let events = EventType::parse_filter(&req.events)
        .map_err(|m| Problem::bad_request(format!("events: {m}")))?;
    let id = match req.id {
        Some(id) => {
            check_name("webhook", &id)?;
            if app.store.get_webhook(&org, &id).await?.is_some() {
                return Err(Problem::conflict(format!(
                    "webhook {id:?} exists; PATCH it instead"
                )));
            }
            id
        }
        None => new_id("wh"),
    };
    let hook = Webhook {
        id,
        org: org.clone(),
        kind,
        url: req.url,
        events,
        path_template: req.path_template,
        secret: (kind == WebhookKind::Http).then(new_webhook_secret),
        enabled: req.enabled.unwrap_or(true),
        disabled_reason: None,
        created_at: Utc::now(),
        failing_since: None,
    };
    check_hook(&hook, app.config.delivery.allow_private_destinations)?;
    if kind == WebhookKind::Http && req.verify {
        crate::delivery::verify_endpoint(&app, &hook).await?;
    }
    app.store.put_webhook(&hook).await?;
    tracing::info!(org = %org, webhook = %hook.id, kind = kind.as_str(), "webhook created");
    Ok((StatusCode::CREATED, Json(hook_json(&hook, true))).into_response())
}

async fn list_hooks(
    State(app): State<App>,
    Path(org): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_org(&app.store, &org).await?;
    let hooks: Vec<_> = app
        .store
        .list_webhooks(&org)
        .await?
        .iter()
        .map(|h| hook_json(h, false))
        .collect();
    Ok(Json(json!({ "webhooks": hooks })))
}

pub async fn find_hook(app: &App, org: &str, id: &str) -> ApiResult<Webhook> {
    require_org(&app.store, org).await?;
    app.store
        .get_webhook(org, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no webhook {id:?} in org {org:?}")))
}

async fn get_hook(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(hook_json(&find_hook(&app, &org, &id).await?, false)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchHook {
    #[serde(default, deserialize_with = "not_null")]
    url: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    events: Option<Vec<String>>,
    #[serde(default, deserialize_with = "not_null")]
    path_template: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    enabled: Option<bool>,
    /// `true` issues a new Standard Webhooks secret (returned once in the answer).
    #[serde(default)]
    rotate_secret: bool,
    #[serde(default = "yes")]
    verify: bool,
}

async fn patch_hook(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let mut hook = find_hook(&app, &org, &id).await?;
    let req: PatchHook = parse_body(&body)?;
    let url_changed = req
        .url
        .as_ref()
        .is_some_and(|u| Some(u) != hook.url.as_ref());
    if let Some(u) = req.url {
        hook.url = Some(u);
    }
    if let Some(e) = req.events {
        hook.events = EventType::parse_filter(&e)
            .map_err(|m| Problem::bad_request(format!("events: {m}")))?;
    }
    if let Some(t) = req.path_template {
        hook.path_template = Some(t);
    }
    if let Some(en) = req.enabled {
        hook.enabled = en;
        if en {
            hook.disabled_reason = None;
        }
    }
    let rotated = req.rotate_secret && hook.kind == WebhookKind::Http;
    if rotated {
        hook.secret = Some(new_webhook_secret());
    }
    check_hook(&hook, app.config.delivery.allow_private_destinations)?;
    if url_changed && req.verify {
        crate::delivery::verify_endpoint(&app, &hook).await?;
    }
    app.store.put_webhook(&hook).await?;
    tracing::info!(org = %org, webhook = %id, rotated, "webhook updated");
    Ok(Json(hook_json(&hook, rotated)))
}

async fn delete_hook(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_org(&app.store, &org).await?;
    if !app.store.delete_webhook(&org, &id).await? {
        return Err(Problem::not_found(format!(
            "no webhook {id:?} in org {org:?}"
        )));
    }
    tracing::info!(org = %org, webhook = %id, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutEndpoint {
    url: String,
}

async fn put_cv_endpoint(
    State(app): State<App>,
    Path(org): Path<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    require_org(&app.store, &org).await?;
    let req: PutEndpoint = parse_body(&body)?;
    let parsed = validate_url(&req.url).map_err(|m| Problem::bad_request(format!("url: {m}")))?;
    crate::ssrf::check_literal(&parsed, app.config.delivery.allow_private_destinations)
        .map_err(|m| Problem::bad_request(format!("url: {m}")))?;
    app.store.put_custom_value_endpoint(&org, &req.url).await?;
    Ok(Json(json!({ "org": org, "url": req.url })))
}

async fn get_cv_endpoint(
    State(app): State<App>,
    Path(org): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_org(&app.store, &org).await?;
    let url = app
        .store
        .get_custom_value_endpoint(&org)
        .await?
        .ok_or_else(|| Problem::not_found(format!("org {org:?} has no custom-value endpoint")))?;
    Ok(Json(json!({ "org": org, "url": url })))
}

/// Applies `[[orgs]]` of the config file. Running it twice gives the same state.
pub async fn apply_declared(store: &Arc<dyn Store>, config: &Config) -> Result<(), String> {
    let orgs_dir = config.data_dir.join("orgs");
    for o in &config.orgs {
        let ctx = |e: crate::store::StoreError| format!("org {:?}: {e}", o.name);
        store.put_org(&o.name, &o.name).await.map_err(ctx)?;
        store
            .set_org_limits(&o.name, &o.limits)
            .await
            .map_err(ctx)?;
        std::fs::create_dir_all(orgs_dir.join(&o.name))
            .map_err(|e| format!("org {:?}: folder: {e}", o.name))?;
        for u in &o.sftp_users {
            let user = SftpUser {
                org: o.name.clone(),
                name: u.name.clone(),
                has_password: u.password_hash.is_some(),
                password_hash: u.password_hash.clone(),
                public_keys: u.public_keys.clone(),
                upload: u.upload,
            };
            store.put_sftp_user(&user).await.map_err(ctx)?;
        }
        for w in &o.webhooks {
            let kind = WebhookKind::parse(&w.kind)
                .ok_or_else(|| format!("webhook {:?}: bad kind", w.id))?;
            let existing = store.get_webhook(&o.name, &w.id).await.map_err(ctx)?;
            let hook = Webhook {
                id: w.id.clone(),
                org: o.name.clone(),
                kind,
                url: w.url.clone(),
                events: EventType::parse_filter(&w.events)?,
                path_template: w.path_template.clone(),
                secret: match kind {
                    WebhookKind::Http => existing
                        .as_ref()
                        .and_then(|e| e.secret.clone())
                        .or_else(|| Some(new_webhook_secret())),
                    WebhookKind::Sftp => None,
                },
                enabled: existing.as_ref().map(|e| e.enabled).unwrap_or(true),
                disabled_reason: existing.as_ref().and_then(|e| e.disabled_reason.clone()),
                created_at: existing
                    .as_ref()
                    .map(|e| e.created_at)
                    .unwrap_or_else(Utc::now),
                failing_since: None,
            };
            store.put_webhook(&hook).await.map_err(ctx)?;
        }
        if let Some(u) = &o.custom_value_endpoint {
            store
                .put_custom_value_endpoint(&o.name, u)
                .await
                .map_err(ctx)?;
        }
    }
    if !config.orgs.is_empty() {
        tracing::info!(
            orgs = config.orgs.len(),
            "applied orgs declared in the config file"
        );
    }
    Ok(())
}
