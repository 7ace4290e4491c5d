//! Delivery outcomes on PostgreSQL: each recorded only under the claim that made it, with
//! its attempt log entry and its effect on the webhook's health, in one transaction.

use std::sync::Arc;

use chrono::Utc;

use super::super::health::{AttemptRecord, HookEffect};
use super::super::rows::micros;
use super::super::*;
use super::PostgresStore;

pub(super) async fn record_attempts(s: &PostgresStore, batch: Arc<[AttemptRecord]>) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut c = s.conn().await?;
    let tx = c.transaction().await?;
    tx.batch_execute(super::queue::KEYED_PLANS).await?;
    let now = micros(Utc::now());
    let mut retries = false;
    // One set-based pass per run of distinct jobs: a job recorded twice in one batch (not
    // what the scheduler sends, but the contract allows it) sees its outcomes in order.
    let mut start = 0;
    while start < batch.len() {
        let mut seen = std::collections::HashSet::new();
        let end = batch[start..]
            .iter()
            .position(|r| !seen.insert(r.job.id.as_str()))
            .map_or(batch.len(), |n| start + n);
        retries |= apply(&tx, &batch[start..end], now).await?;
        start = end;
    }
    // A retry recorded here falls due later; other nodes learn when (should this one
    // die before then) from the wake-up, which makes them read the outbox's next due time.
    if retries {
        super::notify::notify(&tx, &s.origin).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Records `batch` (distinct jobs) in `tx`; true when a retry was recorded.
async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &[AttemptRecord],
    now: i64,
) -> Result<bool> {
    // Outcomes and attempt log entries go in as arrays, one statement each for the whole
    // batch: PostgreSQL parses, plans and runs each once instead of once per job, which is
    // most of its cost per delivery. Phase 1 applies each outcome under its claim; the ids
    // it returns are the outcomes that stood.
    let mut ids = Vec::with_capacity(batch.len());
    let mut states = Vec::with_capacity(batch.len());
    let mut nexts = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut errors = Vec::with_capacity(batch.len());
    let mut claims = Vec::with_capacity(batch.len());
    for rec in batch {
        let (st, next) = rec.outcome.job_state();
        ids.push(rec.job.id.as_str());
        states.push(st.as_str());
        nexts.push(next.map(micros));
        statuses.push(rec.attempt.status().map(i32::from));
        errors.push(rec.attempt.error.as_deref());
        claims.push(rec.job.claim.as_ref().map(|c| c.0.as_str()));
    }
    let upd = tx
        .prepare_cached(
            "UPDATE deliveries d SET status = u.st, attempts = d.attempts + 1, next_attempt_at = u.next,
               last_status = u.status, last_error = u.error, updated_at = $1, claim = NULL, lease_until = NULL
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[], $7::text[])
               AS u(id, st, next, status, error, claim)
             WHERE d.id = u.id AND d.claim IS NOT DISTINCT FROM u.claim
             RETURNING d.id",
        )
        .await?;
    let stood: std::collections::HashSet<String> = tx
        .query(
            &upd,
            &[&now, &ids, &states, &nexts, &statuses, &errors, &claims],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Phase 2: the attempt log and the webhook effects of the outcomes that stood.
    // As on SQLite: an effect just applied to a webhook is not applied again in this batch.
    let mut last: std::collections::HashMap<&str, u8> = Default::default();
    let mut retries = false;
    const OK: u8 = 1;
    const FAILING: u8 = 2;
    const DISABLED: u8 = 3;
    let mut log = AttemptLog::default();
    let mut effects: Vec<(&str, HookWrite)> = Vec::new();
    for rec in batch {
        let (job, a) = (&rec.job, &rec.attempt);
        if !stood.contains(&job.id) {
            // The lease ran out and another claim took the job (or it was deleted): that
            // claimer's outcome stands; this one is not recorded (at-least-once delivery).
            tracing::warn!(delivery = %job.id, "outcome of an expired claim not recorded; the job was claimed again");
            continue;
        }
        retries |= matches!(rec.outcome, AttemptOutcome::Retry { .. });
        log.push(job, a);
        let hook = job.webhook_id.as_str();
        match &rec.hook {
            HookEffect::Healthy => {
                if last.insert(hook, OK) != Some(OK) {
                    effects.push((hook, HookWrite::Healthy));
                }
            }
            HookEffect::Disable { reason } => {
                effects.push((hook, HookWrite::Disable(reason)));
                last.insert(hook, DISABLED);
            }
            HookEffect::Failing { at } => {
                if last.insert(hook, FAILING) != Some(FAILING) {
                    effects.push((hook, HookWrite::Failing(micros(*at))));
                }
            }
            HookEffect::None => {}
        }
    }
    if !log.ids.is_empty() {
        let ins = tx
            .prepare_cached(
                "INSERT INTO attempts (delivery_id, at, status, latency_ms, error, response_excerpt, outcome)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::bigint[], $5::text[], $6::text[], $7::text[])",
            )
            .await?;
        tx.execute(
            &ins,
            &[
                &log.ids,
                &log.at,
                &log.status,
                &log.latency,
                &log.error,
                &log.excerpt,
                &log.result,
            ],
        )
        .await?;
    }
    // Few (one per webhook and batch, in order): one statement each.
    for (hook, w) in effects {
        match w {
            HookWrite::Healthy => {
                tx.execute(
                    "UPDATE webhooks SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
                    &[&hook],
                )
                .await?
            }
            HookWrite::Failing(at) => {
                tx.execute(
                    "UPDATE webhooks SET failing_since = $2 WHERE id = $1 AND failing_since IS NULL",
                    &[&hook, &at],
                )
                .await?
            }
            HookWrite::Disable(reason) => {
                tx.execute(
                    "UPDATE webhooks SET enabled = FALSE, disabled_reason = $2 WHERE id = $1",
                    &[&hook, &reason],
                )
                .await?
            }
        };
    }
    Ok(retries)
}

/// What an outcome does to its webhook's row.
enum HookWrite<'a> {
    Healthy,
    Failing(i64),
    Disable(&'a str),
}

/// Attempt log entries as columns, for one `INSERT … SELECT FROM unnest(…)`.
#[derive(Default)]
struct AttemptLog<'a> {
    ids: Vec<&'a str>,
    at: Vec<i64>,
    status: Vec<Option<i32>>,
    latency: Vec<i64>,
    error: Vec<Option<&'a str>>,
    excerpt: Vec<Option<&'a str>>,
    result: Vec<&'static str>,
}

impl<'a> AttemptLog<'a> {
    fn push(&mut self, job: &'a DeliveryJob, a: &'a Attempt) {
        self.ids.push(&job.id);
        self.at.push(micros(a.at));
        self.status.push(a.status().map(i32::from));
        self.latency.push(a.latency_ms as i64);
        self.error.push(a.error.as_deref());
        self.excerpt.push(a.response_excerpt.as_deref());
        self.result.push(a.result.as_str());
    }
}
