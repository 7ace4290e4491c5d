//! The delivery queue on SQLite: due jobs, attempts and their outcomes, the delivery log
//! and replays.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::super::health::{AttemptRecord, HookEffect};
use super::super::rows::*;
use super::super::*;
use super::{Rows, SqliteStore};

/// Candidates a poll reads beyond its limit (see `jobs`).
const SPARE: usize = 16;

impl SqliteStore {
    /// Due jobs outside `busy`, oldest first.
    ///
    /// Two steps in one read transaction. The jobs in flight are the oldest due rows, so a
    /// poll passes all of them (up to workers × 9 and the queues) before it finds new
    /// ones: step 1 walks the due index alone (it holds id, webhook and status) and skips
    /// the busy ones in memory, without reading their rows, and without SQLite building a
    /// temporary index of the busy ids at every poll (as `NOT IN json_each(…)` did). Step 2
    /// reads just the chosen jobs, by id: their rows, events and webhooks are most of what
    /// a poll costs now.
    async fn jobs(&self, now: DateTime<Utc>, limit: usize, busy: Busy) -> Result<Vec<DeliveryJob>> {
        let sb = self.secrets.clone();
        self.with_reader(move |c, q| {
            let Busy { deliveries, webhooks, .. } = busy;
            let mut skip: std::collections::HashSet<String> = deliveries.into_iter().collect();
            skip.extend(q.keys("deliveries"));
            let deep: std::collections::HashSet<String> = webhooks.into_iter().collect();
            let tx = c.unchecked_transaction()?;
            // A few more than asked for: a job step 2 cannot hand out (its event row gone)
            // must not make a full poll look like the end of the backlog.
            let want = limit + SPARE;
            let mut chosen: Vec<String> = Vec::with_capacity(want);
            {
                let mut st = tx.prepare_cached(
                    "SELECT id, webhook_id FROM deliveries
                     WHERE status IN ('pending', 'failed') AND next_attempt_at <= ?1
                     ORDER BY next_attempt_at",
                )?;
                let mut rows = st.query(params![micros(now)])?;
                while chosen.len() < want {
                    let Some(r) = rows.next()? else { break };
                    let id = match r.get_ref(0)?.as_str() {
                        Ok(id) => id,
                        Err(_) => {
                            // Not text: no job can be built from it (step 2 looks ids up as
                            // text). Reported once, like any corrupt row.
                            q.report(&Corrupt {
                                table: "deliveries",
                                key: format!("{:?}", r.get_ref(0)?),
                                why: "id is not text".into(),
                            });
                            continue;
                        }
                    };
                    if skip.contains(id)
                        || r.get_ref(1)?.as_str().is_ok_and(|h| deep.contains(h))
                    {
                        continue;
                    }
                    chosen.push(id.to_owned());
                }
            }
            if chosen.is_empty() {
                return Ok(Vec::new());
            }
            let hook_cols = HOOK_COLS
                .split(", ")
                .map(|c| format!("w.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let order_col = 8 + HOOK_COLS.split(", ").count();
            // CROSS JOIN: the chosen ids drive the join (a primary key look-up each).
            let mut st = tx.prepare_cached(&format!(
                "SELECT d.id, d.org, d.webhook_id, d.event_id, e.envelope, d.attempts, d.created_at, w.id IS NOT NULL, {hook_cols}, j.key
                 FROM json_each(?1) j CROSS JOIN deliveries d ON d.id = j.value
                 JOIN events e ON e.org = d.org AND e.id = d.event_id
                 LEFT JOIN webhooks w ON w.id = d.webhook_id AND w.org = d.org
                 WHERE d.status IN ('pending', 'failed') AND d.next_attempt_at <= ?2"
            ))?;
            let list = serde_json::to_string(&chosen).map_err(|e| StoreError::Db(e.to_string()))?;
            // Jobs of one webhook share its row: parse it once per query.
            let mut hooks_seen: std::collections::HashMap<(String, String), Webhook> =
                Default::default();
            let mut rows: Vec<(i64, DeliveryJob)> = st
                .query_map(params![list, micros(now)], |r| {
                    // A job whose own row or webhook row is corrupt is skipped, and kept
                    // out of later queries under its own id.
                    keyed("deliveries", r, 0, |r| {
                    let webhook = if r.get::<_, bool>(7)? {
                        let id: (String, String) = (r.get(9)?, r.get(8)?);
                        match hooks_seen.get(&id) {
                            Some(h) => Some(h.clone()),
                            None => {
                                let h = hook_row_at(r, 8, &sb)?;
                                hooks_seen.insert(id, h.clone());
                                Some(h)
                            }
                        }
                    } else {
                        None
                    };
                    Ok((r.get(order_col)?, DeliveryJob {
                        claim: None,
                        took_over: None,
                        id: r.get(0)?,
                        org: r.get(1)?,
                        webhook_id: r.get(2)?,
                        event_id: r.get(3)?,
                        payload: r.get(4)?,
                        attempts: r.get(5)?,
                        created_at: time(r, 6)?,
                        webhook,
                    }))
                    })
                    .map_err(|e| match as_corrupt(&e) {
                        Some(c) if c.table != "deliveries" => {
                            q.report(c);
                            let key = r.get::<_, String>(0).unwrap_or_default();
                            rusqlite::Error::FromSqlConversionFailure(
                                0,
                                rusqlite::types::Type::Null,
                                Box::new(Corrupt { table: "deliveries", key, why: c.to_string() }),
                            )
                        }
                        _ => e,
                    })
                })?
                .rows(q)?;
            // In due order: the join runs in list order, and the sort makes that a guarantee
            // rather than a query plan.
            rows.sort_by_key(|(k, _)| *k);
            rows.truncate(limit);
            Ok(rows.into_iter().map(|(_, j)| j).collect())
        })
        .await
    }
}

pub(super) async fn due_jobs(
    s: &SqliteStore,
    now: DateTime<Utc>,
    limit: usize,
    busy: Busy,
) -> Result<Vec<DeliveryJob>> {
    s.jobs(now, limit, busy).await
}

pub(super) async fn next_due_at(s: &SqliteStore, busy: Busy) -> Result<Option<DateTime<Utc>>> {
    s.with_reader(move |c, q| {
        let mut busy = busy;
        busy.deliveries.extend(q.keys("deliveries"));
        let (ids, hooks) = busy.to_json();
        let v: Option<i64> = c.query_row(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE status IN ('pending', 'failed')
               AND id NOT IN (SELECT value FROM json_each(?1))
               AND webhook_id NOT IN (SELECT value FROM json_each(?2))",
            params![ids, hooks],
            |r| r.get(0),
        )?;
        Ok(v.and_then(from_micros))
    })
    .await
}

pub(super) async fn record_attempts(s: &SqliteStore, batch: Arc<[AttemptRecord]>) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    s.with_writer(move |c| {
        let tx = c.transaction()?;
        let now = micros(Utc::now());
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO attempts (delivery_id, at, status, latency_ms, error, response_excerpt, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut upd = tx.prepare_cached(
                "UPDATE deliveries SET status = ?2, attempts = attempts + 1, next_attempt_at = ?3, last_status = ?4,
                   last_error = ?5, updated_at = ?6 WHERE id = ?1",
            )?;
            let mut ok_hook = tx.prepare_cached(
                "UPDATE webhooks SET failing_since = NULL WHERE id = ?1 AND failing_since IS NOT NULL",
            )?;
            let mut failing_hook = tx.prepare_cached(
                "UPDATE webhooks SET failing_since = ?2 WHERE id = ?1 AND failing_since IS NULL",
            )?;
            let mut disable = tx.prepare_cached(
                "UPDATE webhooks SET enabled = 0, disabled_reason = ?2 WHERE id = ?1",
            )?;
            // The effect last applied per webhook in this batch: applying "healthy" or
            // "failing since (if unset)" again right after changes nothing, so it is
            // skipped (one statement per webhook, not per job). The rule deciding the
            // effect is `health::hook_effect`, not this code.
            let mut last: std::collections::HashMap<&str, u8> = Default::default();
            const OK: u8 = 1;
            const FAILING: u8 = 2;
            const DISABLED: u8 = 3;
            for rec in batch.iter() {
                let (job, a) = (&rec.job, &rec.attempt);
                ins.execute(params![
                    job.id,
                    micros(a.at),
                    a.status(),
                    a.latency_ms as i64,
                    a.error,
                    a.response_excerpt,
                    a.result.as_str()
                ])?;
                let (status, next) = rec.outcome.job_state();
                upd.execute(params![job.id, status.as_str(), next.map(micros), a.status(), a.error, now])?;
                let hook = job.webhook_id.as_str();
                match &rec.hook {
                    HookEffect::Healthy => {
                        if last.insert(hook, OK) != Some(OK) {
                            ok_hook.execute([hook])?;
                        }
                    }
                    HookEffect::Disable { reason } => {
                        disable.execute(params![hook, reason])?;
                        last.insert(hook, DISABLED);
                    }
                    HookEffect::Failing { at } => {
                        if last.insert(hook, FAILING) != Some(FAILING) {
                            failing_hook.execute(params![hook, micros(*at)])?;
                        }
                    }
                    HookEffect::None => {}
                }
            }
        }
        tx.commit()?;
        Ok(())
    })
    .await
}

pub(super) async fn list_deliveries(
    s: &SqliteStore,
    org: &str,
    webhook_id: &str,
    status: Option<DeliveryStatus>,
    limit: usize,
) -> Result<Vec<Delivery>> {
    let (org, wid) = (org.to_owned(), webhook_id.to_owned());
    s.with_reader(move |c, q| {
        // Which statuses the filter selects is `DeliveryStatus::selected_by`'s rule.
        let selected = DeliveryStatus::selected_by(status)
            .map(|v| serde_json::to_string(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>()))
            .transpose()
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let mut st = c.prepare_cached(&format!(
            "SELECT {DELIVERY_COLS} FROM deliveries WHERE org = ?1 AND webhook_id = ?2
               AND (?3 IS NULL OR status IN (SELECT value FROM json_each(?3)))
             ORDER BY created_at DESC LIMIT ?4"
        ))?;
        let mut rows = st
            .query_map(params![org, wid, selected, limit as i64], delivery_row)?
            .rows(q)?;
        let mut at = c.prepare_cached(
            "SELECT delivery_id, at, status, latency_ms, error, response_excerpt, outcome FROM attempts WHERE delivery_id = ?1 ORDER BY at",
        )?;
        for d in &mut rows {
            d.attempt_log = at.query_map([&d.id], attempt_row)?.rows(q)?;
        }
        Ok(rows)
    })
    .await
}

pub(super) async fn replay(
    s: &SqliteStore,
    org: &str,
    webhook_id: &str,
    delivery_id: Option<&str>,
    since: Option<DateTime<Utc>>,
) -> Result<u64> {
    let (org, wid, did) = (
        org.to_owned(),
        webhook_id.to_owned(),
        delivery_id.map(str::to_owned),
    );
    s.with_writer(move |c| {
        let now = micros(Utc::now());
        let n = match did {
            Some(did) => c.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?4, updated_at = ?4
                 WHERE org = ?1 AND webhook_id = ?2 AND id = ?3",
                params![org, wid, did, now],
            )?,
            None => c.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?4, updated_at = ?4
                 WHERE org = ?1 AND webhook_id = ?2 AND created_at >= ?3",
                params![org, wid, since.map(micros).unwrap_or(0), now],
            )?,
        };
        Ok(n as u64)
    })
    .await
}

pub(super) async fn queue_stats(s: &SqliteStore) -> Result<(u64, Option<DateTime<Utc>>)> {
    s.with_reader(|c, _| {
        let (n, oldest): (i64, Option<i64>) = c.query_row(
            "SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status IN ('pending', 'failed')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n as u64, oldest.and_then(from_micros)))
    })
    .await
}
