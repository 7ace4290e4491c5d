//! SFTP operations on the jailed file system. Everything here is blocking file-system
//! work: the dispatcher runs it on tokio's blocking pool.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use russh_sftp::extensions::Statvfs;
use russh_sftp::protocol::{self, FileAttributes, OpenFlags, StatusCode};

use super::jail::{Jail, JailError, Resolved};
use super::status;

/// Why a request failed; maps onto an SFTP status without leaking host details.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no such file")]
    NoSuchFile,
    #[error("permission denied")]
    Denied,
    #[error("{0}")]
    Failure(&'static str),
    #[error("bad message")]
    BadMessage,
    #[error("operation unsupported")]
    Unsupported,
    #[error("{0}")]
    Jail(#[from] JailError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl OpError {
    /// The status OpenSSH's sftp-server would send for this failure (see `status`).
    pub fn status(&self) -> (StatusCode, String) {
        let fixed = |c: StatusCode| (c, status::code_text(c).to_owned());
        match self {
            OpError::NoSuchFile => fixed(StatusCode::NoSuchFile),
            OpError::Denied => fixed(StatusCode::PermissionDenied),
            OpError::Failure(m) => (StatusCode::Failure, (*m).into()),
            OpError::BadMessage => fixed(StatusCode::BadMessage),
            OpError::Unsupported => fixed(StatusCode::OpUnsupported),
            OpError::Jail(JailError::Io(e)) | OpError::Io(e) => {
                (status::io_status(e), status::io_message(e))
            }
            // A NUL in a path: OpenSSH cannot even parse it.
            OpError::Jail(JailError::Invalid) => fixed(StatusCode::BadMessage),
            // In OpenSSH's chroot `/../x` is `/x`, and a planted link is met with
            // O_NOFOLLOW (ELOOP): either way the path names nothing the user may see.
            OpError::Jail(e @ (JailError::Escape | JailError::Symlink)) => {
                (StatusCode::NoSuchFile, e.to_string())
            }
        }
    }
}

/// The error a system call would have given: its status comes from `status::io_status`.
pub fn errno(code: i32) -> OpError {
    OpError::Io(io::Error::from_raw_os_error(code))
}

pub type OpResult<T> = Result<T, OpError>;

/// Who is asking, and where they are jailed.
pub struct SessionCtx {
    pub user: String,
    pub org: String,
    pub upload: bool,
    pub ip: std::net::IpAddr,
    pub jail: Jail,
    /// Uploads are written here and renamed in on close (same file system as the orgs).
    pub tmp_dir: PathBuf,
    /// No upload may grow past this (`sftp.max_upload_bytes`): a WRITE at a huge offset or
    /// a SETSTAT size would otherwise fill the disk every org shares.
    pub max_upload: u64,
    /// Open handles per channel (`sftp.max_handles_per_session`).
    pub max_handles: usize,
    /// Open handles per user and for the process.
    pub budget: std::sync::Arc<super::budget::HandleBudget>,
}

impl SessionCtx {
    pub fn resolve(&self, path: &str) -> OpResult<Resolved> {
        Ok(self.jail.resolve(path)?)
    }
}

/// An upload in progress: data goes to `tmp`, which becomes `target` on close.
#[derive(Debug)]
pub struct Upload {
    pub tmp: PathBuf,
    pub target: PathBuf,
}

pub struct Opened {
    pub file: File,
    pub virt: String,
    pub upload: Option<Upload>,
}

fn open_nofollow() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

fn lstat(r: &Resolved) -> OpResult<Metadata> {
    let m = fs::symlink_metadata(&r.real)?;
    if m.file_type().is_symlink() {
        return Err(JailError::Symlink.into());
    }
    Ok(m)
}

pub fn attrs(m: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(m.len()),
        uid: Some(m.uid()),
        user: None,
        gid: Some(m.gid()),
        group: None,
        permissions: Some(m.mode()),
        atime: Some(clamp_time(m.atime())),
        mtime: Some(clamp_time(m.mtime())),
    }
}

fn clamp_time(t: i64) -> u32 {
    t.clamp(0, u32::MAX as i64) as u32
}

/// `ls -l` style, as OpenSSH's server writes it: FileZilla and WinSCP parse it.
pub fn longname(name: &str, m: &Metadata, user: &str, group: &str) -> String {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else {
        '-'
    };
    let mode = m.mode();
    let mut perms = String::with_capacity(10);
    perms.push(kind);
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let mtime = chrono::DateTime::from_timestamp(m.mtime(), 0).unwrap_or_default();
    let six_months = chrono::Duration::days(182);
    let now = chrono::Utc::now();
    let date = if mtime > now - six_months && mtime < now + six_months {
        mtime.format("%b %e %H:%M")
    } else {
        mtime.format("%b %e  %Y")
    };
    format!(
        "{perms} {:>4} {user:<8} {group:<8} {:>8} {date} {name}",
        m.nlink(),
        m.len()
    )
}

