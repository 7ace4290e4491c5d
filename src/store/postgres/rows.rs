//! Reading rows: typed columns, times in microseconds, JSON columns, and the catalog
//! rows (orgs, SFTP users, webhooks) several queries share.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Row;

use super::super::rows::from_micros;
use super::super::*;
use crate::secrets::SecretBox;

/// A column this version cannot read is a database error naming the table and key.
pub(super) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    r.try_get(i)
        .map_err(|e| StoreError::Db(format!("column {i}: {e}")))
}

pub(super) fn time_at(r: &Row, i: usize) -> Result<DateTime<Utc>> {
    let v: i64 = get(r, i)?;
    from_micros(v).ok_or_else(|| StoreError::Db(format!("column {i}: time {v} out of range")))
}

pub(super) fn opt_time_at(r: &Row, i: usize) -> Result<Option<DateTime<Utc>>> {
    get::<Option<i64>>(r, i)?
        .map(|v| from_micros(v).ok_or_else(|| StoreError::Db(format!("time {v} out of range"))))
        .transpose()
}

pub(super) fn json_at<T: serde::de::DeserializeOwned>(r: &Row, i: usize, what: &str) -> Result<T> {
    let s: String = get(r, i)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Db(format!("{what}: {e}")))
}

pub(super) fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Db(e.to_string()))
}

pub(super) const ORG_COLS: &str = "name, display_name, created_at, limits";
pub(super) const USER_COLS: &str = "name, org, password_hash, public_keys, upload";
pub(super) const HOOK_COLS: &str = "id, org, kind, url, events, path_template, secret, enabled, disabled_reason, created_at, failing_since, rollup";

pub(super) fn org_row(r: &Row) -> Result<Org> {
    Ok(Org {
        id: get(r, 0)?,
        name: get(r, 1)?,
        created_at: time_at(r, 2)?,
        limits: json_at(r, 3, "org limits")?,
    })
}

pub(super) fn user_row(r: &Row) -> Result<SftpUser> {
    let hash: Option<String> = get(r, 2)?;
    Ok(SftpUser {
        name: get(r, 0)?,
        org: get(r, 1)?,
        has_password: hash.is_some(),
        password_hash: hash,
        public_keys: json_at(r, 3, "public keys")?,
        upload: get(r, 4)?,
    })
}

/// A webhook whose `HOOK_COLS` start at column `o`.
pub(super) fn hook_row(r: &Row, o: usize, sb: &SecretBox) -> Result<Webhook> {
    let id: String = get(r, o)?;
    let kind: String = get(r, o + 2)?;
    let rollup = match get::<Option<String>>(r, o + 11)? {
        None => None,
        Some(j) => Some(
            serde_json::from_str(&j)
                .map_err(|e| StoreError::Db(format!("webhook {id}: rollup: {e}")))?,
        ),
    };
    let secret = match get::<Option<String>>(r, o + 6)? {
        Some(s) if SecretBox::is_sealed(&s) => Some(sb.open(&id, &s).map_err(StoreError::Db)?),
        other => other,
    };
    Ok(Webhook {
        org: get(r, o + 1)?,
        kind: WebhookKind::parse(&kind)
            .ok_or_else(|| StoreError::Db(format!("webhook {id}: unknown kind {kind:?}")))?,
        url: get(r, o + 3)?,
        events: json_at(r, o + 4, "webhook events")?,
        path_template: get(r, o + 5)?,
        secret,
        enabled: get(r, o + 7)?,
        disabled_reason: get(r, o + 8)?,
        created_at: time_at(r, o + 9)?,
        failing_since: opt_time_at(r, o + 10)?,
        // As SQLite reads it (`rows::hook_row_at`): a roll-up hook writes NDJSON.gz.
        format: if rollup.is_some() {
            crate::rollups::Format::NdjsonGz
        } else {
            crate::rollups::Format::Json
        },
        rollup,
        id,
    })
}
