//! Signing of outgoing requests, two independent ways so receivers can pick either:
//!
//! * `Authorization: Bearer <JWT>` — EdDSA (Ed25519) with hookbridge's own key; the
//!   public halves are served at `/.well-known/jwks.json`. Claims: `iss`, `sub` (org),
//!   `aud` (the destination URL), `iat`, `exp`, `jti` (delivery id) and `body_sha256`:
//!   the **lowercase hex** SHA-256 of the exact body bytes (empty body for GETs).
//! * Standard Webhooks: `webhook-id`, `webhook-timestamp`, and `webhook-signature`
//!   = `v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, where the secret is
//!   the base64 part after `whsec_` of the webhook's own secret.
//!
//! The key ring is a list so that rotation can keep retired keys published for
//! [`ROTATION_GRACE`] while receivers refresh their JWKS caches. It is kept where
//! `crate::identity` keeps the node's keys: `<data>/secrets/webhook_signing_keys.json`
//! (mode 0600) on one node, the store in scale-out (see `keyring` for rotation and how
//! the other nodes follow it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use aws_lc_rs::signature::Ed25519KeyPair;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How long a retired key stays in the JWKS after a rotation.
pub const ROTATION_GRACE: Duration = Duration::days(7);
/// Lifetime of a delivery JWT; retries sign anew, so this only bounds replays of one request.
const JWT_TTL: Duration = Duration::minutes(5);
/// Bound of the HMAC key cache; past it the cache starts over (one rebuild per secret).
const HMAC_CACHE_MAX: usize = 4096;
/// PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signing key ring: {0}")]
    Ring(String),
    #[error("signing key: {0}")]
    Key(String),
    #[error("JWT encoding: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

#[derive(Serialize, Deserialize, Clone)]
struct StoredKey {
    kid: String,
    /// Base64 (standard) of the 32-byte Ed25519 seed.
    seed: String,
    created_at: DateTime<Utc>,
    #[serde(default)]
    retired_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, Deserialize, Default)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

struct LoadedKey {
    stored: StoredKey,
    /// The parsed key pair, so signing does not parse the PKCS#8 document and derive the
    /// public key again for every delivery (what `jsonwebtoken::encode` does).
    pair: Ed25519KeyPair,
    /// `base64url(JSON header)`: the same for every token this key signs.
    header_b64: String,
    jwk: Jwk,
}

fn load_key(stored: StoredKey) -> Result<LoadedKey, SigningError> {
    let seed = STANDARD
        .decode(&stored.seed)
        .map_err(|e| SigningError::Key(format!("key {}: seed is not base64: {e}", stored.kid)))?;
    if seed.len() != 32 {
        return Err(SigningError::Key(format!(
            "key {}: seed must be 32 bytes",
            stored.kid
        )));
    }
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let enc = EncodingKey::from_ed_der(&der);
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::EdDSA)?;
    jwk.common.key_id = Some(stored.kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(KeyAlgorithm::EdDSA);
    let pair = Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|e| SigningError::Key(format!("key {}: {e}", stored.kid)))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(stored.kid.clone());
    let header_b64 = b64_json(&header)?;
    Ok(LoadedKey {
        stored,
        pair,
        header_b64,
        jwk,
    })
}

