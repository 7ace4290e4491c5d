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

/// What each org folder holds (recounted by the sweeper, bumped by the spool in between),
/// plus what batches being committed have reserved. Reservations are taken by the
/// committer under one lock, so concurrent posts cannot all pass the same quota check.
#[derive(Default)]
pub struct Usage {
    by_org: Mutex<HashMap<String, Counted>>,
}

#[derive(Default)]
struct Counted {
    /// On disk, as last counted plus what was placed since.
    held: OrgUsage,
    /// Reserved by events whose files are being written.
    reserved: OrgUsage,
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

impl Usage {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Counted>> {
        self.by_org.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On disk plus reserved.
    pub fn get(&self, org: &str) -> OrgUsage {
        self.lock()
            .get(org)
            .map(|c| OrgUsage {
                files: c.held.files + c.reserved.files,
                bytes: c.held.bytes + c.reserved.bytes,
            })
            .unwrap_or_default()
    }

    pub fn add(&self, org: &str, files: u64, bytes: u64) {
        let mut map = self.lock();
        let u = &mut map.entry(org.to_owned()).or_default().held;
        u.files += files;
        u.bytes += bytes;
    }

    /// Reserves room for `files`/`bytes` if `quota` allows it, atomically with the check;
    /// otherwise says why not.
    pub fn reserve(&self, org: &str, quota: Quota, files: u64, bytes: u64) -> Result<(), String> {
        let mut map = self.lock();
        let c = map.entry(org.to_owned()).or_default();
        let now = OrgUsage {
            files: c.held.files + c.reserved.files,
            bytes: c.held.bytes + c.reserved.bytes,
        };
        if let Some(why) = over_quota(now, quota, files, bytes) {
            return Err(why);
        }
        c.reserved.files += files;
        c.reserved.bytes += bytes;
        Ok(())
    }

    /// Ends a reservation: `placed` turns it into held files, otherwise it is given back.
    pub fn settle(&self, org: &str, files: u64, bytes: u64, placed: bool) {
        let mut map = self.lock();
        let c = map.entry(org.to_owned()).or_default();
        c.reserved.files = c.reserved.files.saturating_sub(files);
        c.reserved.bytes = c.reserved.bytes.saturating_sub(bytes);
        if placed {
            c.held.files += files;
            c.held.bytes += bytes;
        }
    }

    /// A recount of what is on disk; reservations in flight stay.
    pub fn set(&self, org: &str, usage: OrgUsage) {
        self.lock().entry(org.to_owned()).or_default().held = usage;
    }

    pub fn remove(&self, org: &str) {
        self.lock().remove(org);
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

#[cfg(test)]
mod reserve_tests {
    use super::*;

    #[test]
    fn reservations_count_until_settled() {
        let u = Usage::default();
        let q = Quota { files: 2, bytes: 0 };
        u.reserve("a", q, 1, 10).unwrap();
        u.reserve("a", q, 1, 10).unwrap();
        assert!(u.reserve("a", q, 1, 10).is_err());
        u.settle("a", 1, 10, false);
        u.reserve("a", q, 1, 10).unwrap();
        u.settle("a", 1, 10, true);
        // A recount does not forget the reservation still in flight.
        u.set(
            "a",
            OrgUsage {
                files: 1,
                bytes: 10,
            },
        );
        assert!(u.reserve("a", q, 1, 10).is_err());
        assert_eq!(
            u.get("a"),
            OrgUsage {
                files: 2,
                bytes: 20
            }
        );
    }
}
