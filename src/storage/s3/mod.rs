//! Org folders in an S3-compatible bucket: the object `<prefix>/<org>/<path>`.
//!
//! Where S3 cannot match POSIX, this does what SFTPGo's S3 backend does:
//! - folders are key prefixes; a listing shows each common prefix as a folder. `mkdir`
//!   writes an empty marker object (`<dir>/.hookbridge-dir`, hidden from listings) so
//!   an empty folder can exist; a folder disappears with its last object;
//! - rename is copy + delete (not atomic; a folder is renamed object by object, up to
//!   [`MAX_DIR_RENAME`] objects), and "fail if the target exists" is a check before the copy;
//! - uploads are written sequentially (out-of-order pipelined WRITEs are re-ordered in a
//!   bounded buffer), as one PUT when small or a multipart upload, published on close;
//!   resuming or writing into an existing file is not supported;
//! - no owners, modes or settable times.
//!
//! Event files use a create-only PUT (`If-None-Match: *`): a 412 means the file is there
//! already, which for an idempotent event write is success.

mod pages;
mod read;
mod setup;
mod upload;

use pages::{S3Lister, S3Staged};
pub use setup::Credentials;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use object_store::aws::AmazonS3;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::{Path, PathPart};
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{
    Capabilities, EntryKind, EventFile, FileInfo, Lister, Meta, OrgName, ReadHandle, RenameMode,
    SetAttrs, Space, StagedEvents, Storage, StorageError, StoragePath, StorageResult, UploadHandle,
    UploadOptions, DIR_PERM, FILE_PERM,
};

/// The object that keeps an empty folder in existence; never listed, never served.
pub const DIR_MARKER: &str = ".hookbridge-dir";
/// Objects a folder rename copies one by one before it refuses (it is not atomic).
pub const MAX_DIR_RENAME: usize = 10_000;
/// Keys per list request (S3's own maximum).
const PAGE: usize = 1000;
/// Event PUTs of one batch in flight at once.
const PUT_CONCURRENCY: usize = 32;

#[derive(Debug, Clone)]
pub struct S3Storage {
    store: Arc<AmazonS3>,
    bucket: String,
    /// Clean key prefix, no slashes at either end (may be empty).
    prefix: String,
    endpoint: String,
}

fn map_err(e: object_store::Error) -> StorageError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => StorageError::NotFound,
        E::AlreadyExists { .. } => StorageError::AlreadyExists,
        E::Precondition { .. } => StorageError::Backend("the object changed meanwhile".into()),
        E::PermissionDenied { source, .. } => {
            StorageError::Backend(format!("access denied by the S3 store: {source}"))
        }
        E::Unauthenticated { source, .. } => {
            StorageError::Backend(format!("the S3 store refused the credentials: {source}"))
        }
        E::NotSupported { source } => StorageError::Backend(source.to_string()),
        E::InvalidPath { .. } => StorageError::InvalidPath("not a valid object key"),
        // Connection refused, timeouts, 5xx after the retries: worth trying again later.
        other => StorageError::Unavailable(other.to_string()),
    }
}

fn part(seg: &str) -> StorageResult<PathPart<'static>> {
    PathPart::parse(seg)
        .map(|p| PathPart::from(p.as_ref().to_owned()))
        .map_err(|_| StorageError::InvalidPath("not a valid object key"))
}

fn meta_of(o: &ObjectMeta) -> Meta {
    Meta {
        kind: EntryKind::File,
        size: o.size,
        mtime: SystemTime::from(o.last_modified),
        atime: SystemTime::from(o.last_modified),
        perm: FILE_PERM,
        uid: 0,
        gid: 0,
        nlink: 1,
    }
}

fn dir_meta(mtime: SystemTime) -> Meta {
    Meta {
        kind: EntryKind::Dir,
        size: 0,
        mtime,
        atime: mtime,
        perm: DIR_PERM,
        uid: 0,
        gid: 0,
        nlink: 1,
    }
}

