//! The retry policy: what an answer means, and when to try again.
//!
//! * 2xx: delivered.
//! * no answer (DNS, connect, TLS, timeout), 408, 425, 429, 5xx: retried along
//!   `delivery.retry_delays` (with ±20 % jitter so retries of many jobs spread out),
//!   then dead. `Retry-After` (seconds or HTTP date) is honoured, capped at [`MAX_RETRY_AFTER`].
//! * 410 Gone: the receiver says the endpoint is gone for good: dead, webhook disabled.
//! * any other status (other 4xx, 3xx since redirects are not followed): a configuration
//!   problem that rarely heals by itself: retried up to [`CLIENT_ERROR_ATTEMPTS`] attempts, then dead.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::AttemptOutcome;

/// Attempts in all for an answer like 400, 401, 403 or 404.
pub const CLIENT_ERROR_ATTEMPTS: u32 = 3;
/// A receiver cannot push a retry further out than this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retriable,
    ClientError,
    Gone,
}

/// What an answer (or its absence) means for the job.
pub fn classify(status: Option<u16>, failed: bool) -> Verdict {
    match status {
        Some(200..=299) if !failed => Verdict::Delivered,
        Some(410) => Verdict::Gone,
        None | Some(408 | 425 | 429 | 500..=599) => Verdict::Retriable,
        Some(200..=299) => Verdict::Retriable,
        Some(_) => Verdict::ClientError,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date, relative to `now`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // RFC 2822 parsing accepts the IMF-fixdate of HTTP ("Sun, 06 Nov 1994 08:49:37 GMT").
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}

/// Decides the outcome of attempt number `attempt` (1 for the first) of a job.
pub fn decide(
    verdict: Verdict,
    attempt: u32,
    delays: &[Duration],
    retry_after: Option<Duration>,
    now: DateTime<Utc>,
) -> AttemptOutcome {
    let max_attempts = match verdict {
        Verdict::Delivered => return AttemptOutcome::Delivered,
        Verdict::Gone => {
            return AttemptOutcome::DisableWebhook {
                reason: "the endpoint answered 410 Gone".into(),
            }
        }
        Verdict::Retriable => delays.len() as u32 + 1,
        Verdict::ClientError => CLIENT_ERROR_ATTEMPTS.min(delays.len() as u32 + 1),
    };
    if attempt >= max_attempts {
        return AttemptOutcome::Dead;
    }
    let idx = (attempt.max(1) - 1) as usize;
    let base = delays
        .get(idx)
        .or(delays.last())
        .copied()
        .unwrap_or(Duration::from_secs(60));
    let mut wait = jitter(base);
    if let Some(ra) = retry_after {
        wait = wait.max(ra.min(MAX_RETRY_AFTER));
    }
    let at = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1));
    AttemptOutcome::Retry { at }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays() -> Vec<Duration> {
        [5, 30, 120].into_iter().map(Duration::from_secs).collect()
    }

    fn retry_in(o: &AttemptOutcome, now: DateTime<Utc>) -> Duration {
        match o {
            AttemptOutcome::Retry { at } => (*at - now).to_std().unwrap(),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn classes() {
        assert_eq!(classify(Some(204), false), Verdict::Delivered);
        assert_eq!(classify(Some(200), true), Verdict::Retriable);
        assert_eq!(classify(None, true), Verdict::Retriable);
        assert_eq!(classify(Some(503), false), Verdict::Retriable);
        assert_eq!(classify(Some(429), false), Verdict::Retriable);
        assert_eq!(classify(Some(410), false), Verdict::Gone);
        assert_eq!(classify(Some(404), false), Verdict::ClientError);
        assert_eq!(classify(Some(301), false), Verdict::ClientError);
    }

    #[test]
    fn schedule_with_jitter_then_dead() {
        let now = Utc::now();
        let d = delays();
        for (attempt, base) in [(1, 5.0), (2, 30.0), (3, 120.0)] {
            let w = retry_in(&decide(Verdict::Retriable, attempt, &d, None, now), now);
            let s = w.as_secs_f64();
            assert!(s >= base * 0.79 && s <= base * 1.21, "{attempt}: {s}");
        }
        assert!(matches!(
            decide(Verdict::Retriable, 4, &d, None, now),
            AttemptOutcome::Dead
        ));
    }

    #[test]
    fn client_errors_give_up_sooner() {
        let now = Utc::now();
        let d = delays();
        assert!(matches!(
            decide(Verdict::ClientError, 2, &d, None, now),
            AttemptOutcome::Retry { .. }
        ));
        assert!(matches!(
            decide(Verdict::ClientError, 3, &d, None, now),
            AttemptOutcome::Dead
        ));
        assert!(matches!(
            decide(Verdict::Gone, 1, &d, None, now),
            AttemptOutcome::DisableWebhook { .. }
        ));
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let now = Utc::now();
        let d = delays();
        let w = retry_in(
            &decide(
                Verdict::Retriable,
                1,
                &d,
                Some(Duration::from_secs(600)),
                now,
            ),
            now,
        );
        assert_eq!(w.as_secs(), 600);
        let w = retry_in(
            &decide(
                Verdict::Retriable,
                1,
                &d,
                Some(Duration::from_secs(86400 * 30)),
                now,
            ),
            now,
        );
        assert_eq!(w, MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_forms() {
        let now: DateTime<Utc> = "2015-10-21T07:28:00Z".parse().unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
