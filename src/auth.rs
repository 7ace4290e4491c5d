//! Credentials of SFTP users: argon2id password hashes and OpenSSH public keys.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use rand::Rng;
use russh::keys::{Algorithm, PublicKey};

pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash password: {e}"))
}

/// Constant-time comparison inside argon2; callers run it on a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// Verifies passwords at most `permits` at a time, each in a memory block of its own that is
/// kept for the next one. argon2id takes `m` KiB per verification (19 MiB by default): letting
/// every attempt allocate its own, on whichever blocking thread, took memory up with the number
/// of parallel attempts (32 attempts, +470 MB), and the allocator kept much of it afterwards.
/// Attempts over the bound wait for a turn; they allocate nothing while they wait.
pub struct Verifier {
    turns: tokio::sync::Semaphore,
    memory: std::sync::Mutex<Vec<Vec<argon2::Block>>>,
}

impl Verifier {
    pub fn new(permits: usize) -> Verifier {
        Verifier {
            turns: tokio::sync::Semaphore::new(permits.max(1)),
            memory: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Waits for a turn, then verifies `password` against the PHC string `hash` on a blocking
    /// thread. `still_wanted` is asked once the turn came (e.g. "is the source banned by now?");
    /// when it says no, nothing is hashed and `None` is returned.
    pub async fn verify(
        &self,
        password: String,
        hash: String,
        still_wanted: impl FnOnce() -> bool,
    ) -> Option<bool> {
        let _turn = self.turns.acquire().await.ok()?;
        if !still_wanted() {
            return None;
        }
        let mut blocks = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let (ok, blocks) = tokio::task::spawn_blocking(move || {
            let ok = verify_password_in(&password, &hash, &mut blocks);
            (ok, blocks)
        })
        .await
        .unwrap_or_default();
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(blocks);
        Some(ok)
    }
}

/// [`verify_password`] in caller-provided memory, grown to the hash's `m` when needed.
fn verify_password_in(password: &str, hash: &str, blocks: &mut Vec<argon2::Block>) -> bool {
    use subtle::ConstantTimeEq;
    let Ok(parsed) = argon2::PasswordHash::new(hash) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = argon2::Params::try_from(&parsed) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let n = params.block_count();
    if blocks.len() < n {
        blocks.resize(n, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(
            password.as_bytes(),
            salt.as_ref(),
            &mut out,
            &mut blocks[..n],
        )
        .is_ok()
        && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

pub fn check_hash_format(hash: &str) -> Result<(), String> {
    if !hash.starts_with("$argon2id$") {
        return Err("must be an argon2id PHC string ($argon2id$…); make one with `hookbridge hash-password`".into());
    }
    argon2::PasswordHash::new(hash)
        .map(|_| ())
        .map_err(|e| format!("not a valid argon2id hash: {e}"))
}

/// Parses an `authorized_keys`-style line; only algorithms we accept for login.
pub fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    let key = PublicKey::from_openssh(text.trim())
        .map_err(|e| format!("not an OpenSSH public key: {e}"))?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => Ok(key),
        other => Err(format!(
            "key type {} is not accepted; use ssh-ed25519, ecdsa-sha2-* or ssh-rsa",
            other.as_str()
        )),
    }
}

/// Keys are compared by their key material; comments don't matter.
pub fn key_matches(stored: &[String], offered: &PublicKey) -> bool {
    stored
        .iter()
        .filter_map(|s| PublicKey::from_openssh(s.trim()).ok())
        .any(|k| k.key_data() == offered.key_data())
}

pub fn constant_time_eq(a: &str, b: &str) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    // Hashing first keeps the comparison constant-time even when the lengths differ.
    let ha = sha2::Sha256::digest(a.as_bytes());
    let hb = sha2::Sha256::digest(b.as_bytes());
    ha.as_slice().ct_eq(hb.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        check_hash_format(&h).unwrap();
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("wrong", &h));
        assert!(check_hash_format("plain").is_err());
        // The pooled verifier agrees, also for other parameters than the default's.
        let mut blocks = Vec::new();
        assert!(verify_password_in("s3cret", &h, &mut blocks));
        assert!(!verify_password_in("wrong", &h, &mut blocks));
        let small = Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(64, 1, 1, None).unwrap(),
        )
        .hash_password_with_salt(b"other", b"saltsaltsalt")
        .unwrap()
        .to_string();
        assert!(verify_password_in("other", &small, &mut blocks));
        assert!(!verify_password_in("s3cret", &small, &mut blocks));
        assert!(!verify_password_in("x", "not a hash", &mut blocks));
    }

    #[test]
    fn keys() {
        let k =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ5Pv7nYwLsvyKQ4hZ8eXqHe0yD3V8sJ4C6W6W6W6W6 test";
        let parsed = parse_public_key(k).unwrap();
        assert!(key_matches(&[k.replace(" test", " other")], &parsed));
        assert!(parse_public_key("ssh-ed25519 garbage").is_err());
    }

    #[test]
    fn ct_eq() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
