//! Reading and uploading files on the local backend.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rustix::fs::{self as rfs, OFlags};

use super::{blocking, fs, Inner};
use crate::storage::{
    Meta, OrgName, ReadHandle, SetAttrs, Space, StorageError, StoragePath, StorageResult,
    UploadHandle, UploadOptions,
};

pub struct LocalRead {
    file: Arc<File>,
    meta: Meta,
}

impl LocalRead {
    pub(super) fn open(inner: &Inner, org: &OrgName, path: &StoragePath) -> StorageResult<Self> {
        let fd = fs::open_beneath(
            inner.orgs.as_fd(),
            &Inner::rel(org, path),
            OFlags::RDONLY,
            0,
        )
        .map_err(StorageError::from_io)?;
        let meta = fs::fstat(fd.as_fd())?;
        if meta.is_dir() {
            return Err(StorageError::IsADirectory);
        }
        Ok(Self {
            file: Arc::new(File::from(fd)),
            meta,
        })
    }
}

#[async_trait]
impl ReadHandle for LocalRead {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    async fn read_at(&self, offset: u64, len: usize, headroom: usize) -> StorageResult<BytesMut> {
        let file = self.file.clone();
        blocking(move || {
            let mut buf = BytesMut::zeroed(headroom + len);
            let mut n = 0;
            while n < len {
                match file.read_at(&mut buf[headroom + n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(StorageError::from_io(e)),
                }
            }
            buf.truncate(headroom + n);
            Ok(buf)
        })
        .await
    }
}

/// Data goes to a temp file in `<data_dir>/tmp`; on commit it is fsync'd and renamed into
/// the parent folder opened at create time (so a rename of that folder meanwhile still
/// publishes inside the org, never through a path).
pub struct LocalUpload(Arc<Up>);

struct Up {
    file: File,
    tmp_dir: OwnedFd,
    tmp_name: String,
    parent: OwnedFd,
    name: String,
    exclusive: bool,
    max: u64,
    size: AtomicU64,
    /// Committed or aborted: the temp is gone or renamed.
    done: AtomicBool,
}

impl LocalUpload {
    pub(super) fn create(
        inner: &Inner,
        org: &OrgName,
        path: &StoragePath,
        opts: UploadOptions,
    ) -> StorageResult<Self> {
        let (parent, name) = inner.parent(org, path)?;
        let existing = match fs::stat_at(parent.as_fd(), name) {
            Ok(m) if m.is_dir() => return Err(StorageError::IsADirectory),
            Ok(m) => Some(m),
            Err(StorageError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if existing.is_some() && opts.exclusive {
            return Err(StorageError::AlreadyExists);
        }
        let tmp_dir = rustix::io::fcntl_dupfd_cloexec(inner.tmp.as_fd(), 0)?;
        let tmp_name = format!("sftp-upload-{}.part", ulid::Ulid::new());
        let fd = rfs::openat(
            tmp_dir.as_fd(),
            tmp_name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            rfs::Mode::from_raw_mode(0o640),
        )?;
        let up = Up {
            file: File::from(fd),
            tmp_dir,
            tmp_name,
            parent,
            name: name.to_owned(),
            exclusive: opts.exclusive,
            max: opts.max_bytes,
            size: AtomicU64::new(0),
            done: AtomicBool::new(false),
        };
        if existing.is_some() && opts.keep_existing {
            // Resumed or in-place writes start from the current content.
            let src = File::from(rfs::openat(
                up.parent.as_fd(),
                up.name.as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                rfs::Mode::empty(),
            )?);
            let mut off = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = src.read_at(&mut buf, off).map_err(StorageError::from_io)?;
                if k == 0 {
                    break;
                }
                up.file
                    .write_all_at(&buf[..k], off)
                    .map_err(StorageError::from_io)?;
                off += k as u64;
            }
            up.size.store(off, Ordering::Release);
        }
        Ok(Self(Arc::new(up)))
    }
}

impl Up {
    fn remove_tmp(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            let _ = fs::unlink_at(self.tmp_dir.as_fd(), &self.tmp_name, false);
        }
    }

