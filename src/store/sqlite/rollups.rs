//! Roll-ups on SQLite: staged lines, partition leases and close records.
//! One process owns the SQLite file, so the lease here only guards against two closer
//! passes of this process; on PostgreSQL the same claim is what keeps nodes apart.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Transaction};

use super::rows::{from_micros, micros};
use super::{NewEvent, PartitionRef, Result, SqliteStore, StagedRow, StoreError};

pub(super) const MIGRATION: &str = r#"
ALTER TABLE webhooks ADD COLUMN rollup TEXT;
CREATE TABLE rollup_lines (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    hook TEXT NOT NULL,
    partition TEXT NOT NULL,
    closes_at INTEGER NOT NULL,
    accepted_at INTEGER NOT NULL,
    envelope TEXT NOT NULL
);
CREATE INDEX rollup_lines_partition ON rollup_lines(hook, partition, seq);
CREATE INDEX rollup_lines_closes ON rollup_lines(closes_at);
CREATE TABLE rollup_partitions (
    hook TEXT NOT NULL,
    partition TEXT NOT NULL,
    org TEXT NOT NULL,
    lease_until INTEGER,
    closed_at INTEGER,
    events INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hook, partition)
) WITHOUT ROWID;
"#;

/// Migration 9: lines are kept after their partition closes (state 1), for rebuilds by
/// replay (state 2 = reopened), until the org's retention drops them.
pub(super) const MIGRATION_KEEP: &str = r#"
ALTER TABLE rollup_lines ADD COLUMN state INTEGER NOT NULL DEFAULT 0;
DROP INDEX rollup_lines_closes;
CREATE INDEX rollup_lines_due ON rollup_lines(state, closes_at);
CREATE INDEX rollup_lines_kept ON rollup_lines(org, accepted_at);
"#;

/// Stages the roll-up lines of a new event (inside `commit_events`' transaction).
pub(super) fn stage_lines(tx: &Transaction<'_>, ev: &NewEvent) -> Result<()> {
    if ev.lines.is_empty() {
        return Ok(());
    }
    let at = ev
        .accepted_at
        .ok_or_else(|| StoreError::Db("roll-up lines without an accept time".into()))?;
    let mut ins = tx.prepare_cached(
        "INSERT INTO rollup_lines (org, hook, partition, closes_at, accepted_at, envelope)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for l in &ev.lines {
        ins.execute(params![
            ev.org,
            l.hook,
            l.partition,
            micros(l.closes_at),
            micros(at),
            ev.envelope_json
        ])?;
    }
    Ok(())
}

fn time_of(v: i64) -> Result<DateTime<Utc>> {
    from_micros(v).ok_or_else(|| StoreError::Db(format!("roll-up time {v} is out of range")))
}

impl SqliteStore {
    pub(super) async fn rollup_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PartitionRef>> {
        self.with_reader(move |c, _| {
            let mut st = c.prepare_cached(
                "SELECT l.org, l.hook, l.partition, MIN(l.closes_at) AS c FROM rollup_lines l
                 LEFT JOIN rollup_partitions p ON p.hook = l.hook AND p.partition = l.partition
                 WHERE l.state IN (0, 2) AND l.closes_at <= ?1 AND (p.lease_until IS NULL OR p.lease_until < ?1)
                 GROUP BY l.hook, l.partition ORDER BY c LIMIT ?2",
            )?;
            let rows = st.query_map(params![micros(now), limit as i64], |r| {
                Ok(PartitionRef {
                    org: r.get(0)?,
                    hook: r.get(1)?,
                    partition: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// One process owns the file (its leases are dropped at open), so the node is not kept.
    pub(super) async fn rollup_claim(
        &self,
        p: &PartitionRef,
        _node: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        let p = p.clone();
        self.with_writer(move |c| {
            let n = c.execute(
                "INSERT INTO rollup_partitions (hook, partition, org, lease_until) VALUES (?1, ?2, ?3, ?5)
                 ON CONFLICT(hook, partition) DO UPDATE SET lease_until = ?5
                   WHERE rollup_partitions.lease_until IS NULL OR rollup_partitions.lease_until < ?4",
                params![p.hook, p.partition, p.org, micros(now), micros(until)],
            )?;
            Ok(n == 1)
        })
        .await
    }

    pub(super) async fn rollup_lines(&self, p: &PartitionRef) -> Result<Vec<StagedRow>> {
        let p = p.clone();
        self.with_reader(move |c, _| {
            let mut st = c.prepare_cached(
                "SELECT seq, accepted_at, envelope, state FROM rollup_lines
                 WHERE hook = ?1 AND partition = ?2 ORDER BY seq",
            )?;
            let rows = st
                .query_map(params![p.hook, p.partition], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(seq, at, envelope, state)| {
                    Ok(StagedRow {
                        seq,
                        accepted_at: time_of(at)?,
                        envelope,
                        closed_before: state != 0,
                    })
                })
                .collect()
        })
        .await
    }

    pub(super) async fn rollup_close(
        &self,
        p: &PartitionRef,
        through_seq: i64,
        events: u64,
        bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let p = p.clone();
        self.with_writer(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE rollup_lines SET state = 1
                 WHERE hook = ?1 AND partition = ?2 AND seq <= ?3 AND state IN (0, 2)",
                params![p.hook, p.partition, through_seq],
            )?;
            tx.execute(
                "INSERT INTO rollup_partitions (hook, partition, org, lease_until, closed_at, events, bytes)
                 VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6)
                 ON CONFLICT(hook, partition) DO UPDATE SET lease_until = NULL, closed_at = ?4,
                   events = ?5, bytes = ?6",
                params![p.hook, p.partition, p.org, micros(now), events as i64, bytes as i64],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn rollup_backlog_stats(&self) -> Result<(u64, Option<DateTime<Utc>>)> {
        self.with_reader(move |c, _| {
            let (n, min): (i64, Option<i64>) = c
                .query_row(
                    "SELECT COUNT(*), MIN(closes_at) FROM rollup_lines WHERE state IN (0, 2)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .unwrap_or((0, None));
            Ok((n as u64, min.map(time_of).transpose()?))
        })
        .await
    }

    pub(super) async fn rollup_reopen(
        &self,
        org: &str,
        hook: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let (org, hook) = (org.to_owned(), hook.to_owned());
        self.with_writer(move |c| {
            let tx = c.transaction()?;
            let parts = {
                let mut st = tx.prepare_cached(
                    "SELECT DISTINCT partition FROM rollup_lines
                     WHERE org = ?1 AND accepted_at >= ?3 AND accepted_at < ?4 AND hook = ?2
                       AND state = 1
                     ORDER BY partition",
                )?;
                let rows = st.query_map(params![org, hook, micros(from), micros(until)], |r| {
                    r.get::<_, String>(0)
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            {
                // Whole partitions: a line of one outside the range is rebuilt with it.
                let mut up = tx.prepare_cached(
                    "UPDATE rollup_lines SET state = 2, closes_at = ?3
                     WHERE hook = ?1 AND partition = ?2 AND state = 1",
                )?;
                for p in &parts {
                    up.execute(params![hook, p, micros(now)])?;
                }
            }
            tx.commit()?;
            Ok(parts)
        })
        .await
    }

    pub(super) async fn rollup_prune(&self, org: &str, before: DateTime<Utc>) -> Result<u64> {
        let org = org.to_owned();
        self.with_writer(move |c| {
            let n = c.execute(
                "DELETE FROM rollup_lines WHERE org = ?1 AND accepted_at < ?2 AND state = 1",
                params![org, micros(before)],
            )?;
            Ok(n as u64)
        })
        .await
    }
}
