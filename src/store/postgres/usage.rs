//! Org folder usage, taken paths and roll-ups on PostgreSQL (the "Org folder usage" and
//! "Roll-ups" groups of the `Store` trait), behaving as SQLite's `usage.rs`/`rollups.rs`.
//! Nodes share this database: the quota check locks the org's usage row inside the commit
//! transaction, and a partition's lease is one conditional upsert, so two nodes never both
//! pass one check or both close one partition. Leases are never cleared at start-up (a
//! starting node cannot tell another node's live lease from its own dead one).

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use super::super::rows::micros;
use super::super::*;
use super::{get, time_at, PostgresStore};
use crate::limits::{over_quota, OrgUsage, Quota};

/// Charges `files`/`bytes` to `org` if its quota allows them; otherwise says why not and
/// charges nothing. The row is created if missing and locked (`FOR UPDATE`), so concurrent
/// commits for one org on any node check one after the other.
pub(super) async fn charge(
    tx: &Transaction<'_>,
    org: &str,
    quota: Option<Quota>,
    files: u64,
    bytes: u64,
) -> Result<std::result::Result<(), String>> {
    if let Some(q) = quota {
        tx.execute(
            "INSERT INTO org_usage (org, files, bytes) VALUES ($1, 0, 0) ON CONFLICT (org) DO NOTHING",
            &[&org],
        )
        .await?;
        let r = tx
            .query_one(
                "SELECT files, bytes FROM org_usage WHERE org = $1 FOR UPDATE",
                &[&org],
            )
            .await?;
        let now = OrgUsage {
            files: get::<i64>(&r, 0)?.max(0) as u64,
            bytes: get::<i64>(&r, 1)?.max(0) as u64,
        };
        if let Some(why) = over_quota(now, q, files, bytes) {
            return Ok(Err(why));
        }
    }
    add(tx, org, files as i64, bytes as i64).await?;
    Ok(Ok(()))
}

async fn add(
    c: &impl deadpool_postgres::GenericClient,
    org: &str,
    files: i64,
    bytes: i64,
) -> Result<()> {
    c.execute(
        "INSERT INTO org_usage (org, files, bytes) VALUES ($1, GREATEST($2::bigint, 0), GREATEST($3::bigint, 0))
         ON CONFLICT (org) DO UPDATE SET files = GREATEST(org_usage.files + $2::bigint, 0),
           bytes = GREATEST(org_usage.bytes + $3::bigint, 0)",
        &[&org, &files, &bytes],
    )
    .await?;
    Ok(())
}

