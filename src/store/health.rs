//! Webhook health rules, shared by every store implementation: which attempts count as
//! failures, when a webhook starts failing (`failing_since`), and when it is disabled
//! (`delivery.disable_after`). The store only carries out the [`HookEffect`] decided here.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Attempt, AttemptOutcome, AttemptResult, DeliveryJob};

/// What an attempt does to its webhook's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEffect {
    /// A success: the webhook is healthy again (`failing_since` cleared).
    Healthy,
    /// A failure of the endpoint: `failing_since` becomes `at` unless already set.
    Failing { at: DateTime<Utc> },
    /// Disable the webhook with this reason.
    Disable { reason: String },
    /// Says nothing about the endpoint (nothing was sent).
    None,
}

/// An attempt with what it does to its job and its webhook, ready for the store.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub job: DeliveryJob,
    pub attempt: Attempt,
    pub outcome: AttemptOutcome,
    pub hook: HookEffect,
}

impl AttemptRecord {
    pub fn new(job: DeliveryJob, attempt: Attempt, outcome: AttemptOutcome) -> Self {
        let hook = hook_effect(&attempt, &outcome);
        Self {
            job,
            attempt,
            outcome,
            hook,
        }
    }
}

/// The rule: a disabling outcome disables; a delivery heals; an attempt that reached out
/// to the endpoint and failed (an HTTP error or any transport error, however fast) marks
/// the webhook failing; an attempt that sent nothing changes nothing.
pub fn hook_effect(attempt: &Attempt, outcome: &AttemptOutcome) -> HookEffect {
    if let AttemptOutcome::DisableWebhook { reason } = outcome {
        return HookEffect::Disable {
            reason: reason.clone(),
        };
    }
    match attempt.result {
        AttemptResult::Delivered { .. } => HookEffect::Healthy,
        AttemptResult::HttpError { .. } | AttemptResult::Transport(_) => {
            HookEffect::Failing { at: attempt.at }
        }
        AttemptResult::NotAttempted => HookEffect::None,
    }
}

/// Why a webhook failing since `failing_since` must now be disabled, if it must: it has
/// had no success for `disable_after`.
pub fn disable_reason(
    failing_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    disable_after: Duration,
) -> Option<String> {
    let since = failing_since?;
    ((now - since).to_std().unwrap_or_default() >= disable_after).then(|| {
        format!(
            "no successful delivery since {} (delivery.disable_after is {})",
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            humantime::format_duration(disable_after)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TransportError;

    fn attempt(result: AttemptResult, latency_ms: u64) -> Attempt {
        Attempt {
            at: Utc::now(),
            result,
            latency_ms,
            error: None,
            response_excerpt: None,
        }
    }

    #[test]
    fn a_fast_refused_connection_is_a_failure() {
        let a = attempt(AttemptResult::Transport(TransportError::Connect), 0);
        let retry = AttemptOutcome::Retry { at: Utc::now() };
        assert_eq!(hook_effect(&a, &retry), HookEffect::Failing { at: a.at });
    }

    #[test]
    fn nothing_sent_says_nothing() {
        let a = attempt(AttemptResult::NotAttempted, 0);
        assert_eq!(hook_effect(&a, &AttemptOutcome::Dead), HookEffect::None);
        let ok = attempt(AttemptResult::Delivered { status: 204 }, 3);
        assert_eq!(
            hook_effect(&ok, &AttemptOutcome::Delivered),
            HookEffect::Healthy
        );
    }

    #[test]
    fn disabled_after_the_period() {
        let now = Utc::now();
        let d = Duration::from_secs(60);
        assert!(disable_reason(None, now, d).is_none());
        assert!(disable_reason(Some(now - chrono::Duration::seconds(30)), now, d).is_none());
        assert!(disable_reason(Some(now - chrono::Duration::seconds(60)), now, d).is_some());
    }
}
