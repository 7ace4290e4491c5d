//! Ingest and the delivery queue on PostgreSQL.

use chrono::{DateTime, Utc};

use super::super::rows::micros;
use super::super::*;
use super::{get, hook_row, opt_time_at, time_at, to_json, usage, PostgresStore};

/// Set at the start of the transaction of a claim or a batch of outcomes: index paths
/// only. Both statements touch at most a poll's jobs, by primary key or from the head of
/// `deliveries_due`, so an index is always the right path; but PostgreSQL picks from its
/// statistics, and those lag far behind a queue table that grows by thousands of rows a
/// second (autovacuum analyzes it a minute later at best). Measured on PostgreSQL 15 with
/// 14,000 due jobs before the first analyze: a claim of 191 jobs read and sorted the whole
/// backlog (bitmap scan, 7-11 ms; 0.4 ms by the index), and a batch of 129 outcomes read
/// the whole table into a hash join (5 ms; 1.7 ms by the primary key). Not `enable_sort`:
/// the claim's final ORDER BY has no other path, and turning sorts off made the planner
/// reorder the joins into a plan 30 times slower.
pub(super) const KEYED_PLANS: &str =
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;
     SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

/// Times a batch that lost a deadlock or serialization conflict with another node is run
/// again before the caller hears "unavailable" (503, Retry-After).
const CONTENTION_TRIES: u32 = 3;

pub(super) async fn commit_events(
    s: &PostgresStore,
    batch: Vec<NewEvent>,
    files_done: Vec<(String, String)>,
    lease: Option<Lease>,
) -> Result<CommitClaim> {
    let mut tries = 0;
    loop {
        tries += 1;
        match commit_once(s, &batch, &files_done, lease.as_ref()).await {
            Err(e) if super::is_contention(&e) && tries < CONTENTION_TRIES => {
                metrics::counter!("hookbridge_store_conflict_retries_total").increment(1);
                tracing::debug!(error = %e, "ingest batch lost a lock conflict with another node; running it again");
            }
            other => return other,
        }
    }
}

