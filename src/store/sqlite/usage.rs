//! Org folder usage and taken paths on SQLite (see the "Org folder usage" group of the
//! `Store` trait). The quota check runs inside the commit transaction: the one writer
//! connection serialises commits, so concurrent posts never all pass the same check.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::super::{PendingFiles, Result};
use super::SqliteStore;
use crate::limits::{over_quota, OrgUsage, Quota};

/// Charges `files`/`bytes` to `org` if its quota allows them; otherwise says why not and
/// charges nothing. An org with no count yet counts from zero (its count is set from a
/// listing at start-up, which then only fills orgs that still have none).
pub(super) fn charge(
    tx: &Transaction<'_>,
    org: &str,
    quota: Option<Quota>,
    files: u64,
    bytes: u64,
) -> Result<std::result::Result<(), String>> {
    if let Some(q) = quota {
        let now = get(tx, org)?.unwrap_or_default();
        if let Some(why) = over_quota(now, q, files, bytes) {
            return Ok(Err(why));
        }
    }
    add(tx, org, files as i64, bytes as i64)?;
    Ok(Ok(()))
}

fn get(c: &Connection, org: &str) -> Result<Option<OrgUsage>> {
    let row: Option<(i64, i64)> = c
        .prepare_cached("SELECT files, bytes FROM org_usage WHERE org = ?1")?
        .query_row([org], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(f, b)| OrgUsage {
        files: f.max(0) as u64,
        bytes: b.max(0) as u64,
    }))
}

fn add(c: &Connection, org: &str, files: i64, bytes: i64) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO org_usage (org, files, bytes) VALUES (?1, max(?2, 0), max(?3, 0))
         ON CONFLICT (org) DO UPDATE SET files = max(files + ?2, 0), bytes = max(bytes + ?3, 0)",
    )?
    .execute(params![org, files, bytes])?;
    Ok(())
}

/// Leaves out of `pending` the paths users took; an event left with no path is still
/// returned (the repair then marks it written).
pub(super) fn without_taken(
    c: &Connection,
    mut pending: Vec<PendingFiles>,
) -> Result<Vec<PendingFiles>> {
    if pending.is_empty() {
        return Ok(pending);
    }
    let mut st = c.prepare_cached("SELECT 1 FROM taken_files WHERE org = ?1 AND path = ?2")?;
    for p in &mut pending {
        let mut keep = Vec::with_capacity(p.files.len());
        for f in std::mem::take(&mut p.files) {
            if !st.exists(params![p.org, f])? {
                keep.push(f);
            }
        }
        p.files = keep;
    }
    Ok(pending)
}

impl SqliteStore {
    pub(super) async fn usage_of(&self, org: &str) -> Result<Option<OrgUsage>> {
        let org = org.to_owned();
        self.with_reader(move |c, _| get(c, &org)).await
    }

    pub(super) async fn usage_set(&self, org: &str, u: OrgUsage, replace: bool) -> Result<()> {
        let org = org.to_owned();
        self.with_writer(move |c| {
            let sql = if replace {
                "INSERT INTO org_usage (org, files, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (org) DO UPDATE SET files = ?2, bytes = ?3"
            } else {
                "INSERT INTO org_usage (org, files, bytes) VALUES (?1, ?2, ?3) ON CONFLICT (org) DO NOTHING"
            };
            c.execute(sql, params![org, u.files as i64, u.bytes as i64])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn usage_add(&self, org: &str, files: i64, bytes: i64) -> Result<()> {
        if files == 0 && bytes == 0 {
            return Ok(());
        }
        let org = org.to_owned();
        self.with_writer(move |c| add(c, &org, files, bytes)).await
    }

    pub(super) async fn which_taken(&self, org: &str, paths: Vec<String>) -> Result<Vec<String>> {
        let org = org.to_owned();
        self.with_reader(move |c, _| {
            let mut st =
                c.prepare_cached("SELECT 1 FROM taken_files WHERE org = ?1 AND path = ?2")?;
            let mut out = Vec::new();
            for p in paths {
                if st.exists(params![org, p])? {
                    out.push(p);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn taken(&self, org: &str, path: &str) -> Result<()> {
        let (org, path) = (org.to_owned(), path.to_owned());
        self.with_writer(move |c| {
            // Only while an event still pending lists the path: the table stays tiny.
            c.execute(
                "INSERT OR IGNORE INTO taken_files (org, path) SELECT ?1, ?2 WHERE EXISTS
                 (SELECT 1 FROM events e, json_each(e.result, '$.files') j
                  WHERE e.org = ?1 AND e.files_pending = 1 AND j.value = ?2)",
                params![org, path],
            )?;
            Ok(())
        })
        .await
    }
}
