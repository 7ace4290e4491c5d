//! The scheduler: takes due jobs from the durable outbox and runs attempts concurrently.
//!
//! * At most `delivery.workers` attempts run at once, and at most
//!   `delivery.per_endpoint_concurrency` per webhook. Due jobs are taken in batches into
//!   per-webhook queues; a webhook with a deep queue is left out of the next query, so one
//!   slow endpoint never fills the batch and holds back the others.
//! * Outcomes are recorded by one recorder task in group commits (one fsync per batch,
//!   not per attempt). A job stays "in flight" in memory until its outcome is durable, so
//!   it is never picked twice; if the process dies first, the job is still due in the
//!   store and is simply tried again at the next start (receivers dedupe on `webhook-id`).
//! * The scheduler sleeps until new jobs are committed (`App::delivery_wake`), an attempt
//!   finishes, an outcome is recorded, or the next job falls due.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::SendError;
use super::retry;
use crate::store::health::{self, AttemptRecord};
use crate::store::{
    Attempt, AttemptOutcome, AttemptResult, Busy, DeliveryJob, Store, TransportError, WebhookKind,
};
use crate::App;

/// Most jobs taken from the store in one query.
const FETCH_MAX: usize = 256;
/// Most outcomes written in one transaction.
const RECORD_BATCH: usize = 512;
/// Longest sleep without a reason to wake: bounds the cost of a missed notification.
const IDLE_POLL: Duration = Duration::from_secs(5);

type Recorded = (DeliveryJob, Attempt, AttemptOutcome);
type InFlight = Arc<Mutex<HashSet<String>>>;

