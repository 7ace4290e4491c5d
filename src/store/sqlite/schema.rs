//! The SQLite schema: numbered migrations (`PRAGMA user_version` is the applied count)
//! and how a connection is opened.

use std::path::Path;

use rusqlite::Connection;

use super::super::{Result, StoreError};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE orgs (
    name TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE sftp_users (
    name TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    password_hash TEXT,
    public_keys TEXT NOT NULL DEFAULT '[]',
    upload INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sftp_users_org ON sftp_users(org);
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    url TEXT,
    events TEXT NOT NULL,
    path_template TEXT,
    secret TEXT,
    enabled INTEGER NOT NULL DEFAULT 1,
    disabled_reason TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX webhooks_org ON webhooks(org);
CREATE TABLE custom_value_endpoints (
    org TEXT PRIMARY KEY REFERENCES orgs(name) ON DELETE CASCADE,
    url TEXT NOT NULL
);
CREATE TABLE events (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    result TEXT NOT NULL,
    files_pending INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (org, id)
);
CREATE INDEX events_files_pending ON events(files_pending) WHERE files_pending = 1;
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_status INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX deliveries_webhook ON deliveries(org, webhook_id, created_at);
CREATE TABLE attempts (
    delivery_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    status INTEGER,
    latency_ms INTEGER NOT NULL,
    error TEXT,
    response_excerpt TEXT
);
CREATE INDEX attempts_delivery ON attempts(delivery_id, at);
"#,
    // 2: when a webhook started failing without a success since (for `disable_after`).
    r#"
ALTER TABLE webhooks ADD COLUMN failing_since INTEGER;
"#,
    // 3: per-org overrides of [limits] (quota, retention, ingest rate), as JSON.
    "ALTER TABLE orgs ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';",
    // 4: what each attempt did (`AttemptResult`), instead of guessing from status and latency.
    // Old rows: an answer is an HTTP error unless 2xx without error; no answer is a transport
    // error unless it is one of the "nothing sent" reasons the worker wrote.
    r#"
ALTER TABLE attempts ADD COLUMN outcome TEXT NOT NULL DEFAULT 'transport_error';
UPDATE attempts SET outcome = CASE
    WHEN status BETWEEN 200 AND 299 AND error IS NULL THEN 'delivered'
    WHEN status IS NOT NULL THEN 'http_error'
    WHEN latency_ms = 0 AND (error LIKE 'webhook deleted%' OR error LIKE 'webhook disabled%'
                             OR error LIKE 'webhook has no url%') THEN 'not_attempted'
    ELSE 'transport_error' END;
"#,
    // 5: downloads by file, so retention needs no atime (and works on S3).
    r#"
CREATE TABLE downloads (
    org TEXT NOT NULL,
    path TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (org, path)
) WITHOUT ROWID;
"#,
    // 6: org usage counted as files come and go (quotas across nodes, no listing); which
    // pending events were charged (a deferred one is not); paths users took while their
    // event was still pending (a repair must not write them again).
    r#"
CREATE TABLE org_usage (
    org TEXT PRIMARY KEY,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
ALTER TABLE events ADD COLUMN charged INTEGER NOT NULL DEFAULT 1;
CREATE TABLE taken_files (
    org TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (org, path)
) WITHOUT ROWID;
"#,
    // 7: roll-ups: a webhook's roll-up settings (JSON), lines staged with their event
    // (seq is the accept order), and partitions' leases and close records.
    super::rollups::MIGRATION,
    // 8: state shared by the nodes of a scaled-out service (bans, keys).
    r#"
CREATE TABLE bans (
    ip TEXT PRIMARY KEY,
    until INTEGER NOT NULL,
    reason TEXT NOT NULL,
    node TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE shared_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // 9: roll-up lines kept after their partition closes, for rebuilds by replay.
    super::rollups::MIGRATION_KEEP,
    // 10: the due index carries what a poll filters on (id, webhook, status), so a poll
    // walks it alone, past the jobs in flight, without reading their rows (queue.rs).
    r#"
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries(next_attempt_at, id, webhook_id, status)
    WHERE status IN ('pending', 'failed');
"#,
];

pub(super) fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsync'd at every commit, which is what a 202 promises.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    // A newer binary migrated this file: this one does not know its tables and must not
    // write to them.
    if version > MIGRATIONS.len() as i64 {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known: MIGRATIONS.len() as i64,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(m)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied state migration");
    }
    Ok(())
}
