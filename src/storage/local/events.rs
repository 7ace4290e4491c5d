//! Event files with group commit, the local way.
//!
//! For a batch: every file's temp copy is written under `<data_dir>/tmp` and fdatasync'd
//! (several threads side by side: concurrent fdatasyncs on one file system share journal
//! commits); each temp is renamed create-only into its folder, opened beneath the org
//! with no symlink at any step; then every folder touched is fsync'd once (and, the first
//! time, its parent chain, and the parent of any folder made here).
//!
//! Each file stands on its own. A folder renamed or removed by an SFTP user between the
//! lookup and the rename is looked up (or made) again; a folder whose fsync fails fails
//! only the files placed in it. A file already there under its name (a rewrite after a
//! crash) counts as written.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;

use rustix::fs::{self as rfs, OFlags};

use super::{fs, Inner};
use crate::storage::{EventFile, OrgName, StagedEvents, StorageError, StoragePath, StorageResult};

/// Threads writing and fdatasyncing temps at once.
const SYNC_THREADS: usize = 4;
/// Lookups of a folder that keeps vanishing under us before the file is given up.
const PLACE_ATTEMPTS: usize = 5;

/// Folders (org, relative path) whose entry in their parent is known durable.
#[derive(Debug, Default)]
pub(crate) struct DurableDirs(Mutex<HashSet<(String, String)>>);

impl DurableDirs {
    fn contains(&self, key: &(String, String)) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    fn insert(&self, key: (String, String)) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
    }

    pub(crate) fn forget_org(&self, org: &OrgName) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(o, _)| o != org.as_str());
    }
}

/// Folders to fsync at the end of a batch, by inode (one fsync per folder even when two
/// lookups returned two fds), with the files placed in each.
#[derive(Default)]
struct ToSync {
    dirs: HashMap<(u64, u64), (OwnedFd, Vec<usize>)>,
}

impl ToSync {
    fn add(&mut self, fd: BorrowedFd<'_>, file: Option<usize>) -> StorageResult<()> {
        let st = rfs::fstat(fd)?;
        let key = (st.st_dev, st.st_ino);
        if let std::collections::hash_map::Entry::Vacant(v) = self.dirs.entry(key) {
            v.insert((rustix::io::fcntl_dupfd_cloexec(fd, 0)?, Vec::new()));
        }
        if let (Some(i), Some((_, files))) = (file, self.dirs.get_mut(&key)) {
            files.push(i);
        }
        Ok(())
    }
}

/// Temps written and fdatasync'd, not yet visible: the first half of a batch, which runs
/// while the store commits. Dropped unpublished, the temps go.
pub(crate) struct LocalStaged {
    inner: Arc<Inner>,
    files: Vec<EventFile>,
    temps: Vec<Option<StorageResult<String>>>,
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        for t in self.temps.iter().flatten().flatten() {
            let _ = fs::unlink_at(self.inner.tmp.as_fd(), t, false);
        }
    }
}

pub(super) fn stage(inner: Arc<Inner>, files: Vec<EventFile>) -> LocalStaged {
    let temps = write_temps(&inner, &files).into_iter().map(Some).collect();
    LocalStaged {
        inner,
        files,
        temps,
    }
}

/// A stage whose writer failed as a whole: every file fails with `why`.
pub(super) fn failed(inner: Arc<Inner>, files: Vec<EventFile>, why: &str) -> LocalStaged {
    let temps = files
        .iter()
        .map(|_| Some(Err(StorageError::Backend(why.to_owned()))))
        .collect();
    LocalStaged {
        inner,
        files,
        temps,
    }
}

#[async_trait]
impl StagedEvents for LocalStaged {
    async fn publish(mut self: Box<Self>, keep: Vec<bool>) -> Vec<StorageResult<()>> {
        let n = self.files.len();
        match tokio::task::spawn_blocking(move || publish(&mut self, &keep)).await {
            Ok(r) => r,
            Err(e) => (0..n)
                .map(|_| Err(StorageError::Backend(format!("storage task failed: {e}"))))
                .collect(),
        }
    }
}

