//! SQLite implementation: WAL with `synchronous=FULL`, so a commit is fsync'd before it returns.
//! One writer connection and a few reader connections, each behind a mutex and used from
//! blocking threads, so a commit's fsync never stalls reads and ingest lookups, SFTP
//! logins and the delivery scheduler do not queue behind one another.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::health::AttemptRecord;
use super::rows::*;
use super::*;
use crate::secrets::SecretBox;

mod checkpoint;
mod ingest;
mod nodes;
mod queue;
mod rollups;
mod schema;
mod tenants;
mod usage;

use schema::{migrate, open};

#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<std::sync::atomic::AtomicUsize>,
    quarantine: Quarantine,
    secrets: Arc<SecretBox>,
}

/// Seals webhook secrets stored in plain text by older versions, in one transaction.
fn seal_plain_secrets(conn: &mut Connection, sb: &SecretBox) -> Result<()> {
    let tx = conn.transaction()?;
    let plain: Vec<(String, String)> = {
        let mut st = tx.prepare(
            "SELECT id, secret FROM webhooks WHERE secret IS NOT NULL AND secret NOT LIKE 'enc:v1:%'",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (id, secret) in &plain {
        let sealed = sb.seal(id, secret).map_err(StoreError::Db)?;
        tx.execute(
            "UPDATE webhooks SET secret = ?2 WHERE id = ?1",
            params![id, sealed],
        )?;
    }
    tx.commit()?;
    if !plain.is_empty() {
        tracing::info!(
            webhooks = plain.len(),
            "encrypted webhook secrets stored in plain text by an older version"
        );
    }
    Ok(())
}

/// WAL readers never block each other or the writer.
const READERS: usize = 4;

impl SqliteStore {
    /// Opens (and migrates) the database; webhook secrets are sealed with `secrets`.
    pub fn open(path: &Path, secrets: Arc<SecretBox>) -> Result<Self> {
        let mut writer = open(path)?;
        migrate(&mut writer)?;
        // One process owns this file: a roll-up lease left by a previous run (killed while
        // closing) holds no one back.
        writer.execute(
            "UPDATE rollup_partitions SET lease_until = NULL WHERE lease_until IS NOT NULL",
            [],
        )?;
        seal_plain_secrets(&mut writer, &secrets)?;
        let readers = (0..READERS)
            .map(|_| open(path).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        let writer = Arc::new(Mutex::new(writer));
        checkpoint::start(&writer, path)?;
        Ok(Self {
            writer,
            readers: Arc::new(readers),
            next_reader: Arc::default(),
            quarantine: Quarantine::default(),
            secrets,
        })
    }

    pub(super) async fn with_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| StoreError::Db("writer lock poisoned".into()))?;
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError::Db(e.to_string()))?
    }

    pub(super) async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Quarantine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        let q = self.quarantine.clone();
        let start = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            // A free connection if there is one, else wait for the one this call drew.
            let n = readers.len();
            let free = (0..n).find_map(|i| readers[(start + i) % n].try_lock().ok());
            let c = match free {
                Some(c) => c,
                None => readers[start % n]
                    .lock()
                    .map_err(|_| StoreError::Db("reader lock poisoned".into()))?,
            };
            f(&c, &q)
        })
        .await
        .map_err(|e| StoreError::Db(e.to_string()))?
    }
}

