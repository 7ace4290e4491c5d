//! The scheduler: runs attempts of jobs from the durable outbox concurrently.
//!
//! * Jobs come two ways. A job just committed is handed over by the spool's committer
//!   (`handoff`) with its payload, webhook and (on a shared store) the claim its commit
//!   took: it starts without a poll, a read or a claim round trip. The outbox is polled
//!   (`Store::due_jobs`) only for what hand-overs do not cover: the backlog at start,
//!   retries when they fall due, replays, jobs left in the store while their webhook's
//!   queue was deep, and jobs other nodes sharing the store committed (their wake-up,
//!   `Store::job_wakeups`, says when) or left behind (an expired lease: taken over,
//!   logged and counted).
//! * On a shared store a claimed job carries a lease (2 × request timeout +
//!   `delivery.lease_margin`). An attempt is started only with at least the request
//!   timeout (+1 s) of its lease left; a job that waited longer for a permit is left for
//!   the next claim instead, so an attempt never outlives its lease.
//! * At most `delivery.workers` attempts run at once, and at most
//!   `delivery.per_endpoint_concurrency` per webhook. A webhook with a deep queue gets no
//!   more jobs in memory (they wait in the store), so one slow endpoint never holds back
//!   the others nor fills the memory.
//! * An attempt frees its endpoint slot when the HTTP exchange ends, and its worker slot
//!   once the recorder has its outcome. Outcomes are recorded by one recorder task in
//!   group commits (one fsync per batch, not per attempt), at most `RECORD_PER_WORKER` ×
//!   workers per batch and as many waiting: a crash sends again at most `workers` × 9
//!   deliveries (made, not yet recorded). A job
//!   stays "in flight" in memory until its outcome is durable, so it is never claimed
//!   twice; if the process dies first, the job is still due in the store and is tried
//!   again at the next start with the same `webhook-id` (receivers dedupe on it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::SendError;
use super::handoff::{lock, Announcements, Handed, InFlight};
use super::queues::{take_polled, Polled, Queues};
use super::recorder::{recorder, DueAgain, Recorded};
use super::retry;
use crate::store::health;
use crate::store::{
    Attempt, AttemptOutcome, AttemptResult, Busy, DeliveryJob, TransportError, WebhookKind,
};
use crate::App;

/// Most jobs taken from the store in one poll.
const FETCH_MAX: usize = 256;
/// Most outcomes written in one transaction, and outcomes waiting for it, per worker.
/// Together with the rule that an attempt keeps its worker slot until its outcome is
/// queued, this bounds what a crash sends again: at most `workers` × (1 + 2 ×
/// `RECORD_PER_WORKER`) deliveries were made and not yet recorded at any moment.
const RECORD_PER_WORKER: usize = 4;
/// How long a job's copy of its webhook is trusted before the attempt reads it again.
const WEBHOOK_FRESH: Duration = Duration::from_secs(1);
/// Longest wait for that read (then the job's copy is used).
const WEBHOOK_REREAD: Duration = Duration::from_millis(500);
/// Longest sleep without a reason to wake: bounds the cost of a missed notification.
const IDLE_POLL: Duration = Duration::from_secs(5);

