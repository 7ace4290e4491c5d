//! The direct hand-off of freshly committed jobs from the spool's committer to the
//! delivery scheduler, so new work never waits for a poll, a query or a claim.
//!
//! 1. Before its commit, the committer *reserves* the batch's delivery ids in the
//!    scheduler's in-flight set: from then on no poll of the outbox hands them out, so a
//!    job is never both polled and handed over.
//! 2. The commit records the jobs durably; on a shared store (PostgreSQL) the same
//!    transaction claims them for this node under a lease (`Store::commit_and_claim`), so
//!    no other node polls them either.
//! 3. The committer *hands over* the jobs themselves (payload, and the webhook as the
//!    request read it) with that claim; ids the commit did not insert are released.
//!
//! The outbox stays the durable record and the source of truth after a restart: a job
//! lost here (shutdown, crash) is still due in the store, found by the next run's poll
//! and sent with the same `webhook-id`. A node hands back every lease it holds at a clean
//! stop, and at start those its previous run died with ([`hand_back_node_leases`]), so
//! such jobs are due again at once, not when their leases expire.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::store::{CommitClaim, DeliveryJob, Lease, NewEvent, Store, Webhook};

/// Jobs a scheduler holds (queued, or being attempted until their outcome is durable) or
/// the committer is about to hand it: never handed out by a poll.
pub(super) type InFlight = Arc<Mutex<HashSet<String>>>;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock leaves plain data behind: still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Jobs one group commit inserted, handed over together.
#[derive(Debug)]
pub struct Handed {
    /// When the commit started: a lease taken in it runs from no later than this.
    pub since: Instant,
    pub jobs: Vec<DeliveryJob>,
}

/// The committer's end: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct Announcer {
    tx: mpsc::UnboundedSender<Handed>,
    in_flight: InFlight,
    lease: Lease,
}

/// The scheduler's end.
#[derive(Debug)]
pub struct Announcements {
    pub(super) rx: mpsc::UnboundedReceiver<Handed>,
    pub(super) in_flight: InFlight,
    pub(super) lease: Lease,
}

/// The lease this node's scheduler holds delivery jobs under on a shared store: it must
/// outlive an attempt (the request timeout), with room for the wait for a permit and the
/// outcome's group commit (`delivery.lease_margin`). SQLite ignores leases.
fn lease(config: &Config) -> Lease {
    let d = &config.delivery;
    Lease {
        node: config.node_id.clone(),
        length: d.request_timeout.0 * 2 + d.lease_margin.0,
    }
}

/// A connected pair sharing one in-flight set and the node's lease. Unbounded on
/// purpose: the committer must not wait on delivery; what queues here is bounded by the
/// ingest rate (the scheduler drains it whenever it runs, and leaves jobs of deep queues
/// in the store).
pub fn handoff(config: &Config) -> (Announcer, Announcements) {
    let (tx, rx) = mpsc::unbounded_channel();
    let in_flight = InFlight::default();
    let lease = lease(config);
    (
        Announcer {
            tx,
            in_flight: in_flight.clone(),
            lease: lease.clone(),
        },
        Announcements {
            rx,
            in_flight,
            lease,
        },
    )
}

impl Announcer {
    /// The lease the commit claims the batch's jobs under (see `Store::commit_and_claim`).
    pub fn lease(&self) -> Lease {
        self.lease.clone()
    }

    /// Keeps these delivery ids out of every poll until they are handed over or released.
    pub fn reserve<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut set = lock(&self.in_flight);
        set.extend(ids.into_iter().map(str::to_owned));
    }

    /// Gives back reserved ids no job was handed over for (not inserted, or the commit failed).
    pub fn release<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut set = lock(&self.in_flight);
        for id in ids {
            set.remove(id);
        }
    }

    /// The jobs `commit` inserted, built from their events (the payload is the envelope,
    /// the webhook as the request read it); reserved ids it did not insert are released.
    pub fn committed<'a>(
        &self,
        since: Instant,
        commit: &CommitClaim,
        accepted: DateTime<Utc>,
        events: impl IntoIterator<Item = (&'a NewEvent, &'a [Webhook])>,
    ) -> Handed {
        let inserted: HashSet<&str> = commit.inserted.iter().map(String::as_str).collect();
        let mut jobs = Vec::with_capacity(inserted.len());
        let mut not_inserted = Vec::new();
        for (ev, hooks) in events {
            for (id, hook_id) in &ev.deliveries {
                if !inserted.contains(id.as_str()) {
                    not_inserted.push(id.as_str());
                    continue;
                }
                jobs.push(DeliveryJob {
                    id: id.clone(),
                    org: ev.org.clone(),
                    webhook_id: hook_id.clone(),
                    event_id: ev.id.clone(),
                    payload: ev.envelope_json.clone(),
                    attempts: 0,
                    created_at: accepted,
                    webhook: hooks.iter().find(|h| &h.id == hook_id).cloned(),
                    claim: commit.claim.clone(),
                    took_over: None,
                });
            }
        }
        self.release(not_inserted);
        Handed { since, jobs }
    }

    /// Hands over committed (durable) jobs whose ids were reserved. With no scheduler
    /// running (shutting down) they are released: the jobs stay due in the store.
    pub fn hand_over(&self, handed: Handed) {
        if handed.jobs.is_empty() {
            return;
        }
        if let Err(mpsc::error::SendError(h)) = self.tx.send(handed) {
            self.release(h.jobs.iter().map(|j| j.id.as_str()));
        }
    }
}

/// Whose leases [`hand_back_node_leases`] hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandBack {
    /// At start, before the spool, the scheduler or the roll-up closer runs: every lease
    /// under this node's id is its previous run's, which died with them in hand.
    PreviousRun,
    /// At a clean stop, once every task of this run has ended: jobs claimed and never
    /// sent (queued, or committed after the scheduler stopped) and partitions not closed.
    ThisRun,
}

/// Hands back the delivery and roll-up leases held under `node`'s claims
/// (`Store::release_node_claims`). It must run only while no task of this process can hold
/// a lease it is using: a release racing the committer would free a job it had just
/// claimed and handed over, and another node could send it at the same time. So at start
/// it is awaited to the end (a timeout would leave the statement running on the server
/// while this run starts claiming); at a stop it is bounded in time, as nothing claims
/// any more: with the store down, the leases simply expire.
pub async fn hand_back_node_leases(store: &dyn Store, node: &str, which: HandBack) {
    let r = match which {
        HandBack::PreviousRun => Ok(store.release_node_claims(node).await),
        HandBack::ThisRun => {
            tokio::time::timeout(Duration::from_secs(5), store.release_node_claims(node)).await
        }
    };
    match r {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => match which {
            HandBack::PreviousRun => tracing::info!(
                leases = n,
                "handed back the leases of this node's previous run"
            ),
            // Jobs claimed and never sent, or sent by an attempt cut off at the drain limit
            // (sent again, with the same webhook-id), and partitions not closed.
            HandBack::ThisRun => {
                tracing::info!(leases = n, "handed back the leases this run still held")
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not hand back this node's leases; they are taken again when they expire")
        }
        Err(_) => tracing::warn!(
            "the store did not answer in 5 s; this node's leases are taken again when they expire"
        ),
    }
}
