//! The scheduler's jobs in memory: claimed jobs waiting for a permit, per webhook, and
//! the answers of outbox polls that fill them.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::handoff::{lock, InFlight};
use crate::store::DeliveryJob;

/// Jobs claimed and waiting for a permit, per webhook, with the moment their claim was
/// asked for (their lease runs from then).
#[derive(Default)]
pub(super) struct Queues {
    pub(super) by_hook: HashMap<String, VecDeque<(Instant, DeliveryJob)>>,
    pub(super) len: usize,
}

impl Queues {
    pub(super) fn push(
        &mut self,
        node: &str,
        in_flight: &InFlight,
        claimed: Instant,
        jobs: Vec<DeliveryJob>,
    ) {
        let mut set = lock(in_flight);
        for job in jobs {
            if let Some(old) = &job.took_over {
                // The claim's node prefix says whose lease ran out: another node (dead or
                // stalled), or this one: a job whose lease got too short while it waited
                // (worker.rs) is handed back unsent, and only when that hand-back failed
                // does its lease run out.
                let from = old.0.split('/').next().unwrap_or_default();
                if from == node {
                    tracing::debug!(delivery = %job.id, expired_claim = %old.0, "claimed again a job whose lease this node let lapse unused");
                } else {
                    metrics::counter!("hookbridge_delivery_lease_takeovers_total").increment(1);
                    tracing::warn!(delivery = %job.id, from_node = %from, expired_claim = %old.0, "took over a delivery job whose lease expired under another claim; it is sent again with the same webhook-id");
                }
            }
            set.insert(job.id.clone());
            self.by_hook
                .entry(job.webhook_id.clone())
                .or_default()
                .push_back((claimed, job));
            self.len += 1;
        }
    }

    /// Webhooks with at least `deep` jobs waiting: left out of claims and polls.
    pub(super) fn deep(&self, deep: usize) -> Vec<String> {
        self.by_hook
            .iter()
            .filter(|(_, q)| q.len() >= deep)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// A poll's answer (`Store::due_jobs`), from its own task.
pub(super) struct Polled {
    /// When the claim was asked for: the jobs' leases run from then.
    pub(super) asked: Instant,
    pub(super) limit: usize,
    /// Webhooks with deep queues were left out of it.
    pub(super) deep: bool,
    pub(super) jobs: crate::store::Result<Vec<DeliveryJob>>,
}

/// Queues a poll's jobs; false when the store could not be read.
pub(super) fn take_polled(
    done: Result<Polled, String>,
    node: &str,
    in_flight: &InFlight,
    queued: &mut Queues,
    poll: &mut bool,
    deep_left: &mut bool,
    next_due: &mut Option<DateTime<Utc>>,
) -> bool {
    let p = match done {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "the delivery poll failed; retrying shortly");
            *poll = true;
            return false;
        }
    };
    match p.jobs {
        Ok(mut jobs) => {
            *poll |= jobs.len() >= p.limit;
            *deep_left = p.deep;
            *next_due = None;
            // The in-flight set may have grown while the poll ran (the committer reserves
            // jobs before it commits them): a job held here already is not queued twice.
            {
                let set = lock(in_flight);
                jobs.retain(|j| !set.contains(&j.id));
            }
            metrics::counter!("hookbridge_delivery_jobs_claimed_total", "via" => "poll")
                .increment(jobs.len() as u64);
            queued.push(node, in_flight, p.asked, jobs);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read due deliveries; retrying shortly");
            *poll = true;
            false
        }
    }
}