pub async fn run(
    app: App,
    mut announced: Announcements,
    cancel: CancellationToken,
) -> Result<(), String> {
    let cfg = app.config.delivery.clone();
    // Claims on a shared (PostgreSQL) queue outlive the attempt; SQLite ignores the lease.
    // (This node's previous run's leases were handed back at start: `hand_back_node_leases`.)
    let node = app.config.node_id.clone();
    let lease_length = announced.lease.length;
    let lease = Some(announced.lease.clone());
    // An attempt needs this much of its lease left to start (the request, and a second
    // for the outcome's commit): never sends past the lease.
    let lease_needed = cfg.request_timeout.0 + Duration::from_secs(1);
    // Other nodes' commits (PostgreSQL NOTIFY); None on a store one process owns.
    let mut wakeups = app.store.job_wakeups();
    let per_endpoint = cfg.per_endpoint_concurrency;
    let global = Arc::new(Semaphore::new(cfg.workers));
    let mut endpoints: HashMap<String, Arc<Semaphore>> = HashMap::new();
    // Shared with the committer, which reserves new jobs here before it commits them.
    let in_flight: InFlight = announced.in_flight.clone();
    let recorded = Arc::new(Notify::new());
    let due_again: DueAgain = Arc::default();
    let record_batch = cfg.workers * RECORD_PER_WORKER;
    let (rec_tx, rec_rx) = mpsc::channel::<Recorded>(record_batch);
    let mut recorder = tokio::spawn(recorder(
        app.store.clone(),
        rec_rx,
        record_batch,
        in_flight.clone(),
        due_again.clone(),
        recorded.clone(),
    ));
    let mut attempts: JoinSet<()> = JoinSet::new();
    let mut queued = Queues::default();
    // A webhook with this many jobs waiting gets no more until it drains.
    let deep = per_endpoint * 4;
    // Jobs handed over by the committer, not queued yet.
    let mut fresh: Vec<Handed> = Vec::new();
    // Poll the outbox when there is room: at start, when woken (replay), when the next
    // job falls due, and again right away while a poll comes back full.
    let mut poll = true;
    // Due jobs were left in the store while their webhook's queue was deep: poll again
    // whenever an attempt ends.
    let mut deep_left = false;
    // When the store's next job outside the in-flight set is due (None: ask the store).
    let mut next_due: Option<DateTime<Utc>> = None;
    // The poll under way: it runs beside the attempts, so the jobs already queued keep
    // starting while the store answers (waiting on it serially idled the workers for a
    // claim round trip per poll, which bounded the drain of a backlog on PostgreSQL).
    let mut polling: Option<tokio::task::JoinHandle<Polled>> = None;
    let mut answer: Option<Result<Polled, String>> = None;
    // Jobs handed over while a poll was out. On SQLite (no lease) that poll may have read
    // one of them as due before the committer reserved it; if its attempt is recorded (and
    // leaves the in-flight set) before the answer is taken, only this set keeps the polled
    // copy from being sent again.
    let mut handed_during_poll: HashSet<String> = HashSet::new();
    // Jobs whose lease got too short while they waited for a permit.
    let mut lapsed: Vec<DeliveryJob> = Vec::new();
    tracing::info!(
        workers = cfg.workers,
        per_endpoint,
        "delivery workers started"
    );

    while !cancel.is_cancelled() {
        while let Some(done) = attempts.try_join_next() {
            attempt_ended(done);
        }
        // Forget idle endpoints so the map does not grow with every webhook ever seen.
        endpoints
            .retain(|k, s| s.available_permits() < per_endpoint || queued.by_hook.contains_key(k));
        let mut store_failed = false;

        // 1. The direct path: queue what the committer just handed over.
        while let Ok(h) = announced.rx.try_recv() {
            fresh.push(h);
        }
        if !fresh.is_empty() {
            let deep_hooks = queued.deep(deep);
            // Jobs of a webhook whose queue is deep wait in the store instead of memory.
            let mut left = Vec::new();
            for h in fresh.drain(..) {
                let (keep, drop): (Vec<_>, Vec<_>) = h
                    .jobs
                    .into_iter()
                    .partition(|j| !deep_hooks.contains(&j.webhook_id));
                metrics::counter!("hookbridge_delivery_jobs_claimed_total", "via" => "handoff")
                    .increment(keep.len() as u64);
                if polling.is_some() || answer.is_some() {
                    handed_during_poll.extend(keep.iter().map(|j| j.id.clone()));
                }
                queued.push(&node, &in_flight, h.since, keep);
                left.extend(drop);
            }
            if !left.is_empty() {
                deep_left = true;
                store_failed |= !leave_in_store(&app, &in_flight, left).await;
            }
        }

        // 2. The outbox, for what the hand-overs do not cover: a poll's answer, then the
        // next poll (started, not awaited).
        if polling.as_ref().is_some_and(|p| p.is_finished()) {
            if let Some(p) = polling.take() {
                answer = Some(p.await.map_err(|e| e.to_string()));
            }
        }
        if let Some(mut done) = answer.take() {
            if let Ok(Polled { jobs: Ok(jobs), .. }) = &mut done {
                jobs.retain(|j| !handed_during_poll.contains(&j.id));
            }
            handed_during_poll.clear();
            store_failed |= !take_polled(
                done,
                &node,
                &in_flight,
                &mut queued,
                &mut poll,
                &mut deep_left,
                &mut next_due,
            );
        }
        if poll && polling.is_none() && queued.len < FETCH_MAX / 2 && !store_failed {
            let limit = FETCH_MAX - queued.len;
            let deep_hooks = queued.deep(deep);
            let busy = Busy {
                deliveries: lock(&in_flight).iter().cloned().collect(),
                webhooks: deep_hooks.clone(),
                lease: lease.clone(),
            };
            let store = app.store.clone();
            // Set again by its answer when it came back full, or by a wake-up meanwhile.
            poll = false;
            polling = Some(tokio::spawn(async move {
                let asked = Instant::now();
                let jobs = store.due_jobs(Utc::now(), limit, busy).await;
                Polled {
                    asked,
                    limit,
                    deep: !deep_hooks.is_empty(),
                    jobs,
                }
            }));
        }

        // 3. Start what the permits allow.
        for (hook, q) in queued.by_hook.iter_mut() {
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
                let Some((claimed, job)) = q.pop_front() else {
                    break;
                };
                queued.len -= 1;
                if job.claim.is_some() && claimed.elapsed() + lease_needed > lease_length {
                    // Its lease may run out mid-request and another node take it: hand it
                    // back (below) for the next claim, by any node.
                    metrics::counter!("hookbridge_delivery_leases_lapsed_total").increment(1);
                    tracing::debug!(delivery = %job.id, "lease too short to start the attempt; handed back for the next claim");
                    lapsed.push(job);
                    continue;
                }
                attempts.spawn(attempt(app.clone(), job, claimed, g, ep, rec_tx.clone()));
            }
        }
        queued.by_hook.retain(|_, q| !q.is_empty());
        if !lapsed.is_empty() {
            // Handed back now rather than left to expire: any node's next poll takes them.
            store_failed |= !leave_in_store(&app, &in_flight, std::mem::take(&mut lapsed)).await;
            next_due = None;
        }
        if polling.as_ref().is_some_and(|p| p.is_finished())
            || (poll && polling.is_none() && queued.len < FETCH_MAX / 2 && !store_failed)
        {
            continue;
        }

        // 4. Sleep until there is something to do.
        let wait = if store_failed {
            Duration::from_secs(1)
        } else if poll || polling.is_some() {
            // Waiting for room (an attempt ending wakes us) or for the poll's answer.
            IDLE_POLL
        } else {
            if next_due.is_none() {
                let busy = Busy {
                    deliveries: lock(&in_flight).iter().cloned().collect(),
                    webhooks: queued.deep(deep),
                    lease: None,
                };
                match app.store.next_due_at(busy).await {
                    Ok(t) => next_due = t.or(Some(Utc::now() + IDLE_POLL)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read when deliveries are due; retrying shortly");
                        next_due = Some(Utc::now() + chrono::Duration::seconds(1));
                    }
                }
            }
            // At least a few ms: a job the store counts as due but cannot hand out (its
            // event row gone) must not turn this into a busy loop.
            next_due
                .and_then(|t| (t - Utc::now()).to_std().ok())
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(5), IDLE_POLL)
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(h) = announced.rx.recv() => {
                metrics::counter!("hookbridge_delivery_wakeups_total", "source" => "handoff").increment(1);
                fresh.push(h);
            }
            _ = app.delivery_wake.notified() => {
                metrics::counter!("hookbridge_delivery_wakeups_total", "source" => "local").increment(1);
                poll = true;
            }
            w = other_nodes(&mut wakeups) => match w {
                Some(()) => {
                    metrics::counter!("hookbridge_delivery_wakeups_total", "source" => "notify").increment(1);
                    // Poll, then read the next due time again: a retry another node
                    // recorded may fall due before the one known here.
                    poll = true;
                    next_due = None;
                }
                None => {
                    tracing::warn!("the wake-ups from other nodes stopped; polling only");
                    wakeups = None;
                }
            },
            _ = recorded.notified() => {
                if let Some(t) = lock(&due_again).take() {
                    next_due = Some(next_due.map_or(t, |n| n.min(t)));
                }
            }
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                attempt_ended(done);
                poll |= deep_left;
            }
            // Outcomes could no longer be recorded: stop sending (the daemon stops; what
            // is unrecorded is due again at the next start).
            r = &mut recorder => {
                return Err(match r {
                    Ok(()) => "the delivery recorder stopped".to_owned(),
                    Err(e) => format!("the delivery recorder failed: {e}"),
                });
            }
            // Its answer is queued at the top of the loop.
            done = async { polling.as_mut().expect("guarded").await }, if polling.is_some() => {
                polling = None;
                answer = Some(done.map_err(|e| e.to_string()));
            }
            _ = tokio::time::sleep(wait) => {
                metrics::counter!("hookbridge_delivery_wakeups_total", "source" => "poll").increment(1);
                poll = true;
            }
        }
    }
    // Jobs still waiting for a permit, or handed over and not queued, stay due in the store
    // (on a shared store their claims are handed back once the whole process has stopped:
    // `hand_back_node_leases`).
    drop(queued);
    drop(fresh);
    // A poll's claims, if it ran, are handed back with the rest.
    if let Some(p) = polling.take() {
        p.abort();
    }

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