/// Places the staged files marked in `keep` (the others' temps are removed), then fsyncs
/// every folder touched once.
fn publish(st: &mut LocalStaged, keep: &[bool]) -> Vec<StorageResult<()>> {
    let inner = st.inner.clone();
    let mut results: Vec<StorageResult<()>> = Vec::with_capacity(st.files.len());
    let mut sync = ToSync::default();
    let mut chains: HashSet<(String, String)> = HashSet::new();
    for (i, f) in st.files.iter().enumerate() {
        let Some(tmp) = st.temps[i].take() else {
            results.push(Err(StorageError::Backend("published twice".into())));
            continue;
        };
        if !keep.get(i).copied().unwrap_or(false) {
            if let Ok(t) = &tmp {
                let _ = fs::unlink_at(inner.tmp.as_fd(), t, false);
            }
            results.push(Ok(()));
            continue;
        }
        let res = tmp.and_then(|tmp| {
            let r = place(&inner, f, &tmp, i, &mut sync);
            // Placed or not, the temp is not needed any more (a no-op after a rename).
            let _ = fs::unlink_at(inner.tmp.as_fd(), &tmp, false);
            r
        });
        if res.is_ok() {
            if let Some(parent) = f.path.parent() {
                let key = (f.org.as_str().to_owned(), parent.relative());
                if !inner.durable.contains(&key) {
                    chains.insert(key);
                }
            }
        }
        results.push(res);
    }
    // Folders seen for the first time: fsync their chain up to `orgs/`, once.
    for (org, rel) in &chains {
        if let Err(e) = sync_chain(&inner, org, rel, &mut sync) {
            tracing::warn!(org = %org, folder = %rel, error = %e, "cannot fsync the folders above an event file");
        }
    }
    let t = Instant::now();
    for (fd, placed) in sync.dirs.values() {
        if let Err(e) = fs::fsync(fd.as_fd()) {
            let e = StorageError::from_io(e);
            for &i in placed {
                results[i] = Err(clone_err(&e));
            }
        }
    }
    metrics::histogram!("hookbridge_fsync_seconds", "what" => "batch_dirs")
        .record(t.elapsed().as_secs_f64());
    for key in chains {
        inner.durable.insert(key);
    }
    results
}

fn clone_err(e: &StorageError) -> StorageError {
    match e {
        StorageError::NoSpace => StorageError::NoSpace,
        StorageError::NotFound => StorageError::NotFound,
        other => StorageError::Backend(other.to_string()),
    }
}

