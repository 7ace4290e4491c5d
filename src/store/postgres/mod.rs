//! PostgreSQL implementation, for several nodes sharing one state (`[store] url`).
//! `tokio-postgres` behind a `deadpool-postgres` pool, plain TCP without TLS (the database
//! is expected on a private network or a local socket proxy; see the README). Every write
//! is one transaction committed with PostgreSQL's default `synchronous_commit = on`, so
//! a 202 follows a durable commit. A database that cannot be reached is
//! [`StoreError::Unavailable`]: ingest answers 503 with Retry-After and nothing acked is lost.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::health::AttemptRecord;
use super::rows::micros;
use super::*;
use crate::secrets::SecretBox;

mod attempts;
mod errors;
mod nodes;
mod notify;
mod queue;
mod rows;
mod schema;
mod usage;

use errors::pool_err;
pub(crate) use errors::{is_contention, pg_err};
use rows::{
    get, hook_row, opt_time_at, org_row, time_at, to_json, user_row, HOOK_COLS, ORG_COLS, USER_COLS,
};

#[cfg(test)]
pub(crate) use schema::known as known_migrations;

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    secrets: Arc<SecretBox>,
    /// For the listener's own session (LISTEN is per connection, so not from the pool).
    cfg: tokio_postgres::Config,
    /// Tags this process's NOTIFYs, so its own listener ignores them (`notify`).
    origin: Arc<str>,
}

/// Connections per node: enough for the group committers, the scheduler and API reads.
const POOL_SIZE: usize = 16;
/// How long a caller waits for a connection (or for a new one to be made) before the
/// store is called unavailable and ingest answers 503.
const WAIT: Duration = Duration::from_secs(5);

