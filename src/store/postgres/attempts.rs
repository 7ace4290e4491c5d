//! Delivery outcomes on PostgreSQL: each recorded only under the claim that made it, with
//! its attempt log entry and its effect on the webhook's health, in one transaction.

use chrono::Utc;

use super::super::health::{AttemptRecord, HookEffect};
use super::super::rows::micros;
use super::super::*;
use super::PostgresStore;

pub(super) async fn record_attempts(s: &PostgresStore, batch: Vec<AttemptRecord>) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut c = s.conn().await?;
    let tx = c.transaction().await?;
    let now = micros(Utc::now());
    let ins = tx
        .prepare_cached(
            "INSERT INTO attempts (delivery_id, at, status, latency_ms, error, response_excerpt, outcome)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    let upd = tx
        .prepare_cached(
            "UPDATE deliveries SET status = $2, attempts = attempts + 1, next_attempt_at = $3, last_status = $4,
               last_error = $5, updated_at = $6, claim = NULL, lease_until = NULL
             WHERE id = $1 AND claim IS NOT DISTINCT FROM $7",
        )
        .await?;
    let ok_hook = tx
        .prepare_cached(
            "UPDATE webhooks SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
        )
        .await?;
    let failing_hook = tx
        .prepare_cached(
            "UPDATE webhooks SET failing_since = $2 WHERE id = $1 AND failing_since IS NULL",
        )
        .await?;
    let disable = tx
        .prepare_cached("UPDATE webhooks SET enabled = FALSE, disabled_reason = $2 WHERE id = $1")
        .await?;
    // The statements of a batch are pipelined (sent together, answered in order): one
    // round trip per phase instead of several per job, so outcomes are durable sooner and
    // a crash repeats fewer deliveries. Phase 1 applies each outcome under its claim.
    type Pending<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>,
    >;
    struct Row<'a> {
        st: &'static str,
        next: Option<i64>,
        status: Option<i32>,
        claim: Option<&'a str>,
        at: i64,
        latency: i64,
        result: &'static str,
        failing_at: Option<i64>,
    }
    let rows: Vec<Row> = batch
        .iter()
        .map(|rec| {
            let (st, next) = rec.outcome.job_state();
            Row {
                st: st.as_str(),
                next: next.map(micros),
                status: rec.attempt.status().map(i32::from),
                claim: rec.job.claim.as_ref().map(|c| c.0.as_str()),
                at: micros(rec.attempt.at),
                latency: rec.attempt.latency_ms as i64,
                result: rec.attempt.result.as_str(),
                failing_at: match &rec.hook {
                    HookEffect::Failing { at } => Some(micros(*at)),
                    _ => None,
                },
            }
        })
        .collect();
    // Async blocks own each statement's parameter list (borrowing only the batch).
    let txr = &tx;
    let (upd, ins, ok_hook, failing_hook, disable) =
        (&upd, &ins, &ok_hook, &failing_hook, &disable);
    let now = &now;
    let updates: Vec<Pending> = batch
        .iter()
        .zip(&rows)
        .map(|(rec, r)| -> Pending {
            Box::pin(async move {
                txr.execute(
                    upd,
                    &[
                        &rec.job.id,
                        &r.st,
                        &r.next,
                        &r.status,
                        &rec.attempt.error,
                        now,
                        &r.claim,
                    ],
                )
                .await
            })
        })
        .collect();
    let updated = futures::future::try_join_all(updates).await?;
    // Phase 2: the attempt log and the webhook effects of the outcomes that stood.
    // As on SQLite: an effect just applied to a webhook is not applied again in this batch.
    let mut last: std::collections::HashMap<&str, u8> = Default::default();
    // A retry recorded here falls due later; other nodes learn when (should this one
    // die before then) from the wake-up, which makes them read the outbox's next due time.
    let mut retries = false;
    const OK: u8 = 1;
    const FAILING: u8 = 2;
    const DISABLED: u8 = 3;
    let mut writes: Vec<Pending> = Vec::with_capacity(batch.len() * 2);
    for ((rec, r), n) in batch.iter().zip(&rows).zip(updated) {
        let (job, a) = (&rec.job, &rec.attempt);
        if n == 0 {
            // The lease ran out and another claim took the job (or it was deleted): that
            // claimer's outcome stands; this one is not recorded (at-least-once delivery).
            tracing::warn!(delivery = %job.id, "outcome of an expired claim not recorded; the job was claimed again");
            continue;
        }
        retries |= r.next.is_some();
        writes.push(Box::pin(async move {
            txr.execute(
                ins,
                &[
                    &job.id,
                    &r.at,
                    &r.status,
                    &r.latency,
                    &a.error,
                    &a.response_excerpt,
                    &r.result,
                ],
            )
            .await
        }));
        let hook = &job.webhook_id;
        match &rec.hook {
            HookEffect::Healthy => {
                if last.insert(hook, OK) != Some(OK) {
                    writes.push(Box::pin(async move { txr.execute(ok_hook, &[hook]).await }));
                }
            }
            HookEffect::Disable { reason } => {
                writes.push(Box::pin(async move {
                    txr.execute(disable, &[hook, reason]).await
                }));
                last.insert(hook, DISABLED);
            }
            HookEffect::Failing { .. } => {
                if last.insert(hook, FAILING) != Some(FAILING) {
                    writes.push(Box::pin(async move {
                        txr.execute(failing_hook, &[hook, &r.failing_at]).await
                    }));
                }
            }
            HookEffect::None => {}
        }
    }
    futures::future::try_join_all(writes).await?;
    if retries {
        super::notify::notify(&tx, &s.origin).await?;
    }
    tx.commit().await?;
    Ok(())
}
