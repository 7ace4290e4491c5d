//! The org folders, behind one seam.
//!
//! Everything hookbridge does to an org's files (the spool publishing event files, SFTP
//! operations, retention, usage, the admin API, connection tests) goes through
//! [`Storage`], modelled on SFTPGo's `vfs.Fs`: one interface, two backends, and
//! [`Capabilities`] for what a backend cannot do the POSIX way.
//!
//! - [`local`]: the org folders on a local file system. Every path is resolved beneath the
//!   org's directory fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a symlink
//!   planted anywhere (or swapped in between two calls) is never followed.
//! - [`s3`]: any S3-compatible store, keys `<prefix>/<org>/<path>`.
//!
//! Paths are [`StoragePath`]s, cleaned and checked before a backend sees them.

pub mod complete_view;
mod config;
pub mod local;
mod path;
pub mod s3;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

pub use config::{StorageConfig, StorageKind};
pub use path::{OrgName, StoragePath};

/// Why a storage operation failed. Each has the errno a system call would have given
/// ([`StorageError::errno`]), and so the SFTP status OpenSSH's sftp-server would send.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("no such file or directory")]
    NotFound,
    #[error("permission denied")]
    PermissionDenied,
    #[error("file exists")]
    AlreadyExists,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid path: {0}")]
    InvalidPath(&'static str),
    #[error("path leaves the org folder")]
    Escape,
    #[error("symbolic links are not served")]
    Symlink,
    #[error("not supported by this storage: {0}")]
    Unsupported(&'static str),
    /// A write past the configured upload limit (EFBIG).
    #[error("file too large")]
    TooLarge,
    #[error("no space left on the storage")]
    NoSpace,
    /// The backend cannot be reached or answered 5xx: worth retrying later (503).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage I/O error: {0}")]
    Io(std::io::Error),
    #[error("storage error: {0}")]
    Backend(String),
}

/// SFTP status codes (draft-ietf-secsh-filexfer-02), without tying storage to a protocol crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SftpStatus {
    NoSuchFile,
    PermissionDenied,
    Failure,
    BadMessage,
    OpUnsupported,
}

impl StorageError {
    /// The errno a system call would have failed with, so that a protocol layer can answer
    /// exactly as OpenSSH's sftp-server does for that errno.
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::NotFound => libc::ENOENT,
            StorageError::PermissionDenied => libc::EACCES,
            StorageError::AlreadyExists => libc::EEXIST,
            StorageError::NotADirectory => libc::ENOTDIR,
            StorageError::IsADirectory => libc::EISDIR,
            StorageError::NotEmpty => libc::ENOTEMPTY,
            StorageError::InvalidPath(_) => libc::EINVAL,
            // In a chroot `/../x` is `/x`, and a planted link meets O_NOFOLLOW (ELOOP):
            // either way the path names nothing the user may see.
            StorageError::Escape => libc::ENOENT,
            StorageError::Symlink => libc::ELOOP,
            StorageError::Unsupported(_) => libc::ENOSYS,
            StorageError::TooLarge => libc::EFBIG,
            StorageError::NoSpace => libc::ENOSPC,
            StorageError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            StorageError::Unavailable(_) | StorageError::Backend(_) => libc::EIO,
        }
    }

    /// As OpenSSH's `errno_to_portable` for [`StorageError::errno`].
    pub fn sftp_status(&self) -> SftpStatus {
        match self.errno() {
            libc::ENOENT | libc::ENOTDIR | libc::EBADF | libc::ELOOP => SftpStatus::NoSuchFile,
            libc::EPERM | libc::EACCES | libc::EFAULT => SftpStatus::PermissionDenied,
            libc::ENAMETOOLONG | libc::EINVAL => SftpStatus::BadMessage,
            libc::ENOSYS => SftpStatus::OpUnsupported,
            _ => SftpStatus::Failure,
        }
    }

    /// Whether the caller should answer 503 / retry rather than report a hard failure.
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Unavailable(_) | StorageError::NoSpace)
    }

    /// Maps an errno; ELOOP and EXDEV are what `RESOLVE_NO_SYMLINKS` / `RESOLVE_BENEATH`
    /// answer when a path meets a symlink or tries to leave the root.
    pub fn from_io(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) => StorageError::NotFound,
            Some(libc::EACCES) | Some(libc::EPERM) => StorageError::PermissionDenied,
            Some(libc::EEXIST) => StorageError::AlreadyExists,
            Some(libc::ENOTDIR) => StorageError::NotADirectory,
            Some(libc::EISDIR) => StorageError::IsADirectory,
            Some(libc::ENOTEMPTY) => StorageError::NotEmpty,
            Some(libc::ELOOP) => StorageError::Symlink,
            Some(libc::EXDEV) => StorageError::Escape,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::NoSpace,
            Some(libc::EFBIG) => StorageError::TooLarge,
            Some(libc::ENAMETOOLONG) => StorageError::InvalidPath("name too long"),
            _ => StorageError::Io(e),
        }
    }
}

