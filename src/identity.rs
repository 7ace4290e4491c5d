//! Where a node's identity comes from: the SSH host key, the webhook signing key ring, and
//! the admin token and ingress secret when the config gives none. [`Keeper::for_config`]
//! is the one place that decides between the two sources:
//!
//! * **One node** (SQLite, no `store.url`): files in the data dir, made on first start
//!   (`<data_dir>/secrets/…` and the host key file), as hookbridge always did.
//! * **Scale-out** (`store.url`, PostgreSQL): the store's shared secrets, so that every node
//!   serves the same host key and JWKS and accepts the same tokens. The first node to
//!   start makes each value (the store keeps the first writer's); the others read it. A
//!   node that still has a file from its single-node days offers that file as the first
//!   value, so the customers' `known_hosts` entries and the receivers' JWKS caches stay
//!   valid. Values are sealed with `store.secrets_key` (AES-256-GCM, the row name as AAD),
//!   so a dump of the database alone gives none of them away, and a node started with a
//!   different key than the others stops at once instead of serving other keys.
//!
//! A rotation replaces a value only if it is still the version the rotating node read
//! (compare and set), and the nodes poll the version (see `delivery::keyring`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::secrets::{private_dir, write_private_file, SecretBox};
use crate::store::{Store, StoreError};

/// One secret of the node's identity: a file in one-node mode, a shared row in scale-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The SFTP server's private key (OpenSSH format).
    HostKey,
    /// The webhook signing key ring (JSON, see `delivery::signing`).
    SigningKeys,
    /// The admin API's bearer token, when `admin.token` is not set.
    AdminToken,
    /// The ingress HS256 secret, when `ingress.jwt_hs256_secret` is not set.
    IngressSecret,
}

impl Slot {
    /// The row name in the store's shared secrets.
    pub fn name(self) -> &'static str {
        match self {
            Slot::HostKey => "ssh_host_key",
            Slot::SigningKeys => "webhook_signing_keys",
            Slot::AdminToken => "admin_token",
            Slot::IngressSecret => "ingress_jwt_secret",
        }
    }
}

/// A value and its version: the version goes up at each rotation (always 0 for files,
/// which only this process writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub version: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("the shared {name} in the store: {message}")]
    Shared { name: &'static str, message: String },
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Make(String),
}

pub struct Keeper {
    secrets_dir: PathBuf,
    host_key_file: PathBuf,
    /// Scale-out: the store and the key shared values are sealed with.
    shared: Option<(Arc<dyn Store>, Arc<SecretBox>)>,
    /// Read-change-replace cycles on this node take turns ([`Keeper::one_at_a_time`]):
    /// with files the write is the only compare-and-set there is, so two rotations at
    /// once would both "win" (one key lost) and share one temp file.
    replacing: tokio::sync::Mutex<()>,
}

/// The row that pins `store.secrets_key`: its sealed value is written by the first node and
/// must open on every other before that node writes anything, so a node given another key
/// stops at once instead of sealing rows the others cannot open.
const KEY_CHECK: &str = "secrets_key_check";
const KEY_CHECK_PLAIN: &str = "hookbridge: the nodes of this store share this secrets key";

impl Keeper {
    /// Files when the config has no `store.url`, else the store's shared secrets (after
    /// checking that `sealer` is the key the other nodes seal with).
    pub async fn open(
        config: &Config,
        store: &Arc<dyn Store>,
        sealer: Arc<SecretBox>,
    ) -> Result<Self, IdentityError> {
        let keeper = Self {
            secrets_dir: config.data_dir.join("secrets"),
            host_key_file: config.host_key_path(),
            shared: config.store.url.as_ref().map(|_| (store.clone(), sealer)),
            replacing: tokio::sync::Mutex::new(()),
        };
        if let Some((store, sealer)) = &keeper.shared {
            let shared_err = |message: String| IdentityError::Shared {
                name: KEY_CHECK,
                message,
            };
            let aad = format!("shared:{KEY_CHECK}");
            let sealed = sealer.seal(&aad, KEY_CHECK_PLAIN).map_err(shared_err)?;
            let kept = store.shared_secret_init(KEY_CHECK, &sealed).await?;
            if sealer.open(&aad, &kept.value).as_deref() != Ok(KEY_CHECK_PLAIN) {
                return Err(shared_err(
                    "store.secrets_key is not the key the other nodes of this store use (the first node's); give every node the same store.secrets_key".into(),
                ));
            }
        }
        Ok(keeper)
    }