    fn commit(&self) -> StorageResult<()> {
        if self.done.load(Ordering::Acquire) {
            return Err(StorageError::Backend("upload already finished".into()));
        }
        self.file.sync_all().map_err(StorageError::from_io)?;
        fs::rename_at(
            self.tmp_dir.as_fd(),
            &self.tmp_name,
            self.parent.as_fd(),
            &self.name,
            !self.exclusive,
        )
        .map_err(StorageError::from_io)?;
        self.done.store(true, Ordering::Release);
        fs::fsync(self.parent.as_fd()).map_err(StorageError::from_io)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.remove_tmp();
    }
}

#[async_trait]
impl UploadHandle for LocalUpload {
    async fn write_at(&self, offset: u64, data: Bytes) -> StorageResult<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.0.max {
            return Err(StorageError::TooLarge);
        }
        let up = self.0.clone();
        blocking(move || {
            up.file
                .write_all_at(&data, offset)
                .map_err(StorageError::from_io)
        })
        .await?;
        self.0.size.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.0.size.load(Ordering::Acquire)
    }

    async fn set_len(&self, len: u64) -> StorageResult<()> {
        if len > self.0.max {
            return Err(StorageError::TooLarge);
        }
        let up = self.0.clone();
        blocking(move || up.file.set_len(len).map_err(StorageError::from_io)).await?;
        self.0.size.store(len, Ordering::Release);
        Ok(())
    }

    async fn commit(&self) -> StorageResult<()> {
        let up = self.0.clone();
        let res = blocking(move || {
            let res = up.commit();
            if res.is_err() {
                up.remove_tmp();
            }
            res
        })
        .await;
        res
    }

    async fn abort(&self) {
        let up = self.0.clone();
        let _ = blocking(move || {
            up.remove_tmp();
            Ok(())
        })
        .await;
    }
}

pub(super) fn set_attrs(
    inner: &Inner,
    org: &OrgName,
    path: &StoragePath,
    attrs: SetAttrs,
) -> StorageResult<()> {
    let fd = fs::open_beneath(
        inner.orgs.as_fd(),
        &Inner::rel(org, path),
        OFlags::RDONLY,
        0,
    )
    .map_err(StorageError::from_io)?;
    if let Some(perm) = attrs.perm {
        rfs::fchmod(fd.as_fd(), rfs::Mode::from_raw_mode(perm & 0o7777))?;
    }
    if attrs.atime.is_none() && attrs.mtime.is_none() {
        return Ok(());
    }
    let ts = |t: Option<SystemTime>| match t {
        Some(t) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            rfs::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            }
        }
        None => rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
    };
    let times = rfs::Timestamps {
        last_access: ts(attrs.atime),
        last_modification: ts(attrs.mtime),
    };
    Ok(rfs::futimens(fd.as_fd(), &times)?)
}

/// `statvfs` of the file system holding the org folders.
pub(super) fn space(inner: &Inner) -> StorageResult<Space> {
    let s = rfs::fstatvfs(inner.orgs.as_fd())?;
    Ok(Space {
        block_size: s.f_bsize,
        fragment_size: s.f_frsize,
        blocks: s.f_blocks,
        blocks_free: s.f_bfree,
        blocks_avail: s.f_bavail,
        inodes: s.f_files,
        inodes_free: s.f_ffree,
        inodes_avail: s.f_favail,
        fs_id: s.f_fsid,
        flags: s.f_flag.bits(),
        name_max: s.f_namemax,
    })
}

/// Writes, fsyncs, reads back and removes a probe file in the temp folder, and opens the
/// orgs folder: proves both are usable.
pub(super) fn probe(inner: &Inner) -> StorageResult<()> {
    let name = format!("probe-{}.tmp", ulid::Ulid::new());
    let fd = rfs::openat(
        inner.tmp.as_fd(),
        name.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        rfs::Mode::from_raw_mode(0o600),
    )?;
    let f = File::from(fd);
    let res = (|| {
        f.write_all_at(b"hookbridge probe", 0)
            .map_err(StorageError::from_io)?;
        f.sync_data().map_err(StorageError::from_io)?;
        let mut back = [0u8; 16];
        f.read_exact_at(&mut back, 0)
            .map_err(StorageError::from_io)?;
        if &back != b"hookbridge probe" {
            return Err(StorageError::Backend("probe read back differs".into()));
        }
        fs::open_dir(inner.orgs.as_fd(), "").map_err(StorageError::from_io)?;
        Ok(())
    })();
    let _ = fs::unlink_at(inner.tmp.as_fd(), &name, false);
    res
}