/// `base64url(JSON)` without padding, as a JWT part is encoded.
fn b64_json<T: Serialize>(v: &T) -> Result<String, SigningError> {
    let json = serde_json::to_vec(v).map_err(|e| SigningError::Key(format!("JSON: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

fn new_stored_key() -> StoredKey {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    StoredKey {
        kid: format!("hb_{}", ulid::Ulid::new().to_string().to_lowercase()),
        seed: STANDARD.encode(seed),
        created_at: Utc::now(),
        retired_at: None,
    }
}

fn parse_ring(ring: &str, version: i64) -> Result<Ring, SigningError> {
    let file: KeyFile = serde_json::from_str(ring)
        .map_err(|e| SigningError::Ring(format!("not a key list: {e}")))?;
    if !file.keys.iter().any(|k| k.retired_at.is_none()) {
        return Err(SigningError::Ring("holds no active (unretired) key".into()));
    }
    Ok(Ring {
        version,
        keys: file
            .keys
            .into_iter()
            .map(load_key)
            .collect::<Result<Vec<_>, _>>()?,
    })
}

fn ring_json(file: &KeyFile) -> Result<String, SigningError> {
    serde_json::to_string_pretty(file).map_err(|e| SigningError::Ring(format!("JSON: {e}")))
}

/// The loaded ring and the version of the kept ring it was loaded from.
struct Ring {
    version: i64,
    keys: Vec<LoadedKey>,
}

/// The key ring: the newest unretired key signs; every unexpired key is published.
pub struct Signer {
    issuer: String,
    keys: RwLock<Ring>,
    /// Standard Webhooks HMAC keys by webhook secret: decoding the secret and hashing it
    /// into the HMAC's inner/outer pads cost ~5k instructions per delivery otherwise. Keyed
    /// by the secret itself, so a rotated secret simply gets a new entry.
    hmac_keys: Mutex<HashMap<String, Arc<aws_lc_rs::hmac::Key>>>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
    jti: &'a str,
    body_sha256: &'a str,
}

/// What one signed request carries.
pub struct SignedHeaders {
    pub authorization: String,
    pub webhook_id: String,
    pub webhook_timestamp: String,
    /// Absent when the destination has no Standard Webhooks secret (custom values).
    pub webhook_signature: Option<String>,
}

impl SignedHeaders {
    /// Adds the signature headers to `headers` (values straight from the strings, no copy).
    pub fn apply(
        self,
        headers: &mut HeaderMap,
    ) -> Result<(), axum::http::header::InvalidHeaderValue> {
        // Static names: parsing a custom name from a `&str` copies it into a new buffer
        // on every request.
        headers.insert(header::AUTHORIZATION, value(self.authorization)?);
        headers.insert(
            HeaderName::from_static("webhook-id"),
            value(self.webhook_id)?,
        );
        headers.insert(
            HeaderName::from_static("webhook-timestamp"),
            value(self.webhook_timestamp)?,
        );
        if let Some(s) = self.webhook_signature {
            headers.insert(HeaderName::from_static("webhook-signature"), value(s)?);
        }
        Ok(())
    }
}

fn value(s: String) -> Result<HeaderValue, axum::http::header::InvalidHeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
}

impl Signer {
    /// A new ring of one key: the first value of a kept ring.
    pub fn new_ring() -> Result<String, SigningError> {
        ring_json(&KeyFile {
            keys: vec![new_stored_key()],
        })
    }

    /// Loads a kept ring (`ring` as [`Signer::new_ring`] and [`Signer::rotated`] make it).
    pub fn from_ring(issuer: &str, ring: &str, version: i64) -> Result<Self, SigningError> {
        Ok(Self {
            issuer: issuer.to_owned(),
            keys: RwLock::new(parse_ring(ring, version)?),
            hmac_keys: Mutex::new(HashMap::new()),
        })
    }

    /// The version of the kept ring this signer holds.
    pub fn version(&self) -> i64 {
        self.read().version
    }

    /// Takes a newer kept ring (a rotation here or on another node); an older or equal
    /// version is ignored, so a slow poll cannot undo a rotation. True when it changed.
    pub fn install(&self, ring: &str, version: i64) -> Result<bool, SigningError> {
        let parsed = parse_ring(ring, version)?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if version <= keys.version {
            return Ok(false);
        }
        *keys = parsed;
        Ok(true)
    }

    /// The ring after one rotation of this one, to be kept: a new signing key, the
    /// previous ones retired (published for [`ROTATION_GRACE`]), expired ones dropped.
    /// Returns the ring and the new key id.
    pub fn rotated(&self) -> Result<(String, String), SigningError> {
        let now = Utc::now();
        let mut stored: Vec<StoredKey> = self
            .read()
            .keys
            .iter()
            .map(|k| k.stored.clone())
            .filter(|k| k.retired_at.is_none_or(|t| now - t < ROTATION_GRACE))
            .collect();
        for k in &mut stored {
            k.retired_at.get_or_insert(now);
        }
        let fresh = new_stored_key();
        let kid = fresh.kid.clone();
        stored.push(fresh);
        Ok((ring_json(&KeyFile { keys: stored })?, kid))
    }

    /// The key id that signs now.
    pub fn active_kid(&self) -> Option<String> {
        self.read()
            .keys
            .iter()
            .rev()
            .find(|k| k.stored.retired_at.is_none())
            .map(|k| k.stored.kid.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Public keys receivers verify with: the active key and those still in their grace period.
    pub fn jwks(&self) -> JwkSet {
        let now = Utc::now();
        let ring = self.read();
        JwkSet {
            keys: ring
                .keys
                .iter()
                .filter(|k| k.stored.retired_at.is_none_or(|t| now - t < ROTATION_GRACE))
                .map(|k| k.jwk.clone())
                .collect(),
        }
    }

    /// Signs one request to `aud` on behalf of `org`. `id` is the delivery id: the JWT's
    /// `jti` and `webhook-id`, identical on every retry so receivers can dedupe.
    pub fn sign(
        &self,
        org: &str,
        aud: &str,
        id: &str,
        body: &[u8],
        secret: Option<&str>,
    ) -> Result<SignedHeaders, SigningError> {
        let now = Utc::now();
        let mut body_hex = [0u8; 64];
        let claims = Claims {
            iss: &self.issuer,
            sub: org,
            aud,
            iat: now.timestamp(),
            exp: (now + JWT_TTL).timestamp(),
            jti: id,
            body_sha256: hex_into(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body).as_ref(),
                &mut body_hex,
            ),
        };
        let ring = self.read();
        let active = ring
            .keys
            .iter()
            .rev()
            .find(|k| k.stored.retired_at.is_none())
            .ok_or_else(|| SigningError::Key("no active signing key".into()))?;
        // The JWS compact form jsonwebtoken::encode produces, with the cached key pair,
        // written straight into the header value (no intermediate strings).
        const BEARER: &str = "Bearer ";
        let mut auth = String::with_capacity(512);
        auth.push_str(BEARER);
        auth.push_str(&active.header_b64);
        auth.push('.');
        // The claims JSON goes through a per-thread buffer: one allocation less per request.
        CLAIMS_BUF.with_borrow_mut(|json| {
            json.clear();
            serde_json::to_writer(&mut *json, &claims)
                .map_err(|e| SigningError::Key(format!("JSON: {e}")))?;
            URL_SAFE_NO_PAD.encode_string(&json[..], &mut auth);
            Ok::<_, SigningError>(())
        })?;
        let sig = active.pair.sign(&auth.as_bytes()[BEARER.len()..]);
        drop(ring);
        auth.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut auth);
        let ts = now.timestamp().to_string();
        Ok(SignedHeaders {
            authorization: auth,
            webhook_signature: secret.map(|s| signature_with_key(&self.hmac_key(s), id, &ts, body)),
            webhook_id: id.to_owned(),
            webhook_timestamp: ts,
        })
    }

    /// The HMAC key of a webhook secret, built once per secret.
    fn hmac_key(&self, secret: &str) -> Arc<aws_lc_rs::hmac::Key> {
        let mut cache = match self.hmac_keys.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(k) = cache.get(secret) {
            return k.clone();
        }
        if cache.len() >= HMAC_CACHE_MAX {
            cache.clear();
        }
        let k = Arc::new(hmac_key(secret));
        cache.insert(secret.to_owned(), k.clone());
        k
    }
}

thread_local! {
    static CLAIMS_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// Lowercase hex of a 32-byte digest, written into `out` (no allocation).
fn hex_into<'a>(digest: &[u8], out: &'a mut [u8; 64]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in digest.iter().take(32).enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
    }
    // Only ASCII hex digits were written.
    std::str::from_utf8(&out[..digest.len().min(32) * 2]).unwrap_or_default()
}

#[cfg(test)]
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// The HMAC-SHA256 key of a `whsec_` secret (aws-lc: assembly, SHA extensions where the
/// CPU has them).
fn hmac_key(secret: &str) -> aws_lc_rs::hmac::Key {
    let raw = secret.strip_prefix("whsec_").unwrap_or(secret);
    // Secrets we issue are base64; a hand-made one that is not is used as raw bytes.
    let key = STANDARD
        .decode(raw)
        .unwrap_or_else(|_| raw.as_bytes().to_vec());
    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key)
}

/// `v1,<base64 HMAC-SHA256>` of `{id}.{timestamp}.{body}` as Standard Webhooks defines it.
pub fn standard_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    signature_with_key(&hmac_key(secret), id, timestamp, body)
}

