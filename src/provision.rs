//! Provisioning: the one code path that turns a request into stored orgs, SFTP users,
//! webhooks and custom-value endpoints, whoever asks — the admin API, the `[[orgs]]` of
//! the config file (at start and on SIGHUP) or `serve --demo`. Every check (names,
//! kinds, URLs, the SSRF guard, keys, hashes) lives here, so no caller can skip one.

use std::sync::Arc;

use chrono::Utc;

use crate::config::{Config, OrgLimits};
use crate::event::EventType;
use crate::rollups;
use crate::store::{
    new_id, validate_name, validate_path_template, validate_url, Org, SftpUser, Store, StoreError,
    Webhook, WebhookKind,
};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A field of the request is wrong; `field` names it as the request spells it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("cannot create the folder of org {org}: {source}")]
    Folder {
        org: String,
        source: crate::storage::StorageError,
    },
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ProvisionError {
    ProvisionError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Creates or renames an org, sets its limits when given, and makes its folder.
/// Returns the org and whether it was created.
pub async fn put_org(
    store: &Arc<dyn Store>,
    storage: &dyn crate::storage::Storage,
    id: &str,
    display: Option<String>,
    limits: Option<OrgLimits>,
) -> Result<(Org, bool), ProvisionError> {
    validate_name(id).map_err(|m| invalid("name", format!("invalid org name: {m}")))?;
    let display = display.unwrap_or_else(|| id.to_owned());
    // Characters, not bytes, as JSON Schema's maxLength counts them.
    let chars = display.chars().count();
    if chars == 0 || chars > 200 || display.chars().any(char::is_control) {
        return Err(invalid("name", "must be 1 to 200 printable characters"));
    }
    if let Some(l) = &limits {
        l.validate().map_err(|m| invalid("limits", m))?;
    }
    let (mut org, created) = store.put_org(id, &display).await?;
    if let Some(l) = limits {
        store.set_org_limits(id, &l).await?;
        org.limits = l;
    }
    let folder = |source| ProvisionError::Folder {
        org: id.to_owned(),
        source,
    };
    let name = crate::storage::OrgName::new(id).map_err(folder)?;
    storage.create_org(&name).await.map_err(folder)?;
    if created {
        tracing::info!(org = %id, "org created");
    }
    Ok((org, created))
}

/// What a caller asks of an SFTP user; `None` keeps the stored value.
#[derive(Debug, Default, Clone)]
pub struct UserSpec {
    pub password: Option<String>,
    pub password_hash: Option<String>,
    pub public_keys: Option<Vec<String>>,
    pub upload: Option<bool>,
    /// The spec is the whole user (config file): an absent hash means no password.
    pub complete: bool,
}

/// Creates or updates an SFTP user of `org` (which must exist). Returns it and whether it
/// was created.
pub async fn put_user(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
    spec: UserSpec,
) -> Result<(SftpUser, bool), ProvisionError> {
    validate_name(name).map_err(|m| invalid("name", format!("invalid user name: {m}")))?;
    // The document's `anyOf`: every PUT names a credential; ones it leaves out are kept.
    if spec.password.is_none()
        && spec.password_hash.is_none()
        && spec.public_keys.as_ref().is_none_or(|k| k.is_empty())
    {
        return Err(invalid(
            "password",
            "an SFTP user needs a `password`, a `password_hash` or at least one of `public_keys`",
        ));
    }
    let existing = store.get_sftp_user(name).await?.filter(|u| u.org == org);
    let public_keys = match spec.public_keys {
        Some(keys) => {
            for (i, k) in keys.iter().enumerate() {
                crate::auth::parse_public_key(k)
                    .map_err(|m| invalid(format!("public_keys[{i}]"), m))?;
            }
            keys.into_iter().map(|k| k.trim().to_owned()).collect()
        }
        None => existing
            .as_ref()
            .map(|u| u.public_keys.clone())
            .unwrap_or_default(),
    };
    let password_hash = match (spec.password, spec.password_hash) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "password",
                "give `password` or `password_hash`, not both",
            ))
        }
        (Some(p), None) => {
            if !(8..=1024).contains(&p.chars().count()) {
                return Err(invalid("password", "must be 8 to 1024 characters"));
            }
            let h = tokio::task::spawn_blocking(move || crate::auth::hash_password(&p))
                .await
                .map_err(|e| ProvisionError::Hash(e.to_string()))?
                .map_err(ProvisionError::Hash)?;
            Some(h)
        }
        (None, Some(h)) => {
            crate::auth::check_hash_format(&h).map_err(|m| invalid("password_hash", m))?;
            Some(h)
        }
        (None, None) if spec.complete => None,
        (None, None) => existing.as_ref().and_then(|u| u.password_hash.clone()),
    };
    if password_hash.is_none() && public_keys.is_empty() {
        return Err(invalid(
            "password",
            "an SFTP user needs a `password` or at least one of `public_keys`",
        ));
    }
    let upload = spec
        .upload
        .or(existing.as_ref().map(|u| u.upload))
        .unwrap_or(false);
    let user = SftpUser {
        org: org.to_owned(),
        name: name.to_owned(),
        has_password: password_hash.is_some(),
        password_hash,
        public_keys,
        upload,
    };
    let created = store.put_sftp_user(&user).await?;
    tracing::info!(org = %org, user = %name, created, "SFTP user saved");
    Ok((user, created))
}

