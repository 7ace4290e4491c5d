//! Shared secrets: the ingress HS256 secret and the admin token. When the config and the
//! environment give none, one is generated once and kept where `crate::identity` keeps the
//! node's keys (the data dir, mode 0600, on one node; the store in scale-out), so the
//! embedded defaults work out of the box and survive restarts. Also the sealing of webhook
//! secrets at rest ([`SecretBox`]) and the owner-only file helpers.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use rand::Rng;

use crate::config::Config;
use crate::identity::{Keeper, Slot};

pub struct Secrets {
    pub ingress_jwt: String,
    pub admin_token: String,
}

pub fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
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
    /// The configured values, or else the generated ones `keeper` holds (made once: per
    /// data dir on one node, per store in scale-out, never per node).
    pub async fn load(config: &Config, keeper: &Keeper) -> Result<Self, String> {
        let ingress_jwt = match &config.ingress.jwt_hs256_secret {
            Some(s) => s.clone(),
            None => {
                generated(
                    keeper,
                    Slot::IngressSecret,
                    "ingress.jwt_hs256_secret",
                    "secret",
                )
                .await?
            }
        };
        let admin_token = match &config.admin.token {
            Some(s) => s.clone(),
            None => generated(keeper, Slot::AdminToken, "admin.token", "token").await?,
        };
        Ok(Self {
            ingress_jwt,
            admin_token,
        })
    }
}

async fn generated(keeper: &Keeper, slot: Slot, key: &str, what: &str) -> Result<String, String> {
    let v = keeper
        .get_or_init(slot, || Ok(random_token(32)))
        .await
        .map_err(|e| e.to_string())?;
    let cli = match slot {
        Slot::AdminToken => "hookbridge admin-token",
        _ => "hookbridge token --org ORG",
    };
    if keeper.is_shared() {
        tracing::warn!(
            "{key} not set; using the generated {what} kept in the store, the same on every node (`{cli} --config FILE` prints {})",
            if slot == Slot::AdminToken { "it" } else { "a JWT made with it" }
        );
    } else {
        tracing::warn!(file = %keeper.file(slot).display(), "{key} not set; using the generated {what} in this file");
    }
    Ok(v.value)
}

/// Webhook signing secrets at rest: AES-256-GCM with a key from `store.secrets_key` (env
/// `HOOKBRIDGE_SECRETS_KEY`), or else a key generated once into `<data_dir>/secrets/`.
/// A sealed value is `enc:v1:<base64(nonce | ciphertext | tag)>`, bound to the webhook id
/// (the id is the AAD), so a sealed secret copied onto another row does not open.
pub struct SecretBox {
    key: aws_lc_rs::aead::LessSafeKey,
}

const SEALED_PREFIX: &str = "enc:v1:";

/// Why scale-out needs a configured key: a key generated into the same database as the
/// secrets it seals would protect nothing, and one per node would not open the others' rows.
pub const SECRETS_KEY_REQUIRED: &str = "required when store.url is set (scale-out): webhook secrets and the keys the nodes share are sealed with it in PostgreSQL, so it must not be kept there; give every node the same value (env HOOKBRIDGE_SECRETS_KEY; make one with `openssl rand -base64 32`)";

impl SecretBox {
    /// `key` is 32 bytes, base64 (standard alphabet).
    pub fn from_base64(key: &str) -> Result<Self, String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| format!("not base64: {e}"))?;
        let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &raw)
            .map_err(|_| {
                format!(
                    "must be 32 bytes (base64 of 32 random bytes), got {}",
                    raw.len()
                )
            })?;
        Ok(Self {
            key: aws_lc_rs::aead::LessSafeKey::new(unbound),
        })
    }

    pub fn load_or_create(config: &Config) -> Result<Self, String> {
        if let Some(k) = &config.store.secrets_key {
            return Self::from_base64(k).map_err(|m| format!("store.secrets_key: {m}"));
        }
        if config.store.url.is_some() {
            return Err(format!("store.secrets_key: {SECRETS_KEY_REQUIRED}"));
        }
        let dir = config.data_dir.join("secrets");
        private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let p = dir.join("webhook_secrets_key");
        let key = match std::fs::read_to_string(&p) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            Ok(_) => return Err(format!("{} is empty", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = [0u8; 32];
                rand::rng().fill_bytes(&mut b);
                let k = base64::engine::general_purpose::STANDARD.encode(b);
                write_private_file(&p, k.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
                k
            }
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        };
        tracing::warn!(file = %p.display(),
            "store.secrets_key not set; webhook secrets are encrypted with the generated key in this file (keep it apart from state.db backups)");
        Self::from_base64(&key).map_err(|m| format!("{}: {m}", p.display()))
    }

    pub fn is_sealed(v: &str) -> bool {
        v.starts_with(SEALED_PREFIX)
    }

    pub fn seal(&self, id: &str, plain: &str) -> Result<String, String> {
        use aws_lc_rs::aead::{Aad, Nonce, NONCE_LEN};
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut buf = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut buf,
            )
            .map_err(|_| "encryption failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    pub fn open(&self, id: &str, sealed: &str) -> Result<String, String> {
        use aws_lc_rs::aead::{Aad, Nonce, NONCE_LEN};
        let b64 = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or("not a sealed secret")?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("sealed secret is not base64: {e}"))?;
        if raw.len() < NONCE_LEN {
            return Err("sealed secret is too short".into());
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .map_err(|_| {
                "sealed secret does not open with store.secrets_key (wrong key, or copied from another row)"
                    .to_string()
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "sealed secret is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_row() {
        let k = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let b = SecretBox::from_base64(&k).unwrap();
        let s = b.seal("wh_1", "whsec_abc").unwrap();
        assert!(SecretBox::is_sealed(&s) && !s.contains("whsec_abc"));
        assert_eq!(b.open("wh_1", &s).unwrap(), "whsec_abc");
        assert!(b.open("wh_2", &s).is_err());
        let other =
            SecretBox::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        assert!(other.open("wh_1", &s).is_err());
        assert!(SecretBox::from_base64("c2hvcnQ=").is_err());
    }
}