fn lock(set: &InFlight) -> std::sync::MutexGuard<'_, HashSet<String>> {
    // A panic while holding this lock leaves a plain set behind: still usable.
    set.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(app: App, cancel: CancellationToken) -> Result<(), String> {
    let cfg = app.config.delivery.clone();
    let per_endpoint = cfg.per_endpoint_concurrency;
    let global = Arc::new(Semaphore::new(cfg.workers));
    let mut endpoints: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let in_flight: InFlight = Arc::default();
    let recorded = Arc::new(Notify::new());
    let (rec_tx, rec_rx) = mpsc::channel::<Recorded>(cfg.workers * 4);
    let recorder = tokio::spawn(recorder(
        app.store.clone(),
        rec_rx,
        in_flight.clone(),
        recorded.clone(),
    ));
    let mut attempts: JoinSet<()> = JoinSet::new();
    // Jobs taken from the store and waiting for a permit, per webhook. Taking a batch
    // ahead keeps the store query off the path of every single attempt.
    let mut queued: HashMap<String, VecDeque<DeliveryJob>> = HashMap::new();
    let mut queued_n = 0usize;
    // A webhook with this many jobs waiting is left out of the next query, so one slow
    // endpoint's backlog never crowds the others out of a batch.
    let deep = per_endpoint * 4;
    tracing::info!(
        workers = cfg.workers,
        per_endpoint,
        "delivery workers started"
    );

    while !cancel.is_cancelled() {
        while attempts.try_join_next().is_some() {}
        // Forget idle endpoints so the map does not grow with every webhook ever seen.
        endpoints.retain(|k, s| s.available_permits() < per_endpoint || queued.contains_key(k));
        let busy = |queued: &HashMap<String, VecDeque<DeliveryJob>>| Busy {
            deliveries: lock(&in_flight).iter().cloned().collect(),
            webhooks: queued
                .iter()
                .filter(|(_, q)| q.len() >= deep)
                .map(|(k, _)| k.clone())
                .collect(),
        };
        let mut fetched = 0;
        let mut store_failed = false;
        if queued_n < FETCH_MAX / 2 {
            match app
                .store
                .due_jobs(Utc::now(), FETCH_MAX - queued_n, busy(&queued))
                .await
            {
                Ok(jobs) => {
                    fetched = jobs.len();
                    let mut set = lock(&in_flight);
                    for job in jobs {
                        set.insert(job.id.clone());
                        queued
                            .entry(job.webhook_id.clone())
                            .or_default()
                            .push_back(job);
                        queued_n += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read due deliveries; retrying shortly");
                    store_failed = true;
                }
            }
        }
        let mut started = 0;
        for (hook, q) in queued.iter_mut() {
            let sem = endpoints
                .entry(hook.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(per_endpoint)))
                .clone();
            while !q.is_empty() {
                let Ok(ep) = sem.clone().try_acquire_owned() else {
                    break;
                };
                let Ok(g) = global.clone().try_acquire_owned() else {
                    break;
                };
                let Some(job) = q.pop_front() else { break };
                attempts.spawn(attempt(app.clone(), job, [g, ep], rec_tx.clone()));
                queued_n -= 1;
                started += 1;
            }
        }
        queued.retain(|_, q| !q.is_empty());
        if started > 0 || (fetched > 0 && queued_n < FETCH_MAX / 2) {
            // More may be due or startable right away.
            continue;
        }
        let wait = if store_failed {
            Duration::from_secs(1)
        } else if queued_n >= FETCH_MAX / 2 {
            IDLE_POLL
        } else {
            match app.store.next_due_at(busy(&queued)).await {
                Ok(Some(t)) => (t - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .clamp(Duration::from_millis(5), IDLE_POLL),
                Ok(None) => IDLE_POLL,
                Err(_) => Duration::from_secs(1),
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = app.delivery_wake.notified() => {}
            _ = recorded.notified() => {}
            Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Jobs still waiting for a permit stay due in the store.
    drop(queued);

    // Stop taking jobs; let the attempts under way finish (each bounded by the request
    // timeout) and their outcomes be written, so a clean stop repeats nothing.
    let n = attempts.len();
    if n > 0 {
        tracing::info!(in_flight = n, "delivery: waiting for attempts under way");
    }
    let drained = tokio::time::timeout(super::drain_limit(&app), async {
        while attempts.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        attempts.abort_all();
        tracing::warn!("delivery: attempts still running at shutdown were abandoned; they will be retried at the next start");
    }
    drop(rec_tx);
    recorder
        .await
        .map_err(|e| format!("delivery recorder failed: {e}"))?;
    Ok(())
}

/// One attempt of one job; the outcome goes to the recorder.
async fn attempt(
    app: App,
    mut job: DeliveryJob,
    permits: [OwnedSemaphorePermit; 2],
    rec: mpsc::Sender<Recorded>,
) {
    // The payload becomes the request body (no copy); a retry reads it from the store again.
    let body = std::mem::take(&mut job.payload).into_bytes();
    let (a, outcome) = deliver(&app, &job, body).await;
    // The endpoint is free for the next job while the outcome waits for its commit.
    drop(permits);
    // Recording needs the ids only: keep the batches the recorder holds (and copies on a
    // retry) small.
    job.webhook = None;
    let id = job.id.clone();
    if rec.send((job, a, outcome)).await.is_err() {
        tracing::warn!(delivery = %id, "outcome not recorded (shutting down); the job will be retried");
    }
}

fn skipped(reason: String) -> (Attempt, AttemptOutcome) {
    (
        Attempt {
            at: Utc::now(),
            result: AttemptResult::NotAttempted,
            latency_ms: 0,
            error: Some(reason),
            response_excerpt: None,
        },
        AttemptOutcome::Dead,
    )
}

#[tracing::instrument(skip_all, fields(org = %job.org, webhook = %job.webhook_id, delivery = %job.id, attempt = job.attempts + 1))]
async fn deliver(app: &App, job: &DeliveryJob, body: Vec<u8>) -> (Attempt, AttemptOutcome) {
    // Retry delays and `disable_after` follow SIGHUP reloads.
    let current = app.current();
    let cfg = &current.delivery;
    let now = Utc::now();
    let hook = match &job.webhook {
        Some(h) if h.kind == WebhookKind::Http => h,
        _ => return skipped("webhook deleted".into()),
    };
    if !hook.enabled {
        return skipped(format!(
            "webhook disabled: {}",
            hook.disabled_reason.as_deref().unwrap_or("by an admin")
        ));
    }
    let Some(url) = hook.url.as_deref() else {
        return skipped("webhook has no url".into());
    };
    let ex = super::post_signed(app, &job.org, url, hook.secret.as_deref(), &job.id, body).await;
    let latency = ex.latency;
    let verdict = retry::classify(ex.status, ex.error.is_some());
    let retry_after = ex
        .retry_after
        .as_deref()
        .and_then(|v| retry::parse_retry_after(v, Utc::now()));
    let delays: Vec<Duration> = cfg.retry_delays.iter().map(|d| d.0).collect();
    let mut outcome = retry::decide(verdict, job.attempts + 1, &delays, retry_after, Utc::now());
    if matches!(outcome, AttemptOutcome::Retry { .. } | AttemptOutcome::Dead) {
        if let Some(reason) =
            health::disable_reason(hook.failing_since, Utc::now(), cfg.disable_after.0)
        {
            outcome = AttemptOutcome::DisableWebhook { reason };
        }
    }
    let label = match &outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Retry { .. } => "retry",
        AttemptOutcome::Dead => "dead",
        AttemptOutcome::DisableWebhook { .. } => "disabled",
    };
    metrics::counter!("hookbridge_delivery_attempts_total", "outcome" => label).increment(1);
    metrics::histogram!("hookbridge_delivery_latency_seconds").record(latency.as_secs_f64());
    match &outcome {
        AttemptOutcome::Delivered => tracing::debug!(status = ex.status, "delivered"),
        AttemptOutcome::Retry { at } => {
            tracing::debug!(result = %ex.describe(), retry_at = %at, "attempt failed; will retry")
        }
        AttemptOutcome::Dead => {
            tracing::warn!(result = %ex.describe(), "delivery failed for good (dead); replay it once the endpoint is fixed")
        }
        AttemptOutcome::DisableWebhook { reason } => {
            tracing::warn!(result = %ex.describe(), reason = %reason, "webhook disabled")
        }
    }
    let result = match (ex.status, &ex.error) {
        (Some(status), None) if verdict == retry::Verdict::Delivered => {
            AttemptResult::Delivered { status }
        }
        (Some(status), _) => AttemptResult::HttpError { status },
        (None, e) => AttemptResult::Transport(match e {
            Some(SendError::Dns { .. }) => TransportError::Dns,
            Some(SendError::Forbidden(_)) => TransportError::Forbidden,
            Some(SendError::Tls(_)) => TransportError::Tls,
            Some(SendError::Connect(_)) => TransportError::Connect,
            Some(SendError::Timeout(_)) => TransportError::Timeout,
            Some(SendError::Other(_)) | None => TransportError::Other,
        }),
    };
    let a = Attempt {
        at: now,
        result,
        latency_ms: latency.as_millis() as u64,
        error: (verdict != retry::Verdict::Delivered).then(|| ex.describe()),
        response_excerpt: ex.excerpt(),
    };
    (a, outcome)
}

/// Writes outcomes in batches; only then are the jobs released from the in-flight set.
async fn recorder(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Recorded>,
    in_flight: InFlight,
    recorded: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < RECORD_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let ids: Vec<String> = batch.iter().map(|(j, _, _)| j.id.clone()).collect();
        let records: Vec<AttemptRecord> = batch
            .into_iter()
            .map(|(job, a, outcome)| AttemptRecord::new(job, a, outcome))
            .collect();
        let mut tries = 0;
        loop {
            tries += 1;
            match store.record_attempts(records.clone()).await {
                Ok(()) => break,
                Err(e) if tries < 5 => {
                    tracing::warn!(error = %e, jobs = ids.len(), "cannot record delivery outcomes; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    // The jobs stay due in the store: they will be delivered again, and
                    // receivers dedupe on webhook-id. Better than losing track of them.
                    tracing::error!(error = %e, jobs = ids.len(), "giving up recording delivery outcomes; these jobs will be attempted again");
                    break;
                }
            }
        }
        {
            let mut set = lock(&in_flight);
            for id in &ids {
                set.remove(id);
            }
        }
        recorded.notify_one();
    }
}