/// What a caller asks of a new webhook.
#[derive(Debug, Clone)]
pub struct HookSpec {
    pub id: Option<String>,
    pub kind: String,
    pub url: Option<String>,
    pub events: Vec<String>,
    pub path_template: Option<String>,
    pub enabled: Option<bool>,
    /// `json` (default) or `ndjson.gz` (roll-ups, `sftp` only, with `rollup`).
    pub format: Option<String>,
    pub rollup: Option<String>,
    pub close_after: Option<String>,
    pub max_part_bytes: Option<u64>,
}

/// The format and roll-up settings `spec` asks for, checked.
fn rollup_of(
    kind: WebhookKind,
    spec: &HookSpec,
) -> Result<(rollups::Format, Option<rollups::RollupSpec>), ProvisionError> {
    let format = match spec.format.as_deref() {
        None => rollups::Format::Json,
        Some(f) => rollups::Format::parse(f).ok_or_else(|| {
            invalid(
                "format",
                format!("{f:?} is not allowed; use \"json\" or \"ndjson.gz\""),
            )
        })?,
    };
    if format == rollups::Format::Json {
        for (key, set) in [
            ("rollup", spec.rollup.is_some()),
            ("close_after", spec.close_after.is_some()),
            ("max_part_bytes", spec.max_part_bytes.is_some()),
        ] {
            if set {
                return Err(invalid(key, "only with \"format\": \"ndjson.gz\""));
            }
        }
        return Ok((format, None));
    }
    if kind != WebhookKind::Sftp {
        return Err(invalid(
            "format",
            "\"ndjson.gz\" is only for webhooks of kind \"sftp\"",
        ));
    }
    if spec.path_template.is_some() {
        return Err(invalid(
            "path_template",
            "not with \"format\": \"ndjson.gz\": roll-ups go to /rollups/<type>/dt=…/",
        ));
    }
    let period = match spec.rollup.as_deref() {
        None => {
            return Err(invalid(
                "rollup",
                "required with \"format\": \"ndjson.gz\"; use \"hour\" or \"day\"",
            ))
        }
        Some(r) => rollups::Period::parse(r).ok_or_else(|| {
            invalid(
                "rollup",
                format!("{r:?} is not allowed; use \"hour\" or \"day\""),
            )
        })?,
    };
    let close_after = match spec.close_after.as_deref() {
        None => rollups::DEFAULT_CLOSE_AFTER,
        Some(c) => rollups::parse_close_after(c).map_err(|m| invalid("close_after", m))?,
    };
    let r = rollups::RollupSpec {
        rollup: period,
        close_after,
        max_part_bytes: spec
            .max_part_bytes
            .unwrap_or(rollups::DEFAULT_MAX_PART_BYTES),
    };
    r.validate().map_err(|(k, m)| invalid(k, m))?;
    Ok((format, Some(r)))
}

