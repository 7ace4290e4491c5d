//! Org folders on the local file system: `<data_dir>/orgs/<org>/…`, temps in `<data_dir>/tmp`.
//!
//! Every operation starts from the directory fd of `orgs/` opened once, and resolves
//! `<org>/<path>` beneath it with no symlink at any step (see [`fs`]). Operations on a
//! name (delete, rename, mkdir, rmdir) open the parent that way and then act on the
//! last component with the `*at` calls, which never follow it.

mod events;
mod fs;
mod io;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rustix::fs::{self as rfs, FileType, OFlags};

use super::{
    Capabilities, Entry, EventFile, FileInfo, Lister, Meta, OrgName, ReadHandle, RenameMode,
    SetAttrs, Space, StagedEvents, Storage, StorageError, StoragePath, StorageResult, UploadHandle,
    UploadOptions,
};

/// Entries per listing page.
const PAGE: usize = 1000;

#[derive(Debug, Clone)]
pub struct LocalStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    orgs_path: PathBuf,
    orgs: OwnedFd,
    tmp: OwnedFd,
    /// Folders whose entry in their parent is known durable (their chain was fsync'd once).
    durable: events::DurableDirs,
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T, F>(f: F) -> StorageResult<T>
where
    F: FnOnce() -> StorageResult<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StorageError::Backend(format!("storage task failed: {e}"))))
}

impl LocalStorage {
    /// Opens (creating if needed) the org and temp folders, and removes temps a crash left.
    pub fn open(orgs_dir: &Path, tmp_dir: &Path) -> StorageResult<Self> {
        let prep = |p: &Path| -> StorageResult<OwnedFd> {
            std::fs::create_dir_all(p).map_err(StorageError::from_io)?;
            Ok(rfs::open(
                p,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                rfs::Mode::empty(),
            )?)
        };
        let orgs = prep(orgs_dir)?;
        let tmp = prep(tmp_dir)?;
        let mut d = rfs::Dir::read_from(&tmp)?;
        for (name, ft) in fs::read_names(&mut d, usize::MAX).map_err(StorageError::from_io)? {
            if ft == FileType::RegularFile {
                fs::unlink_at(tmp.as_fd(), &name, false).map_err(StorageError::from_io)?;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                orgs_path: orgs_dir.to_owned(),
                orgs,
                tmp,
                durable: Default::default(),
            }),
        })
    }
}

impl Inner {
    fn rel(org: &OrgName, path: &StoragePath) -> String {
        if path.is_root() {
            org.as_str().to_owned()
        } else {
            format!("{}/{}", org.as_str(), path.relative())
        }
    }

    fn open_dir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<OwnedFd> {
        fs::open_dir(self.orgs.as_fd(), &Self::rel(org, path)).map_err(StorageError::from_io)
    }

