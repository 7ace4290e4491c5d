//! SSRF guard: webhook and custom-value destinations must be public unless the operator
//! allows private ones. Checked on the literal URL at creation and before every request
//! (an IP literal never reaches the resolver), and on every resolved address at connect
//! time (so DNS rebinding cannot sneak past the first check).
//!
//! Every address, literal or resolved, is checked against ONE table per family: the IANA
//! IPv4 and IPv6 Special-Purpose Address Registries, plus the blocks outside IPv6 global
//! unicast (`2000::/3`) and the deprecated ones (site-local, v4-compatible). The few
//! special blocks IANA marks "globally reachable" (AS112, PCP/TURN anycast, …) are refused
//! too: they are anycast services, never someone's webhook receiver. IPv6 forms that embed
//! an IPv4 address (v4-mapped, v4-translated, 6to4, NAT64 `64:ff9b::/96`) are judged by that address, so
//! `[::ffff:7f00:1]` or `[2002:7f00:1::]` cannot reach loopback; Teredo is refused whole.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One row of the table: a block and why it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Special<A> {
    pub net: A,
    pub prefix: u8,
    pub what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8, what: &'static str) -> Special<Ipv4Addr> {
    Special {
        net: Ipv4Addr::new(a, b, c, d),
        prefix,
        what,
    }
}

const fn v6(s: [u16; 8], prefix: u8, what: &'static str) -> Special<Ipv6Addr> {
    Special {
        net: Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
        what,
    }
}

/// IANA IPv4 Special-Purpose Address Registry, plus multicast and the reserved 240/4.
pub const V4_TABLE: &[Special<Ipv4Addr>] = &[
    v4(0, 0, 0, 0, 8, "\"this network\" (RFC 791)"),
    v4(10, 0, 0, 0, 8, "private-use (RFC 1918)"),
    v4(
        100,
        64,
        0,
        0,
        10,
        "shared address space / carrier-grade NAT (RFC 6598)",
    ),
    v4(127, 0, 0, 0, 8, "loopback (RFC 1122)"),
    v4(169, 254, 0, 0, 16, "link-local, cloud metadata (RFC 3927)"),
    v4(172, 16, 0, 0, 12, "private-use (RFC 1918)"),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments (RFC 6890)"),
    v4(192, 0, 2, 0, 24, "documentation TEST-NET-1 (RFC 5737)"),
    v4(192, 31, 196, 0, 24, "AS112-v4 (RFC 7535)"),
    v4(192, 52, 193, 0, 24, "AMT (RFC 7450)"),
    v4(
        192,
        88,
        99,
        0,
        24,
        "deprecated 6to4 relay anycast (RFC 7526)",
    ),
    v4(192, 168, 0, 0, 16, "private-use (RFC 1918)"),
    v4(192, 175, 48, 0, 24, "AS112 direct delegation (RFC 7534)"),
    v4(198, 18, 0, 0, 15, "benchmarking (RFC 2544)"),
    v4(198, 51, 100, 0, 24, "documentation TEST-NET-2 (RFC 5737)"),
    v4(203, 0, 113, 0, 24, "documentation TEST-NET-3 (RFC 5737)"),
    v4(224, 0, 0, 0, 4, "multicast (RFC 5771)"),
    v4(
        240,
        0,
        0,
        0,
        4,
        "reserved, limited broadcast (RFC 1112, RFC 919)",
    ),
];

/// IANA IPv6 Special-Purpose Address Registry, the deprecated blocks, and everything
/// outside global unicast. The embedded-IPv4 prefixes are handled before this table.
pub const V6_TABLE: &[Special<Ipv6Addr>] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified (RFC 4291)"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback (RFC 4291)"),
    v6(
        [0, 0, 0, 0, 0, 0, 0, 0],
        96,
        "deprecated IPv4-compatible (RFC 4291)",
    ),
    v6(
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "local-use NAT64 (RFC 8215)",
    ),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (RFC 6666)"),
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy prefix (RFC 9780)"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo (RFC 4380)"),
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments (RFC 2928)",
    ),
    v6(
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        "documentation (RFC 3849)",
    ),
    v6(
        [0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0],
        48,
        "AS112 direct delegation (RFC 7534)",
    ),
    v6(
        [0x3fff, 0, 0, 0, 0, 0, 0, 0],
        20,
        "documentation (RFC 9637)",
    ),
    v6(
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "segment routing SIDs (RFC 9602)",
    ),
    v6(
        [0xfc00, 0, 0, 0, 0, 0, 0, 0],
        7,
        "unique local, AWS IMDS (RFC 4193)",
    ),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local (RFC 4291)"),
    v6(
        [0xfec0, 0, 0, 0, 0, 0, 0, 0],
        10,
        "deprecated site-local (RFC 3879)",
    ),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast (RFC 4291)"),
    // Everything outside 2000::/3 is unassigned or one of the blocks above.
    v6(
        [0, 0, 0, 0, 0, 0, 0, 0],
        3,
        "outside global unicast 2000::/3 (RFC 4291)",
    ),
    v6(
        [0x4000, 0, 0, 0, 0, 0, 0, 0],
        2,
        "outside global unicast 2000::/3 (RFC 4291)",
    ),
    v6(
        [0x8000, 0, 0, 0, 0, 0, 0, 0],
        1,
        "outside global unicast 2000::/3 (RFC 4291)",
    ),
];

fn in_v4(ip: Ipv4Addr, row: &Special<Ipv4Addr>) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(row.prefix))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(row.net) & mask
}