impl From<rustix::io::Errno> for StorageError {
    fn from(e: rustix::io::Errno) -> Self {
        StorageError::from_io(e.into())
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// What a backend can do the POSIX way; callers and the README describe the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Rename is one atomic step (S3: copy then delete, so a reader may briefly see both).
    pub atomic_rename: bool,
    /// Directories exist on their own (S3: emulated with a `dir/` marker object; a folder
    /// whose last object is gone disappears).
    pub real_dirs: bool,
    /// Uploads may write at any offset and resume an existing file (S3: sequential only).
    pub random_write: bool,
    /// Modification times can be set (SFTP SETSTAT).
    pub set_times: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
}

/// What `stat` and listings report. S3 has no owners or modes: they are synthesised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: EntryKind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Last access where the storage keeps one (S3: the modification time).
    pub atime: SystemTime,
    /// Permission bits only (no file type).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }

    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub meta: Meta,
}

/// A file found by [`Storage::walk`] (retention, usage recount, crash repair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub path: StoragePath,
    pub size: u64,
    pub mtime: SystemTime,
}

/// One event file to write create-only. The same (org, path, body) written twice is one
/// file: the second write finds it and counts as done.
#[derive(Debug, Clone)]
pub struct EventFile {
    pub org: OrgName,
    pub path: StoragePath,
    pub body: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    /// SFTP RENAME: fails with `AlreadyExists` when the target exists.
    NoReplace,
    /// `posix-rename@openssh.com`: replaces a file at the target.
    Replace,
}

/// How an upload starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadOptions {
    /// The target must not exist now nor when the upload is published (O_EXCL).
    pub exclusive: bool,
    /// Start from the current content (open without TRUNC); refused where `random_write` is false.
    pub keep_existing: bool,
    /// No write may end past this many bytes.
    pub max_bytes: u64,
}

/// Event files staged by [`Storage::stage_events`]. Dropped without `publish`, nothing
/// of them remains.
#[async_trait]
pub trait StagedEvents: Send {
    /// Makes the files marked in `keep` (one flag per staged file) durable and visible,
    /// create-only, and discards the rest. One result per staged file, in order (`Ok` for
    /// a file not kept).
    async fn publish(self: Box<Self>, keep: Vec<bool>) -> Vec<StorageResult<()>>;
}

/// One page of a directory listing at a time: a 100k-entry folder is never held whole.
#[async_trait]
pub trait Lister: Send {
    /// The next entries, or `None` at the end. Pages are not sorted across calls.
    async fn next_page(&mut self) -> StorageResult<Option<Vec<Entry>>>;
}

/// An open file for reading. Reads may come in any order and at once (SFTP pipelines
/// them); each is served from the storage by range, never by fetching the whole object.
#[async_trait]
pub trait ReadHandle: Send + Sync {
    /// The file as it was when opened.
    fn meta(&self) -> &Meta;

    /// Reads up to `len` bytes at `offset` into a buffer that starts with `headroom`
    /// unused bytes (room for a protocol header, so the data is not copied again).
    /// Returns the buffer; fewer than `headroom + len` bytes means end of file.
    async fn read_at(&self, offset: u64, len: usize, headroom: usize) -> StorageResult<BytesMut>;
}

/// An upload in progress: invisible to readers until [`UploadHandle::commit`] publishes
/// it; aborted (or dropped), it leaves nothing behind. Writes may run concurrently;
/// the caller makes sure none runs during `commit` or `abort`, each called once.
#[async_trait]
pub trait UploadHandle: Send + Sync {
    async fn write_at(&self, offset: u64, data: Bytes) -> StorageResult<()>;

    /// Size so far (the highest offset written, or what `set_len` set).
    fn size(&self) -> u64;

    /// Truncates or extends the upload (SFTP FSETSTAT size); `Unsupported` without
    /// `random_write` unless it changes nothing.
    async fn set_len(&self, len: u64) -> StorageResult<()>;

    /// Makes the upload durable and visible under its name.
    async fn commit(&self) -> StorageResult<()>;

    /// Throws the upload away.
    async fn abort(&self);
}

/// What SETSTAT may change; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttrs {
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    /// Permission bits.
    pub perm: Option<u32>,
}

impl SetAttrs {
    pub fn is_empty(&self) -> bool {
        self.atime.is_none() && self.mtime.is_none() && self.perm.is_none()
    }
}

