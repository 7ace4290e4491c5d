//! Counters of connections per source IP, with a slot that gives its place back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many connections each source IP holds of one kind (all sessions, or unauthenticated).
#[derive(Default, Clone)]
pub(super) struct PerIp(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerIp {
    /// A slot for `ip`, or `None` when it already holds `max`.
    pub(super) fn take(&self, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&ip).copied().unwrap_or(0)
    }
}

/// Counts one connection against its source IP until dropped.
pub(super) struct IpSlot {
    map: PerIp,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_share_and_dropped_slots_come_back() {
        let m = PerIp::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = m.take(a, 2).unwrap();
        let _s2 = m.take(a, 2).unwrap();
        assert!(m.take(a, 2).is_none());
        assert!(m.take(b, 2).is_some(), "another source keeps its share");
        drop(s1);
        assert_eq!(m.held(a), 1);
        assert!(m.take(a, 2).is_some());
    }
}
