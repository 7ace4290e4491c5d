//! The delivery queue on SQLite: due jobs, attempts and their outcomes, the delivery log
//! and replays.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::super::health::{AttemptRecord, HookEffect};
use super::super::rows::*;
use super::super::*;
use super::{Rows, SqliteStore};

impl SqliteStore {
    /// Due jobs outside `busy`, oldest first.
    async fn jobs(&self, now: DateTime<Utc>, limit: usize, busy: Busy) -> Result<Vec<DeliveryJob>> {
        let sb = self.secrets.clone();
        self.with_reader(move |c, q| {
            let mut busy = busy;
            busy.deliveries.extend(q.keys("deliveries"));
            let (ids, hooks) = busy.to_json();
            let hook_cols = HOOK_COLS
                .split(", ")
                .map(|c| format!("w.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut st = c.prepare_cached(&format!(
                "SELECT d.id, d.org, d.webhook_id, d.event_id, e.envelope, d.attempts, d.created_at, w.id IS NOT NULL, {hook_cols}
                 FROM deliveries d JOIN events e ON e.org = d.org AND e.id = d.event_id
                 LEFT JOIN webhooks w ON w.id = d.webhook_id AND w.org = d.org
                 WHERE d.status IN ('pending', 'failed') AND d.next_attempt_at <= ?1
                   AND d.id NOT IN (SELECT value FROM json_each(?3))
                   AND d.webhook_id NOT IN (SELECT value FROM json_each(?4))
                 ORDER BY d.next_attempt_at LIMIT ?2"
            ))?;
            // Jobs of one webhook share its row: parse it once per query.
            let mut hooks_seen: std::collections::HashMap<(String, String), Webhook> =
                Default::default();
            let rows = st
                .query_map(params![micros(now), limit as i64, ids, hooks], |r| {
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
                    Ok(DeliveryJob {
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
                    })
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
            Ok(rows)
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

pub(super) async fn record_attempts(s: &SqliteStore, batch: Vec<AttemptRecord>) -> Result<()> {
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
            for rec in &batch {
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