impl PostgresStore {
    /// Connects, migrates (refusing a schema newer than this binary) and checks the
    /// connection; webhook secrets are sealed with `secrets`.
    pub async fn open(url: &str, secrets: Arc<SecretBox>) -> Result<Self> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Db(format!("store url is not a PostgreSQL URL: {e}")))?;
        cfg.connect_timeout(WAIT);
        if cfg.get_application_name().is_none() {
            cfg.application_name("hookbridge");
        }
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .recycle_timeout(Some(WAIT))
            .build()
            .map_err(|e| StoreError::Db(format!("PostgreSQL pool: {e}")))?;
        let origin: Arc<str> = ulid::Ulid::new().to_string().into();
        let store = Self {
            pool,
            secrets,
            cfg,
            origin,
        };
        {
            let mut c = store.conn().await?;
            schema::migrate(&mut c).await?;
        }
        Ok(store)
    }

    /// Reaches the database without changing it: what `check-config` shows. A schema
    /// newer than this binary is an error, as at start.
    pub async fn check(url: &str) -> Result<String> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Db(format!("not a PostgreSQL URL: {e}")))?;
        cfg.connect_timeout(WAIT);
        let (c, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(conn);
        let server: String = c.query_one("SHOW server_version", &[]).await?.get(0);
        let version = schema::applied(&c).await?;
        let known = schema::known();
        if version > known {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known,
            });
        }
        Ok(format!(
            "server {server}, schema version {version} of {known}{}",
            if version < known {
                ", migrated at start"
            } else {
                ""
            }
        ))
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn put_org(&self, id: &str, display: &str) -> Result<(Org, bool)> {
        let c = self.conn().await?;
        // xmax = 0 only on a freshly inserted row: one statement says created or updated.
        let r = c
            .query_one(
                &format!(
                    "INSERT INTO orgs (name, display_name, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET display_name = excluded.display_name
                     RETURNING {ORG_COLS}, (xmax = 0)"
                ),
                &[&id, &display, &micros(Utc::now())],
            )
            .await?;
        Ok((org_row(&r)?, get(&r, 4)?))
    }

    async fn get_org(&self, name: &str) -> Result<Option<Org>> {
        let c = self.conn().await?;
        let sql = format!("SELECT {ORG_COLS} FROM orgs WHERE name = $1");
        c.query_opt(&sql, &[&name])
            .await?
            .as_ref()
            .map(org_row)
            .transpose()
    }

    async fn list_orgs(&self) -> Result<Vec<Org>> {
        let c = self.conn().await?;
        let sql = format!("SELECT {ORG_COLS} FROM orgs ORDER BY name");
        c.query(&sql, &[]).await?.iter().map(org_row).collect()
    }

    async fn set_org_limits(&self, name: &str, limits: &crate::config::OrgLimits) -> Result<bool> {
        let json = to_json(limits)?;
        let c = self.conn().await?;
        Ok(c.execute(
            "UPDATE orgs SET limits = $2 WHERE name = $1",
            &[&name, &json],
        )
        .await?
            == 1)
    }

    async fn delete_org(&self, name: &str) -> Result<bool> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute("DELETE FROM orgs WHERE name = $1", &[&name])
            .await?;
        tx.execute("DELETE FROM events WHERE org = $1", &[&name])
            .await?;
        tx.execute(
            "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE org = $1)",
            &[&name],
        )
        .await?;
        tx.execute("DELETE FROM deliveries WHERE org = $1", &[&name])
            .await?;
        tx.execute("DELETE FROM downloads WHERE org = $1", &[&name])
            .await?;
        tx.execute("DELETE FROM org_usage WHERE org = $1", &[&name])
            .await?;
        tx.execute("DELETE FROM taken_files WHERE org = $1", &[&name])
            .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn put_sftp_user(&self, u: &SftpUser) -> Result<bool> {
        let keys = to_json(&u.public_keys)?;
        let c = self.conn().await?;
        // The update applies only to a user of the same org; no row back means the name
        // belongs to another org.
        let r = c
            .query_opt(
                "INSERT INTO sftp_users (name, org, password_hash, public_keys, upload) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                   public_keys = excluded.public_keys, upload = excluded.upload
                 WHERE sftp_users.org = excluded.org
                 RETURNING (xmax = 0)",
                &[&u.name, &u.org, &u.password_hash, &keys, &u.upload],
            )
            .await?;
        match r {
            Some(r) => get(&r, 0),
            None => Err(StoreError::Conflict(format!(
                "SFTP user name {:?} is taken by another org; SSH logins carry only the user name",
                u.name
            ))),
        }
    }

    async fn get_sftp_user(&self, name: &str) -> Result<Option<SftpUser>> {
        let c = self.conn().await?;
        let sql = format!("SELECT {USER_COLS} FROM sftp_users WHERE name = $1");
        c.query_opt(&sql, &[&name])
            .await?
            .as_ref()
            .map(user_row)
            .transpose()
    }

    async fn list_sftp_users(&self, org: &str) -> Result<Vec<SftpUser>> {
        let c = self.conn().await?;
        let sql = format!("SELECT {USER_COLS} FROM sftp_users WHERE org = $1 ORDER BY name");
        c.query(&sql, &[&org]).await?.iter().map(user_row).collect()
    }

    async fn delete_sftp_user(&self, org: &str, name: &str) -> Result<bool> {
        let c = self.conn().await?;
        Ok(c.execute(
            "DELETE FROM sftp_users WHERE org = $1 AND name = $2",
            &[&org, &name],
        )
        .await?
            == 1)
    }

    async fn put_webhook(&self, hook: &Webhook) -> Result<()> {
        let mut h = hook.clone();
        if let Some(plain) = &h.secret {
            h.secret = Some(self.secrets.seal(&h.id, plain).map_err(StoreError::Db)?);
        }
        let events = to_json(&h.events)?;
        let rollup = h.rollup.as_ref().map(to_json).transpose()?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let old = tx
            .query_opt(
                "SELECT org, enabled, failing_since FROM webhooks WHERE id = $1 FOR UPDATE",
                &[&h.id],
            )
            .await?;
        let old = match old {
            Some(r) => {
                let org: String = get(&r, 0)?;
                if org != h.org {
                    return Err(StoreError::Conflict(format!(
                        "webhook id {:?} belongs to another org",
                        h.id
                    )));
                }
                Some((get::<bool>(&r, 1)?, opt_time_at(&r, 2)?))
            }
            None => None,
        };
        let failing_since = failing_since_on_put(old, h.enabled).map(micros);
        tx.execute(
            &format!(
                "INSERT INTO webhooks ({HOOK_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, url = excluded.url, events = excluded.events,
                   path_template = excluded.path_template, secret = excluded.secret, enabled = excluded.enabled,
                   disabled_reason = excluded.disabled_reason, failing_since = excluded.failing_since,
                   rollup = excluded.rollup"
            ),
            &[
                &h.id,
                &h.org,
                &h.kind.as_str(),
                &h.url,
                &events,
                &h.path_template,
                &h.secret,
                &h.enabled,
                &h.disabled_reason,
                &micros(h.created_at),
                &failing_since,
                &rollup,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_webhook(&self, org: &str, id: &str) -> Result<Option<Webhook>> {
        let c = self.conn().await?;
        let sql = format!("SELECT {HOOK_COLS} FROM webhooks WHERE org = $1 AND id = $2");
        c.query_opt(&sql, &[&org, &id])
            .await?
            .map(|r| hook_row(&r, 0, &self.secrets))
            .transpose()
    }

    async fn list_webhooks(&self, org: &str) -> Result<Vec<Webhook>> {
        let c = self.conn().await?;
        let sql =
            format!("SELECT {HOOK_COLS} FROM webhooks WHERE org = $1 ORDER BY created_at, id");
        c.query(&sql, &[&org])
            .await?
            .iter()
            .map(|r| hook_row(r, 0, &self.secrets))
            .collect()
    }

    async fn delete_webhook(&self, org: &str, id: &str) -> Result<bool> {
        let open: Vec<&str> = DeliveryStatus::OPEN.iter().map(|s| s.as_str()).collect();
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute(
                "DELETE FROM webhooks WHERE org = $1 AND id = $2",
                &[&org, &id],
            )
            .await?;
        // The rule (`rules::DELETED_WEBHOOK_*`) decides what its open jobs become.
        tx.execute(
            "UPDATE deliveries SET status = $2, next_attempt_at = NULL, last_error = $3
             WHERE webhook_id = $1 AND status = ANY($4)",
            &[
                &id,
                &DELETED_WEBHOOK_JOB_STATE.as_str(),
                &DELETED_WEBHOOK_ERROR,
                &open,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn put_custom_value_endpoint(&self, org: &str, url: &str) -> Result<()> {
        let c = self.conn().await?;
        c.execute(
            "INSERT INTO custom_value_endpoints (org, url) VALUES ($1, $2)
             ON CONFLICT (org) DO UPDATE SET url = excluded.url",
            &[&org, &url],
        )
        .await?;
        Ok(())
    }

    async fn get_custom_value_endpoint(&self, org: &str) -> Result<Option<String>> {
        let c = self.conn().await?;
        let r = c
            .query_opt(
                "SELECT url FROM custom_value_endpoints WHERE org = $1",
                &[&org],
            )
            .await?;
        r.map(|r| get(&r, 0)).transpose()
    }

    async fn commit_and_claim(
        &self,
        batch: Vec<NewEvent>,
        files_done: Vec<(String, String)>,
        lease: Option<Lease>,
    ) -> Result<CommitClaim> {
        queue::commit_events(self, batch, files_done, lease).await
    }

    async fn mark_files_done(&self, done: Vec<(String, String)>) -> Result<()> {
        queue::mark_files_done(self, done).await
    }

    async fn pending_files(&self) -> Result<Vec<PendingFiles>> {
        queue::pending_files(self).await
    }

    async fn ping(&self) -> Result<()> {
        nodes::ping(self).await
    }

    async fn put_ban(&self, ban: &Ban) -> Result<()> {
        nodes::put_ban(self, ban).await
    }

    async fn active_bans(&self, now: DateTime<Utc>) -> Result<Vec<Ban>> {
        nodes::active_bans(self, now).await
    }

    async fn shared_secret_init(&self, name: &str, value: &str) -> Result<SharedSecret> {
        nodes::secret_init(self, name, value).await
    }

    async fn shared_secret_get(&self, name: &str) -> Result<Option<SharedSecret>> {
        nodes::secret_get(self, name).await
    }

    async fn shared_secret_replace(
        &self,
        name: &str,
        version: i64,
        value: &str,
    ) -> Result<Option<SharedSecret>> {
        nodes::secret_replace(self, name, version, value).await
    }

    async fn reopen_partitions(
        &self,
        org: &str,
        hook: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        self.rollup_reopen(org, hook, from, until, now).await
    }

    async fn prune_rollup_lines(&self, org: &str, before: DateTime<Utc>) -> Result<u64> {
        self.rollup_prune(org, before).await
    }

    async fn due_jobs(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        busy: Busy,
    ) -> Result<Vec<DeliveryJob>> {
        queue::jobs(self, now, limit, busy).await
    }

    async fn release_claims(&self, claim: &ClaimId, ids: Vec<String>) -> Result<u64> {
        queue::release_claims(self, claim, ids).await
    }

    async fn next_due_at(&self, busy: Busy) -> Result<Option<DateTime<Utc>>> {
        queue::next_due_at(self, busy).await
    }

    async fn record_attempts(&self, batch: Arc<[AttemptRecord]>) -> Result<()> {
        attempts::record_attempts(self, batch).await
    }

    async fn list_deliveries(
        &self,
        org: &str,
        webhook_id: &str,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        queue::list_deliveries(self, org, webhook_id, status, limit).await
    }

    async fn replay(
        &self,
        org: &str,
        webhook_id: &str,
        delivery_id: Option<&str>,
        since: Option<DateTime<Utc>>,
    ) -> Result<u64> {
        queue::replay(self, org, webhook_id, delivery_id, since).await
    }

    async fn queue_stats(&self) -> Result<(u64, Option<DateTime<Utc>>)> {
        let open: Vec<&str> = DeliveryStatus::OPEN.iter().map(|s| s.as_str()).collect();
        let c = self.conn().await?;
        let r = c
            .query_one(
                "SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status = ANY($1)",
                &[&open],
            )
            .await?;
        let n: i64 = get(&r, 0)?;
        Ok((n as u64, opt_time_at(&r, 1)?))
    }

    async fn record_downloads(&self, files: Vec<(String, String)>) -> Result<()> {
        queue::record_downloads(self, files).await
    }

    async fn downloaded(&self, org: &str) -> Result<std::collections::HashSet<String>> {
        let c = self.conn().await?;
        let rows = c
            .query("SELECT path FROM downloads WHERE org = $1", &[&org])
            .await?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    async fn forget_downloads(&self, org: &str, paths: Vec<String>) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let c = self.conn().await?;
        c.execute(
            "DELETE FROM downloads WHERE org = $1 AND path = ANY($2)",
            &[&org, &paths],
        )
        .await?;
        Ok(())
    }

    async fn move_downloads(&self, org: &str, from: &str, to: &str) -> Result<()> {
        queue::move_downloads(self, org, from, to).await
    }

    async fn release_node_claims(&self, node: &str) -> Result<u64> {
        queue::release_node_claims(self, node).await
    }

    async fn org_usage(&self, org: &str) -> Result<Option<crate::limits::OrgUsage>> {
        self.usage_of(org).await
    }

    async fn set_org_usage(
        &self,
        org: &str,
        usage: crate::limits::OrgUsage,
        replace: bool,
    ) -> Result<()> {
        self.usage_set(org, usage, replace).await
    }

    async fn add_org_usage(&self, org: &str, files: i64, bytes: i64) -> Result<()> {
        self.usage_add(org, files, bytes).await
    }

    async fn record_taken(&self, org: &str, path: &str) -> Result<()> {
        self.taken(org, path).await
    }

    async fn taken_paths(&self, org: &str, paths: Vec<String>) -> Result<Vec<String>> {
        self.which_taken(org, paths).await
    }

    async fn due_partitions(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<PartitionRef>> {
        self.rollup_due(now, limit).await
    }

    async fn claim_partition(
        &self,
        p: &PartitionRef,
        node: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        self.rollup_claim(p, node, now, until).await
    }

    async fn partition_lines(&self, p: &PartitionRef) -> Result<Vec<StagedRow>> {
        self.rollup_lines(p).await
    }

    async fn close_partition(
        &self,
        p: &PartitionRef,
        through_seq: i64,
        events: u64,
        bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.rollup_close(p, through_seq, events, bytes, now).await
    }

    async fn rollup_backlog(&self) -> Result<(u64, Option<DateTime<Utc>>)> {
        self.rollup_backlog_stats().await
    }

    fn job_wakeups(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        Some(notify::spawn(self.cfg.clone(), self.origin.clone()))
    }
}