/// Hands jobs back to the store, for a later poll (jobs handed over for a deep queue, and
/// jobs whose lease got too short while they waited): their claims
/// (on a shared store) are released so that no lease has to run out first. False when the
/// store could not be told (they are due again when their leases expire).
async fn leave_in_store(app: &App, in_flight: &InFlight, jobs: Vec<DeliveryJob>) -> bool {
    {
        let mut set = lock(in_flight);
        for j in &jobs {
            set.remove(&j.id);
        }
    }
    let mut by_claim: HashMap<&str, (&crate::store::ClaimId, Vec<String>)> = HashMap::new();
    for j in &jobs {
        if let Some(c) = &j.claim {
            by_claim
                .entry(c.0.as_str())
                .or_insert_with(|| (c, Vec::new()))
                .1
                .push(j.id.clone());
        }
    }
    let mut ok = true;
    for (claim, ids) in by_claim.into_values() {
        if let Err(e) = app.store.release_claims(claim, ids).await {
            tracing::warn!(error = %e, "cannot hand back delivery jobs left for a later poll; they are taken again when their leases expire");
            ok = false;
        }
    }
    ok
}

/// The next wake-up from other nodes; never, without a source.
async fn other_nodes(w: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match w {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// An attempt's task ended. A panic is a bug: logged and counted; its job stays in the
/// in-flight set (no poll hands it out again) until the process restarts, rather than being
/// sent again and again by a loop of polls.
fn attempt_ended(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            metrics::counter!("hookbridge_delivery_attempt_panics_total").increment(1);
            tracing::error!(error = %e, "a delivery attempt panicked; its job is tried again after a restart");
        }
    }
}

