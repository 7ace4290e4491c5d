//! Uploads to S3: sequential data, one PUT when small, a multipart upload when large,
//! published on commit.
//!
//! SFTP clients pipeline WRITEs, so they may arrive a little out of order: data ahead of
//! the next expected offset waits in a buffer bounded by [`MAX_AHEAD`]. A write behind it
//! (rewriting bytes already sent) cannot be done on S3 and fails the upload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::sync::Mutex;

use super::map_err;
use crate::storage::{StorageError, StorageResult, UploadHandle, UploadOptions};

/// Part size of a multipart upload (S3 needs >= 5 MiB for every part but the last).
const PART: usize = 8 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Out-of-order data held before the upload is refused.
const MAX_AHEAD: usize = 64 << 20;

pub struct S3Upload {
    store: Arc<dyn ObjectStore>,
    key: Path,
    opts: UploadOptions,
    size: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes up to here are in `head` or sent.
    next: u64,
    /// Data not yet in a part (all of it while the file is smaller than a part).
    head: BytesMut,
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: usize,
    multipart: Option<WriteMultipart>,
    failed: Option<String>,
}

impl S3Upload {
    pub fn new<S: ObjectStore>(store: Arc<S>, key: Path, opts: UploadOptions) -> Self {
        Self {
            store,
            key,
            opts,
            size: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    async fn push(&self, st: &mut State, data: &[u8]) -> StorageResult<()> {
        st.head.extend_from_slice(data);
        st.next += data.len() as u64;
        while st.head.len() >= PART {
            let chunk = st.head.split_to(PART).freeze();
            if st.multipart.is_none() {
                let up = self.store.put_multipart(&self.key).await.map_err(map_err)?;
                st.multipart = Some(WriteMultipart::new_with_chunk_size(up, PART));
            }
            if let Some(mp) = st.multipart.as_mut() {
                mp.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(map_err)?;
                mp.put(chunk);
            }
        }
        Ok(())
    }

    async fn write_locked(&self, st: &mut State, offset: u64, data: Bytes) -> StorageResult<()> {
        if offset < st.next {
            return Err(StorageError::Unsupported(
                "rewriting data already written (object storage uploads are sequential)",
            ));
        }
        if offset > st.next {
            st.ahead_bytes += data.len();
            if st.ahead_bytes > MAX_AHEAD || st.ahead.insert(offset, data).is_some() {
                return Err(StorageError::Unsupported(
                    "writes too far out of order for object storage",
                ));
            }
            return Ok(());
        }
        self.push(st, &data).await?;
        while let Some(entry) = st.ahead.first_entry() {
            if *entry.key() != st.next {
                if *entry.key() < st.next {
                    return Err(StorageError::Unsupported(
                        "overlapping writes (object storage uploads are sequential)",
                    ));
                }
                break;
            }
            let d = entry.remove();
            st.ahead_bytes -= d.len();
            self.push(st, &d).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl UploadHandle for S3Upload {
    async fn write_at(&self, offset: u64, data: Bytes) -> StorageResult<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.opts.max_bytes {
            return Err(StorageError::TooLarge);
        }
        let mut st = self.state.lock().await;
        if let Some(e) = &st.failed {
            return Err(StorageError::Backend(e.clone()));
        }
        let res = self.write_locked(&mut st, offset, data).await;
        if let Err(e) = &res {
            st.failed = Some(e.to_string());
        } else {
            self.size.fetch_max(end, Ordering::AcqRel);
        }
        res
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    async fn set_len(&self, len: u64) -> StorageResult<()> {
        if len == self.size() {
            return Ok(());
        }
        Err(StorageError::Unsupported(
            "changing the size of an upload on object storage",
        ))
    }

    async fn commit(&self) -> StorageResult<()> {
        let mut st = self.state.lock().await;
        let st = std::mem::take(&mut *st);
        if let Some(e) = st.failed {
            if let Some(mp) = st.multipart {
                let _ = mp.abort().await;
            }
            return Err(StorageError::Backend(e));
        }
        if !st.ahead.is_empty() {
            if let Some(mp) = st.multipart {
                let _ = mp.abort().await;
            }
            return Err(StorageError::Unsupported(
                "a file with holes cannot be stored on object storage",
            ));
        }
        match st.multipart {
            None => {
                // Small: one PUT, create-only when the client asked for O_EXCL.
                let mode = if self.opts.exclusive {
                    PutMode::Create
                } else {
                    PutMode::Overwrite
                };
                let opts = PutOptions {
                    mode,
                    ..Default::default()
                };
                self.store
                    .put_opts(&self.key, PutPayload::from_bytes(st.head.freeze()), opts)
                    .await
                    .map_err(map_err)?;
                Ok(())
            }
            Some(mut mp) => {
                if self.opts.exclusive {
                    // S3 completes a multipart upload unconditionally: check just before.
                    match self.store.head(&self.key).await {
                        Ok(_) => {
                            let _ = mp.abort().await;
                            return Err(StorageError::AlreadyExists);
                        }
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            let _ = mp.abort().await;
                            return Err(map_err(e));
                        }
                    }
                }
                if !st.head.is_empty() {
                    mp.put(st.head.freeze());
                }
                mp.finish().await.map_err(map_err)?;
                Ok(())
            }
        }
    }

    async fn abort(&self) {
        let mut st = self.state.lock().await;
        if let Some(mp) = st.multipart.take() {
            if let Err(e) = mp.abort().await {
                tracing::warn!(error = %e, "could not abort a multipart upload; the bucket's lifecycle rule must reap it");
            }
        }
    }
}
