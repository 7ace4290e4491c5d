//! Reading SQLite rows into typed values. A stored value this version cannot read (an
//! unknown kind or status, broken JSON, a time out of range, a wrong column type) is a
//! corrupt row: it is logged and counted once (`hookbridge_store_corrupt_rows_total`),
//! and skipped by list queries or refused by single lookups — never read as a default.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::types::Type;
use rusqlite::Row;

use super::*;
use crate::secrets::SecretBox;

/// A row this version cannot read, named by table and key.
#[derive(Debug, Clone)]
pub(super) struct Corrupt {
    pub table: &'static str,
    pub key: String,
    pub why: String,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "corrupt row in {} ({}): {}",
            self.table, self.key, self.why
        )
    }
}

impl std::error::Error for Corrupt {}

/// Corrupt rows seen so far: each is reported once, and deliveries among them are kept
/// out of the scheduler's queries (so it does not poll them in a loop).
#[derive(Clone, Default)]
pub(super) struct Quarantine(Arc<Mutex<HashSet<(&'static str, String)>>>);

impl Quarantine {
    pub fn report(&self, c: &Corrupt) {
        let first = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((c.table, c.key.clone()));
        if first {
            metrics::counter!("hookbridge_store_corrupt_rows_total", "table" => c.table)
                .increment(1);
            tracing::error!(table = c.table, key = %c.key, why = %c.why,
                "corrupt row in the state database: skipped, not read as a default; fix or delete it");
        }
    }

    /// Keys of corrupt rows of `table`.
    pub fn keys(&self, table: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// Collects `rows`, skipping (and reporting) corrupt ones.
    pub fn collect<T>(&self, rows: impl Iterator<Item = rusqlite::Result<T>>) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for r in rows {
            match r {
                Ok(v) => out.push(v),
                Err(e) => match as_corrupt(&e) {
                    Some(c) => self.report(c),
                    None => return Err(e.into()),
                },
            }
        }
        Ok(out)
    }

    /// A single lookup: a corrupt row is reported and answered as an error.
    pub fn one<T>(&self, row: rusqlite::Result<Option<T>>) -> Result<Option<T>> {
        match row {
            Ok(v) => Ok(v),
            Err(e) => match as_corrupt(&e) {
                Some(c) => {
                    self.report(c);
                    Err(StoreError::Db(c.to_string()))
                }
                None => Err(e.into()),
            },
        }
    }
}

pub(super) fn as_corrupt(e: &rusqlite::Error) -> Option<&Corrupt> {
    match e {
        rusqlite::Error::FromSqlConversionFailure(_, _, b) => b.downcast_ref::<Corrupt>(),
        _ => None,
    }
}

fn bad(why: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, Type::Null, why.into().into())
}

/// Runs `f` on the row; a value it cannot read becomes a [`Corrupt`] naming the row by
/// its `key` column. Errors that are not about a value (I/O, SQL) pass through.
pub(super) fn keyed<T>(
    table: &'static str,
    r: &Row<'_>,
    key: usize,
    f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    match f(r) {
        Ok(v) => Ok(v),
        Err(e) if as_corrupt(&e).is_some() => Err(e),
        Err(
            e @ (rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)),
        ) => {
            let key = match r.get_ref(key) {
                Ok(v) => match v.as_str() {
                    Ok(s) => s.to_owned(),
                    Err(_) => format!("{v:?}"),
                },
                Err(_) => "?".into(),
            };
            let why = match &e {
                rusqlite::Error::FromSqlConversionFailure(_, _, b) => b.to_string(),
                other => other.to_string(),
            };
            Err(rusqlite::Error::FromSqlConversionFailure(
                0,
                Type::Null,
                Box::new(Corrupt { table, key, why }),
            ))
        }
        Err(e) => Err(e),
    }
}

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored time; out of range is corrupt, never 1970.
pub(super) fn time(r: &Row<'_>, col: usize) -> rusqlite::Result<DateTime<Utc>> {
    let v: i64 = r.get(col)?;
    from_micros(v).ok_or_else(|| bad(format!("column {col}: time {v} is out of range")))
}

pub(super) fn opt_time(r: &Row<'_>, col: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    match r.get::<_, Option<i64>>(col)? {
        None => Ok(None),
        Some(v) => from_micros(v)
            .map(Some)
            .ok_or_else(|| bad(format!("column {col}: time {v} is out of range"))),
    }
}

pub(super) fn from_micros(v: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_micros(v).single()
}