    /// The parent's fd and the last name; the root has neither.
    fn parent<'p>(
        &self,
        org: &OrgName,
        path: &'p StoragePath,
    ) -> StorageResult<(OwnedFd, &'p str)> {
        let (Some(parent), Some(name)) = (path.parent(), path.name()) else {
            return Err(StorageError::PermissionDenied);
        };
        Ok((self.open_dir(org, &parent)?, name))
    }

    fn stat(&self, org: &OrgName, path: &StoragePath) -> StorageResult<Meta> {
        if path.is_root() {
            return fs::fstat(self.open_dir(org, path)?.as_fd());
        }
        let (dir, name) = self.parent(org, path)?;
        fs::stat_at(dir.as_fd(), name)
    }

    fn walk(&self, org: &OrgName) -> StorageResult<Vec<FileInfo>> {
        let mut out = Vec::new();
        let root = match self.open_dir(org, &StoragePath::root()) {
            Ok(fd) => fd,
            Err(StorageError::NotFound) => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut stack = vec![(root, StoragePath::root())];
        while let Some((fd, at)) = stack.pop() {
            let mut d = rfs::Dir::read_from(&fd)?;
            for (name, _) in fs::read_names(&mut d, usize::MAX).map_err(StorageError::from_io)? {
                let Ok(path) = at.join(&name) else { continue };
                let meta = match fs::stat_at(fd.as_fd(), &name) {
                    Ok(m) => m,
                    // Gone meanwhile, or a symlink/fifo: nothing to count or remove.
                    Err(StorageError::NotFound | StorageError::Symlink) => continue,
                    Err(e) => return Err(e),
                };
                if meta.is_dir() {
                    match fs::open_dir(fd.as_fd(), &name) {
                        Ok(child) => stack.push((child, path)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(StorageError::from_io(e)),
                    }
                } else {
                    out.push(FileInfo {
                        path,
                        size: meta.size,
                        mtime: meta.mtime,
                    });
                }
            }
        }
        Ok(out)
    }
}

struct LocalLister {
    dir: Option<(rfs::Dir, OwnedFd)>,
}

#[async_trait]
impl Lister for LocalLister {
    async fn next_page(&mut self) -> StorageResult<Option<Vec<Entry>>> {
        let Some((mut d, fd)) = self.dir.take() else {
            return Ok(None);
        };
        let (d, fd, page) = blocking(move || {
            let names = fs::read_names(&mut d, PAGE).map_err(StorageError::from_io)?;
            let mut page = Vec::with_capacity(names.len());
            for (name, _) in &names {
                // Symlinks, fifos and sockets stay hidden; so does whatever vanished.
                if let Ok(meta) = fs::stat_at(fd.as_fd(), name) {
                    page.push(Entry {
                        name: name.clone(),
                        meta,
                    });
                }
            }
            Ok((d, fd, (!names.is_empty()).then_some(page)))
        })
        .await?;
        if page.is_some() {
            self.dir = Some((d, fd));
        }
        Ok(page)
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_rename: true,
            real_dirs: true,
            random_write: true,
            set_times: true,
        }
    }

    fn describe(&self) -> String {
        format!("local {}", self.inner.orgs_path.display())
    }

    async fn check(&self) -> StorageResult<()> {
        let inner = self.inner.clone();
        blocking(move || io::probe(&inner)).await
    }

    async fn ready(&self) -> StorageResult<()> {
        let inner = self.inner.clone();
        blocking(move || {
            rfs::fstat(&inner.orgs)?;
            rfs::fstat(&inner.tmp)?;
            // Unlinked from under us (someone removed the data dir): not ready.
            fs::open_dir(inner.orgs.as_fd(), "").map_err(StorageError::from_io)?;
            Ok(())
        })
        .await
    }

    async fn create_org(&self, org: &OrgName) -> StorageResult<()> {
        let (inner, org) = (self.inner.clone(), org.clone());
        blocking(move || {
            match fs::mkdir_at(inner.orgs.as_fd(), org.as_str()) {
                Ok(()) => fs::fsync(inner.orgs.as_fd()).map_err(StorageError::from_io),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Whatever is there must be a real folder, not a planted symlink.
                    inner.open_dir(&org, &StoragePath::root()).map(drop)
                }
                Err(e) => Err(StorageError::from_io(e)),
            }
        })
        .await
    }

    async fn remove_org(&self, org: &OrgName) -> StorageResult<()> {
        let (inner, org) = (self.inner.clone(), org.clone());
        blocking(move || {
            // Out of sight in one step, then removed at leisure.
            let grave = format!("deleted-org-{}", ulid::Ulid::new());
            match fs::rename_at(
                inner.orgs.as_fd(),
                org.as_str(),
                inner.tmp.as_fd(),
                &grave,
                false,
            ) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(StorageError::from_io(e)),
            }
            inner.durable.forget_org(&org);
            fs::remove_tree(inner.tmp.as_fd(), &grave).map_err(StorageError::from_io)
        })
        .await
    }

    async fn stage_events(&self, files: Vec<EventFile>) -> Box<dyn StagedEvents> {
        let inner = self.inner.clone();
        let (inner2, kept) = (inner.clone(), files.clone());
        match tokio::task::spawn_blocking(move || events::stage(inner, files)).await {
            Ok(staged) => Box::new(staged),
            Err(e) => Box::new(events::failed(
                inner2,
                kept,
                &format!("storage task failed: {e}"),
            )),
        }
    }

    async fn stat(&self, org: &OrgName, path: &StoragePath) -> StorageResult<Meta> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        blocking(move || inner.stat(&org, &path)).await
    }

    async fn list(&self, org: &OrgName, dir: &StoragePath) -> StorageResult<Box<dyn Lister>> {
        let (inner, org, dir) = (self.inner.clone(), org.clone(), dir.clone());
        let opened = blocking(move || {
            let fd = match inner.open_dir(&org, &dir) {
                Err(StorageError::Io(e)) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(StorageError::NotADirectory)
                }
                other => other?,
            };
            let d = rfs::Dir::read_from(&fd)?;
            Ok((d, fd))
        })
        .await?;
        Ok(Box::new(LocalLister { dir: Some(opened) }))
    }

    async fn open_read(
        &self,
        org: &OrgName,
        path: &StoragePath,
    ) -> StorageResult<Box<dyn ReadHandle>> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        Ok(Box::new(
            blocking(move || io::LocalRead::open(&inner, &org, &path)).await?,
        ))
    }

    async fn delete(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        blocking(move || {
            let (dir, name) = inner.parent(&org, &path)?;
            if fs::stat_at(dir.as_fd(), name)?.is_dir() {
                return Err(StorageError::IsADirectory);
            }
            fs::unlink_at(dir.as_fd(), name, false).map_err(StorageError::from_io)
        })
        .await
    }

    async fn rename(
        &self,
        org: &OrgName,
        from: &StoragePath,
        to: &StoragePath,
        mode: RenameMode,
    ) -> StorageResult<()> {
        let (inner, org, from, to) = (self.inner.clone(), org.clone(), from.clone(), to.clone());
        blocking(move || {
            let (a, an) = inner.parent(&org, &from)?;
            let (b, bn) = inner.parent(&org, &to)?;
            // A planted symlink is not served, so not moved either; what the kernel renames
            // below is the entry in `a`, never what a link points to.
            fs::stat_at(a.as_fd(), an)?;
            fs::rename_at(a.as_fd(), an, b.as_fd(), bn, mode == RenameMode::Replace)
                .map_err(StorageError::from_io)
        })
        .await
    }

    async fn mkdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        blocking(move || {
            if path.is_root() {
                return Err(StorageError::AlreadyExists);
            }
            let (dir, name) = inner.parent(&org, &path)?;
            fs::mkdir_at(dir.as_fd(), name).map_err(StorageError::from_io)
        })
        .await
    }

    async fn rmdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        blocking(move || {
            let (dir, name) = inner.parent(&org, &path)?;
            if !fs::stat_at(dir.as_fd(), name)?.is_dir() {
                return Err(StorageError::NotADirectory);
            }
            fs::unlink_at(dir.as_fd(), name, true).map_err(StorageError::from_io)
        })
        .await
    }

    async fn create_upload(
        &self,
        org: &OrgName,
        path: &StoragePath,
        opts: UploadOptions,
    ) -> StorageResult<Box<dyn UploadHandle>> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        Ok(Box::new(
            blocking(move || io::LocalUpload::create(&inner, &org, &path, opts)).await?,
        ))
    }

    async fn set_attrs(
        &self,
        org: &OrgName,
        path: &StoragePath,
        attrs: SetAttrs,
    ) -> StorageResult<()> {
        let (inner, org, path) = (self.inner.clone(), org.clone(), path.clone());
        blocking(move || io::set_attrs(&inner, &org, &path, attrs)).await
    }

    async fn space(&self) -> StorageResult<Space> {
        let inner = self.inner.clone();
        blocking(move || io::space(&inner)).await
    }

    async fn walk(&self, org: &OrgName) -> StorageResult<Vec<FileInfo>> {
        let (inner, org) = (self.inner.clone(), org.clone());
        blocking(move || inner.walk(&org)).await
    }
}