    /// Opens what a CLI command needs to read the same values as `serve` would: the
    /// PostgreSQL store in scale-out mode, nothing in one-node mode.
    pub async fn open_for_cli(config: &Config) -> Result<Self, String> {
        let Some(url) = &config.store.url else {
            // One node: the files alone (neither the SQLite store nor the webhook secrets
            // key is needed to read them, so none is made).
            return Ok(Self {
                secrets_dir: config.data_dir.join("secrets"),
                host_key_file: config.host_key_path(),
                shared: None,
                replacing: tokio::sync::Mutex::new(()),
            });
        };
        let sealer = Arc::new(SecretBox::load_or_create(config)?);
        let store: Arc<dyn Store> = Arc::new(
            crate::store::PostgresStore::open(url, sealer.clone())
                .await
                .map_err(|e| format!("state store: {e}"))?,
        );
        Self::open(config, &store, sealer)
            .await
            .map_err(|e| e.to_string())
    }

    /// True in scale-out mode: values come from the store, shared by every node.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The file of `slot` in one-node mode (offered as the first value in scale-out).
    pub fn file(&self, slot: Slot) -> PathBuf {
        match slot {
            Slot::HostKey => self.host_key_file.clone(),
            Slot::SigningKeys => self.secrets_dir.join("webhook_signing_keys.json"),
            Slot::AdminToken => self.secrets_dir.join("admin_token"),
            Slot::IngressSecret => self.secrets_dir.join("ingress_jwt_secret"),
        }
    }

    /// Where the value of `slot` is kept, for log lines.
    pub fn describe(&self, slot: Slot) -> String {
        match &self.shared {
            None => self.file(slot).display().to_string(),
            Some(_) => format!("the store (shared secret {:?})", slot.name()),
        }
    }

    /// The value of `slot`, made by `make` (and kept) when there is none yet.
    pub async fn get_or_init(
        &self,
        slot: Slot,
        make: impl FnOnce() -> Result<String, String>,
    ) -> Result<Versioned, IdentityError> {
        let path = self.file(slot);
        let Some((store, sealer)) = &self.shared else {
            if let Some(value) = read_file(&path)? {
                return Ok(Versioned { value, version: 0 });
            }
            let value = make().map_err(IdentityError::Make)?;
            write_file(&path, &value)?;
            tracing::info!(file = %path.display(), "created {}", slot.name());
            return Ok(Versioned { value, version: 0 });
        };
        let local = read_file(&path)?;
        if let Some(found) = store.shared_secret_get(slot.name()).await? {
            let v = open(sealer, slot, found)?;
            if local.as_ref().is_some_and(|l| l != v.value.trim()) {
                tracing::warn!(file = %path.display(),
                    "this file differs from the {} shared by the nodes in the store; the shared one is used", slot.name());
            }
            return Ok(v);
        }
        // None yet: this node offers its file (a single node moving to scale-out) or a new
        // value; of nodes starting together, the store keeps the first writer's.
        let (offer, imported) = match local {
            Some(l) => (l, true),
            None => (make().map_err(IdentityError::Make)?, false),
        };
        let sealed = sealer
            .seal(&aad(slot), &offer)
            .map_err(|message| IdentityError::Shared {
                name: slot.name(),
                message,
            })?;
        let won = open(
            sealer,
            slot,
            store.shared_secret_init(slot.name(), &sealed).await?,
        )?;
        match (won.value.trim() == offer.trim(), imported) {
            (true, true) => {
                tracing::info!(file = %path.display(), "imported this file as the {} shared by the nodes", slot.name())
            }
            (true, false) => tracing::info!("created the {} shared by the nodes", slot.name()),
            (false, true) => tracing::warn!(file = %path.display(),
                "another node stored the shared {} first; this file is not used", slot.name()),
            (false, false) => {}
        }
        Ok(won)
    }

    /// The current value of `slot`, if there is one: what the nodes poll for rotations.
    pub async fn current(&self, slot: Slot) -> Result<Option<Versioned>, IdentityError> {
        match &self.shared {
            None => Ok(read_file(&self.file(slot))?.map(|value| Versioned { value, version: 0 })),
            Some((store, sealer)) => store
                .shared_secret_get(slot.name())
                .await?
                .map(|s| open(sealer, slot, s))
                .transpose(),
        }
    }

