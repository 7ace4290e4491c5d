//! Orgs, their SFTP users, webhooks and Custom Value endpoints on SQLite.

use chrono::Utc;
use rusqlite::{params, OptionalExtension};

use super::super::rows::*;
use super::super::*;
use super::{Rows, SqliteStore};

pub(super) async fn put_org(s: &SqliteStore, id: &str, display: &str) -> Result<(Org, bool)> {
    let (name, display) = (id.to_owned(), display.to_owned());
    s.with_writer(move |c| {
        let now = micros(Utc::now());
        let created = c.execute(
            "INSERT OR IGNORE INTO orgs (name, display_name, created_at) VALUES (?1, ?2, ?3)",
            params![name, display, now],
        )? == 1;
        if !created {
            c.execute(
                "UPDATE orgs SET display_name = ?2 WHERE name = ?1",
                params![name, display],
            )?;
        }
        let org = c.query_row(
            "SELECT name, display_name, created_at, limits FROM orgs WHERE name = ?1",
            [&name],
            org_row,
        )?;
        Ok((org, created))
    })
    .await
}

pub(super) async fn get_org(s: &SqliteStore, name: &str) -> Result<Option<Org>> {
    let name = name.to_owned();
    s.with_reader(move |c, q| {
        q.one(
            c.query_row(
                "SELECT name, display_name, created_at, limits FROM orgs WHERE name = ?1",
                [&name],
                org_row,
            )
            .optional(),
        )
    })
    .await
}

pub(super) async fn list_orgs(s: &SqliteStore) -> Result<Vec<Org>> {
    s.with_reader(|c, q| {
        let mut st =
            c.prepare("SELECT name, display_name, created_at, limits FROM orgs ORDER BY name")?;
        let rows = st.query_map([], org_row)?.rows(q)?;
        Ok(rows)
    })
    .await
}

pub(super) async fn set_org_limits(
    s: &SqliteStore,
    name: &str,
    limits: &crate::config::OrgLimits,
) -> Result<bool> {
    let name = name.to_owned();
    let json = serde_json::to_string(limits).map_err(|e| StoreError::Db(e.to_string()))?;
    s.with_writer(move |c| {
        Ok(c.execute(
            "UPDATE orgs SET limits = ?2 WHERE name = ?1",
            params![name, json],
        )? == 1)
    })
    .await
}