/// Changes to an existing webhook; `None` keeps the stored value.
#[derive(Debug, Default, Clone)]
pub struct HookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub path_template: Option<String>,
    pub enabled: Option<bool>,
    pub rotate_secret: bool,
    /// Roll-up settings, checked as at creation against the hook's current ones.
    pub format: Option<String>,
    pub rollup: Option<String>,
    pub close_after: Option<String>,
    pub max_part_bytes: Option<u64>,
}

pub fn new_webhook_secret() -> String {
    let mut b = [0u8; 24];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    format!(
        "whsec_{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b)
    )
}

/// A webhook built from `spec`, checked but not stored (the admin API verifies the
/// endpoint in between). `existing` is the stored one of the same id when the caller
/// updates it in place (config file): its secret, state and creation time are kept.
pub fn build_webhook(
    org: &str,
    spec: HookSpec,
    existing: Option<&Webhook>,
    allow_private: bool,
) -> Result<Webhook, ProvisionError> {
    let kind = WebhookKind::parse(&spec.kind).ok_or_else(|| {
        invalid(
            "kind",
            format!("{:?} is not allowed; use \"sftp\" or \"http\"", spec.kind),
        )
    })?;
    let events = EventType::parse_filter(&spec.events).map_err(|m| invalid("events", m))?;
    let (format, rollup) = rollup_of(kind, &spec)?;
    let id = match spec.id {
        Some(id) => {
            validate_name(&id).map_err(|m| invalid("id", format!("invalid webhook name: {m}")))?;
            id
        }
        None => new_id("wh"),
    };
    let existing = existing.filter(|e| e.kind == kind);
    let hook = Webhook {
        id,
        org: org.to_owned(),
        kind,
        url: spec.url,
        events,
        path_template: spec.path_template,
        secret: match kind {
            WebhookKind::Http => existing
                .and_then(|e| e.secret.clone())
                .or_else(|| Some(new_webhook_secret())),
            WebhookKind::Sftp => None,
        },
        enabled: spec.enabled.or(existing.map(|e| e.enabled)).unwrap_or(true),
        disabled_reason: existing.and_then(|e| e.disabled_reason.clone()),
        created_at: existing.map(|e| e.created_at).unwrap_or_else(Utc::now),
        failing_since: None,
        format,
        rollup,
    };
    check_webhook(&hook, allow_private)?;
    Ok(hook)
}

/// Applies `patch` to `hook` and checks the result. Returns whether the secret rotated.
pub fn patch_webhook(
    hook: &mut Webhook,
    patch: HookPatch,
    allow_private: bool,
) -> Result<bool, ProvisionError> {
    patch_rollup(hook, &patch)?;
    if let Some(u) = patch.url {
        hook.url = Some(u);
    }
    if let Some(e) = patch.events {
        hook.events = EventType::parse_filter(&e).map_err(|m| invalid("events", m))?;
    }
    if let Some(t) = patch.path_template {
        hook.path_template = Some(t);
    }
    if let Some(en) = patch.enabled {
        hook.enabled = en;
        if en {
            hook.disabled_reason = None;
        }
    }
    let rotated = patch.rotate_secret && hook.kind == WebhookKind::Http;
    if rotated {
        hook.secret = Some(new_webhook_secret());
    }
    check_webhook(hook, allow_private)?;
    Ok(rotated)
}