fn in_v6(ip: Ipv6Addr, row: &Special<Ipv6Addr>) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(row.prefix))
        .unwrap_or(0);
    u128::from(ip) & mask == u128::from(row.net) & mask
}

/// The IPv4 address an IPv6 address carries, for the forms that route to it.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<(Ipv4Addr, &'static str)> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff {
        return Some((low, "IPv4-mapped"));
    }
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return Some((low, "IPv4-translated ::ffff:0:0/96"));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some((low, "NAT64 64:ff9b::/96"));
    }
    if s[0] == 0x2002 {
        let mid = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return Some((mid, "6to4 2002::/16"));
    }
    None
}

/// Why `ip` may not be a destination, or `None` when it is a public unicast address.
pub fn forbidden_reason(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(a) => V4_TABLE
            .iter()
            .find(|r| in_v4(a, r))
            .map(|r| r.what.to_owned()),
        IpAddr::V6(a) => {
            if let Some((inner, form)) = embedded_v4(a) {
                return forbidden_reason(IpAddr::V4(inner))
                    .map(|why| format!("{form} form of {inner}, {why}"));
            }
            V6_TABLE
                .iter()
                .find(|r| in_v6(a, r))
                .map(|r| r.what.to_owned())
        }
    }
}

pub fn is_forbidden(ip: IpAddr) -> bool {
    forbidden_reason(ip).is_some()
}

/// Special-use names (RFC 6761, RFC 6762, ICANN's `.internal`) that never name a public
/// host, and the cloud metadata names. Compared without the root dot: `localhost.` is
/// `localhost`.
const LOCAL_NAMES: &[&str] = &["localhost", "metadata.google.internal", "metadata"];
const LOCAL_SUFFIXES: &[&str] = &[
    ".localhost",
    ".local",
    ".internal",
    ".home.arpa",
    ".invalid",
    ".test",
    ".onion",
];

fn is_local_name(domain: &str) -> bool {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    LOCAL_NAMES.contains(&d.as_str())
        || LOCAL_SUFFIXES.iter().any(|s| d.ends_with(s) || d == s[1..])
}

/// Checks a URL whose host is an IP literal or a special-use local name.
pub fn check_literal(url: &url::Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let refused = |ip: IpAddr| {
        forbidden_reason(ip).map_or(Ok(()), |why| {
            Err(format!(
                "destination {ip} is a private, loopback or special-purpose address ({why})"
            ))
        })
    };
    match url.host() {
        Some(url::Host::Ipv4(ip)) => refused(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => refused(IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) if is_local_name(d) => {
            Err(format!("destination {d} is a local name"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_v4(r: &Special<Ipv4Addr>) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(r.net) | u32::MAX.checked_shr(u32::from(r.prefix)).unwrap_or(0))
    }
    fn last_v6(r: &Special<Ipv6Addr>) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(r.net) | u128::MAX.checked_shr(u32::from(r.prefix)).unwrap_or(0))
    }

    #[test]
    fn every_row_of_both_tables_is_refused_first_to_last() {
        for r in V4_TABLE {
            for ip in [r.net, last_v4(r)] {
                assert!(is_forbidden(IpAddr::V4(ip)), "{ip} ({})", r.what);
                // The same address in every embedded form is refused too.
                for wrapped in [ip.to_ipv6_mapped(), nat64(ip), six_to_four(ip)] {
                    assert!(is_forbidden(IpAddr::V6(wrapped)), "{wrapped} ({})", r.what);
                }
            }
        }
        for r in V6_TABLE {
            for ip in [r.net, last_v6(r)] {
                if embedded_v4(ip).is_none() {
                    assert!(is_forbidden(IpAddr::V6(ip)), "{ip} ({})", r.what);
                }
            }
        }
    }

    fn nat64(ip: Ipv4Addr) -> Ipv6Addr {
        let o = ip.octets();
        Ipv6Addr::new(
            0x64,
            0xff9b,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([o[2], o[3]]),
        )
    }
    fn six_to_four(ip: Ipv4Addr) -> Ipv6Addr {
        let o = ip.octets();
        Ipv6Addr::new(
            0x2002,
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([o[2], o[3]]),
            0,
            0,
            0,
            0,
            1,
        )
    }

    #[test]
    fn public_neighbours_pass() {
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.0",
            "192.88.98.255",
            "192.88.100.0",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = good.parse().unwrap();
            assert_eq!(forbidden_reason(ip), None, "{good}");
        }
    }

    #[test]
    fn the_probe_literals_are_refused() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        for bad in [
            "http://[::127.0.0.1]/x",
            "http://[::ffff:0:7f00:1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[2002:7f00:1::]/x",
            "http://[2001::1]/x",
            "http://[fec0::1]/x",
            "http://[100::1]/x",
            "http://[64:ff9b::a9fe:a9fe]/x",
            "http://[fd00:ec2::254]/x",
            "http://192.88.99.1/x",
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://localhost./x",
            "http://LOCALHOST/x",
            "http://a.localhost/x",
            "http://metadata.google.internal./x",
            "http://printer.local/x",
            "http://127.0.0.1/x",
            "http://[::1]/x",
        ] {
            assert!(check_literal(&u(bad), false).is_err(), "{bad}");
            assert!(
                check_literal(&u(bad), true).is_ok(),
                "{bad} with allow_private"
            );
        }
        assert!(check_literal(&u("https://example.com/x"), false).is_ok());
        assert!(check_literal(&u("https://localhost.example.com/x"), false).is_ok());
        let why = check_literal(&u("http://[::ffff:0:7f00:1]/x"), false).unwrap_err();
        assert!(why.contains("loopback"), "{why}");
    }
}