pub fn realpath(ctx: &SessionCtx, path: &str) -> OpResult<protocol::File> {
    // Clamped first, so `..` at the root answers `/` as a chrooted OpenSSH does; the
    // result still goes through the resolver (symlinks refused).
    let r = ctx.resolve(&super::jail::clamp(path)?)?;
    Ok(protocol::File {
        longname: r.virt.clone(),
        filename: r.virt,
        attrs: FileAttributes::empty(),
    })
}

pub fn stat(ctx: &SessionCtx, path: &str) -> OpResult<FileAttributes> {
    let r = ctx.resolve(path)?;
    Ok(attrs(&lstat(&r)?))
}

/// Reads a whole directory at OPENDIR; READDIR then hands it out in batches.
pub fn list_dir(ctx: &SessionCtx, path: &str) -> OpResult<Vec<protocol::File>> {
    let r = ctx.resolve(path)?;
    if !lstat(&r)?.is_dir() {
        // OpenSSH's opendir(3) fails with ENOTDIR: NO_SUCH_FILE, which clients branch on.
        return Err(errno(libc::ENOTDIR));
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&r.real)? {
        let entry = entry?;
        // DirEntry::metadata does not follow symlinks; those (and sockets, fifos) stay hidden.
        let Ok(m) = entry.metadata() else { continue };
        if !(m.is_file() || m.is_dir()) {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        out.push(protocol::File {
            longname: longname(&name, &m, &ctx.user, &ctx.org),
            filename: name,
            attrs: attrs(&m),
        });
    }
    Ok(out)
}

pub fn open(ctx: &SessionCtx, path: &str, flags: OpenFlags) -> OpResult<Opened> {
    let r = ctx.resolve(path)?;
    let writing = flags
        .intersects(OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE);
    if !writing {
        let file = open_nofollow().read(true).open(&r.real)?;
        if !file.metadata()?.is_file() {
            // OpenSSH opens it, then read(2) fails with EISDIR: FAILURE.
            return Err(errno(libc::EISDIR));
        }
        return Ok(Opened {
            file,
            virt: r.virt,
            upload: None,
        });
    }
    if !ctx.upload {
        return Err(OpError::Denied);
    }
    if r.is_root() {
        return Err(errno(libc::EISDIR));
    }
    let existing = match fs::symlink_metadata(&r.real) {
        Ok(m) if m.is_file() => true,
        Ok(m) if m.is_dir() => return Err(errno(libc::EISDIR)),
        Ok(_) => return Err(JailError::Symlink.into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e.into()),
    };
    if existing && flags.contains(OpenFlags::CREATE | OpenFlags::EXCLUDE) {
        return Err(errno(libc::EEXIST));
    }
    if existing {
        // Uploads never replace or change a file that is already there (an event
        // hookbridge wrote, or another upload): a forged event would look genuine.
        return Err(OpError::Denied);
    }
    if !flags.contains(OpenFlags::CREATE) {
        return Err(errno(libc::ENOENT));
    }
    match r.real.parent() {
        Some(dir) if dir.is_dir() => {}
        _ => return Err(errno(libc::ENOENT)),
    }
    // Readers of the folder must never see a partial upload: write beside, rename on close.
    let tmp = ctx
        .tmp_dir
        .join(format!("sftp-upload-{}.part", ulid::Ulid::new()));
    let file = open_nofollow()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o640)
        .open(&tmp)?;
    Ok(Opened {
        file,
        virt: r.virt,
        upload: Some(Upload {
            tmp,
            target: r.real,
        }),
    })
}