/// Writes and fdatasyncs one temp per file; the temp's name, or why not.
fn write_temps(inner: &Inner, files: &[EventFile]) -> Vec<StorageResult<String>> {
    let names: Vec<String> = files
        .iter()
        .map(|_| format!("{}.tmp", ulid::Ulid::new()))
        .collect();
    let chunk = files.len().div_ceil(SYNC_THREADS).max(8);
    let tmp = inner.tmp.as_fd();
    let mut out: Vec<StorageResult<String>> = Vec::with_capacity(files.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .zip(names.chunks(chunk))
            .map(|(fs_, ns)| {
                s.spawn(move || {
                    fs_.iter()
                        .zip(ns)
                        .map(|(f, n)| write_synced(tmp, n, &f.body).map(|()| n.clone()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => out.extend(r),
                Err(_) => out.push(Err(StorageError::Backend("writer thread panicked".into()))),
            }
        }
    });
    // A panicked thread leaves fewer results than files: fail the rest, never misalign.
    while out.len() < files.len() {
        out.push(Err(StorageError::Backend("writer thread panicked".into())));
    }
    out
}

fn write_synced(tmp: BorrowedFd<'_>, name: &str, body: &[u8]) -> StorageResult<()> {
    use std::io::Write;
    let fd = rfs::openat(
        tmp,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        rfs::Mode::from_raw_mode(0o644),
    )?;
    let mut f = File::from(fd);
    let res = f.write_all(body).and_then(|()| {
        let t = Instant::now();
        f.sync_data()?;
        metrics::histogram!("hookbridge_fsync_seconds", "what" => "file")
            .record(t.elapsed().as_secs_f64());
        Ok(())
    });
    if let Err(e) = res {
        let _ = fs::unlink_at(tmp, name, false);
        return Err(StorageError::from_io(e));
    }
    Ok(())
}

/// Renames the temp into its folder, create-only; looks the folder up again (or makes it)
/// when it vanished meanwhile.
fn place(
    inner: &Inner,
    f: &EventFile,
    tmp: &str,
    i: usize,
    sync: &mut ToSync,
) -> StorageResult<()> {
    let (Some(parent), Some(name)) = (f.path.parent(), f.path.name()) else {
        return Err(StorageError::InvalidPath("an event file needs a name"));
    };
    let mut last = StorageError::NotFound;
    for _ in 0..PLACE_ATTEMPTS {
        let dir = match make_dirs(inner, &f.org, &parent, sync) {
            Ok(d) => d,
            Err(StorageError::NotFound) => continue,
            Err(e) => return Err(e),
        };
        match fs::rename_at(inner.tmp.as_fd(), tmp, dir.as_fd(), name, false) {
            Ok(()) => return sync.add(dir.as_fd(), Some(i)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Written before (a rewrite after a crash): make sure its folder is durable.
                return sync.add(dir.as_fd(), Some(i));
            }
            // The folder was removed between the lookup and the rename: look again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = StorageError::from_io(e);
            }
            Err(e) => return Err(StorageError::from_io(e)),
        }
    }
    Err(last)
}

/// Opens `dir` beneath the org, making what is missing (the org folder too); the parent of
/// each folder made is queued for fsync.
fn make_dirs(
    inner: &Inner,
    org: &OrgName,
    dir: &StoragePath,
    sync: &mut ToSync,
) -> StorageResult<OwnedFd> {
    match inner.open_dir(org, dir) {
        Err(StorageError::NotFound) => {}
        other => return other,
    }
    let mut cur = match inner.open_dir(org, &StoragePath::root()) {
        Ok(fd) => fd,
        Err(StorageError::NotFound) => {
            mkdir_tolerant(inner.orgs.as_fd(), org.as_str(), sync)?;
            inner.open_dir(org, &StoragePath::root())?
        }
        Err(e) => return Err(e),
    };
    for seg in dir.segments() {
        let next = match fs::open_dir(cur.as_fd(), seg) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                mkdir_tolerant(cur.as_fd(), seg, sync)?;
                fs::open_dir(cur.as_fd(), seg).map_err(StorageError::from_io)?
            }
            Err(e) => return Err(StorageError::from_io(e)),
        };
        cur = next;
    }
    Ok(cur)
}

fn mkdir_tolerant(parent: BorrowedFd<'_>, name: &str, sync: &mut ToSync) -> StorageResult<()> {
    match fs::mkdir_at(parent, name) {
        Ok(()) => sync.add(parent, None),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StorageError::from_io(e)),
    }
}

/// Queues `orgs/`, the org folder and every folder above `rel` for fsync: their entries
/// may have been made by the admin API or SFTP without one.
fn sync_chain(inner: &Inner, org: &str, rel: &str, sync: &mut ToSync) -> StorageResult<()> {
    sync.add(inner.orgs.as_fd(), None)?;
    let mut path = org.to_owned();
    let segs: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
    // The folder itself is already queued (files were placed in it); its ancestors are not.
    for seg in std::iter::once(None)
        .chain(segs.iter().map(Some))
        .take(segs.len())
    {
        if let Some(s) = seg {
            path.push('/');
            path.push_str(s);
        }
        match fs::open_dir(inner.orgs.as_fd(), &path) {
            Ok(fd) => sync.add(fd.as_fd(), None)?,
            // Moved meanwhile: its new place is the mover's business, not a lost file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::from_io(e)),
        }
    }
    Ok(())
}