impl S3Storage {
    fn base(&self) -> Vec<PathPart<'static>> {
        self.prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| PathPart::from(s.to_owned()))
            .collect()
    }

    /// The object key of `path` in `org`. Segments were checked by [`StoragePath`]: they
    /// cannot climb, so the key always lies under `<prefix>/<org>/`.
    fn key(&self, org: &OrgName, path: &StoragePath) -> StorageResult<Path> {
        let mut parts = self.base();
        parts.push(part(org.as_str())?);
        for s in path.segments() {
            if s == DIR_MARKER {
                return Err(StorageError::InvalidPath("reserved name"));
            }
            parts.push(part(s)?);
        }
        Ok(Path::from_iter(parts))
    }

    /// `key/` as a list prefix (the trailing slash keeps `acme` from matching `acme2`).
    fn dir_prefix(key: &Path) -> String {
        let s = key.as_ref();
        if s.is_empty() {
            String::new()
        } else {
            format!("{s}/")
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: bool,
        token: Option<String>,
        max: usize,
    ) -> StorageResult<object_store::list::PaginatedListResult> {
        let opts = PaginatedListOptions {
            delimiter: delimiter.then(|| "/".into()),
            max_keys: Some(max),
            page_token: token,
            ..Default::default()
        };
        self.store
            .list_paginated(Some(prefix), opts)
            .await
            .map_err(map_err)
    }

    /// Whether anything (an object or a marker) lies under `key/`.
    async fn dir_exists(&self, key: &Path) -> StorageResult<bool> {
        let r = self
            .list_page(&Self::dir_prefix(key), false, None, 1)
            .await?;
        Ok(!r.result.objects.is_empty())
    }

    /// Every object under `key/` (markers included), all pages.
    async fn list_all(&self, key: &Path, cap: usize) -> StorageResult<Vec<ObjectMeta>> {
        let prefix = Self::dir_prefix(key);
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let r = self.list_page(&prefix, false, token, PAGE).await?;
            out.extend(r.result.objects);
            if out.len() > cap {
                return Err(StorageError::Unsupported(
                    "a folder this large cannot be renamed on object storage",
                ));
            }
            match r.page_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    async fn head(&self, key: &Path) -> StorageResult<Option<ObjectMeta>> {
        match self.store.head(key).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn stat_key(&self, key: &Path, root: bool) -> StorageResult<Meta> {
        if root {
            return Ok(dir_meta(SystemTime::UNIX_EPOCH));
        }
        if let Some(m) = self.head(key).await? {
            return Ok(meta_of(&m));
        }
        if self.dir_exists(key).await? {
            return Ok(dir_meta(SystemTime::UNIX_EPOCH));
        }
        Err(StorageError::NotFound)
    }

    async fn put_create(&self, key: &Path, body: Bytes) -> StorageResult<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(key, PutPayload::from_bytes(body), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn rename_file(&self, from: &Path, to: &Path) -> StorageResult<()> {
        self.store.copy(from, to).await.map_err(map_err)?;
        self.store.delete(from).await.map_err(map_err)
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_rename: false,
            real_dirs: false,
            random_write: false,
            set_times: false,
        }
    }

    fn describe(&self) -> String {
        format!("s3 {}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    async fn check(&self) -> StorageResult<()> {
        let mut parts = self.base();
        parts.push(PathPart::from(format!(
            ".hookbridge-probe-{}",
            ulid::Ulid::new()
        )));
        let key = Path::from_iter(parts);
        let body = Bytes::from_static(b"hookbridge probe");
        // Say what an operator should look at, not just what S3 answered.
        let explain = |e: StorageError| match e {
            StorageError::NotFound => StorageError::Backend(format!(
                "bucket {:?} does not exist at {} (storage.bucket)",
                self.bucket, self.endpoint
            )),
            StorageError::Unavailable(m) => StorageError::Unavailable(format!(
                "cannot reach the S3 endpoint {} (storage.endpoint): {m}",
                self.endpoint
            )),
            StorageError::Backend(m) => StorageError::Backend(format!(
                "{m} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and storage.region)"
            )),
            other => other,
        };
        self.put_create(&key, body.clone()).await.map_err(explain)?;
        let back = async {
            let r = self.store.get(&key).await.map_err(map_err)?;
            r.bytes().await.map_err(map_err)
        }
        .await
        .map_err(explain);
        let _ = self.store.delete(&key).await;
        if back? != body {
            return Err(StorageError::Backend(format!(
                "a probe object read back from bucket {:?} differs from what was written",
                self.bucket
            )));
        }
        Ok(())
    }

    async fn ready(&self) -> StorageResult<()> {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        self.list_page(&prefix, true, None, 1).await.map(drop)
    }

    async fn create_org(&self, _org: &OrgName) -> StorageResult<()> {
        // The org's prefix needs no object: it exists as soon as a file is written.
        Ok(())
    }

    async fn remove_org(&self, org: &OrgName) -> StorageResult<()> {
        let key = self.key(org, &StoragePath::root())?;
        let prefix = Self::dir_prefix(&key);
        loop {
            let r = self.list_page(&prefix, false, None, PAGE).await?;
            if r.result.objects.is_empty() {
                return Ok(());
            }
            let locations = stream::iter(r.result.objects.into_iter().map(|o| Ok(o.location)));
            let mut deleted = self.store.delete_stream(locations.boxed());
            while let Some(res) = deleted.next().await {
                match res {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(map_err(e)),
                }
            }
        }
    }

    async fn stage_events(&self, files: Vec<EventFile>) -> Box<dyn StagedEvents> {
        // Nothing to stage: an object is visible once PUT, so PUTs wait for the publish
        // (after the store commit), or a refused event could leave a file behind.
        Box::new(S3Staged {
            s3: self.clone(),
            files,
        })
    }

    async fn stat(&self, org: &OrgName, path: &StoragePath) -> StorageResult<Meta> {
        let key = self.key(org, path)?;
        self.stat_key(&key, path.is_root()).await
    }

    async fn list(&self, org: &OrgName, dir: &StoragePath) -> StorageResult<Box<dyn Lister>> {
        let key = self.key(org, dir)?;
        if !dir.is_root() {
            // A listing of a file, or of nothing, is an error as on a file system.
            if self.head(&key).await?.is_some() {
                return Err(StorageError::NotADirectory);
            }
            if !self.dir_exists(&key).await? {
                return Err(StorageError::NotFound);
            }
        }
        Ok(Box::new(S3Lister {
            s3: self.clone(),
            prefix: Self::dir_prefix(&key),
            token: None,
            done: false,
        }))
    }

    async fn open_read(
        &self,
        org: &OrgName,
        path: &StoragePath,
    ) -> StorageResult<Box<dyn ReadHandle>> {
        let key = self.key(org, path)?;
        let Some(m) = self.head(&key).await? else {
            if !path.is_root() && self.dir_exists(&key).await? {
                return Err(StorageError::IsADirectory);
            }
            return Err(StorageError::NotFound);
        };
        Ok(Box::new(read::S3Read::new(self.store.clone(), key, m)))
    }

    async fn delete(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        let key = self.key(org, path)?;
        if self.head(&key).await?.is_none() {
            if !path.is_root() && self.dir_exists(&key).await? {
                return Err(StorageError::IsADirectory);
            }
            return Err(StorageError::NotFound);
        }
        self.store.delete(&key).await.map_err(map_err)
    }

    async fn rename(
        &self,
        org: &OrgName,
        from: &StoragePath,
        to: &StoragePath,
        mode: RenameMode,
    ) -> StorageResult<()> {
        if from.is_root() || to.is_root() {
            return Err(StorageError::PermissionDenied);
        }
        let (a, b) = (self.key(org, from)?, self.key(org, to)?);
        if to.starts_with(from) {
            return Err(StorageError::InvalidPath(
                "cannot move a folder into itself",
            ));
        }
        let target_file = self.head(&b).await?.is_some();
        let target_dir = !target_file && self.dir_exists(&b).await?;
        if self.head(&a).await?.is_some() {
            if target_dir {
                return Err(StorageError::IsADirectory);
            }
            if target_file && mode == RenameMode::NoReplace {
                return Err(StorageError::AlreadyExists);
            }
            return self.rename_file(&a, &b).await;
        }
        // A folder: object by object.
        let objects = self.list_all(&a, MAX_DIR_RENAME).await?;
        if objects.is_empty() {
            return Err(StorageError::NotFound);
        }
        if target_file || target_dir {
            return Err(StorageError::AlreadyExists);
        }
        let from_prefix = Self::dir_prefix(&a);
        let to_prefix = Self::dir_prefix(&b);
        for o in objects {
            let Some(rest) = o.location.as_ref().strip_prefix(&from_prefix) else {
                continue;
            };
            let dest = Path::parse(format!("{to_prefix}{rest}"))
                .map_err(|_| StorageError::InvalidPath("not a valid object key"))?;
            self.rename_file(&o.location, &dest).await?;
        }
        Ok(())
    }

    async fn mkdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        if path.is_root() {
            return Err(StorageError::AlreadyExists);
        }
        let key = self.key(org, path)?;
        if self.head(&key).await?.is_some() || self.dir_exists(&key).await? {
            return Err(StorageError::AlreadyExists);
        }
        if let Some(parent) = path.parent().filter(|p| !p.is_root()) {
            let pk = self.key(org, &parent)?;
            if !self.dir_exists(&pk).await? {
                return Err(StorageError::NotFound);
            }
        }
        let marker = key.clone().join(DIR_MARKER);
        self.put_create(&marker, Bytes::new()).await
    }

    async fn rmdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        if path.is_root() {
            return Err(StorageError::PermissionDenied);
        }
        let key = self.key(org, path)?;
        if self.head(&key).await?.is_some() {
            return Err(StorageError::NotADirectory);
        }
        let r = self
            .list_page(&Self::dir_prefix(&key), false, None, 2)
            .await?;
        let marker = key.clone().join(DIR_MARKER);
        let mut has_marker = false;
        for o in &r.result.objects {
            if o.location == marker {
                has_marker = true;
            } else {
                return Err(StorageError::NotEmpty);
            }
        }
        if !has_marker {
            return Err(StorageError::NotFound);
        }
        self.store.delete(&marker).await.map_err(map_err)
    }

    async fn create_upload(
        &self,
        org: &OrgName,
        path: &StoragePath,
        opts: UploadOptions,
    ) -> StorageResult<Box<dyn UploadHandle>> {
        if path.is_root() {
            return Err(StorageError::IsADirectory);
        }
        let key = self.key(org, path)?;
        let existing = self.head(&key).await?;
        if existing.is_none() && self.dir_exists(&key).await? {
            return Err(StorageError::IsADirectory);
        }
        if existing.is_some() && opts.exclusive {
            return Err(StorageError::AlreadyExists);
        }
        if existing.as_ref().is_some_and(|m| m.size > 0) && opts.keep_existing {
            return Err(StorageError::Unsupported(
                "writing into an existing file (resume, append) on object storage",
            ));
        }
        if let Some(parent) = path.parent().filter(|p| !p.is_root()) {
            if !self.dir_exists(&self.key(org, &parent)?).await? {
                return Err(StorageError::NotFound);
            }
        }
        Ok(Box::new(upload::S3Upload::new(
            self.store.clone(),
            key,
            opts,
        )))
    }

    async fn set_attrs(
        &self,
        _org: &OrgName,
        _path: &StoragePath,
        _attrs: SetAttrs,
    ) -> StorageResult<()> {
        Err(StorageError::Unsupported(
            "setting times or modes on object storage",
        ))
    }

    async fn space(&self) -> StorageResult<Space> {
        Err(StorageError::Unsupported("free space of object storage"))
    }

    async fn walk(&self, org: &OrgName) -> StorageResult<Vec<FileInfo>> {
        let root = self.key(org, &StoragePath::root())?;
        let prefix = Self::dir_prefix(&root);
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let r = self.list_page(&prefix, false, token, PAGE).await?;
            for o in r.result.objects {
                let Some(rest) = o.location.as_ref().strip_prefix(&prefix) else {
                    continue;
                };
                if o.location.filename() == Some(DIR_MARKER) {
                    continue;
                }
                // Keys another tool wrote that are not plain names are left alone.
                let Ok(path) = StoragePath::from_segments(rest.split('/')) else {
                    continue;
                };
                out.push(FileInfo {
                    path,
                    size: o.size,
                    mtime: SystemTime::from(o.last_modified),
                });
            }
            match r.page_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }
}
