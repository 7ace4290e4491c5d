//! PostgreSQL side of the store's "nodes" and "shared secrets" groups.

use chrono::{DateTime, Utc};

use super::super::rows::from_micros;
use super::super::*;
use super::{get, PostgresStore};

pub(super) async fn ping(s: &PostgresStore) -> Result<()> {
    s.conn().await?.query_one("SELECT 1", &[]).await?;
    Ok(())
}

pub(super) async fn put_ban(s: &PostgresStore, ban: &Ban) -> Result<()> {
    s.conn()
        .await?
        .execute(
            "INSERT INTO bans (ip, until, reason, node) VALUES ($1, $2, $3, $4)
             ON CONFLICT (ip) DO UPDATE SET until = excluded.until,
                 reason = excluded.reason, node = excluded.node
             WHERE excluded.until > bans.until",
            &[
                &ban.ip.to_string(),
                &ban.until.timestamp_micros(),
                &ban.reason,
                &ban.node,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn active_bans(s: &PostgresStore, now: DateTime<Utc>) -> Result<Vec<Ban>> {
    let now = now.timestamp_micros();
    let c = s.conn().await?;
    c.execute("DELETE FROM bans WHERE until <= $1", &[&now])
        .await?;
    let rows = c
        .query("SELECT ip, until, reason, node FROM bans", &[])
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let (ip, until): (String, i64) = (get(r, 0)?, get(r, 1)?);
        // A row this binary cannot read is skipped, not fatal: bans are advisory.
        if let (Ok(ip), Some(until)) = (ip.parse(), from_micros(until)) {
            out.push(Ban {
                ip,
                until,
                reason: get(r, 2)?,
                node: get(r, 3)?,
            });
        }
    }
    Ok(out)
}

async fn secret(c: &tokio_postgres::Client, name: &str) -> Result<Option<SharedSecret>> {
    let row = c
        .query_opt(
            "SELECT value, version FROM shared_secrets WHERE name = $1",
            &[&name],
        )
        .await?;
    row.map(|r| {
        Ok(SharedSecret {
            value: get(&r, 0)?,
            version: get(&r, 1)?,
        })
    })
    .transpose()
}

pub(super) async fn secret_init(
    s: &PostgresStore,
    name: &str,
    value: &str,
) -> Result<SharedSecret> {
    let c = s.conn().await?;
    // Insert-if-absent, then read the winner: nodes starting together agree on one value.
    c.execute(
        "INSERT INTO shared_secrets (name, value, version) VALUES ($1, $2, 1)
         ON CONFLICT (name) DO NOTHING",
        &[&name, &value],
    )
    .await?;
    secret(&c, name).await?.ok_or(StoreError::NotFound)
}

pub(super) async fn secret_get(s: &PostgresStore, name: &str) -> Result<Option<SharedSecret>> {
    let c = s.conn().await?;
    secret(&c, name).await
}

pub(super) async fn secret_replace(
    s: &PostgresStore,
    name: &str,
    version: i64,
    value: &str,
) -> Result<Option<SharedSecret>> {
    let c = s.conn().await?;
    // One conditional update: of two nodes rotating at once, exactly one wins.
    let r = c
        .query_opt(
            "UPDATE shared_secrets SET value = $2, version = version + 1
             WHERE name = $1 AND version = $3
             RETURNING value, version",
            &[&name, &value, &version],
        )
        .await?;
    r.map(|r| {
        Ok(SharedSecret {
            value: get(&r, 0)?,
            version: get(&r, 1)?,
        })
    })
    .transpose()
}