/// One attempt of one job; the outcome goes to the recorder (which takes the job out of
/// the in-flight set once the outcome is durable).
async fn attempt(
    app: App,
    mut job: DeliveryJob,
    read_at: Instant,
    worker: OwnedSemaphorePermit,
    endpoint: OwnedSemaphorePermit,
    rec: mpsc::Sender<Recorded>,
) {
    // The webhook came with the job, as read when it was committed or polled. A job that
    // waited for a slot (a slow or busy endpoint) reads it again, so that disabling,
    // deleting, a new URL or a new secret applies to the very next attempt, on any node;
    // a fresh job (the common case, milliseconds old) skips the round trip.
    // Bounded, so that the read cannot eat the lease margin an attempt starts with.
    if read_at.elapsed() > WEBHOOK_FRESH {
        match tokio::time::timeout(
            WEBHOOK_REREAD,
            app.store.get_webhook(&job.org, &job.webhook_id),
        )
        .await
        {
            Ok(Ok(h)) => job.webhook = h,
            Ok(Err(e)) => {
                tracing::warn!(delivery = %job.id, error = %e, "cannot read the webhook again; sending with the settings read when the job was taken")
            }
            Err(_) => {
                tracing::warn!(delivery = %job.id, "the webhook's read took over 500 ms; sending with the settings read when the job was taken")
            }
        }
    }
    // The payload becomes the request body (no copy); a retry reads it from the store again.
    let body = std::mem::take(&mut job.payload).into_bytes();
    let (a, outcome) = deliver(&app, &job, body).await;
    // The endpoint is free for the next job while the outcome waits for its commit.
    drop(endpoint);
    // Recording needs the ids only: keep the batches the recorder holds (and copies on a
    // retry) small.
    job.webhook = None;
    let id = job.id.clone();
    // The worker slot is held until the recorder has the outcome: when recording falls
    // behind, sending slows down with it, so what a crash repeats stays bounded.
    if rec.send((job, a, outcome)).await.is_err() {
        tracing::warn!(delivery = %id, "outcome not recorded (the recorder stopped); the job is tried again after a restart");
    }
    drop(worker);
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
