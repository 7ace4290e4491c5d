//! Delivery-state rules shared by every store implementation, so SQLite and PostgreSQL
//! cannot drift apart: which statuses are still to be attempted, what the API's "failed"
//! filter selects, what an attempt's outcome makes of its job, what deleting a webhook
//! does to its jobs, and what re-enabling a webhook does to its health. The stores bind
//! the values decided here; their SQL carries no rule of its own.

use chrono::{DateTime, Utc};

use super::{AttemptOutcome, DeliveryStatus};

impl DeliveryStatus {
    /// Jobs still to be attempted (due now or later).
    pub const OPEN: [DeliveryStatus; 2] = [DeliveryStatus::Pending, DeliveryStatus::Failed];

    pub fn is_open(self) -> bool {
        Self::OPEN.contains(&self)
    }

    /// The statuses a delivery-log filter selects (`None`: all). "failed" in the API means
    /// every delivery that has been tried and has not succeeded: retrying or given up.
    pub fn selected_by(filter: Option<DeliveryStatus>) -> Option<Vec<DeliveryStatus>> {
        filter.map(|f| match f {
            DeliveryStatus::Failed => vec![DeliveryStatus::Failed, DeliveryStatus::Dead],
            other => vec![other],
        })
    }
}

impl AttemptOutcome {
    /// The job's status and next attempt time after this outcome.
    pub fn job_state(&self) -> (DeliveryStatus, Option<DateTime<Utc>>) {
        match self {
            AttemptOutcome::Delivered => (DeliveryStatus::Delivered, None),
            AttemptOutcome::Retry { at } => (DeliveryStatus::Failed, Some(*at)),
            AttemptOutcome::Dead | AttemptOutcome::DisableWebhook { .. } => {
                (DeliveryStatus::Dead, None)
            }
        }
    }
}

/// A deleted webhook's open jobs have nowhere to go: they become dead, with this error,
/// and are never attempted again (delivered and dead ones keep their log).
pub const DELETED_WEBHOOK_JOB_STATE: DeliveryStatus = DeliveryStatus::Dead;
pub const DELETED_WEBHOOK_ERROR: &str = "webhook deleted";

/// `failing_since` after a webhook is written by the API or the config: a new webhook is
/// healthy; re-enabling a disabled one gives it a fresh start (it would otherwise be
/// disabled again at its next failure); any other update keeps its health.
pub fn failing_since_on_put(
    old: Option<(bool, Option<DateTime<Utc>>)>,
    new_enabled: bool,
) -> Option<DateTime<Utc>> {
    match old {
        None => None,
        Some((false, _)) if new_enabled => None,
        Some((_, since)) => since,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_enabling_heals() {
        let t = Some(Utc::now());
        assert_eq!(failing_since_on_put(None, true), None);
        assert_eq!(failing_since_on_put(Some((false, t)), true), None);
        assert_eq!(failing_since_on_put(Some((true, t)), true), t);
        assert_eq!(failing_since_on_put(Some((false, t)), false), t);
    }

    #[test]
    fn failed_filter_includes_dead() {
        assert_eq!(
            DeliveryStatus::selected_by(Some(DeliveryStatus::Failed)),
            Some(vec![DeliveryStatus::Failed, DeliveryStatus::Dead])
        );
        assert_eq!(DeliveryStatus::selected_by(None), None);
    }
}