async fn commit_once(
    s: &PostgresStore,
    batch: &[NewEvent],
    files_done: &[(String, String)],
    lease: Option<&Lease>,
) -> Result<CommitClaim> {
    let mut c = s.conn().await?;
    let tx = c.transaction().await?;
    mark_done(&tx, files_done).await?;
    // Quota rows are locked below one event at a time, in batch order; two nodes
    // committing batches for the same orgs in another order would deadlock. Locking the
    // existing rows first, sorted by org, makes every batch take them in one order.
    let mut orgs: Vec<&str> = batch
        .iter()
        .filter(|e| !e.files.is_empty())
        .map(|e| e.org.as_str())
        .collect();
    orgs.sort_unstable();
    orgs.dedup();
    if orgs.len() > 1 {
        tx.query(
            "SELECT org FROM org_usage WHERE org = ANY($1) ORDER BY org FOR UPDATE",
            &[&orgs],
        )
        .await?;
    }
    let mut new_jobs = Vec::new();
    let at = Utc::now();
    let now = micros(at);
    // Jobs inserted already claimed by this node (its scheduler is handed them directly):
    // the same claim and lease `jobs` takes, so no node polls them while the lease runs.
    let claim = lease.map(|l| ClaimId::new(&l.node));
    let claim_text = claim.as_ref().map(|c| c.0.as_str());
    let lease_until = lease.map(|l| {
        micros(at + chrono::Duration::from_std(l.length).unwrap_or(chrono::Duration::hours(1)))
    });
    let ins_event = tx
        .prepare_cached(
            "INSERT INTO events (org, id, envelope, result, files_pending, created_at, charged)
             VALUES ($1, $2, $3, $4, $5, $6, TRUE) ON CONFLICT (org, id) DO NOTHING",
        )
        .await?;
    let find = tx
        .prepare_cached(
            "SELECT result, files_pending, envelope, charged FROM events WHERE org = $1 AND id = $2",
        )
        .await?;
    let ins_delivery = tx
        .prepare_cached(
            "INSERT INTO deliveries (id, org, webhook_id, event_id, status, attempts, next_attempt_at, created_at, updated_at, claim, lease_until)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $6, $6, $7, $8)",
        )
        .await?;
    let pending = DeliveryStatus::Pending.as_str();
    let mut out = Vec::with_capacity(batch.len());
    for ev in batch {
        let result = IngestResult {
            id: ev.id.clone(),
            files: ev.files.clone(),
            deliveries: ev.deliveries.iter().map(|(d, _)| d.clone()).collect(),
        };
        let result_json = to_json(&result)?;
        // Idempotency is the primary key: a concurrent insert of the same id on another
        // node waits for that commit and then inserts nothing.
        let inserted = tx
            .execute(
                &ins_event,
                &[
                    &ev.org,
                    &ev.id,
                    &ev.envelope_json,
                    &result_json,
                    &!ev.files.is_empty(),
                    &now,
                ],
            )
            .await?;
        if inserted == 0 {
            let r = tx.query_one(&find, &[&ev.org, &ev.id]).await?;
            let text: String = get(&r, 0)?;
            let result: IngestResult =
                serde_json::from_str(&text).map_err(|e| StoreError::Db(e.to_string()))?;
            let files_pending: bool = get(&r, 1)?;
            let envelope: String = get(&r, 2)?;
            let charged: bool = get(&r, 3)?;
            if files_pending && !charged {
                // Deferred earlier: the repost gets its files written if they fit now.
                let (files, bytes) = file_usage(result.files.len(), envelope.len());
                if let Err(why) = usage::charge(&tx, &ev.org, ev.quota, files, bytes).await? {
                    out.push(CommitOutcome::Deferred { result, why });
                    continue;
                }
                tx.execute(
                    "UPDATE events SET charged = TRUE WHERE org = $1 AND id = $2",
                    &[&ev.org, &ev.id],
                )
                .await?;
            }
            let pending_envelope = files_pending.then_some(envelope);
            out.push(CommitOutcome::Known {
                result,
                pending_envelope,
            });
            continue;
        }
        // New: its files are charged against the quota in this transaction; if they do
        // not fit, the event stays recorded with its files deferred (not charged).
        let (files, bytes) = ev.usage();
        let over = if files > 0 {
            usage::charge(&tx, &ev.org, ev.quota, files, bytes)
                .await?
                .err()
        } else {
            None
        };
        if over.is_some() {
            tx.execute(
                "UPDATE events SET charged = FALSE WHERE org = $1 AND id = $2",
                &[&ev.org, &ev.id],
            )
            .await?;
        }
        for (did, wid) in &ev.deliveries {
            tx.execute(
                &ins_delivery,
                &[
                    did,
                    &ev.org,
                    wid,
                    &ev.id,
                    &pending,
                    &now,
                    &claim_text,
                    &lease_until,
                ],
            )
            .await?;
            new_jobs.push(did.clone());
        }
        usage::stage_lines(&tx, ev).await?;
        out.push(match over {
            Some(why) => CommitOutcome::Deferred { result, why },
            None => CommitOutcome::New(result),
        });
    }
    // Other nodes need no wake-up for jobs this node claimed; unclaimed ones are theirs too.
    if !new_jobs.is_empty() && claim.is_none() {
        super::notify::notify(&tx, &s.origin).await?;
    }
    tx.commit().await?;
    Ok(CommitClaim {
        outcomes: out,
        inserted: new_jobs,
        claim,
    })
}

async fn mark_done(
    tx: &deadpool_postgres::Transaction<'_>,
    done: &[(String, String)],
) -> Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    let (orgs, ids): (Vec<&str>, Vec<&str>) =
        done.iter().map(|(o, i)| (o.as_str(), i.as_str())).unzip();
    tx.execute(
        "UPDATE events e SET files_pending = FALSE FROM unnest($1::text[], $2::text[]) AS d(org, id)
         WHERE e.org = d.org AND e.id = d.id AND e.files_pending",
        &[&orgs, &ids],
    )
    .await?;
    Ok(())
}

