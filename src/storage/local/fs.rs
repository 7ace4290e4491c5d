//! The few system calls the local backend is built from, all relative to a directory fd.
//!
//! Paths are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: the kernel
//! refuses a symlink at *any* step (ELOOP) and any step out of the starting directory
//! (EXDEV), in the same call that opens the file. There is no check-then-act window: a
//! directory renamed or a symlink planted between two calls is never followed. Kernels
//! without openat2 (< 5.6, or a seccomp filter answering ENOSYS) get the same guarantee
//! from a walk that opens one component at a time with `O_NOFOLLOW`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::storage::{EntryKind, Meta, StorageError, StorageResult};

/// Set once openat2 answered ENOSYS: from then on, walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

/// Opens `rel` (plain segments joined by `/`, or empty for `dir` itself) beneath `dir`.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &str,
    flags: OFlags,
    mode: u32,
) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rfs::openat2(dir, rel, flags, Mode::from_raw_mode(mode), how) {
            Err(rustix::io::Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // openat2 returns EAGAIN when a rename elsewhere raced the lookup: try again.
            Err(rustix::io::Errno::AGAIN) => return open_beneath(dir, rel, flags, mode),
            other => return other.map_err(Into::into),
        }
    }
    walk_open(dir, rel, flags, mode)
}

/// The fallback: one `openat(O_NOFOLLOW)` per component from the starting fd.
fn walk_open(dir: BorrowedFd<'_>, rel: &str, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let segs: Vec<&str> = rel
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if segs.contains(&"..") {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let Some((last, dirs)) = segs.split_last() else {
        return Ok(rfs::openat(dir, ".", flags, Mode::from_raw_mode(mode))?);
    };
    let mut cur: Option<OwnedFd> = None;
    for seg in dirs {
        let base = cur.as_ref().map_or(dir, |f| f.as_fd());
        cur = Some(match rfs::openat(base, *seg, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            // O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR; say ELOOP, as openat2 does.
            Err(rustix::io::Errno::NOTDIR)
                if rfs::statat(base, *seg, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink) =>
            {
                return Err(io::Error::from_raw_os_error(libc::ELOOP))
            }
            Err(e) => return Err(e.into()),
        });
    }
    let base = cur.as_ref().map_or(dir, |f| f.as_fd());
    Ok(rfs::openat(base, *last, flags, Mode::from_raw_mode(mode))?)
}

pub fn open_dir(dir: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    open_beneath(dir, rel, DIR_FLAGS, 0)
}

fn time(sec: i64, nsec: u64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

/// `None` for what is neither a regular file nor a directory (symlinks, fifos, sockets):
/// those are never served.
// The field types of `stat` differ between architectures.
#[allow(clippy::unnecessary_cast)]
pub fn meta_of(st: &rfs::Stat) -> Option<Meta> {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        _ => return None,
    };
    Some(Meta {
        kind,
        size: st.st_size.max(0) as u64,
        mtime: time(st.st_mtime as i64, st.st_mtime_nsec as u64),
        atime: time(st.st_atime as i64, st.st_atime_nsec as u64),
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        nlink: st.st_nlink as u64,
    })
}

/// `stat` of `name` in `dir`, not following a symlink; a symlink is refused.
pub fn stat_at(dir: BorrowedFd<'_>, name: &str) -> StorageResult<Meta> {
    let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(StorageError::Symlink);
    }
    meta_of(&st).ok_or(StorageError::NotFound)
}

pub fn fstat(fd: BorrowedFd<'_>) -> StorageResult<Meta> {
    meta_of(&rfs::fstat(fd)?).ok_or(StorageError::NotFound)
}

/// The entries of a directory (without `.` and `..`), as names and file types. Names that
/// are not UTF-8 are skipped: SFTP v3 names are strings and S3 keys are UTF-8.
pub fn read_names(dir: &mut rfs::Dir, max: usize) -> io::Result<Vec<(String, FileType)>> {
    let mut out = Vec::new();
    while out.len() < max {
        let Some(entry) = dir.next() else { break };
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let Ok(s) = std::str::from_utf8(bytes) else {
            continue;
        };
        out.push((s.to_owned(), entry.file_type()));
    }
    Ok(out)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    Ok(rfs::mkdirat(dir, name, Mode::from_raw_mode(0o755))?)
}

pub fn rename_at(
    from_dir: BorrowedFd<'_>,
    from: &str,
    to_dir: BorrowedFd<'_>,
    to: &str,
    replace: bool,
) -> io::Result<()> {
    let flags = if replace {
        rfs::RenameFlags::empty()
    } else {
        rfs::RenameFlags::NOREPLACE
    };
    match rfs::renameat_with(from_dir, from, to_dir, to, flags) {
        // File systems without RENAME_NOREPLACE: check, then rename (a window remains there).
        Err(rustix::io::Errno::INVAL) if !replace => {
            match rfs::statat(to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Err(io::ErrorKind::AlreadyExists.into()),
                Err(rustix::io::Errno::NOENT) => Ok(rfs::renameat(from_dir, from, to_dir, to)?),
                Err(e) => Err(e.into()),
            }
        }
        other => Ok(other?),
    }
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &str, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rfs::unlinkat(dir, name, flags)?)
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    let t = std::time::Instant::now();
    rfs::fsync(fd)?;
    metrics::histogram!("hookbridge_fsync_seconds", "what" => "dirs")
        .record(t.elapsed().as_secs_f64());
    Ok(())
}

/// Removes `name` in `dir` and everything below it, never following a symlink (a planted
/// link is removed as a link).
pub fn remove_tree(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return unlink_at(dir, name, false);
    }
    let fd = rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
    let mut d = rfs::Dir::read_from(&fd)?;
    loop {
        let names = read_names(&mut d, 1024)?;
        if names.is_empty() {
            break;
        }
        for (n, _) in names {
            remove_tree(fd.as_fd(), &n)?;
        }
        d.rewind();
    }
    unlink_at(dir, name, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Both resolvers, openat2 and the component walk, refuse a symlink at any depth and
    /// any `..`, and open what is plainly inside.
    #[test]
    fn both_resolvers_refuse_symlinks_at_any_depth() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("org");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/f"), "inside").unwrap();
        std::fs::write(dir.path().join("secret"), "outside").unwrap();
        symlink(dir.path().join("secret"), root.join("top")).unwrap();
        symlink("..", root.join("a/up")).unwrap();
        symlink("/etc", root.join("a/b/etc")).unwrap();
        symlink("c", root.join("a/b/samedir")).unwrap();
        let fd = rfs::open(&root, DIR_FLAGS, Mode::empty()).unwrap();
        type Open = fn(BorrowedFd<'_>, &str, OFlags, u32) -> io::Result<OwnedFd>;
        for (name, open) in [
            ("openat2", open_beneath as Open),
            ("walk", walk_open as Open),
        ] {
            assert!(
                open(fd.as_fd(), "a/b/c/f", OFlags::RDONLY, 0).is_ok(),
                "{name}"
            );
            for bad in [
                "top",
                "a/up/top",
                "a/up",
                "a/b/etc/passwd",
                "a/b/samedir/f",
                "a/b/etc",
            ] {
                let e = open(fd.as_fd(), bad, OFlags::RDONLY, 0).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{name} {bad}: {e}");
            }
            let e = open(fd.as_fd(), "a/../../secret", OFlags::RDONLY, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{name}: {e}");
        }
    }
}
