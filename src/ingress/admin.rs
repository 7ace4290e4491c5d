//! Admin API: orgs, SFTP users, webhooks and the custom-value endpoint. The checks and
//! the writes are in [`crate::provision`], shared with the config file and the demo.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::problem::{ApiResult, Problem};
use crate::provision::{self, ProvisionError};
use crate::store::{validate_name, SftpUser, Store, Webhook, WebhookKind};
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
    let (o, created) =
        provision::put_org(&app.store, &*app.storage, &org, req.name, req.limits).await?;
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
    // The name was validated when the org was made; the storage checks it again.
    if let Ok(name) = crate::storage::OrgName::new(&org) {
        if let Err(e) = app.storage.remove_org(&name).await {
            tracing::warn!(org = %org, error = %e, "org deleted but its folder could not be removed");
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
    let spec = provision::UserSpec {
        password: req.password,
        password_hash: req.password_hash,
        public_keys: req.public_keys,
        upload: req.upload,
        complete: false,
    };
    let (u, created) = provision::put_user(&app.store, &org, &user, spec).await?;
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
    remove_user(&app, &org, &user).await?;
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
    #[serde(default, deserialize_with = "not_null")]
    format: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    rollup: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    close_after: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    max_part_bytes: Option<u64>,
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

async fn create_hook(
    State(app): State<App>,
    Path(org): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    require_org(&app.store, &org).await?;
    let req: CreateHook = parse_body(&body)?;
    let spec = provision::HookSpec {
        id: req.id,
        kind: req.kind,
        url: req.url,
        events: req.events,
        path_template: req.path_template,
        enabled: req.enabled,
        format: req.format,
        rollup: req.rollup,
        close_after: req.close_after,
        max_part_bytes: req.max_part_bytes,
    };
    let hook = create_webhook(&app, &org, spec, req.verify).await?;
    Ok((StatusCode::CREATED, Json(hook_json(&hook, true))).into_response())
}

/// Checks, verifies (http, when asked) and stores a new webhook of `org`, which exists:
/// the one path of the admin API and the console.
pub async fn create_webhook(
    app: &App,
    org: &str,
    spec: provision::HookSpec,
    verify: bool,
) -> ApiResult<Webhook> {
    if let Some(id) = &spec.id {
        check_name("webhook", id)?;
        if app.store.get_webhook(org, id).await?.is_some() {
            return Err(Problem::conflict(format!(
                "webhook {id:?} exists; PATCH it instead"
            )));
        }
    }
    let hook = provision::build_webhook(
        org,
        spec,
        None,
        app.config.delivery.allow_private_destinations,
    )?;
    if hook.kind == WebhookKind::Http && verify {
        crate::delivery::verify_endpoint(app, &hook).await?;
    }
    app.store.put_webhook(&hook).await?;
    tracing::info!(org = %org, webhook = %hook.id, kind = hook.kind.as_str(), "webhook created");
    Ok(hook)
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
    #[serde(default, deserialize_with = "not_null")]
    format: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    rollup: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    close_after: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    max_part_bytes: Option<u64>,
}

async fn patch_hook(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let hook = find_hook(&app, &org, &id).await?;
    let req: PatchHook = parse_body(&body)?;
    let patch = provision::HookPatch {
        url: req.url,
        events: req.events,
        path_template: req.path_template,
        enabled: req.enabled,
        rotate_secret: req.rotate_secret,
        format: req.format,
        rollup: req.rollup,
        close_after: req.close_after,
        max_part_bytes: req.max_part_bytes,
    };
    let (hook, rotated) = update_webhook(&app, hook, patch, req.verify).await?;
    Ok(Json(hook_json(&hook, rotated)))
}

/// Applies `patch` to `hook`, verifies a changed URL (when asked) and stores it: the one
/// path of the admin API and the console. Returns the hook and whether its secret rotated.
pub async fn update_webhook(
    app: &App,
    mut hook: Webhook,
    patch: provision::HookPatch,
    verify: bool,
) -> ApiResult<(Webhook, bool)> {
    let url_changed = patch
        .url
        .as_ref()
        .is_some_and(|u| Some(u) != hook.url.as_ref());
    let rotated = provision::patch_webhook(
        &mut hook,
        patch,
        app.config.delivery.allow_private_destinations,
    )?;
    if url_changed && verify {
        crate::delivery::verify_endpoint(app, &hook).await?;
    }
    app.store.put_webhook(&hook).await?;
    tracing::info!(org = %hook.org, webhook = %hook.id, rotated, "webhook updated");
    Ok((hook, rotated))
}

/// Deletes webhook `id` of `org`: the one path of the admin API and the console.
pub async fn remove_webhook(app: &App, org: &str, id: &str) -> ApiResult<()> {
    require_org(&app.store, org).await?;
    if !app.store.delete_webhook(org, id).await? {
        return Err(Problem::not_found(format!(
            "no webhook {id:?} in org {org:?}"
        )));
    }
    tracing::info!(org = %org, webhook = %id, "webhook deleted");
    Ok(())
}

/// Deletes SFTP user `user` of `org`: the one path of the admin API and the console.
pub async fn remove_user(app: &App, org: &str, user: &str) -> ApiResult<()> {
    require_org(&app.store, org).await?;
    if !app.store.delete_sftp_user(org, user).await? {
        return Err(Problem::not_found(format!(
            "no SFTP user {user:?} in org {org:?}"
        )));
    }
    tracing::info!(org = %org, user = %user, "SFTP user deleted");
    Ok(())
}

async fn delete_hook(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_webhook(&app, &org, &id).await?;
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
    set_cv_endpoint(&app, &org, &req.url).await?;
    Ok(Json(json!({ "org": org, "url": req.url })))
}

/// Sets the org's custom-value endpoint: the one path of the admin API and the console.
pub async fn set_cv_endpoint(app: &App, org: &str, url: &str) -> ApiResult<()> {
    provision::check_destination(url, app.config.delivery.allow_private_destinations)?;
    app.store.put_custom_value_endpoint(org, url).await?;
    Ok(())
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

impl From<ProvisionError> for Problem {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::Invalid { .. } => Problem::bad_request(e.to_string()),
            ProvisionError::Conflict(m) => Problem::conflict(m),
            ProvisionError::Store(e) => e.into(),
            ProvisionError::Folder { .. } => Problem::internal("cannot create org folder", e),
            ProvisionError::Hash(_) => Problem::internal("password hashing failed", e),
        }
    }
}