pub(super) async fn mark_files_done(s: &PostgresStore, done: Vec<(String, String)>) -> Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    let mut c = s.conn().await?;
    let tx = c.transaction().await?;
    mark_done(&tx, &done).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn pending_files(s: &PostgresStore) -> Result<Vec<PendingFiles>> {
    let c = s.conn().await?;
    let rows = c
        .query(
            "SELECT org, id, envelope, result FROM events WHERE files_pending AND charged",
            &[],
        )
        .await?;
    let pending = rows
        .iter()
        .map(|r| {
            let result: String = get(r, 3)?;
            let files = serde_json::from_str::<IngestResult>(&result)
                .map_err(|e| StoreError::Db(format!("event result: {e}")))?
                .files;
            Ok(PendingFiles {
                org: get(r, 0)?,
                id: get(r, 1)?,
                envelope_json: get(r, 2)?,
                files,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    usage::without_taken(&c, pending).await
}

/// Due jobs outside `busy`, oldest first. With `busy.lease`
/// the jobs are claimed in the same statement (`FOR UPDATE SKIP LOCKED`, a fresh claim id,
/// `lease_until`), so two nodes never get the same job while its lease runs; an expired
/// lease is claimable again, which is how a dead node's jobs are taken over.
pub(super) async fn jobs(
    s: &PostgresStore,
    now: DateTime<Utc>,
    limit: usize,
    busy: Busy,
) -> Result<Vec<DeliveryJob>> {
    let hook_cols = super::HOOK_COLS
        .split(", ")
        .map(|c| format!("w.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut c = s.conn().await?;
    let claim = busy.lease.as_ref().map(|l| ClaimId::new(&l.node));
    let lease_until = busy.lease.as_ref().map(|l| {
        micros(now + chrono::Duration::from_std(l.length).unwrap_or(chrono::Duration::hours(1)))
    });
    // The status literals match the partial index `deliveries_due` (DeliveryStatus::OPEN).
    let due = "d.status IN ('pending', 'failed') AND d.next_attempt_at <= $1
           AND (d.lease_until IS NULL OR d.lease_until < $1)
           AND NOT (d.id = ANY($3)) AND NOT (d.webhook_id = ANY($4))";
    let sql = if claim.is_some() {
        // `old_claim`: a claim still on a due job is one whose lease expired (outcomes and
        // hand-backs clear it), i.e. a takeover.
        format!(
            "WITH o AS (
               SELECT d.id, d.claim AS old_claim FROM deliveries d WHERE {due}
               ORDER BY d.next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED),
             c AS (
               UPDATE deliveries u SET claim = $5, lease_until = $6 FROM o WHERE u.id = o.id
               RETURNING u.id, u.org, u.webhook_id, u.event_id, u.attempts, u.created_at, u.next_attempt_at, o.old_claim)
             SELECT d.id, d.org, d.webhook_id, d.event_id, e.envelope, d.attempts, d.created_at, w.id IS NOT NULL, {hook_cols}, d.old_claim
             FROM c d JOIN events e ON e.org = d.org AND e.id = d.event_id
             LEFT JOIN webhooks w ON w.id = d.webhook_id AND w.org = d.org
             ORDER BY d.next_attempt_at"
        )
    } else {
        format!(
            "SELECT d.id, d.org, d.webhook_id, d.event_id, e.envelope, d.attempts, d.created_at, w.id IS NOT NULL, {hook_cols}, NULL::text
             FROM deliveries d JOIN events e ON e.org = d.org AND e.id = d.event_id
             LEFT JOIN webhooks w ON w.id = d.webhook_id AND w.org = d.org
             WHERE {due}
             ORDER BY d.next_attempt_at LIMIT $2"
        )
    };
    let claim_text = claim.as_ref().map(|c| c.0.as_str());
    let now_us = micros(now);
    let limit = limit as i64;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&now_us, &limit, &busy.deliveries, &busy.webhooks];
    if claim.is_some() {
        params.push(&claim_text);
        params.push(&lease_until);
    }
    let tx = c.transaction().await?;
    tx.batch_execute(KEYED_PLANS).await?;
    let rows = tx.query(&sql, &params).await?;
    tx.commit().await?;
    // A poll's jobs mostly share a few webhooks: each is decoded (and its secret opened)
    // once per poll, as SQLite's `due_jobs` does, not once per row.
    let mut hooks: std::collections::HashMap<String, Webhook> = Default::default();
    rows.iter()
        .map(|r| {
            let has_hook: bool = get(r, 7)?;
            let webhook = if has_hook {
                let id: String = get(r, 8)?;
                Some(match hooks.get(&id) {
                    Some(w) => w.clone(),
                    None => {
                        let w = hook_row(r, 8, &s.secrets)?;
                        hooks.insert(id, w.clone());
                        w
                    }
                })
            } else {
                None
            };
            Ok(DeliveryJob {
                id: get(r, 0)?,
                org: get(r, 1)?,
                webhook_id: get(r, 2)?,
                event_id: get(r, 3)?,
                payload: get(r, 4)?,
                attempts: get::<i32>(r, 5)? as u32,
                created_at: time_at(r, 6)?,
                webhook,
                claim: claim.clone(),
                took_over: get::<Option<String>>(r, 20)?.map(ClaimId),
            })
        })
        .collect()
}

pub(super) async fn next_due_at(s: &PostgresStore, busy: Busy) -> Result<Option<DateTime<Utc>>> {
    let c = s.conn().await?;
    let r = c
        .query_one(
            // A job leased by another node is due again when its lease expires.
            "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0))) FROM deliveries
             WHERE status IN ('pending', 'failed')
               AND NOT (id = ANY($1)) AND NOT (webhook_id = ANY($2))",
            &[&busy.deliveries, &busy.webhooks],
        )
        .await?;
    opt_time_at(&r, 0)
}

pub(super) async fn list_deliveries(
    s: &PostgresStore,
    org: &str,
    webhook_id: &str,
    status: Option<DeliveryStatus>,
    limit: usize,
) -> Result<Vec<Delivery>> {
    let selected: Option<Vec<&str>> =
        DeliveryStatus::selected_by(status).map(|v| v.iter().map(|s| s.as_str()).collect());
    let c = s.conn().await?;
    let rows = c
        .query(
            "SELECT id, org, webhook_id, event_id, status, attempts, next_attempt_at, last_status, last_error, created_at, updated_at
             FROM deliveries WHERE org = $1 AND webhook_id = $2 AND ($3::text[] IS NULL OR status = ANY($3))
             ORDER BY created_at DESC LIMIT $4",
            &[&org, &webhook_id, &selected, &(limit as i64)],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    let at = c
        .prepare_cached(
            "SELECT at, status, latency_ms, error, response_excerpt, outcome FROM attempts
             WHERE delivery_id = $1 ORDER BY at, seq",
        )
        .await?;
    for r in &rows {
        let st: String = get(r, 4)?;
        let id: String = get(r, 0)?;
        let log = c.query(&at, &[&id]).await?;
        let attempt_log = log
            .iter()
            .map(|a| {
                let outcome: String = get(a, 5)?;
                let status = get::<Option<i32>>(a, 1)?.map(|s| s as u16);
                Ok(Attempt {
                    at: time_at(a, 0)?,
                    result: AttemptResult::parse(&outcome, status).ok_or_else(|| {
                        StoreError::Db(format!(
                            "attempt outcome {outcome:?} with status {status:?}"
                        ))
                    })?,
                    latency_ms: get::<i64>(a, 2)?.max(0) as u64,
                    error: get(a, 3)?,
                    response_excerpt: get(a, 4)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Delivery {
            org: get(r, 1)?,
            webhook_id: get(r, 2)?,
            event_id: get(r, 3)?,
            status: DeliveryStatus::parse(&st)
                .ok_or_else(|| StoreError::Db(format!("delivery {id}: unknown status {st:?}")))?,
            attempts: get::<i32>(r, 5)? as u32,
            next_attempt_at: opt_time_at(r, 6)?,
            last_status: get::<Option<i32>>(r, 7)?.map(|s| s as u16),
            last_error: get(r, 8)?,
            created_at: time_at(r, 9)?,
            updated_at: time_at(r, 10)?,
            attempt_log,
            id,
        });
    }
    Ok(out)
}

pub(super) async fn replay(
    s: &PostgresStore,
    org: &str,
    webhook_id: &str,
    delivery_id: Option<&str>,
    since: Option<DateTime<Utc>>,
) -> Result<u64> {
    let mut c = s.conn().await?;
    let tx = c.transaction().await?;
    let now = micros(Utc::now());
    let pending = DeliveryStatus::Pending.as_str();
    let n = match delivery_id {
        Some(did) => {
            tx.execute(
                "UPDATE deliveries SET status = $5, attempts = 0, next_attempt_at = $4, updated_at = $4
                 WHERE org = $1 AND webhook_id = $2 AND id = $3",
                &[&org, &webhook_id, &did, &now, &pending],
            )
            .await?
        }
        None => {
            tx.execute(
                "UPDATE deliveries SET status = $5, attempts = 0, next_attempt_at = $4, updated_at = $4
                 WHERE org = $1 AND webhook_id = $2 AND created_at >= $3",
                &[&org, &webhook_id, &since.map(micros).unwrap_or(0), &now, &pending],
            )
            .await?
        }
    };
    if n > 0 {
        super::notify::notify(&tx, &s.origin).await?;
    }
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn record_downloads(
    s: &PostgresStore,
    files: Vec<(String, String)>,
) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let now = micros(Utc::now());
    let mut seen = std::collections::HashSet::new();
    // ON CONFLICT cannot touch one row twice in a statement: one entry per file.
    let (orgs, paths): (Vec<&str>, Vec<&str>) = files
        .iter()
        .filter(|f| seen.insert((f.0.as_str(), f.1.as_str())))
        .map(|(o, p)| (o.as_str(), p.as_str()))
        .unzip();
    let c = s.conn().await?;
    c.execute(
        "INSERT INTO downloads (org, path, at) SELECT org, path, $3 FROM unnest($1::text[], $2::text[]) AS f(org, path)
         ON CONFLICT (org, path) DO UPDATE SET at = excluded.at",
        &[&orgs, &paths, &now],
    )
    .await?;
    Ok(())
}

pub(super) async fn move_downloads(
    s: &PostgresStore,
    org: &str,
    from: &str,
    to: &str,
) -> Result<()> {
    let mut c = s.conn().await?;
    let tx = c.transaction().await?;
    // The file itself, or everything below the folder `from/`; a record already at the
    // target is replaced (as SQLite's UPDATE OR REPLACE does).
    let below = format!("{from}/");
    tx.execute(
        "DELETE FROM downloads WHERE org = $1 AND path IN (
            SELECT $3 || substr(path, length($2) + 1) FROM downloads
            WHERE org = $1 AND (path = $2 OR substr(path, 1, length($4)) = $4))",
        &[&org, &from, &to, &below],
    )
    .await?;
    tx.execute(
        "UPDATE downloads SET path = $3 || substr(path, length($2) + 1)
         WHERE org = $1 AND (path = $2 OR substr(path, 1, length($4)) = $4)",
        &[&org, &from, &to, &below],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `Store::release_claims`: only jobs still held under `claim` (an outcome or another
/// node's takeover since is left alone).
pub(super) async fn release_claims(
    s: &PostgresStore,
    claim: &ClaimId,
    ids: Vec<String>,
) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let c = s.conn().await?;
    let n = c
        .execute(
            "UPDATE deliveries SET claim = NULL, lease_until = NULL
             WHERE claim = $1 AND id = ANY($2)",
            &[&claim.0, &ids],
        )
        .await?;
    if n > 0 {
        // Due now for any node: wake the others (this one polls on its own).
        super::notify::notify(&c, &s.origin).await?;
    }
    Ok(n)
}

/// `Store::release_node_claims`: jobs by a prefix match on the claim (not LIKE: node ids may
/// hold `_`), roll-up partitions by their lease's node.
pub(super) async fn release_node_claims(s: &PostgresStore, node: &str) -> Result<u64> {
    let c = s.conn().await?;
    let prefix = ClaimId::node_prefix(node);
    let jobs = c
        .execute(
            "UPDATE deliveries SET claim = NULL, lease_until = NULL
             WHERE claim IS NOT NULL AND left(claim, length($1)) = $1",
            &[&prefix],
        )
        .await?;
    let partitions = c
        .execute(
            "UPDATE rollup_partitions SET lease_until = NULL, lease_node = NULL
             WHERE lease_node = $1 AND lease_until IS NOT NULL",
            &[&node],
        )
        .await?;
    if jobs > 0 {
        // Due now for any node: wake the others.
        super::notify::notify(&c, &s.origin).await?;
    }
    Ok(jobs + partitions)
}