/// Makes an upload durable and visible under its name.
pub fn finish_upload(file: &File, up: &Upload) -> OpResult<()> {
    file.sync_all()?;
    // Never replace: a file that appeared under the name meanwhile (an event) stays.
    if let Err(e) = rename_noreplace(&up.tmp, &up.target) {
        let _ = fs::remove_file(&up.tmp);
        return Err(e.into());
    }
    if let Some(dir) = up.target.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn discard_upload(up: &Upload) {
    let _ = fs::remove_file(&up.tmp);
}

pub fn read_packet(file: &File, id: u32, offset: u64, len: usize) -> io::Result<Option<Bytes>> {
    // The DATA reply is built in place: length, type, id, data length, then the bytes.
    const HDR: usize = 13;
    let mut buf = vec![0u8; HDR + len];
    let mut n = 0;
    while n < len {
        match file.read_at(&mut buf[HDR + n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if n == 0 {
        return Ok(None);
    }
    buf.truncate(HDR + n);
    buf[0..4].copy_from_slice(&((9 + n) as u32).to_be_bytes());
    buf[4] = 103; // SSH_FXP_DATA
    buf[5..9].copy_from_slice(&id.to_be_bytes());
    buf[9..13].copy_from_slice(&(n as u32).to_be_bytes());
    Ok(Some(Bytes::from(buf)))
}

pub fn remove(ctx: &SessionCtx, path: &str) -> OpResult<String> {
    let r = ctx.resolve(path)?;
    let m = lstat(&r)?;
    if m.is_dir() {
        return Err(errno(libc::EISDIR));
    }
    fs::remove_file(&r.real)?;
    Ok(r.virt)
}

pub fn mkdir(ctx: &SessionCtx, path: &str) -> OpResult<()> {
    if !ctx.upload {
        return Err(OpError::Denied);
    }
    let r = ctx.resolve(path)?;
    if r.is_root() {
        return Err(errno(libc::EEXIST));
    }
    fs::create_dir(&r.real)?;
    Ok(())
}

pub fn rmdir(ctx: &SessionCtx, path: &str) -> OpResult<String> {
    // Readers must not change the folders hookbridge writes into.
    if !ctx.upload {
        return Err(OpError::Denied);
    }
    let r = ctx.resolve(path)?;
    if r.is_root() {
        // rmdir("/") in OpenSSH's chroot: EBUSY.
        return Err(errno(libc::EBUSY));
    }
    if !lstat(&r)?.is_dir() {
        return Err(errno(libc::ENOTDIR));
    }
    fs::remove_dir(&r.real)?;
    Ok(r.virt)
}

/// Plain RENAME fails when the target exists; posix-rename replaces it, except for
/// users who may upload (an upload renamed over an event would forge it).
/// Readers rename files only: folders are where hookbridge writes.
pub fn rename(ctx: &SessionCtx, from: &str, to: &str, replace: bool) -> OpResult<()> {
    let a = ctx.resolve(from)?;
    let b = ctx.resolve(to)?;
    if a.is_root() || b.is_root() {
        // rename of or onto "/" in OpenSSH's chroot: EBUSY.
        return Err(errno(libc::EBUSY));
    }
    let m = lstat(&a)?;
    if m.is_dir() && !ctx.upload {
        return Err(OpError::Denied);
    }
    if replace && ctx.upload && fs::symlink_metadata(&b.real).is_ok() {
        return Err(OpError::Denied);
    }
    if replace {
        fs::rename(&a.real, &b.real)?;
    } else {
        rename_noreplace(&a.real, &b.real)?;
    }
    Ok(())
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // renameat2(RENAME_NOREPLACE) checks and renames atomically.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) || err.raw_os_error() == Some(libc::ENOSYS) {
        // File systems without RENAME_NOREPLACE: check, then rename.
        if fs::symlink_metadata(to).is_ok() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        return fs::rename(from, to);
    }
    Err(err)
}

/// SETSTAT by path: only users who may upload may change anything, and only times and
/// plain read/write modes (WinSCP, FileZilla, rclone and paramiko set them after an
/// upload). Ownership and sizes are hookbridge's: a request to change them is refused,
/// never answered OK without being applied.
pub fn setstat(ctx: &SessionCtx, path: &str, a: &FileAttributes) -> OpResult<()> {
    let r = ctx.resolve(path)?;
    let m = lstat(&r)?;
    check_setstat(ctx, &m, a, false)?;
    let f = open_nofollow().read(true).open(&r.real)?;
    set_mode(&f, &m, a)?;
    set_times(&f, &m, a)
}

/// Applies a mode `check_setstat` allowed.
pub fn set_mode(f: &File, m: &Metadata, a: &FileAttributes) -> OpResult<()> {
    use std::os::unix::fs::PermissionsExt;
    match a.permissions {
        Some(p) if p & 0o7777 != m.mode() & 0o7777 => {
            f.set_permissions(fs::Permissions::from_mode(p & 0o7777))?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether a SETSTAT/FSETSTAT of `a` on a file with metadata `m` may be applied.
/// `own_upload`: the handle is an upload in progress, whose size the user may set.
/// Values equal to the current ones change nothing and are accepted.
pub fn check_setstat(
    ctx: &SessionCtx,
    m: &Metadata,
    a: &FileAttributes,
    own_upload: bool,
) -> OpResult<()> {
    let changes_times = a.atime.is_some_and(|t| t as i64 != m.atime())
        || a.mtime.is_some_and(|t| t as i64 != m.mtime());
    let changes_size = a.size.is_some_and(|s| s != m.len());
    let changes_mode = a
        .permissions
        .is_some_and(|p| p & 0o7777 != m.mode() & 0o7777);
    let changes_owner = a.uid.is_some_and(|u| u != m.uid()) || a.gid.is_some_and(|g| g != m.gid());
    // WinSCP and FileZilla set 0644-like modes after an upload: plain read/write bits
    // that keep the owner's (hookbridge's) read and write; no exec or special bits.
    let mode_ok = a
        .permissions
        .is_none_or(|p| p & 0o7777 & !0o666 == 0 && p & 0o600 == 0o600);
    let allowed = if !ctx.upload {
        !(changes_times || changes_size || changes_mode || changes_owner)
    } else {
        !(changes_owner || changes_mode && !mode_ok || changes_size && !own_upload)
    };
    if allowed {
        Ok(())
    } else {
        Err(OpError::Denied)
    }
}

pub fn set_times(f: &File, m: &Metadata, a: &FileAttributes) -> OpResult<()> {
    if a.atime.is_none() && a.mtime.is_none() {
        return Ok(());
    }
    let at = |s: u32| UNIX_EPOCH + Duration::from_secs(s as u64);
    let times = fs::FileTimes::new()
        .set_accessed(
            a.atime
                .map(at)
                .unwrap_or(m.accessed().unwrap_or(SystemTime::now())),
        )
        .set_modified(
            a.mtime
                .map(at)
                .unwrap_or(m.modified().unwrap_or(SystemTime::now())),
        );
    f.set_times(times)?;
    Ok(())
}

pub fn statvfs(ctx: &SessionCtx, path: &str) -> OpResult<Statvfs> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let r = ctx.resolve(path)?;
    lstat(&r)?;
    let c = CString::new(r.real.as_os_str().as_bytes()).map_err(|_| OpError::BadMessage)?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(Statvfs {
        block_size: s.f_bsize as u64,
        fragment_size: s.f_frsize as u64,
        blocks: s.f_blocks as u64,
        blocks_free: s.f_bfree as u64,
        blocks_avail: s.f_bavail as u64,
        inodes: s.f_files as u64,
        inodes_free: s.f_ffree as u64,
        inodes_avail: s.f_favail as u64,
        fs_id: s.f_fsid as u64,
        flags: s.f_flag as u64,
        name_max: s.f_namemax as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(upload: bool) -> (tempfile::TempDir, SessionCtx) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("org")).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let c = SessionCtx {
            user: "u".into(),
            org: "org".into(),
            upload,
            ip: "127.0.0.1".parse().unwrap(),
            jail: Jail::new(&dir.path().join("org")).unwrap(),
            tmp_dir: dir.path().join("tmp"),
            max_upload: 1 << 20,
            max_handles: 4,
            budget: super::super::budget::HandleBudget::new(8, 16),
        };
        (dir, c)
    }

    #[test]
    fn readers_cannot_create_files() {
        let (_d, c) = ctx(false);
        let r = open(&c, "/x", OpenFlags::WRITE | OpenFlags::CREATE);
        assert!(matches!(r, Err(OpError::Denied)));
    }

    #[test]
    fn uploads_appear_on_close_only() {
        let (_d, c) = ctx(true);
        let o = open(
            &c,
            "/x",
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
        )
        .unwrap();
        o.file.write_all_at(b"hello", 0).unwrap();
        assert!(!c.jail.root().join("x").exists());
        finish_upload(&o.file, o.upload.as_ref().unwrap()).unwrap();
        assert_eq!(std::fs::read(c.jail.root().join("x")).unwrap(), b"hello");
    }

    #[test]
    fn plain_rename_refuses_to_replace() {
        let (_d, c) = ctx(false);
        std::fs::write(c.jail.root().join("a"), "a").unwrap();
        std::fs::write(c.jail.root().join("b"), "b").unwrap();
        assert!(rename(&c, "/a", "/b", false).is_err());
        rename(&c, "/a", "/b", true).unwrap();
        assert_eq!(std::fs::read(c.jail.root().join("b")).unwrap(), b"a");
    }

    #[test]
    fn data_packet_layout() {
        let (_d, c) = ctx(false);
        std::fs::write(c.jail.root().join("f"), b"abcdef").unwrap();
        let f = File::open(c.jail.root().join("f")).unwrap();
        let p = read_packet(&f, 7, 2, 100).unwrap().unwrap();
        assert_eq!(
            &p[..],
            &[0, 0, 0, 13, 103, 0, 0, 0, 7, 0, 0, 0, 4, b'c', b'd', b'e', b'f']
        );
        assert!(read_packet(&f, 7, 6, 100).unwrap().is_none());
    }

    #[test]
    fn longname_looks_like_ls() {
        let (_d, c) = ctx(false);
        std::fs::create_dir(c.jail.root().join("d")).unwrap();
        let m = std::fs::metadata(c.jail.root().join("d")).unwrap();
        let l = longname("d", &m, "u", "org");
        assert!(l.starts_with("drwx"), "{l}");
        assert!(l.ends_with(" d"), "{l}");
    }
}
