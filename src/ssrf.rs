//! SSRF guard: webhook and custom-value destinations must be public unless the operator
//! allows private ones. Checked on the literal URL at creation and on every resolved
//! address at connect time (so DNS rebinding cannot sneak past the first check).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            forbidden_v6(v6)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, cloud metadata
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 IETF
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
        || o[0] >= 240
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 can reach private v4
        || (s[0] == 0x2001 && s[1] == 0xdb8)
        || (s[0] == 0xfd00 && s[1] == 0xec2) // AWS IMDS v6
}

/// Checks a URL whose host is an IP literal or a well-known local name.
pub fn check_literal(url: &url::Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) if is_forbidden(IpAddr::V4(ip)) => Err(format!(
            "destination {ip} is a private, loopback or link-local address"
        )),
        Some(url::Host::Ipv6(ip)) if is_forbidden(IpAddr::V6(ip)) => Err(format!(
            "destination {ip} is a private, loopback or link-local address"
        )),
        Some(url::Host::Domain(d))
            if d == "localhost" || d.ends_with(".localhost") || d == "metadata.google.internal" =>
        {
            Err(format!("destination {d} is a local name"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for bad in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "192.168.1.1",
            "172.16.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fc00::1",
            "::ffff:127.0.0.1",
            "100.64.0.1",
        ] {
            assert!(is_forbidden(bad.parse().unwrap()), "{bad}");
        }
        for good in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(!is_forbidden(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn literal_urls() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(check_literal(&u("http://127.0.0.1/x"), false).is_err());
        assert!(check_literal(&u("http://[::1]/x"), false).is_err());
        assert!(check_literal(&u("http://localhost/x"), false).is_err());
        assert!(check_literal(&u("http://127.0.0.1/x"), true).is_ok());
        assert!(check_literal(&u("https://example.com/x"), false).is_ok());
    }
}
