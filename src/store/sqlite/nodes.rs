//! SQLite side of the store's "nodes" and "shared secrets" groups.

use rusqlite::{params, OptionalExtension};

use super::*;

impl SqliteStore {
    pub(super) async fn nodes_ping(&self) -> Result<()> {
        self.with_reader(|c, _| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn nodes_put_ban(&self, ban: &Ban) -> Result<()> {
        let (ip, until, reason, node) = (
            ban.ip.to_string(),
            ban.until.timestamp_micros(),
            ban.reason.clone(),
            ban.node.clone(),
        );
        self.with_writer(move |c| {
            c.execute(
                "INSERT INTO bans (ip, until, reason, node) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (ip) DO UPDATE SET until = excluded.until,
                     reason = excluded.reason, node = excluded.node
                 WHERE excluded.until > bans.until",
                params![ip, until, reason, node],
            )?;
            Ok(())
        })
        .await
    }

    pub(super) async fn nodes_active_bans(&self, now: DateTime<Utc>) -> Result<Vec<Ban>> {
        let now = now.timestamp_micros();
        self.with_writer(move |c| {
            c.execute("DELETE FROM bans WHERE until <= ?1", [now])?;
            let mut st = c.prepare_cached("SELECT ip, until, reason, node FROM bans")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (ip, until, reason, node) = row?;
                // A row this binary cannot read is skipped, not fatal: bans are advisory.
                if let (Ok(ip), Some(until)) = (ip.parse(), rows::from_micros(until)) {
                    out.push(Ban {
                        ip,
                        until,
                        reason,
                        node,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn nodes_secret_init(&self, name: &str, value: &str) -> Result<SharedSecret> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.with_writer(move |c| {
            c.execute(
                "INSERT INTO shared_secrets (name, value, version) VALUES (?1, ?2, 1)
                 ON CONFLICT (name) DO NOTHING",
                params![name, value],
            )?;
            secret(c, &name)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    pub(super) async fn nodes_secret_get(&self, name: &str) -> Result<Option<SharedSecret>> {
        let name = name.to_owned();
        self.with_reader(move |c, _| secret(c, &name)).await
    }

    pub(super) async fn nodes_secret_replace(
        &self,
        name: &str,
        version: i64,
        value: &str,
    ) -> Result<Option<SharedSecret>> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.with_writer(move |c| {
            let n = c.execute(
                "UPDATE shared_secrets SET value = ?2, version = version + 1
                 WHERE name = ?1 AND version = ?3",
                params![name, value, version],
            )?;
            if n == 0 {
                return Ok(None);
            }
            secret(c, &name)
        })
        .await
    }
}

fn secret(c: &rusqlite::Connection, name: &str) -> Result<Option<SharedSecret>> {
    Ok(c.query_row(
        "SELECT value, version FROM shared_secrets WHERE name = ?1",
        [name],
        |r| {
            Ok(SharedSecret {
                value: r.get(0)?,
                version: r.get(1)?,
            })
        },
    )
    .optional()?)
}