fn signature_with_key(
    key: &aws_lc_rs::hmac::Key,
    id: &str,
    timestamp: &str,
    body: &[u8],
) -> String {
    let mut ctx = aws_lc_rs::hmac::Context::with_key(key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let mut out = String::with_capacity(48);
    out.push_str("v1,");
    STANDARD.encode_string(ctx.sign().as_ref(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification's reference libraries.
        let sig = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn cached_hmac_keys_sign_like_fresh_ones_and_follow_a_new_secret() {
        let s = Signer::from_ring("hookbridge", &Signer::new_ring().unwrap(), 0).unwrap();
        for secret in [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_AAAA",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            let h = s
                .sign("acme", "https://x/y", "dlv_1", b"{}", Some(secret))
                .unwrap();
            let want = standard_signature(secret, "dlv_1", &h.webhook_timestamp, b"{}");
            assert_eq!(
                h.webhook_signature.as_deref(),
                Some(want.as_str()),
                "{secret}"
            );
        }
        assert_eq!(s.hmac_keys.lock().unwrap().len(), 2);
    }

    #[test]
    fn body_hash_hex_is_lowercase_and_matches_the_allocating_form() {
        let digest = Sha256::digest(b"hookbridge");
        let mut out = [0u8; 64];
        assert_eq!(hex_into(&digest, &mut out), hex(&digest));
        assert!(hex_into(&digest, &mut out)
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn jwt_verifies_with_jwks_and_rotation_keeps_old_key() {
        let s = Signer::from_ring("hookbridge", &Signer::new_ring().unwrap(), 0).unwrap();
        let h = s
            .sign("acme", "https://x/y", "dlv_1", b"{}", Some("whsec_AAAA"))
            .unwrap();
        let token = h.authorization.strip_prefix("Bearer ").unwrap().to_owned();
        let verify = |s: &Signer, token: &str| {
            let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
            let set = s.jwks();
            let jwk = set.find(&kid).expect("kid published");
            let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
            let mut v = jsonwebtoken::Validation::new(Algorithm::EdDSA);
            v.set_audience(&["https://x/y"]);
            v.set_issuer(&["hookbridge"]);
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
                .unwrap()
                .claims
        };
        let c = verify(&s, &token);
        assert_eq!(c["sub"], "acme");
        assert_eq!(c["jti"], "dlv_1");
        assert_eq!(c["body_sha256"], hex(&Sha256::digest(b"{}")));
        let (ring, kid) = s.rotated().unwrap();
        // Not installed yet: the old key still signs alone.
        assert_eq!(s.jwks().keys.len(), 1);
        assert!(s.install(&ring, 1).unwrap());
        assert!(
            !s.install(&Signer::new_ring().unwrap(), 1).unwrap(),
            "same version"
        );
        assert_eq!(s.active_kid().as_deref(), Some(kid.as_str()));
        assert_eq!(s.jwks().keys.len(), 2);
        verify(&s, &token);
        // Another node (or a restart) loading the kept ring has both keys, signs with the new one.
        let s2 = Signer::from_ring("hookbridge", &ring, 1).unwrap();
        let t2 = s2.sign("acme", "https://x/y", "dlv_2", b"", None).unwrap();
        let t2 = t2.authorization.strip_prefix("Bearer ").unwrap().to_owned();
        assert_ne!(
            jsonwebtoken::decode_header(&t2).unwrap().kid,
            jsonwebtoken::decode_header(&token).unwrap().kid
        );
        verify(&s2, &t2);
        verify(&s2, &token);
    }
}