/// Space of the file system under the org folders (SFTP `statvfs@openssh.com`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub block_size: u64,
    pub fragment_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub inodes: u64,
    pub inodes_free: u64,
    pub inodes_avail: u64,
    pub fs_id: u64,
    pub flags: u64,
    pub name_max: u64,
}

/// The org folders. Paths are relative to the org's root; no operation reaches outside it.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    fn capabilities(&self) -> Capabilities;

    /// `local /var/lib/hookbridge/orgs`, `s3 bucket/prefix at endpoint`: for logs.
    fn describe(&self) -> String;

    /// Reaches the storage and proves it writable (write, read back, delete a probe):
    /// used by `check-config` and at start, with a message that says what is wrong.
    async fn check(&self) -> StorageResult<()>;

    /// A cheap liveness check for `/readyz` (local: the folders are there; S3: one listing).
    async fn ready(&self) -> StorageResult<()>;

    /// Makes the org's root folder (a no-op where folders are implicit).
    async fn create_org(&self, org: &OrgName) -> StorageResult<()>;

    /// Removes an org's folder and everything in it.
    async fn remove_org(&self, org: &OrgName) -> StorageResult<()>;

    /// The first half of writing a batch of event files: whatever can be made durable
    /// without readers seeing it (local: fdatasync'd temps), so that it overlaps the store
    /// commit. Nothing becomes visible before [`StagedEvents::publish`].
    async fn stage_events(&self, files: Vec<EventFile>) -> Box<dyn StagedEvents>;

    /// Writes event files durably and create-only, as one batch: the backend shares the
    /// cost of making them durable (one directory fsync per folder per batch on `local`).
    /// One result per file, in order; a file already there with this name counts as written.
    /// An org's folders being moved or removed meanwhile never fails another org's files.
    async fn write_events(&self, files: &[EventFile]) -> Vec<StorageResult<()>> {
        let keep = vec![true; files.len()];
        self.stage_events(files.to_vec()).await.publish(keep).await
    }

    async fn stat(&self, org: &OrgName, path: &StoragePath) -> StorageResult<Meta>;

    async fn list(&self, org: &OrgName, dir: &StoragePath) -> StorageResult<Box<dyn Lister>>;

    async fn open_read(
        &self,
        org: &OrgName,
        path: &StoragePath,
    ) -> StorageResult<Box<dyn ReadHandle>>;

    /// Removes a file (not a directory).
    async fn delete(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()>;

    async fn rename(
        &self,
        org: &OrgName,
        from: &StoragePath,
        to: &StoragePath,
        mode: RenameMode,
    ) -> StorageResult<()>;

    async fn mkdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()>;

    /// Removes an empty directory.
    async fn rmdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()>;

    async fn create_upload(
        &self,
        org: &OrgName,
        path: &StoragePath,
        opts: UploadOptions,
    ) -> StorageResult<Box<dyn UploadHandle>>;

    /// Sets times and permission bits (`Unsupported` without `set_times`).
    async fn set_attrs(
        &self,
        org: &OrgName,
        path: &StoragePath,
        attrs: SetAttrs,
    ) -> StorageResult<()>;

    /// Space left where the org folders live (`Unsupported` on object storage).
    async fn space(&self) -> StorageResult<Space>;

    /// Every file of the org, in no particular order (retention, usage recount).
    async fn walk(&self, org: &OrgName) -> StorageResult<Vec<FileInfo>>;
}

/// Reads a whole small file (connection tests, tests). Not for org data of unknown size.
pub async fn read_small(
    s: &dyn Storage,
    org: &OrgName,
    path: &StoragePath,
    max: usize,
) -> StorageResult<Bytes> {
    let h = s.open_read(org, path).await?;
    let size = usize::try_from(h.meta().size).unwrap_or(usize::MAX);
    if size > max {
        return Err(StorageError::Backend(format!(
            "file of {size} bytes is over the {max} bytes expected"
        )));
    }
    let buf = h.read_at(0, size, 0).await?;
    Ok(buf.freeze())
}

/// Opens the storage the config asks for.
pub async fn open(
    cfg: &StorageConfig,
    data_dir: &std::path::Path,
) -> StorageResult<Arc<dyn Storage>> {
    match cfg.kind {
        StorageKind::Local => Ok(Arc::new(local::LocalStorage::open(
            &data_dir.join("orgs"),
            &data_dir.join("tmp"),
        )?)),
        StorageKind::S3 => Ok(Arc::new(s3::S3Storage::new(cfg)?)),
    }
}

/// Synthesised modes for backends without them (S3), as `ls -l` shows them.
pub(crate) const FILE_PERM: u32 = 0o644;
pub(crate) const DIR_PERM: u32 = 0o755;
