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
