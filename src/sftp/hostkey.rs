//! The persisted ed25519 host key (OpenSSH format, mode 0600), made on first start.

use std::path::Path;

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey};

pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, String> {
    if path.exists() {
        return russh::keys::load_secret_key(path, None)
            .map_err(|e| format!("cannot load SFTP host key {}: {e}", path.display()));
    }
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| format!("cannot generate host key: {e}"))?;
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("cannot encode host key: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    crate::secrets::write_private_file(path, text.as_bytes())
        .map_err(|e| format!("cannot write host key {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a new SFTP host key");
    Ok(key)
}

/// `SHA256:…` of the key at `path`, if it exists and loads.
pub fn host_key_fingerprint(path: &Path) -> Option<String> {
    let key = russh::keys::load_secret_key(path, None).ok()?;
    Some(key.public_key().fingerprint(HashAlg::Sha256).to_string())
}