    /// Held by a caller around its read → change → [`Keeper::replace`] cycle, so that two
    /// on this node (two rotation requests at once) do not both build on the same value.
    pub async fn one_at_a_time(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.replacing.lock().await
    }

    /// Replaces the value of `slot` if it is still at `version`; `None` when another node
    /// replaced it first (read it with [`Keeper::current`] and decide again).
    pub async fn replace(
        &self,
        slot: Slot,
        version: i64,
        value: &str,
    ) -> Result<Option<Versioned>, IdentityError> {
        let Some((store, sealer)) = &self.shared else {
            // One process owns the file, and its read-modify-replace cycles take turns
            // under [`Keeper::one_at_a_time`]: the write is the whole compare-and-set.
            // fsync'd off the async workers.
            let (path, body) = (self.file(slot), value.to_owned());
            tokio::task::spawn_blocking(move || write_file(&path, &body))
                .await
                .map_err(|e| IdentityError::Make(format!("writing {}: {e}", slot.name())))??;
            return Ok(Some(Versioned {
                value: value.to_owned(),
                version: version + 1,
            }));
        };
        let sealed = sealer
            .seal(&aad(slot), value)
            .map_err(|message| IdentityError::Shared {
                name: slot.name(),
                message,
            })?;
        store
            .shared_secret_replace(slot.name(), version, &sealed)
            .await?
            .map(|s| open(sealer, slot, s))
            .transpose()
    }
}

/// Binds a sealed value to its row, so one shared value copied onto another does not open.
fn aad(slot: Slot) -> String {
    format!("shared:{}", slot.name())
}

fn open(
    sealer: &SecretBox,
    slot: Slot,
    s: crate::store::SharedSecret,
) -> Result<Versioned, IdentityError> {
    let value = sealer
        .open(&aad(slot), &s.value)
        .map_err(|e| IdentityError::Shared {
            name: slot.name(),
            message: format!("{e}; every node of one service needs the same store.secrets_key"),
        })?;
    Ok(Versioned {
        value,
        version: s.version,
    })
}

/// The trimmed content of `path`; `None` when it is missing or empty.
fn read_file(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IdentityError::File {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        }),
    }
}

/// Writes durably, owner-only; the folder is made owner-only when missing.
fn write_file(path: &Path, value: &str) -> Result<(), IdentityError> {
    let err = |message: String| IdentityError::File {
        path: path.to_owned(),
        message,
    };
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.exists() {
            private_dir(dir).map_err(|e| err(format!("cannot create the folder: {e}")))?;
        }
    }
    write_private_file(path, value.as_bytes()).map_err(|e| err(format!("cannot write: {e}")))
}

/// The SFTP host key: made (ed25519) on first start, by the first node in scale-out.
pub async fn host_key(keeper: &Keeper) -> Result<russh::keys::PrivateKey, IdentityError> {
    use russh::keys::ssh_key::LineEnding;
    let v = keeper
        .get_or_init(Slot::HostKey, || {
            let key =
                russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                    .map_err(|e| format!("cannot generate the SFTP host key: {e}"))?;
            Ok(key
                .to_openssh(LineEnding::LF)
                .map_err(|e| format!("cannot encode the SFTP host key: {e}"))?
                .to_string())
        })
        .await?;
    russh::keys::decode_secret_key(&v.value, None).map_err(|e| {
        IdentityError::Make(format!(
            "cannot load the SFTP host key from {}: {e}",
            keeper.describe(Slot::HostKey)
        ))
    })
}

