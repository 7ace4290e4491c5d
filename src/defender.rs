//! Per-source-IP abuse score (after SFTPGo's defender and OpenSSH's PerSourcePenalties):
//! failed logins, protocol errors and connections left unauthenticated until the login grace
//! time add points; an IP reaching the threshold within the observation window is banned for a
//! while. A clean close before authentication (a health check, a banner read, a key scan)
//! scores nothing. Allow-listed networks are never banned.
//!
//! Bans are shared by every node on the store: a ban is written to the store as it is
//! made, and [`sync`] reads the running bans back about every second, so an address banned
//! on one node is refused by all of them within seconds. Scores stay per node (a
//! spray across nodes needs the threshold on one of them): only the verdict is shared.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::DefenderConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offence {
    LoginFailure,
    ProtocolError,
    /// Held an unauthenticated slot until the login grace time ran out.
    LoginTimeout,
}

/// An `ip` or `ip/prefix` of the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub fn parse(s: &str) -> Result<Net, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
            None => max,
        };
        Ok(Net { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

#[derive(Default)]
struct Entry {
    score: u32,
    window_start: Option<Instant>,
    banned_until: Option<Instant>,
}

pub struct Defender {
    cfg: DefenderConfig,
    allow: Vec<Net>,
    hosts: Mutex<HashMap<IpAddr, Entry>>,
    /// This node's id, recorded with the bans it makes.
    node: String,
    /// Bans read from the store (made by any node), until when.
    shared: Mutex<HashMap<IpAddr, Instant>>,
    /// Bans made here and not yet written to the store.
    outbox: Mutex<Vec<crate::store::Ban>>,
    wake: tokio::sync::Notify,
}

impl Defender {
    pub fn new(cfg: &DefenderConfig) -> Defender {
        Self::for_node(cfg, "")
    }

    pub fn for_node(cfg: &DefenderConfig, node: &str) -> Defender {
        let allow = cfg
            .allow_list
            .iter()
            .filter_map(|s| Net::parse(s).ok())
            .collect();
        Defender {
            cfg: cfg.clone(),
            allow,
            hosts: Mutex::new(HashMap::new()),
            node: node.to_owned(),
            shared: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(ip))
    }

    /// Whether `ip` is banned now; logs and counts the release of an expired ban.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        if !self.cfg.enabled || self.allowed(ip) {
            return false;
        }
        if self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .is_some_and(|&t| Instant::now() < t)
        {
            return true;
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = hosts.get_mut(&ip) else {
            return false;
        };
        match e.banned_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                hosts.remove(&ip);
                metrics::counter!("hookbridge_defender_releases_total").increment(1);
                tracing::info!(%ip, "ban expired; the address may connect again");
                false
            }
            None => false,
        }
    }

    /// Adds the offence's points; returns true when this offence got `ip` banned.
    pub fn record(&self, ip: IpAddr, offence: Offence) -> bool {
        if !self.cfg.enabled || self.allowed(ip) {
            return false;
        }
        let points = match offence {
            Offence::LoginFailure => self.cfg.score_login_failure,
            Offence::ProtocolError => self.cfg.score_protocol_error,
            Offence::LoginTimeout => self.cfg.score_login_timeout,
        };
        let now = Instant::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.len() > 100_000 {
            // Bound memory under a spray of addresses: drop what is neither banned nor recent.
            let window = self.cfg.observation_window.0;
            hosts.retain(|_, e| {
                e.banned_until.is_some() || e.window_start.is_some_and(|s| now - s < window)
            });
        }
        let e = hosts.entry(ip).or_default();
        if e.banned_until.is_some_and(|t| now < t) {
            return false;
        }
        if e.window_start
            .is_none_or(|s| now.duration_since(s) > self.cfg.observation_window.0)
        {
            e.window_start = Some(now);
            e.score = 0;
        }
        e.score += points;
        if e.score >= self.cfg.threshold {
            e.banned_until = Some(now + self.cfg.ban_time.0);
            metrics::counter!("hookbridge_defender_bans_total").increment(1);
            tracing::warn!(%ip, score = e.score, ban = ?self.cfg.ban_time.0, ?offence, "address banned for repeated failures");
            let until = chrono::Utc::now()
                + chrono::Duration::from_std(self.cfg.ban_time.0).unwrap_or(chrono::Duration::MAX);
            self.outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(crate::store::Ban {
                    ip,
                    until,
                    reason: format!("{offence:?}, score {}", e.score),
                    node: self.node.clone(),
                });
            self.wake.notify_one();
            return true;
        }
        false
    }

    pub fn banned_count(&self) -> usize {
        let now = Instant::now();
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .values()
            .filter(|e| e.banned_until.is_some_and(|t| now < t))
            .count()
    }
}

/// How often a node reads the bans of the others from the store.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Writes this node's new bans to the store at once and reads every running ban back each
/// [`SYNC_EVERY`]. A store that does not answer only delays sharing: local bans hold.
pub async fn sync(
    defender: std::sync::Arc<Defender>,
    store: std::sync::Arc<dyn crate::store::Store>,
    cancel: tokio_util::sync::CancellationToken,
) {
    if !defender.cfg.enabled {
        return;
    }
    loop {
        let new = std::mem::take(&mut *defender.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        for (i, ban) in new.iter().enumerate() {
            if let Err(e) = store.put_ban(ban).await {
                tracing::warn!(ip = %ban.ip, error = %e, "ban not yet shared with the other nodes; retrying");
                defender
                    .outbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&new[i..]);
                break;
            }
        }
        match store.active_bans(chrono::Utc::now()).await {
            Ok(bans) => {
                let now_utc = chrono::Utc::now();
                let now = Instant::now();
                let mut shared = defender.shared.lock().unwrap_or_else(|p| p.into_inner());
                let mut next = HashMap::with_capacity(bans.len());
                for b in bans {
                    let left = (b.until - now_utc).to_std().unwrap_or_default();
                    if !shared.contains_key(&b.ip) && b.node != defender.node {
                        tracing::info!(ip = %b.ip, by = %b.node, reason = %b.reason, "address banned by another node");
                    }
                    next.insert(b.ip, now + left);
                }
                *shared = next;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the bans of the other nodes; retrying")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = defender.wake.notified() => {}
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
    }
}

pub fn default_ban_time() -> Duration {
    Duration::from_secs(15 * 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn cfg() -> DefenderConfig {
        DefenderConfig {
            threshold: 3,
            ban_time: Dur(Duration::from_millis(50)),
            allow_list: vec!["10.1.0.0/16".into()],
            ..Default::default()
        }
    }

    #[test]
    fn bans_at_the_threshold_and_releases_after_the_ban() {
        let d = Defender::new(&cfg());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!d.record(ip, Offence::LoginFailure));
        assert!(!d.record(ip, Offence::LoginFailure));
        assert!(d.record(ip, Offence::LoginFailure));
        assert!(d.is_banned(ip));
        assert!(!d.is_banned("192.0.2.8".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!d.is_banned(ip));
    }

    #[test]
    fn allow_list_is_never_banned() {
        let d = Defender::new(&cfg());
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        for _ in 0..10 {
            assert!(!d.record(ip, Offence::ProtocolError));
        }
        assert!(!d.is_banned(ip));
        assert!(Net::parse("::ffff:0:0/96").is_ok());
        assert!(Net::parse("10.0.0.0/33").is_err());
        assert!(Net::parse("10.1.0.0/16")
            .unwrap()
            .contains("::ffff:10.1.9.9".parse().unwrap()));
    }
}