/// Applies the roll-up part of `patch`: unset fields keep the hook's current settings
/// (when it stays a roll-up), then the whole is checked by the rules of creation.
///
/// What a change does to partitions already open (their lines are staged with their
/// partition and close time): a new `rollup` period or `close_after` applies to events
/// accepted from then on, open partitions close as they were planned; `max_part_bytes`
/// applies to every partition closed or rebuilt from then on; `"format": "json"` stops
/// staging, and what was staged still closes (with the default part size).
fn patch_rollup(hook: &mut Webhook, patch: &HookPatch) -> Result<(), ProvisionError> {
    if patch.format.is_none()
        && patch.rollup.is_none()
        && patch.close_after.is_none()
        && patch.max_part_bytes.is_none()
    {
        // A path_template on a roll-up hook is refused as at creation.
        if hook.rollup.is_some() && patch.path_template.is_some() {
            return Err(invalid(
                "path_template",
                "not with \"format\": \"ndjson.gz\": roll-ups go to /rollups/<type>/dt=…/",
            ));
        }
        return Ok(());
    }
    let format = patch.format.clone().unwrap_or_else(|| match hook.format {
        rollups::Format::Json => "json".into(),
        rollups::Format::NdjsonGz => "ndjson.gz".into(),
    });
    let cur = hook.rollup.filter(|_| format == "ndjson.gz");
    let spec = HookSpec {
        id: None,
        kind: String::new(),
        url: None,
        events: Vec::new(),
        path_template: patch.path_template.clone(),
        enabled: None,
        format: Some(format),
        rollup: patch
            .rollup
            .clone()
            .or_else(|| cur.map(|c| c.rollup.as_str().to_owned())),
        close_after: patch
            .close_after
            .clone()
            .or_else(|| cur.map(|c| humantime::format_duration(c.close_after).to_string())),
        max_part_bytes: patch.max_part_bytes.or(cur.map(|c| c.max_part_bytes)),
    };
    let (format, rollup) = rollup_of(hook.kind, &spec)?;
    if rollup.is_some() {
        // Roll-ups have no file template; one kept from the per-event format goes.
        hook.path_template = None;
    }
    hook.format = format;
    hook.rollup = rollup;
    Ok(())
}

/// Kind-specific rules of a webhook about to be stored, including the SSRF guard.
pub fn check_webhook(h: &Webhook, allow_private: bool) -> Result<(), ProvisionError> {
    match h.kind {
        WebhookKind::Sftp => {
            if h.url.is_some() {
                return Err(invalid("url", "only for webhooks of kind \"http\""));
            }
            if let Some(t) = &h.path_template {
                validate_path_template(t, &h.org).map_err(|m| invalid("path_template", m))?;
            }
        }
        WebhookKind::Http => {
            let u = h
                .url
                .as_deref()
                .ok_or_else(|| invalid("url", "required for kind \"http\""))?;
            if h.path_template.is_some() {
                return Err(invalid(
                    "path_template",
                    "only for webhooks of kind \"sftp\"",
                ));
            }
            check_destination(u, allow_private)?;
        }
    }
    Ok(())
}

/// A URL hookbridge will call: http(s), no credentials, not a private address unless allowed.
pub fn check_destination(u: &str, allow_private: bool) -> Result<(), ProvisionError> {
    let parsed = validate_url(u).map_err(|m| invalid("url", m))?;
    crate::ssrf::check_literal(&parsed, allow_private).map_err(|m| invalid("url", m))
}

