//! Ingest on SQLite: one group commit records a batch of events, their delivery jobs and
//! staged roll-up lines, and charges their files to the org's quota, in one transaction.

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension};

use super::super::rows::micros;
use super::super::*;
use super::{mark_done, rollups, usage};

/// `Store::commit_and_claim` (the lease is ignored: one process owns the file).
pub(super) fn commit(
    c: &mut Connection,
    batch: Vec<NewEvent>,
    files_done: Vec<(String, String)>,
) -> Result<CommitClaim> {
    let tx = c.transaction()?;
    mark_done(&tx, &files_done)?;
    let now = micros(Utc::now());
    let mut out = Vec::with_capacity(batch.len());
    let mut inserted = Vec::new();
    {
        let mut find = tx.prepare_cached("SELECT result, files_pending, envelope, charged FROM events WHERE org = ?1 AND id = ?2")?;
        let mut ins_event = tx.prepare_cached(
            "INSERT INTO events (org, id, envelope, result, files_pending, created_at, charged) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut ins_delivery = tx.prepare_cached(
            "INSERT INTO deliveries (id, org, webhook_id, event_id, status, attempts, next_attempt_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5, ?5)",
        )?;
        for ev in batch {
            let known: Option<(String, bool, String, bool)> = find
                .query_row(params![ev.org, ev.id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            if let Some((result, files_pending, envelope, charged)) = known {
                let result: IngestResult =
                    serde_json::from_str(&result).map_err(|e| StoreError::Db(e.to_string()))?;
                if files_pending && !charged {
                    // Deferred earlier: the repost gets its files written if they fit now.
                    let (files, bytes) = file_usage(result.files.len(), envelope.len());
                    if let Err(why) = usage::charge(&tx, &ev.org, ev.quota, files, bytes)? {
                        out.push(CommitOutcome::Deferred { result, why });
                        continue;
                    }
                    tx.execute(
                        "UPDATE events SET charged = 1 WHERE org = ?1 AND id = ?2",
                        params![ev.org, ev.id],
                    )?;
                }
                let pending_envelope = files_pending.then_some(envelope);
                out.push(CommitOutcome::Known {
                    result,
                    pending_envelope,
                });
                continue;
            }
            let result = IngestResult {
                id: ev.id.clone(),
                files: ev.files.clone(),
                deliveries: ev.deliveries.iter().map(|(d, _)| d.clone()).collect(),
            };
            let result_json =
                serde_json::to_string(&result).map_err(|e| StoreError::Db(e.to_string()))?;
            let (files, bytes) = ev.usage();
            let over = if files > 0 {
                usage::charge(&tx, &ev.org, ev.quota, files, bytes)?.err()
            } else {
                None
            };
            ins_event.execute(params![
                ev.org,
                ev.id,
                ev.envelope_json,
                result_json,
                !ev.files.is_empty(),
                now,
                over.is_none()
            ])?;
            for (did, wid) in &ev.deliveries {
                ins_delivery.execute(params![did, ev.org, wid, ev.id, now])?;
                inserted.push(did.clone());
            }
            rollups::stage_lines(&tx, &ev)?;
            out.push(match over {
                Some(why) => CommitOutcome::Deferred { result, why },
                None => CommitOutcome::New(result),
            });
        }
    }
    tx.commit()?;
    Ok(CommitClaim {
        outcomes: out,
        inserted,
        claim: None,
    })
}
