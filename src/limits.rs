//! Per-org ingest rate limits (token buckets) and the quota rule. Folder usage itself is
//! counted in the store (`Store::org_usage`), so that every node sees one count.

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

/// An org's quota as the committer checks it; 0 = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub files: u64,
    pub bytes: u64,
}

impl From<&EffectiveLimits> for Quota {
    fn from(l: &EffectiveLimits) -> Self {
        Quota {
            files: l.quota_files,
            bytes: l.quota_bytes,
        }
    }
}

/// Why `incoming` more files/bytes would exceed the org's quota, if they would.
pub fn over_quota(usage: OrgUsage, quota: Quota, files: u64, bytes: u64) -> Option<String> {
    if quota.files > 0 && usage.files + files > quota.files {
        return Some(format!(
            "the org folder holds {} of {} files allowed",
            usage.files, quota.files
        ));
    }
    if quota.bytes > 0 && usage.bytes + bytes > quota.bytes {
        return Some(format!(
            "the org folder holds {} of {} bytes allowed",
            usage.bytes, quota.bytes
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
        let l = Quota::from(&l);
        assert!(over_quota(
            OrgUsage {
                files: 1,
                bytes: 10
            },
            l,
            1,
            10
        )
        .is_none());
        assert!(over_quota(
            OrgUsage {
                files: 2,
                bytes: 10
            },
            l,
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
            l,
            1,
            10
        )
        .unwrap()
        .contains("bytes"));
    }
}