/// Applies `[[orgs]]` of the config file through the same checks as the admin API.
/// Running it twice gives the same state. Errors name the key, e.g.
/// `orgs[0].webhooks[1].url: …`.
pub async fn apply_declared(
    store: &Arc<dyn Store>,
    storage: &dyn crate::storage::Storage,
    config: &Config,
) -> Result<(), String> {
    let allow_private = config.delivery.allow_private_destinations;
    // Checked for every org before anything is stored, so a bad file changes nothing.
    for (i, o) in config.orgs.iter().enumerate() {
        for (j, w) in o.webhooks.iter().enumerate() {
            build_webhook(&o.name, hook_spec(w), None, allow_private)
                .map_err(|e| keyed(&format!("orgs[{i}].webhooks[{j}]"), e))?;
        }
        if let Some(u) = &o.custom_value_endpoint {
            check_destination(u, allow_private)
                .map_err(|e| format!("orgs[{i}].custom_value_endpoint: {e}"))?;
        }
    }
    for (i, o) in config.orgs.iter().enumerate() {
        let key = format!("orgs[{i}]");
        put_org(store, storage, &o.name, None, Some(o.limits.clone()))
            .await
            .map_err(|e| keyed(&key, e))?;
        for (j, u) in o.sftp_users.iter().enumerate() {
            let spec = UserSpec {
                password: None,
                password_hash: u.password_hash.clone(),
                public_keys: Some(u.public_keys.clone()),
                upload: Some(u.upload),
                complete: true,
            };
            put_user(store, &o.name, &u.name, spec)
                .await
                .map_err(|e| keyed(&format!("{key}.sftp_users[{j}]"), e))?;
        }
        for (j, w) in o.webhooks.iter().enumerate() {
            let wkey = format!("{key}.webhooks[{j}]");
            let existing = store
                .get_webhook(&o.name, &w.id)
                .await
                .map_err(|e| keyed(&wkey, e.into()))?;
            let hook = build_webhook(&o.name, hook_spec(w), existing.as_ref(), allow_private)
                .map_err(|e| keyed(&wkey, e))?;
            store
                .put_webhook(&hook)
                .await
                .map_err(|e| keyed(&wkey, e.into()))?;
        }
        if let Some(u) = &o.custom_value_endpoint {
            store
                .put_custom_value_endpoint(&o.name, u)
                .await
                .map_err(|e| keyed(&key, e.into()))?;
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

fn hook_spec(w: &crate::config::WebhookDecl) -> HookSpec {
    HookSpec {
        id: Some(w.id.clone()),
        kind: w.kind.clone(),
        url: w.url.clone(),
        events: w.events.clone(),
        path_template: w.path_template.clone(),
        enabled: None,
        format: w.format.clone(),
        rollup: w.rollup.clone(),
        close_after: w.close_after.clone(),
        max_part_bytes: w.max_part_bytes,
    }
}

/// `key.field: message` for a field error, `key: error` for the rest.
fn keyed(key: &str, e: ProvisionError) -> String {
    match e {
        ProvisionError::Invalid { field, message } => format!("{key}.{field}: {message}"),
        other => format!("{key}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, url: Option<&str>) -> HookSpec {
        HookSpec {
            id: Some("h".into()),
            kind: kind.into(),
            url: url.map(str::to_owned),
            events: vec![],
            path_template: None,
            enabled: None,
            format: None,
            rollup: None,
            close_after: None,
            max_part_bytes: None,
        }
    }

    #[test]
    fn private_destination_is_refused_unless_allowed() {
        let e = build_webhook(
            "acme",
            spec("http", Some("http://127.0.0.1:9/x")),
            None,
            false,
        )
        .unwrap_err();
        assert!(
            matches!(&e, ProvisionError::Invalid { field, .. } if field == "url"),
            "{e}"
        );
        build_webhook(
            "acme",
            spec("http", Some("http://127.0.0.1:9/x")),
            None,
            true,
        )
        .unwrap();
    }

    #[test]
    fn unknown_kind_and_misplaced_fields_are_refused() {
        assert!(build_webhook("acme", spec("ftp", None), None, true).is_err());
        assert!(
            build_webhook("acme", spec("sftp", Some("http://x.example/")), None, true).is_err()
        );
        assert!(build_webhook("acme", spec("http", None), None, true).is_err());
    }
}
