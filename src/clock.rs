//! The one clock that stamps accept times (roll-up partitions) and decides when a
//! roll-up partition closes.
//!
//! Tests need hours to pass in seconds. `HOOKBRIDGE_TEST_CLOCK=<unix seconds>:<speed>`
//! (read once; for tests only, not an operator setting) makes time run `speed` times
//! faster from that instant on: `now = origin + (real now − origin) × speed`. The origin
//! is fixed by the caller, so a daemon restarted with the same value continues the same
//! simulated timeline. Unset (production), this is `Utc::now()`.

use std::sync::OnceLock;

use chrono::{DateTime, TimeZone, Utc};

pub const TEST_CLOCK_ENV: &str = "HOOKBRIDGE_TEST_CLOCK";

fn test_clock() -> Option<(i64, f64)> {
    static CLOCK: OnceLock<Option<(i64, f64)>> = OnceLock::new();
    *CLOCK.get_or_init(|| {
        let v = std::env::var(TEST_CLOCK_ENV).ok()?;
        let parsed = v
            .split_once(':')
            .and_then(|(o, s)| Some((o.parse::<i64>().ok()?, s.parse::<f64>().ok()?)))
            .filter(|(_, s)| *s > 0.0);
        if parsed.is_none() {
            tracing::warn!(value = %v, "{TEST_CLOCK_ENV} is not <unix seconds>:<speed>; using the real clock");
        } else {
            tracing::warn!(value = %v, "{TEST_CLOCK_ENV} is set: accept times run on a simulated test clock");
        }
        parsed
    })
}

pub fn now() -> DateTime<Utc> {
    let real = Utc::now();
    match test_clock() {
        None => real,
        Some((origin, speed)) => {
            let origin_us = origin * 1_000_000;
            let elapsed = (real.timestamp_micros() - origin_us) as f64 * speed;
            Utc.timestamp_micros(origin_us + elapsed as i64)
                .single()
                .unwrap_or(real)
        }
    }
}

/// How long to really wait for `simulated` to pass on this clock.
pub fn real_duration(simulated: std::time::Duration) -> std::time::Duration {
    match test_clock() {
        None => simulated,
        Some((_, speed)) => simulated.div_f64(speed),
    }
}

/// How much simulated time passes in `real` (the inverse of [`real_duration`]).
pub fn simulated(real: std::time::Duration) -> chrono::Duration {
    let d = match test_clock() {
        None => real,
        Some((_, speed)) => real.mul_f64(speed),
    };
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
