//! What the S3 backend hands out in pages: a batch of event files published by concurrent
//! create-only PUTs, and a folder listing page by page.

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use object_store::path::Path;

use super::super::{Entry, EventFile, Lister, StagedEvents, StorageError, StorageResult};
use super::{dir_meta, meta_of, S3Storage, DIR_MARKER, PAGE, PUT_CONCURRENCY};

pub(super) struct S3Staged {
    pub(super) s3: S3Storage,
    pub(super) files: Vec<EventFile>,
}

#[async_trait]
impl StagedEvents for S3Staged {
    async fn publish(self: Box<Self>, keep: Vec<bool>) -> Vec<StorageResult<()>> {
        let s3 = &self.s3;
        let jobs: Vec<Option<(StorageResult<Path>, Bytes)>> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                keep.get(i)
                    .copied()
                    .unwrap_or(false)
                    .then(|| (s3.key(&f.org, &f.path), f.body.clone()))
            })
            .collect();
        let puts = jobs.into_iter().map(|job| {
            let s3 = s3.clone();
            async move {
                let Some((key, body)) = job else {
                    return Ok(());
                };
                match s3.put_create(&key?, body).await {
                    // 412: the object is there already (written before a crash): done.
                    Err(StorageError::AlreadyExists) => Ok(()),
                    other => other,
                }
            }
        });
        stream::iter(puts).buffered(PUT_CONCURRENCY).collect().await
    }
}

pub(super) struct S3Lister {
    pub(super) s3: S3Storage,
    pub(super) prefix: String,
    pub(super) token: Option<String>,
    pub(super) done: bool,
}

#[async_trait]
impl Lister for S3Lister {
    async fn next_page(&mut self) -> StorageResult<Option<Vec<Entry>>> {
        if self.done {
            return Ok(None);
        }
        let r = self
            .s3
            .list_page(&self.prefix, true, self.token.take(), PAGE)
            .await?;
        self.token = r.page_token;
        self.done = self.token.is_none();
        let mut page = Vec::new();
        for p in &r.result.common_prefixes {
            if let Some(name) = p.filename() {
                page.push(Entry {
                    name: name.to_owned(),
                    meta: dir_meta(SystemTime::UNIX_EPOCH),
                });
            }
        }
        for o in &r.result.objects {
            match o.location.filename() {
                Some(DIR_MARKER) | None => {}
                Some(name) => page.push(Entry {
                    name: name.to_owned(),
                    meta: meta_of(o),
                }),
            }
        }
        Ok(Some(page))
    }
}