/// `SHA256:…` of the host key in use, if it exists yet.
pub async fn host_key_fingerprint(keeper: &Keeper) -> Option<String> {
    let v = keeper.current(Slot::HostKey).await.ok()??;
    let key = russh::keys::decode_secret_key(&v.value, None).ok()?;
    Some(
        key.public_key()
            .fingerprint(russh::keys::HashAlg::Sha256)
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeper(dir: &Path, shared: Option<Arc<dyn Store>>) -> Keeper {
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32]);
        Keeper {
            secrets_dir: dir.join("secrets"),
            host_key_file: dir.join("host_key"),
            shared: shared.map(|s| (s, Arc::new(SecretBox::from_base64(&key).unwrap()))),
            replacing: tokio::sync::Mutex::new(()),
        }
    }

    fn sqlite(dir: &Path) -> Arc<dyn Store> {
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32]);
        Arc::new(
            crate::store::SqliteStore::open(
                &dir.join("state.db"),
                Arc::new(SecretBox::from_base64(&key).unwrap()),
            )
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn files_are_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let k = keeper(dir.path(), None);
        let a = k
            .get_or_init(Slot::AdminToken, || Ok("one".into()))
            .await
            .unwrap();
        let b = k
            .get_or_init(Slot::AdminToken, || Ok("two".into()))
            .await
            .unwrap();
        assert_eq!((a.value.as_str(), b.value.as_str()), ("one", "one"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secrets/admin_token")).unwrap(),
            "one"
        );
        let r = k.replace(Slot::AdminToken, 0, "three").await.unwrap();
        assert_eq!(r.unwrap().version, 1);
        assert_eq!(
            k.current(Slot::AdminToken).await.unwrap().unwrap().value,
            "three"
        );
    }

    /// Two nodes on one store with their own folders: the first value wins and is what
    /// both read; an existing file is offered first; the row is sealed; a rotation from a
    /// stale version loses.
    #[tokio::test]
    async fn shared_values_have_one_first_writer_and_are_sealed() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = sqlite(da.path());
        std::fs::create_dir_all(da.path().join("secrets")).unwrap();
        std::fs::write(
            da.path().join("secrets/ingress_jwt_secret"),
            "old-single-node\n",
        )
        .unwrap();
        let (a, b) = (
            keeper(da.path(), Some(store.clone())),
            keeper(db.path(), Some(store.clone())),
        );
        let va = a
            .get_or_init(Slot::IngressSecret, || Ok("fresh-a".into()))
            .await
            .unwrap();
        let vb = b
            .get_or_init(Slot::IngressSecret, || Ok("fresh-b".into()))
            .await
            .unwrap();
        assert_eq!(va.value, "old-single-node");
        assert_eq!(vb, va);
        assert!(!db.path().join("secrets").exists(), "B wrote a local file");
        let raw = store
            .shared_secret_get("ingress_jwt_secret")
            .await
            .unwrap()
            .unwrap();
        assert!(SecretBox::is_sealed(&raw.value) && !raw.value.contains("old-single"));
        let r = a
            .replace(Slot::IngressSecret, va.version, "new")
            .await
            .unwrap();
        assert_eq!(r.as_ref().unwrap().version, va.version + 1);
        assert_eq!(
            b.replace(Slot::IngressSecret, va.version, "stale")
                .await
                .unwrap(),
            None
        );
        assert_eq!(b.current(Slot::IngressSecret).await.unwrap(), r);
        // A node with another secrets_key refuses the value, naming the key.
        let mut other = keeper(db.path(), Some(store));
        other.shared = other.shared.map(|(s, _)| {
            let k = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
            (s, Arc::new(SecretBox::from_base64(&k).unwrap()))
        });
        let e = other
            .get_or_init(Slot::IngressSecret, || Ok("x".into()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("store.secrets_key"), "{e}");
    }

    #[tokio::test]
    async fn a_node_with_another_secrets_key_is_stopped_before_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(dir.path());
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            store: crate::config::StoreConfig {
                url: Some("postgres://the-shared-store".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let sealer = |b: u8| {
            let k = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b; 32]);
            Arc::new(SecretBox::from_base64(&k).unwrap())
        };
        Keeper::open(&config, &store, sealer(1)).await.unwrap();
        Keeper::open(&config, &store, sealer(1)).await.unwrap();
        let e = Keeper::open(&config, &store, sealer(2))
            .await
            .err()
            .expect("another key is refused");
        assert!(e.to_string().contains("store.secrets_key"), "{e}");
        assert_eq!(store.shared_secret_get("admin_token").await.unwrap(), None);
        // One node (no store.url): files, no check.
        config.store.url = None;
        assert!(!Keeper::open(&config, &store, sealer(3))
            .await
            .unwrap()
            .is_shared());
    }

    #[tokio::test]
    async fn host_keys_round_trip_through_either_source() {
        let dir = tempfile::tempdir().unwrap();
        let k = keeper(dir.path(), None);
        let a = host_key(&k).await.unwrap();
        let b = host_key(&k).await.unwrap();
        assert_eq!(a.public_key(), b.public_key());
        // Moving to a shared store imports the file.
        let s = keeper(dir.path(), Some(sqlite(dir.path())));
        assert_eq!(host_key(&s).await.unwrap().public_key(), a.public_key());
        assert_eq!(
            host_key_fingerprint(&s).await,
            Some(
                a.public_key()
                    .fingerprint(russh::keys::HashAlg::Sha256)
                    .to_string()
            )
        );
    }
}