fn json<T: serde::de::DeserializeOwned>(
    r: &Row<'_>,
    col: usize,
    what: &str,
) -> rusqlite::Result<T> {
    let text: String = r.get(col)?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{what}: {e}")))
}

pub(super) fn org_row(r: &Row<'_>) -> rusqlite::Result<Org> {
    keyed("orgs", r, 0, |r| {
        Ok(Org {
            id: r.get(0)?,
            name: r.get(1)?,
            created_at: time(r, 2)?,
            limits: json(r, 3, "limits")?,
        })
    })
}

pub(super) fn user_row(r: &Row<'_>) -> rusqlite::Result<SftpUser> {
    keyed("sftp_users", r, 0, |r| {
        let hash: Option<String> = r.get(2)?;
        Ok(SftpUser {
            name: r.get(0)?,
            org: r.get(1)?,
            has_password: hash.is_some(),
            password_hash: hash,
            public_keys: json(r, 3, "public_keys")?,
            upload: r.get(4)?,
        })
    })
}

pub(super) const USER_COLS: &str = "name, org, password_hash, public_keys, upload";
pub(super) const HOOK_COLS: &str =
    "id, org, kind, url, events, path_template, secret, enabled, disabled_reason, created_at, failing_since, rollup";

pub(super) fn hook_row(r: &Row<'_>, sb: &SecretBox) -> rusqlite::Result<Webhook> {
    hook_row_at(r, 0, sb)
}

/// A webhook whose `HOOK_COLS` start at column `o` of the row.
pub(super) fn hook_row_at(r: &Row<'_>, o: usize, sb: &SecretBox) -> rusqlite::Result<Webhook> {
    keyed("webhooks", r, o, |r| {
        let kind: String = r.get(o + 2)?;
        let id: String = r.get(o)?;
        let secret = match r.get::<_, Option<String>>(o + 6)? {
            Some(s) if SecretBox::is_sealed(&s) => Some(sb.open(&id, &s).map_err(bad)?),
            other => other,
        };
        Ok(Webhook {
            id: r.get(o)?,
            org: r.get(o + 1)?,
            kind: WebhookKind::parse(&kind)
                .ok_or_else(|| bad(format!("unknown webhook kind {kind:?}")))?,
            url: r.get(o + 3)?,
            events: json(r, o + 4, "events")?,
            path_template: r.get(o + 5)?,
            secret,
            enabled: r.get(o + 7)?,
            disabled_reason: r.get(o + 8)?,
            created_at: time(r, o + 9)?,
            failing_since: opt_time(r, o + 10)?,
            rollup: match r.get::<_, Option<String>>(o + 11)? {
                None => None,
                Some(j) => Some(serde_json::from_str(&j).map_err(|e| bad(format!("rollup: {e}")))?),
            },
            format: if r.get::<_, Option<String>>(o + 11)?.is_some() {
                crate::rollups::Format::NdjsonGz
            } else {
                crate::rollups::Format::Json
            },
        })
    })
}

pub(super) const DELIVERY_COLS: &str =
    "id, org, webhook_id, event_id, status, attempts, next_attempt_at, last_status, last_error, created_at, updated_at";

pub(super) fn delivery_row(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    keyed("deliveries", r, 0, |r| {
        let status: String = r.get(4)?;
        Ok(Delivery {
            id: r.get(0)?,
            org: r.get(1)?,
            webhook_id: r.get(2)?,
            event_id: r.get(3)?,
            status: DeliveryStatus::parse(&status)
                .ok_or_else(|| bad(format!("unknown delivery status {status:?}")))?,
            attempts: r.get(5)?,
            next_attempt_at: opt_time(r, 6)?,
            last_status: r.get(7)?,
            last_error: r.get(8)?,
            created_at: time(r, 9)?,
            updated_at: time(r, 10)?,
            attempt_log: Vec::new(),
        })
    })
}

/// `delivery_id, at, status, latency_ms, error, response_excerpt, outcome`.
pub(super) fn attempt_row(r: &Row<'_>) -> rusqlite::Result<Attempt> {
    keyed("attempts", r, 0, |r| {
        let outcome: String = r.get(6)?;
        let status: Option<u16> = r.get(2)?;
        Ok(Attempt {
            at: time(r, 1)?,
            result: AttemptResult::parse(&outcome, status).ok_or_else(|| {
                bad(format!(
                    "attempt outcome {outcome:?} with status {status:?}"
                ))
            })?,
            latency_ms: r.get::<_, i64>(3)?.max(0) as u64,
            error: r.get(4)?,
            response_excerpt: r.get(5)?,
        })
    })
}
