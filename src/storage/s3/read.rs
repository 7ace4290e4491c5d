//! Downloads from S3 by ranged GETs of fixed blocks.
//!
//! SFTP clients pipeline many small READs (32–255 KiB), often out of order. Each READ is
//! served from a block of [`BLOCK`] bytes fetched with one ranged GET (`If-Match` the
//! ETag seen at open, so a file replaced mid-download fails instead of mixing versions);
//! concurrent READs of one block share its GET (clients keep enough READs in flight to
//! reach the next block early), and a handle keeps at most [`KEEP`] blocks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore};
use tokio::sync::OnceCell;

use super::{map_err, meta_of};
use crate::storage::{Meta, ReadHandle, StorageError, StorageResult};

const BLOCK: u64 = 4 << 20;
const KEEP: usize = 3;

type Block = Arc<OnceCell<Bytes>>;

pub struct S3Read {
    store: Arc<dyn ObjectStore>,
    key: Path,
    etag: Option<String>,
    meta: Meta,
    blocks: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<u64, Block>,
    /// Block numbers, least recently used first.
    order: Vec<u64>,
}

impl Cache {
    fn get(&mut self, n: u64) -> Block {
        self.order.retain(|&b| b != n);
        self.order.push(n);
        let cell = self.map.entry(n).or_default().clone();
        while self.order.len() > KEEP {
            let old = self.order.remove(0);
            self.map.remove(&old);
        }
        cell
    }
}

impl S3Read {
    pub fn new<S: ObjectStore>(store: Arc<S>, key: Path, m: ObjectMeta) -> Self {
        Self {
            store,
            key,
            etag: m.e_tag.clone(),
            meta: meta_of(&m),
            blocks: Mutex::new(Cache::default()),
        }
    }

    fn cell(&self, n: u64) -> Block {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner()).get(n)
    }

    async fn block(&self, n: u64) -> StorageResult<Bytes> {
        let cell = self.cell(n);
        let bytes = cell
            .get_or_try_init(|| fetch(&*self.store, &self.key, &self.etag, n, self.meta.size))
            .await?
            .clone();
        Ok(bytes)
    }
}

async fn fetch(
    store: &dyn ObjectStore,
    key: &Path,
    etag: &Option<String>,
    n: u64,
    size: u64,
) -> StorageResult<Bytes> {
    let start = n * BLOCK;
    let end = (start + BLOCK).min(size);
    if start >= end {
        return Ok(Bytes::new());
    }
    let opts = GetOptions {
        range: Some(GetRange::Bounded(start..end)),
        if_match: etag.clone(),
        ..Default::default()
    };
    let r = store.get_opts(key, opts).await.map_err(|e| match e {
        object_store::Error::Precondition { .. } => {
            StorageError::Backend("the file was replaced during the download".into())
        }
        other => map_err(other),
    })?;
    r.bytes().await.map_err(map_err)
}

#[async_trait]
impl ReadHandle for S3Read {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    async fn read_at(&self, offset: u64, len: usize, headroom: usize) -> StorageResult<BytesMut> {
        let size = self.meta.size;
        let end = offset.saturating_add(len as u64).min(size);
        let mut buf = BytesMut::with_capacity(headroom + end.saturating_sub(offset) as usize);
        buf.resize(headroom, 0);
        let mut pos = offset;
        while pos < end {
            let n = pos / BLOCK;
            let block = self.block(n).await?;
            let from = (pos - n * BLOCK) as usize;
            let to = ((end - n * BLOCK) as usize).min(block.len());
            if from >= to {
                break;
            }
            buf.extend_from_slice(&block[from..to]);
            pos += (to - from) as u64;
        }
        Ok(buf)
    }
}
