//! The recorder: writes delivery outcomes in group commits (one durable transaction per
//! batch, not per attempt), then releases the jobs from the in-flight set and tells the
//! scheduler when a job it recorded is due again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify};

use super::handoff::{lock, InFlight};
use crate::store::health::AttemptRecord;
use crate::store::{Attempt, AttemptOutcome, DeliveryJob, Store};

pub(super) type Recorded = (DeliveryJob, Attempt, AttemptOutcome);

/// What the recorder tells the scheduler after a group commit: the earliest moment a job
/// it just recorded is due again (a retry, or a job whose outcome could not be written).
pub(super) type DueAgain = Arc<Mutex<Option<DateTime<Utc>>>>;

/// Writes outcomes in batches; only then are the jobs released from the in-flight set.
pub(super) async fn recorder(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Recorded>,
    batch_max: usize,
    in_flight: InFlight,
    due_again: DueAgain,
    recorded: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let ids: Vec<String> = batch.iter().map(|(j, _, _)| j.id.clone()).collect();
        let mut again = batch
            .iter()
            .filter_map(|(_, _, o)| match o {
                AttemptOutcome::Retry { at } => Some(*at),
                _ => None,
            })
            .min();
        let records: Arc<[AttemptRecord]> = batch
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
                    again = Some(Utc::now());
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
        if let Some(t) = again {
            let mut due = lock(&due_again);
            *due = Some(due.map_or(t, |d| d.min(t)));
        }
        recorded.notify_one();
    }
}
