//! The host key's fingerprint from its file, for `check-config` on one node. The key
//! itself is made and loaded by `crate::identity` (a file on one node, the store in
//! scale-out).

use std::path::Path;

use russh::keys::HashAlg;

/// `SHA256:…` of the key at `path`, if it exists and loads.
pub fn host_key_fingerprint(path: &Path) -> Option<String> {
    let key = russh::keys::load_secret_key(path, None).ok()?;
    Some(key.public_key().fingerprint(HashAlg::Sha256).to_string())
}