/// Stages the roll-up lines of a new event (inside `commit_events`' transaction).
pub(super) async fn stage_lines(tx: &Transaction<'_>, ev: &NewEvent) -> Result<()> {
    if ev.lines.is_empty() {
        return Ok(());
    }
    let at = ev
        .accepted_at
        .ok_or_else(|| StoreError::Db("roll-up lines without an accept time".into()))?;
    let ins = tx
        .prepare_cached(
            "INSERT INTO rollup_lines (org, hook, partition, closes_at, accepted_at, envelope)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    for l in &ev.lines {
        tx.execute(
            &ins,
            &[
                &ev.org,
                &l.hook,
                &l.partition,
                &micros(l.closes_at),
                &micros(at),
                &ev.envelope_json,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Leaves out of `pending` the paths users took; an event left with no path is still
/// returned (the repair then marks it written).
pub(super) async fn without_taken(
    c: &impl deadpool_postgres::GenericClient,
    mut pending: Vec<PendingFiles>,
) -> Result<Vec<PendingFiles>> {
    if pending.is_empty() {
        return Ok(pending);
    }
    let rows = c.query("SELECT org, path FROM taken_files", &[]).await?;
    let taken: std::collections::HashSet<(String, String)> = rows
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
        .collect::<Result<_>>()?;
    for p in &mut pending {
        let org = p.org.clone();
        p.files
            .retain(|f| !taken.contains(&(org.clone(), f.clone())));
    }
    Ok(pending)
}

impl PostgresStore {
    pub(super) async fn usage_of(&self, org: &str) -> Result<Option<OrgUsage>> {
        let c = self.conn().await?;
        let r = c
            .query_opt("SELECT files, bytes FROM org_usage WHERE org = $1", &[&org])
            .await?;
        r.map(|r| {
            Ok(OrgUsage {
                files: get::<i64>(&r, 0)?.max(0) as u64,
                bytes: get::<i64>(&r, 1)?.max(0) as u64,
            })
        })
        .transpose()
    }

    pub(super) async fn usage_set(&self, org: &str, u: OrgUsage, replace: bool) -> Result<()> {
        let sql = if replace {
            "INSERT INTO org_usage (org, files, bytes) VALUES ($1, $2, $3)
             ON CONFLICT (org) DO UPDATE SET files = excluded.files, bytes = excluded.bytes"
        } else {
            "INSERT INTO org_usage (org, files, bytes) VALUES ($1, $2, $3) ON CONFLICT (org) DO NOTHING"
        };
        let c = self.conn().await?;
        c.execute(sql, &[&org, &(u.files as i64), &(u.bytes as i64)])
            .await?;
        Ok(())
    }

    pub(super) async fn usage_add(&self, org: &str, files: i64, bytes: i64) -> Result<()> {
        if files == 0 && bytes == 0 {
            return Ok(());
        }
        let c = self.conn().await?;
        add(&c, org, files, bytes).await
    }

    pub(super) async fn which_taken(&self, org: &str, paths: Vec<String>) -> Result<Vec<String>> {
        if paths.is_empty() {
            return Ok(paths);
        }
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT path FROM taken_files WHERE org = $1 AND path = ANY($2)",
                &[&org, &paths],
            )
            .await?;
        let found: std::collections::HashSet<String> =
            rows.iter().map(|r| get(r, 0)).collect::<Result<_>>()?;
        // In the order asked, as SQLite answers.
        Ok(paths.into_iter().filter(|p| found.contains(p)).collect())
    }

    pub(super) async fn taken(&self, org: &str, path: &str) -> Result<()> {
        let c = self.conn().await?;
        // Only while an event still pending lists the path: the table stays tiny.
        c.execute(
            "INSERT INTO taken_files (org, path) SELECT $1, $2 WHERE EXISTS
             (SELECT 1 FROM events e, json_array_elements_text(e.result::json -> 'files') j(v)
              WHERE e.org = $1 AND e.files_pending AND j.v = $2)
             ON CONFLICT DO NOTHING",
            &[&org, &path],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn rollup_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PartitionRef>> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT l.org, l.hook, l.partition, MIN(l.closes_at) AS c FROM rollup_lines l
                 LEFT JOIN rollup_partitions p ON p.hook = l.hook AND p.partition = l.partition
                 WHERE l.state IN (0, 2) AND l.closes_at <= $1 AND (p.lease_until IS NULL OR p.lease_until < $1)
                 GROUP BY l.org, l.hook, l.partition ORDER BY c LIMIT $2",
                &[&micros(now), &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(PartitionRef {
                    org: get(r, 0)?,
                    hook: get(r, 1)?,
                    partition: get(r, 2)?,
                })
            })
            .collect()
    }

    pub(super) async fn rollup_claim(
        &self,
        p: &PartitionRef,
        node: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        let c = self.conn().await?;
        // One statement: the row lock of the upsert orders two nodes, and the one that
        // comes second sees the first one's live lease and changes nothing.
        let n = c
            .execute(
                "INSERT INTO rollup_partitions (hook, partition, org, lease_until, lease_node)
                 VALUES ($1, $2, $3, $5, $6)
                 ON CONFLICT (hook, partition) DO UPDATE SET lease_until = $5, lease_node = $6
                   WHERE rollup_partitions.lease_until IS NULL OR rollup_partitions.lease_until < $4",
                &[&p.hook, &p.partition, &p.org, &micros(now), &micros(until), &node],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn rollup_lines(&self, p: &PartitionRef) -> Result<Vec<StagedRow>> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, accepted_at, envelope, state FROM rollup_lines
                 WHERE hook = $1 AND partition = $2 ORDER BY seq",
                &[&p.hook, &p.partition],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StagedRow {
                    seq: get(r, 0)?,
                    accepted_at: time_at(r, 1)?,
                    envelope: get(r, 2)?,
                    closed_before: get::<i16>(r, 3)? != 0,
                })
            })
            .collect()
    }

    pub(super) async fn rollup_close(
        &self,
        p: &PartitionRef,
        through_seq: i64,
        events: u64,
        bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "UPDATE rollup_lines SET state = 1
             WHERE hook = $1 AND partition = $2 AND seq <= $3 AND state IN (0, 2)",
            &[&p.hook, &p.partition, &through_seq],
        )
        .await?;
        tx.execute(
            "INSERT INTO rollup_partitions (hook, partition, org, lease_until, closed_at, events, bytes)
             VALUES ($1, $2, $3, NULL, $4, $5, $6)
             ON CONFLICT (hook, partition) DO UPDATE SET lease_until = NULL, lease_node = NULL, closed_at = $4,
               events = $5, bytes = $6",
            &[
                &p.hook,
                &p.partition,
                &p.org,
                &micros(now),
                &(events as i64),
                &(bytes as i64),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn rollup_backlog_stats(&self) -> Result<(u64, Option<DateTime<Utc>>)> {
        let c = self.conn().await?;
        let r = c
            .query_one(
                "SELECT COUNT(*), MIN(closes_at) FROM rollup_lines WHERE state IN (0, 2)",
                &[],
            )
            .await?;
        let n: i64 = get(&r, 0)?;
        Ok((n as u64, super::opt_time_at(&r, 1)?))
    }

    pub(super) async fn rollup_reopen(
        &self,
        org: &str,
        hook: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        // Whole partitions: a line of one outside the range is rebuilt with it. Only
        // closed lines (state 1) flip, so a partition a closer is writing right now is
        // left to that close.
        let rows = tx
            .query(
                "UPDATE rollup_lines SET state = 2, closes_at = $5
                 WHERE hook = $2 AND state = 1 AND partition IN (
                   SELECT DISTINCT partition FROM rollup_lines
                   WHERE org = $1 AND accepted_at >= $3 AND accepted_at < $4 AND hook = $2
                     AND state = 1)
                 RETURNING partition",
                &[&org, &hook, &micros(from), &micros(until), &micros(now)],
            )
            .await?;
        tx.commit().await?;
        let mut parts: Vec<String> = rows
            .iter()
            .map(|r| get::<String>(r, 0))
            .collect::<Result<_>>()?;
        parts.sort();
        parts.dedup();
        Ok(parts)
    }

    pub(super) async fn rollup_prune(&self, org: &str, before: DateTime<Utc>) -> Result<u64> {
        let c = self.conn().await?;
        let n = c
            .execute(
                "DELETE FROM rollup_lines WHERE org = $1 AND accepted_at < $2 AND state = 1",
                &[&org, &micros(before)],
            )
            .await?;
        Ok(n)
    }
}