pub(super) async fn delete_org(s: &SqliteStore, name: &str) -> Result<bool> {
    let name = name.to_owned();
    s.with_writer(move |c| {
        let tx = c.transaction()?;
        let n = tx.execute("DELETE FROM orgs WHERE name = ?1", [&name])?;
        tx.execute("DELETE FROM events WHERE org = ?1", [&name])?;
        tx.execute("DELETE FROM org_usage WHERE org = ?1", [&name])?;
        tx.execute("DELETE FROM taken_files WHERE org = ?1", [&name])?;
        tx.execute(
            "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE org = ?1)",
            [&name],
        )?;
        tx.execute("DELETE FROM deliveries WHERE org = ?1", [&name])?;
        tx.commit()?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn put_sftp_user(s: &SqliteStore, user: &SftpUser) -> Result<bool> {
    let u = user.clone();
    s.with_writer(move |c| {
        let existing: Option<String> =
            c.query_row("SELECT org FROM sftp_users WHERE name = ?1", [&u.name], |r| r.get(0)).optional()?;
        if let Some(org) = &existing {
            if org != &u.org {
                return Err(StoreError::Conflict(format!(
                    "SFTP user name {:?} is taken by another org; SSH logins carry only the user name",
                    u.name
                )));
            }
        }
        let keys = serde_json::to_string(&u.public_keys).unwrap_or_else(|_| "[]".into());
        c.execute(
            "INSERT INTO sftp_users (name, org, password_hash, public_keys, upload) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash,
               public_keys = excluded.public_keys, upload = excluded.upload",
            params![u.name, u.org, u.password_hash, keys, u.upload],
        )?;
        Ok(existing.is_none())
    })
    .await
}

pub(super) async fn get_sftp_user(s: &SqliteStore, name: &str) -> Result<Option<SftpUser>> {
    let name = name.to_owned();
    s.with_reader(move |c, q| {
        q.one(
            c.query_row(
                &format!("SELECT {USER_COLS} FROM sftp_users WHERE name = ?1"),
                [&name],
                user_row,
            )
            .optional(),
        )
    })
    .await
}

pub(super) async fn list_sftp_users(s: &SqliteStore, org: &str) -> Result<Vec<SftpUser>> {
    let org = org.to_owned();
    s.with_reader(move |c, q| {
        let mut st = c.prepare(&format!(
            "SELECT {USER_COLS} FROM sftp_users WHERE org = ?1 ORDER BY name"
        ))?;
        let rows = st.query_map([&org], user_row)?.rows(q)?;
        Ok(rows)
    })
    .await
}

pub(super) async fn delete_sftp_user(s: &SqliteStore, org: &str, name: &str) -> Result<bool> {
    let (org, name) = (org.to_owned(), name.to_owned());
    s.with_writer(move |c| {
        Ok(c.execute(
            "DELETE FROM sftp_users WHERE org = ?1 AND name = ?2",
            [&org, &name],
        )? == 1)
    })
    .await
}

pub(super) async fn put_webhook(s: &SqliteStore, hook: &Webhook) -> Result<()> {
    let mut h = hook.clone();
    if let Some(plain) = &h.secret {
        h.secret = Some(s.secrets.seal(&h.id, plain).map_err(StoreError::Db)?);
    }
    s.with_writer(move |c| {
        let tx = c.transaction()?;
        let other: Option<(String, bool, Option<i64>)> = tx
            .query_row("SELECT org, enabled, failing_since FROM webhooks WHERE id = ?1", [&h.id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if other.as_ref().is_some_and(|(o, ..)| o != &h.org) {
            return Err(StoreError::Conflict(format!("webhook id {:?} belongs to another org", h.id)));
        }
        let failing_since = failing_since_on_put(
            other.map(|(_, enabled, since)| (enabled, since.and_then(from_micros))),
            h.enabled,
        );
        let events = serde_json::to_string(&h.events).unwrap_or_else(|_| "[]".into());
        tx.execute(
            &format!(
                "INSERT INTO webhooks ({HOOK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, url = excluded.url, events = excluded.events,
                   path_template = excluded.path_template, secret = excluded.secret, enabled = excluded.enabled,
                   disabled_reason = excluded.disabled_reason, failing_since = excluded.failing_since,
                   rollup = excluded.rollup"
            ),
            params![
                h.id,
                h.org,
                h.kind.as_str(),
                h.url,
                events,
                h.path_template,
                h.secret,
                h.enabled,
                h.disabled_reason,
                micros(h.created_at),
                failing_since.map(micros),
                h.rollup.map(|r| serde_json::to_string(&r).unwrap_or_default())
            ],
        )?;
        tx.commit()?;
        Ok(())
    })
    .await
}

pub(super) async fn get_webhook(s: &SqliteStore, org: &str, id: &str) -> Result<Option<Webhook>> {
    let (org, id) = (org.to_owned(), id.to_owned());
    let sb = s.secrets.clone();
    s.with_reader(move |c, q| {
        q.one(
            c.query_row(
                &format!("SELECT {HOOK_COLS} FROM webhooks WHERE org = ?1 AND id = ?2"),
                [&org, &id],
                |r| hook_row(r, &sb),
            )
            .optional(),
        )
    })
    .await
}

pub(super) async fn list_webhooks(s: &SqliteStore, org: &str) -> Result<Vec<Webhook>> {
    let org = org.to_owned();
    let sb = s.secrets.clone();
    s.with_reader(move |c, q| {
        let mut st = c.prepare_cached(&format!(
            "SELECT {HOOK_COLS} FROM webhooks WHERE org = ?1 ORDER BY created_at, id"
        ))?;
        let rows = st.query_map([&org], |r| hook_row(r, &sb))?.rows(q)?;
        Ok(rows)
    })
    .await
}

pub(super) async fn delete_webhook(s: &SqliteStore, org: &str, id: &str) -> Result<bool> {
    let (org, id) = (org.to_owned(), id.to_owned());
    s.with_writer(move |c| {
        let tx = c.transaction()?;
        let n = tx.execute(
            "DELETE FROM webhooks WHERE org = ?1 AND id = ?2",
            [&org, &id],
        )?;
        // The rule (`rules::DELETED_WEBHOOK_*`) decides what its open jobs become.
        let open = serde_json::to_string(&DeliveryStatus::OPEN.map(|s| s.as_str()))
            .map_err(|e| StoreError::Db(e.to_string()))?;
        tx.execute(
            "UPDATE deliveries SET status = ?2, next_attempt_at = NULL, last_error = ?3
             WHERE webhook_id = ?1 AND status IN (SELECT value FROM json_each(?4))",
            params![
                id,
                DELETED_WEBHOOK_JOB_STATE.as_str(),
                DELETED_WEBHOOK_ERROR,
                open
            ],
        )?;
        tx.commit()?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn put_custom_value_endpoint(s: &SqliteStore, org: &str, url: &str) -> Result<()> {
    let (org, url) = (org.to_owned(), url.to_owned());
    s.with_writer(move |c| {
        c.execute(
            "INSERT INTO custom_value_endpoints (org, url) VALUES (?1, ?2) ON CONFLICT(org) DO UPDATE SET url = excluded.url",
            [&org, &url],
        )?;
        Ok(())
    })
    .await
}

pub(super) async fn get_custom_value_endpoint(
    s: &SqliteStore,
    org: &str,
) -> Result<Option<String>> {
    let org = org.to_owned();
    s.with_reader(move |c, q| {
        q.one(
            c.query_row(
                "SELECT url FROM custom_value_endpoints WHERE org = ?1",
                [&org],
                |r| r.get(0),
            )
            .optional(),
        )
    })
    .await
}
