//! Per-org ingest rate limits (token buckets) and folder usage for quotas.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::config::EffectiveLimits;

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token of `org`'s bucket, or says after how many seconds one is available.
    pub fn check(&self, org: &str, rate: f64, burst: u32) -> Result<(), u64> {
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(burst.max(1));
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(org.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OrgUsage {
    pub files: u64,
    pub bytes: u64,
}

/// What each org folder holds: recounted by the sweeper, bumped by the spool in between.
#[derive(Default)]
pub struct Usage {
    by_org: Mutex<HashMap<String, OrgUsage>>,
}

impl Usage {
    pub fn get(&self, org: &str) -> OrgUsage {
        self.by_org
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(org)
            .copied()
            .unwrap_or_default()
    }

    pub fn add(&self, org: &str, files: u64, bytes: u64) {
        let mut map = self.by_org.lock().unwrap_or_else(|p| p.into_inner());
        let u = map.entry(org.to_owned()).or_default();
        u.files += files;
        u.bytes += bytes;
    }

    pub fn set(&self, org: &str, usage: OrgUsage) {
        self.by_org
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(org.to_owned(), usage);
    }

    pub fn remove(&self, org: &str) {
        self.by_org
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(org);
    }
}

/// Why `incoming` more files/bytes would exceed the org's quota, if they would.
pub fn over_quota(
    usage: OrgUsage,
    limits: &EffectiveLimits,
    files: u64,
    bytes: u64,
) -> Option<String> {
    if limits.quota_files > 0 && usage.files + files > limits.quota_files {
        return Some(format!(
            "the org folder holds {} of {} files allowed",
            usage.files, limits.quota_files
        ));
    }
    if limits.quota_bytes > 0 && usage.bytes + bytes > limits.quota_bytes {
        return Some(format!(
            "the org folder holds {} of {} bytes allowed",
            usage.bytes, limits.quota_bytes
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses_with_a_wait() {
        let rl = RateLimiter::default();
        // 0.01/s refills one token in 100 s: a loaded machine cannot refill between checks.
        for _ in 0..5 {
            rl.check("a", 0.01, 5).unwrap();
        }
        assert_eq!(rl.check("a", 0.01, 5), Err(100));
        rl.check("b", 0.01, 5).unwrap();
        rl.check("a", 0.0, 5).unwrap();
    }

    #[test]
    fn quota() {
        let l = crate::config::LimitsConfig {
            quota_files: 2,
            quota_bytes: 100,
            ..Default::default()
        }
        .for_org(&Default::default());
        assert!(over_quota(
            OrgUsage {
                files: 1,
                bytes: 10
            },
            &l,
            1,
            10
        )
        .is_none());
        assert!(over_quota(
            OrgUsage {
                files: 2,
                bytes: 10
            },
            &l,
            1,
            10
        )
        .unwrap()
        .contains("files"));
        assert!(over_quota(
            OrgUsage {
                files: 0,
                bytes: 95
            },
            &l,
            1,
            10
        )
        .unwrap()
        .contains("bytes"));
    }
}
