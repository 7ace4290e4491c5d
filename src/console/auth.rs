//! Sign-in links, sessions and CSRF tokens of the console.
//!
//! A link is a one-time token for one org, made by `POST /v1/orgs/{org}/console-links`
//! (admin token) and valid for minutes. Opening it starts a session: a random id in an
//! HttpOnly, `SameSite=Strict` cookie (and `Secure` when the request came over TLS through
//! a proxy that says so in `X-Forwarded-Proto`). Each session belongs to one org and holds
//! the CSRF token every form must send back. Both live in memory: a restart signs everyone
//! out, which is the safe side for a console.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use chrono::{DateTime, Utc};

/// Default lifetime of a sign-in link.
pub const LINK_TTL: Duration = Duration::from_secs(300);
/// Longest lifetime an admin may ask for a link.
pub const LINK_TTL_MAX: Duration = Duration::from_secs(900);
/// A session ends this long after sign-in, whatever it does.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Bounds memory if someone makes links in a loop: the oldest are dropped first.
const MAX_ENTRIES: usize = 10_000;

pub const COOKIE: &str = "hb_console";

#[derive(Debug, Clone)]
pub struct Session {
    pub org: String,
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

struct Link {
    org: String,
    expires_at: DateTime<Utc>,
}

/// Links not yet used and live sessions, keyed by their random tokens.
#[derive(Default)]
pub struct Sessions {
    links: Mutex<HashMap<String, Link>>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, URL-safe: unguessable and fine in a query string or a cookie.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
}

fn prune<V>(map: &mut HashMap<String, V>, expiry: impl Fn(&V) -> DateTime<Utc>) {
    let now = Utc::now();
    map.retain(|_, v| expiry(v) > now);
    while map.len() >= MAX_ENTRIES {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| expiry(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Sessions {
    /// A new one-time link token for `org`, valid for `ttl`.
    pub fn new_link(&self, org: &str, ttl: Duration) -> (String, DateTime<Utc>) {
        let token = random_token();
        let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut links, |l| l.expires_at);
        links.insert(
            token.clone(),
            Link {
                org: org.to_owned(),
                expires_at,
            },
        );
        (token, expires_at)
    }

    /// Uses up a link: the session id and session it starts, or `None` for a link that is
    /// unknown, already used or expired (all three look the same to the caller).
    pub fn redeem(&self, token: &str) -> Option<(String, Session)> {
        let link = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token)?;
        if link.expires_at <= Utc::now() {
            return None;
        }
        let id = random_token();
        let session = Session {
            org: link.org,
            csrf: random_token(),
            expires_at: Utc::now() + chrono::Duration::from_std(SESSION_TTL).unwrap_or_default(),
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut sessions, |s| s.expires_at);
        sessions.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session of the request's cookie.
    pub fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(id) {
            Some(s) if s.expires_at > Utc::now() => Some(s.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
    }
}

/// The value of cookie `name` in the request, if sent.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the browser reached us over TLS (terminated by a proxy in front of hookbridge,
/// which serves plain HTTP itself).
pub fn behind_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value that starts (or, with `max_age` 0, ends) a session.
pub fn set_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_works_once_and_not_after_expiry() {
        let s = Sessions::default();
        let (t, _) = s.new_link("acme", LINK_TTL);
        let (id, sess) = s.redeem(&t).expect("fresh link");
        assert_eq!(sess.org, "acme");
        assert!(s.redeem(&t).is_none(), "second use");
        let (t2, _) = s.new_link("acme", Duration::ZERO);
        assert!(s.redeem(&t2).is_none(), "expired");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(s.get(&h).map(|s| s.org), Some("acme".into()));
        s.end(&h);
        assert!(s.get(&h).is_none());
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("x", SESSION_TTL, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!set_cookie("x", SESSION_TTL, false).contains("Secure"));
    }
}
