//! The webhook signing key ring across nodes: a rotation is a compare-and-set of the kept
//! ring (so two nodes rotating at once lose no key), and every node polls the kept ring's
//! version about every second, so a rotation made on one node is published in the JWKS
//! and used for signing by all of them within seconds. On one node (files) there is
//! nothing to follow.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::signing::{Signer, SigningError};
use crate::identity::{IdentityError, Keeper, Slot};
use crate::App;

/// How often a node reads the kept ring's version (like the bans, `defender::SYNC_EVERY`).
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// Rotations lost to another node's before this one gives up (each loss means a newer
/// ring was kept meanwhile, which is then the base of the next try).
const ROTATE_TRIES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the signing keys changed on other nodes {ROTATE_TRIES} times during this rotation; try again")]
    Contended,
}

/// The signer of this node, from the kept ring (made by the first node to start).
pub async fn load(keeper: &Keeper, issuer: &str) -> Result<Signer, KeyringError> {
    let ring = keeper
        .get_or_init(Slot::SigningKeys, || {
            Signer::new_ring().map_err(|e| e.to_string())
        })
        .await?;
    Ok(Signer::from_ring(issuer, &ring.value, ring.version)?)
}

/// Rotates the kept ring from what this node holds; returns the new key id. This node signs
/// with the new key at once; the others once they poll.
pub async fn rotate(keeper: &Keeper, signer: &Signer) -> Result<String, KeyringError> {
    let _turn = keeper.one_at_a_time().await;
    for _ in 0..ROTATE_TRIES {
        let base = signer.version();
        let (ring, kid) = signer.rotated()?;
        if let Some(kept) = keeper.replace(Slot::SigningKeys, base, &ring).await? {
            signer.install(&kept.value, kept.version)?;
            return Ok(kid);
        }
        // Another node rotated since this one loaded: take its ring, rotate from there.
        catch_up(keeper, signer).await?;
    }
    Err(KeyringError::Contended)
}

/// Loads the kept ring if it is newer than the one held. True when it changed.
async fn catch_up(keeper: &Keeper, signer: &Signer) -> Result<bool, KeyringError> {
    match keeper.current(Slot::SigningKeys).await? {
        Some(kept) if kept.version > signer.version() => {
            Ok(signer.install(&kept.value, kept.version)?)
        }
        _ => Ok(false),
    }
}

/// Follows rotations made on other nodes until `cancel`. A store that does not answer only
/// delays them: the ring held goes on signing and stays published.
pub async fn follow(app: App, cancel: CancellationToken) {
    if !app.identity.is_shared() {
        return;
    }
    let signer = &app.delivery.signer;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        match catch_up(&app.identity, signer).await {
            Ok(changed) => {
                if changed {
                    tracing::info!(
                        kid = signer.active_kid().unwrap_or_default(),
                        version = signer.version(),
                        "webhook signing keys rotated on another node; signing and publishing the new ones"
                    );
                }
                failing = false;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the shared webhook signing keys; retrying");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{Config, StoreConfig};
    use crate::secrets::SecretBox;
    use crate::store::Store;

    /// Two nodes (one shared store, separate folders) rotating from the same ring: the
    /// second loses the compare-and-set, catches up and rotates again, so the kept ring
    /// holds both new keys (the first retired, still published) and both nodes end alike.
    #[tokio::test]
    async fn concurrent_rotations_lose_no_key_and_nodes_converge() {
        let dir = tempfile::tempdir().unwrap();
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [5u8; 32]);
        let sealer = Arc::new(SecretBox::from_base64(&key).unwrap());
        let store: Arc<dyn Store> = Arc::new(
            crate::store::SqliteStore::open(&dir.path().join("state.db"), sealer.clone()).unwrap(),
        );
        let node = |name: &str| Config {
            data_dir: dir.path().join(name),
            store: StoreConfig {
                url: Some("postgres://shared".into()),
                secrets_key: Some(key.clone()),
            },
            ..Default::default()
        };
        let ka = Keeper::open(&node("a"), &store, sealer.clone())
            .await
            .unwrap();
        let kb = Keeper::open(&node("b"), &store, sealer.clone())
            .await
            .unwrap();
        let (a, b) = (
            load(&ka, "hb").await.unwrap(),
            load(&kb, "hb").await.unwrap(),
        );
        assert_eq!(a.jwks(), b.jwks());
        let first = rotate(&ka, &a).await.unwrap();
        // B has not seen A's rotation: its replace loses, it catches up and rotates again.
        let second = rotate(&kb, &b).await.unwrap();
        let published: Vec<_> = b
            .jwks()
            .keys
            .into_iter()
            .filter_map(|k| k.common.key_id)
            .collect();
        assert_eq!(published.len(), 3, "{published:?}");
        assert!(published.contains(&first) && published.contains(&second));
        assert_eq!(b.active_kid(), Some(second.clone()));
        assert!(catch_up(&ka, &a).await.unwrap());
        assert_eq!(a.jwks(), b.jwks());
        assert_eq!(a.active_kid(), Some(second));
        assert!(!catch_up(&ka, &a).await.unwrap(), "nothing new");
        assert!(!dir.path().join("a").exists(), "a node wrote key files");
    }
}
