//! Shared secrets: the ingress HS256 secret and the admin token. When the config and the
//! environment give none, one is generated once and kept in the data dir (mode 0600), so
//! the embedded defaults work out of the box and survive restarts.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::Rng;

use crate::config::Config;

pub struct Secrets {
    pub ingress_jwt: String,
    pub admin_token: String,
    pub ingress_jwt_file: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
}

pub fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn load_or_generate(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let token = random_token(32);
    write_private_file(path, token.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(token)
}

/// Writes a secret durably and atomically, readable by the owner only: temp file (0600),
/// fsync, rename, fsync the folder. A crash leaves the old file or the new one, whole.
pub fn write_private_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?
    .sync_all()
}

/// Creates `dir` (and its parents) and makes it owner-only (0700) whatever the umask;
/// an existing folder that is more open is closed down.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes an existing file owner-only (0600), or creates it empty with that mode. State
/// files made by an older version under umask 022 are closed down at start.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

impl Secrets {
    pub fn load_or_create(config: &Config) -> Result<Self, String> {
        let dir = config.data_dir.join("secrets");
        private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (ingress_jwt, ingress_jwt_file) = match &config.ingress.jwt_hs256_secret {
            Some(s) => (s.clone(), None),
            None => {
                let p = dir.join("ingress_jwt_secret");
                let s = load_or_generate(&p)?;
                tracing::warn!(file = %p.display(), "ingress.jwt_hs256_secret not set; using the generated secret in this file");
                (s, Some(p))
            }
        };
        let (admin_token, admin_token_file) = match &config.admin.token {
            Some(s) => (s.clone(), None),
            None => {
                let p = dir.join("admin_token");
                let s = load_or_generate(&p)?;
                tracing::warn!(file = %p.display(), "admin.token not set; using the generated token in this file");
                (s, Some(p))
            }
        };
        Ok(Self {
            ingress_jwt,
            admin_token,
            ingress_jwt_file,
            admin_token_file,
        })
    }
}