fn mark_done(tx: &rusqlite::Transaction<'_>, done: &[(String, String)]) -> Result<()> {
    let mut st =
        tx.prepare_cached("UPDATE events SET files_pending = 0 WHERE org = ?1 AND id = ?2")?;
    // Taken paths stay recorded: a repair that read the pending list earlier checks them
    // after it wrote (paths hold the event id, so no other event reuses them).
    for (org, id) in done {
        st.execute(params![org, id])?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_org(&self, id: &str, display: &str) -> Result<(Org, bool)> {
        tenants::put_org(self, id, display).await
    }

    async fn get_org(&self, name: &str) -> Result<Option<Org>> {
        tenants::get_org(self, name).await
    }

    async fn list_orgs(&self) -> Result<Vec<Org>> {
        tenants::list_orgs(self).await
    }

    async fn set_org_limits(&self, name: &str, limits: &crate::config::OrgLimits) -> Result<bool> {
        tenants::set_org_limits(self, name, limits).await
    }

    async fn delete_org(&self, name: &str) -> Result<bool> {
        tenants::delete_org(self, name).await
    }

    async fn put_sftp_user(&self, user: &SftpUser) -> Result<bool> {
        tenants::put_sftp_user(self, user).await
    }

    async fn get_sftp_user(&self, name: &str) -> Result<Option<SftpUser>> {
        tenants::get_sftp_user(self, name).await
    }

    async fn list_sftp_users(&self, org: &str) -> Result<Vec<SftpUser>> {
        tenants::list_sftp_users(self, org).await
    }

    async fn delete_sftp_user(&self, org: &str, name: &str) -> Result<bool> {
        tenants::delete_sftp_user(self, org, name).await
    }

    async fn put_webhook(&self, hook: &Webhook) -> Result<()> {
        tenants::put_webhook(self, hook).await
    }

    async fn get_webhook(&self, org: &str, id: &str) -> Result<Option<Webhook>> {
        tenants::get_webhook(self, org, id).await
    }

    async fn list_webhooks(&self, org: &str) -> Result<Vec<Webhook>> {
        tenants::list_webhooks(self, org).await
    }

    async fn delete_webhook(&self, org: &str, id: &str) -> Result<bool> {
        tenants::delete_webhook(self, org, id).await
    }

    async fn put_custom_value_endpoint(&self, org: &str, url: &str) -> Result<()> {
        tenants::put_custom_value_endpoint(self, org, url).await
    }

    async fn get_custom_value_endpoint(&self, org: &str) -> Result<Option<String>> {
        tenants::get_custom_value_endpoint(self, org).await
    }

    async fn commit_and_claim(
        &self,
        batch: Vec<NewEvent>,
        files_done: Vec<(String, String)>,
        _lease: Option<Lease>,
    ) -> Result<CommitClaim> {
        // One process owns this file: the scheduler's in-flight set is the claim.
        self.with_writer(move |c| ingest::commit(c, batch, files_done))
            .await
    }

    async fn mark_files_done(&self, done: Vec<(String, String)>) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        self.with_writer(move |c| {
            let tx = c.transaction()?;
            mark_done(&tx, &done)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn pending_files(&self) -> Result<Vec<PendingFiles>> {
        self.with_reader(|c, q| {
            let mut st =
                c.prepare("SELECT org, id, envelope, result FROM events WHERE files_pending = 1 AND charged = 1")?;
            let rows = st
                .query_map([], |r| {
                    keyed("events", r, 1, |r| {
                        let result: String = r.get(3)?;
                        let files = serde_json::from_str::<IngestResult>(&result)
                            .map(|r| r.files)
                            .map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(
                                    3,
                                    rusqlite::types::Type::Text,
                                    format!("result: {e}").into(),
                                )
                            })?;
                        Ok(PendingFiles {
                            org: r.get(0)?,
                            id: r.get(1)?,
                            envelope_json: r.get(2)?,
                            files,
                        })
                    })
                })?
                .rows(q)?;
            usage::without_taken(c, rows)
        })
        .await
    }

    async fn due_jobs(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        busy: Busy,
    ) -> Result<Vec<DeliveryJob>> {
        queue::due_jobs(self, now, limit, busy).await
    }

    async fn release_claims(&self, _claim: &ClaimId, _ids: Vec<String>) -> Result<u64> {
        // Never claimed in the file: dropping them from the in-flight set released them.
        Ok(0)
    }

    async fn next_due_at(&self, busy: Busy) -> Result<Option<DateTime<Utc>>> {
        queue::next_due_at(self, busy).await
    }

    async fn record_attempts(&self, batch: Arc<[AttemptRecord]>) -> Result<()> {
        queue::record_attempts(self, batch).await
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
        queue::queue_stats(self).await
    }
    async fn record_downloads(&self, files: Vec<(String, String)>) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let now = Utc::now().timestamp_micros();
        self.with_writer(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO downloads (org, path, at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (org, path) DO UPDATE SET at = excluded.at",
                )?;
                for (org, path) in &files {
                    st.execute(params![org, path, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn downloaded(&self, org: &str) -> Result<std::collections::HashSet<String>> {
        let org = org.to_owned();
        self.with_reader(move |c, _| {
            let mut st = c.prepare_cached("SELECT path FROM downloads WHERE org = ?1")?;
            let rows = st.query_map(params![org], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn forget_downloads(&self, org: &str, paths: Vec<String>) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let org = org.to_owned();
        self.with_writer(move |c| {
            let tx = c.transaction()?;
            {
                let mut st =
                    tx.prepare_cached("DELETE FROM downloads WHERE org = ?1 AND path = ?2")?;
                for p in &paths {
                    st.execute(params![org, p])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.nodes_ping().await
    }

    async fn put_ban(&self, ban: &Ban) -> Result<()> {
        self.nodes_put_ban(ban).await
    }

    async fn active_bans(&self, now: DateTime<Utc>) -> Result<Vec<Ban>> {
        self.nodes_active_bans(now).await
    }

    async fn shared_secret_init(&self, name: &str, value: &str) -> Result<SharedSecret> {
        self.nodes_secret_init(name, value).await
    }

    async fn shared_secret_get(&self, name: &str) -> Result<Option<SharedSecret>> {
        self.nodes_secret_get(name).await
    }

    async fn shared_secret_replace(
        &self,
        name: &str,
        version: i64,
        value: &str,
    ) -> Result<Option<SharedSecret>> {
        self.nodes_secret_replace(name, version, value).await
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

    async fn release_node_claims(&self, _node: &str) -> Result<u64> {
        // One process owns the file: its in-flight set, not a lease, is the claim.
        Ok(0)
    }

    async fn move_downloads(&self, org: &str, from: &str, to: &str) -> Result<()> {
        let (org, from, to) = (org.to_owned(), from.to_owned(), to.to_owned());
        self.with_writer(move |c| {
            // The file itself, or everything below the folder `from/`.
            c.execute(
                "UPDATE OR REPLACE downloads SET path = ?3 || substr(path, length(?2) + 1)
                 WHERE org = ?1 AND (path = ?2 OR substr(path, 1, length(?2) + 1) = ?2 || '/')",
                params![org, from, to],
            )?;
            Ok(())
        })
        .await
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
}

/// `.rows(q)`: collects query rows, skipping and reporting corrupt ones.
trait Rows<T> {
    fn rows(self, q: &Quarantine) -> Result<Vec<T>>;
}

impl<T, I: Iterator<Item = rusqlite::Result<T>>> Rows<T> for I {
    fn rows(self, q: &Quarantine) -> Result<Vec<T>> {
        q.collect(self)
    }
}
