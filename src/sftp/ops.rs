//! SFTP operations on an org's folder, through the storage seam (`crate::storage`): the
//! same code serves the local and the S3 backend. Paths are cleaned by `jail::resolve`;
//! the storage resolves them beneath the org root with no symlink at any step.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh_sftp::extensions::Statvfs;
use russh_sftp::protocol::{self, FileAttributes, OpenFlags, StatusCode};

use super::jail;
use super::status;
use crate::storage::{
    Meta, OrgName, ReadHandle, RenameMode, SetAttrs, Storage, StorageError, StoragePath,
    UploadHandle, UploadOptions,
};

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
    Storage(#[from] StorageError),
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
            OpError::Storage(e) => storage_status(e),
        }
    }
}

/// A storage error answers as its errno would in OpenSSH; what only a backend knows
/// (an S3 store down, an I/O error) is logged, and the client gets the generic text.
fn storage_status(e: &StorageError) -> (StatusCode, String) {
    let code = status::errno_to_portable(e.errno());
    match e {
        StorageError::Escape
        | StorageError::Symlink
        | StorageError::Unsupported(_)
        | StorageError::TooLarge => (code, e.to_string()),
        StorageError::Unavailable(_) | StorageError::Backend(_) | StorageError::Io(_) => {
            tracing::warn!(error = %e, "SFTP request failed in the storage");
            (code, status::code_text(code).to_owned())
        }
        _ => (
            code,
            status::io_message(&std::io::Error::from_raw_os_error(e.errno())),
        ),
    }
}

/// The error a system call would have given: its status comes from `status::io_status`.
pub fn errno(code: i32) -> OpError {
    OpError::Storage(StorageError::Io(std::io::Error::from_raw_os_error(code)))
}

pub type OpResult<T> = Result<T, OpError>;

/// Who is asking, and which org folder they see as `/`.
pub struct SessionCtx {
    pub user: String,
    pub org: OrgName,
    pub upload: bool,
    pub ip: std::net::IpAddr,
    pub storage: Arc<dyn Storage>,
    /// No upload may grow past this (`sftp.max_upload_bytes`): a WRITE at a huge offset or
    /// a SETSTAT size would otherwise fill the storage every org shares.
    pub max_upload: u64,
    /// Open handles per channel (`sftp.max_handles_per_session`).
    pub max_handles: usize,
    /// Open handles per user and for the process.
    pub budget: Arc<super::budget::HandleBudget>,
    /// Where downloads, deletes and renames are told to, for retention.
    pub downloads: Option<crate::retention::DownloadLog>,
    pub store: Option<Arc<dyn crate::store::Store>>,
}

impl SessionCtx {
    pub fn resolve(&self, path: &str) -> OpResult<StoragePath> {
        Ok(jail::resolve(path)?)
    }
}

/// What OPEN gave: a file to read, or an upload published on close.
pub enum Opened {
    Read(Arc<dyn ReadHandle>),
    Upload(Arc<dyn UploadHandle>),
}

pub fn attrs(m: &Meta) -> FileAttributes {
    let kind = if m.is_dir() { 0o040000 } else { 0o100000 };
    FileAttributes {
        size: Some(m.size),
        uid: Some(m.uid),
        user: None,
        gid: Some(m.gid),
        group: None,
        permissions: Some(kind | m.perm),
        atime: Some(secs(m.atime)),
        mtime: Some(secs(m.mtime)),
    }
}

fn secs(t: SystemTime) -> u32 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().min(u32::MAX as u64) as u32)
        .unwrap_or(0)
}

/// `ls -l` style, as OpenSSH's server writes it: FileZilla and WinSCP parse it.
pub fn longname(name: &str, m: &Meta, user: &str, group: &str) -> String {
    let mut perms = String::with_capacity(10);
    perms.push(if m.is_dir() { 'd' } else { '-' });
    for shift in [6u32, 3, 0] {
        let bits = (m.perm >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let mtime = chrono::DateTime::from_timestamp(secs(m.mtime) as i64, 0).unwrap_or_default();
    let six_months = chrono::Duration::days(182);
    let now = chrono::Utc::now();
    let date = if mtime > now - six_months && mtime < now + six_months {
        mtime.format("%b %e %H:%M")
    } else {
        mtime.format("%b %e  %Y")
    };
    format!(
        "{perms} {:>4} {user:<8} {group:<8} {:>8} {date} {name}",
        m.nlink, m.size
    )
}

pub async fn realpath(ctx: &SessionCtx, path: &str) -> OpResult<protocol::File> {
    // Clamped first, so `..` at the root answers `/` as a chrooted OpenSSH does.
    let p = ctx.resolve(&jail::clamp(path)?)?;
    let virt = p.virtual_path();
    Ok(protocol::File {
        longname: virt.clone(),
        filename: virt,
        attrs: FileAttributes::empty(),
    })
}

pub async fn stat(ctx: &SessionCtx, path: &str) -> OpResult<FileAttributes> {
    let p = ctx.resolve(path)?;
    Ok(attrs(&ctx.storage.stat(&ctx.org, &p).await?))
}

/// Reads a whole directory at OPENDIR (page by page from the storage); READDIR then hands
/// it out in batches.
pub async fn list_dir(ctx: &SessionCtx, path: &str) -> OpResult<Vec<protocol::File>> {
    let p = ctx.resolve(path)?;
    let mut lister = ctx.storage.list(&ctx.org, &p).await?;
    let mut out = Vec::new();
    while let Some(page) = lister.next_page().await? {
        for e in page {
            out.push(protocol::File {
                longname: longname(&e.name, &e.meta, &ctx.user, ctx.org.as_str()),
                filename: e.name,
                attrs: attrs(&e.meta),
            });
        }
    }
    Ok(out)
}

pub async fn open(
    ctx: &SessionCtx,
    path: &str,
    flags: OpenFlags,
) -> OpResult<(StoragePath, Opened)> {
    let p = ctx.resolve(path)?;
    let writing = flags
        .intersects(OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE);
    if !writing {
        let h = ctx.storage.open_read(&ctx.org, &p).await?;
        return Ok((p, Opened::Read(Arc::from(h))));
    }
    if !ctx.upload {
        return Err(OpError::Denied);
    }
    if p.is_root() {
        return Err(errno(libc::EISDIR));
    }
    let existing = match ctx.storage.stat(&ctx.org, &p).await {
        Ok(m) if m.is_dir() => return Err(errno(libc::EISDIR)),
        Ok(_) => true,
        Err(StorageError::NotFound) => false,
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
    // Readers of the folder never see a partial upload: published on close, create-only
    // (a file that appeared under the name meanwhile, an event, stays).
    let opts = UploadOptions {
        exclusive: true,
        keep_existing: false,
        max_bytes: ctx.max_upload,
    };
    let up = ctx.storage.create_upload(&ctx.org, &p, opts).await?;
    Ok((p, Opened::Upload(Arc::from(up))))
}

/// Fills `buf` (which starts with `hdr` bytes of room) as an SSH_FXP_DATA reply.
pub fn data_packet(mut buf: bytes::BytesMut, hdr: usize, id: u32) -> Option<bytes::Bytes> {
    let n = buf.len().checked_sub(hdr).filter(|&n| n > 0)?;
    buf[0..4].copy_from_slice(&((9 + n) as u32).to_be_bytes());
    buf[4] = 103; // SSH_FXP_DATA
    buf[5..9].copy_from_slice(&id.to_be_bytes());
    buf[9..13].copy_from_slice(&(n as u32).to_be_bytes());
    Some(buf.freeze())
}

pub async fn remove(ctx: &SessionCtx, path: &str) -> OpResult<StoragePath> {
    let p = ctx.resolve(path)?;
    let size = ctx.storage.stat(&ctx.org, &p).await?.size;
    // Recorded before the file goes, so that no repair of its event writes it again.
    taken(ctx, &p).await?;
    ctx.storage.delete(&ctx.org, &p).await?;
    if let Some(store) = &ctx.store {
        count(ctx, -1, -(size as i64)).await;
        if let Err(e) = store
            .forget_downloads(ctx.org.as_str(), vec![p.virtual_path()])
            .await
        {
            tracing::debug!(error = %e, "download record of a deleted file kept");
        }
    }
    Ok(p)
}

pub async fn mkdir(ctx: &SessionCtx, path: &str) -> OpResult<()> {
    if !ctx.upload {
        return Err(OpError::Denied);
    }
    let p = ctx.resolve(path)?;
    Ok(ctx.storage.mkdir(&ctx.org, &p).await?)
}

pub async fn rmdir(ctx: &SessionCtx, path: &str) -> OpResult<StoragePath> {
    // Readers must not change the folders hookbridge writes into.
    if !ctx.upload {
        return Err(OpError::Denied);
    }
    let p = ctx.resolve(path)?;
    if p.is_root() {
        // rmdir("/") in OpenSSH's chroot: EBUSY.
        return Err(errno(libc::EBUSY));
    }
    ctx.storage.rmdir(&ctx.org, &p).await?;
    Ok(p)
}

/// Plain RENAME fails when the target exists; posix-rename replaces it, except for
/// users who may upload (an upload renamed over an event would forge it).
/// Readers rename files only: folders are where hookbridge writes.
pub async fn rename(
    ctx: &SessionCtx,
    from: &str,
    to: &str,
    replace: bool,
) -> OpResult<(StoragePath, StoragePath)> {
    let a = ctx.resolve(from)?;
    let b = ctx.resolve(to)?;
    if a.is_root() || b.is_root() {
        // rename of or onto "/" in OpenSSH's chroot: EBUSY.
        return Err(errno(libc::EBUSY));
    }
    let m = ctx.storage.stat(&ctx.org, &a).await?;
    if m.is_dir() && !ctx.upload {
        return Err(OpError::Denied);
    }
    if replace && ctx.upload {
        match ctx.storage.stat(&ctx.org, &b).await {
            Err(StorageError::NotFound) => {}
            Ok(_) => return Err(OpError::Denied),
            Err(e) => return Err(e.into()),
        }
    }
    let mode = if replace {
        RenameMode::Replace
    } else {
        RenameMode::NoReplace
    };
    // A file replaced by the rename leaves the org's usage.
    let replaced = match (replace, m.is_dir()) {
        (true, false) => match ctx.storage.stat(&ctx.org, &b).await {
            Ok(t) if !t.is_dir() => Some(t.size),
            _ => None,
        },
        _ => None,
    };
    if !m.is_dir() {
        taken(ctx, &a).await?;
    }
    ctx.storage.rename(&ctx.org, &a, &b, mode).await?;
    if let Some(size) = replaced {
        count(ctx, -1, -(size as i64)).await;
    }
    if let Some(store) = &ctx.store {
        // An ETL job that downloads, then moves files to `/done/`: still downloaded.
        let (from, to) = (a.virtual_path(), b.virtual_path());
        if let Err(e) = store.move_downloads(ctx.org.as_str(), &from, &to).await {
            tracing::warn!(error = %e, "download records did not follow a rename");
        }
    }
    Ok((a, b))
}

/// Records in the store that a user takes the file at `p` (delete, rename away), before
/// it goes: a repair of an event still pending then never writes it again. If the store
/// cannot record it, the file stays (a failure the client sees and can retry).
async fn taken(ctx: &SessionCtx, p: &StoragePath) -> OpResult<()> {
    if let Some(store) = &ctx.store {
        store
            .record_taken(ctx.org.as_str(), &p.virtual_path())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "file not removed: the store cannot record it as taken");
                OpError::Failure("the state store cannot record the removal")
            })?;
    }
    Ok(())
}

/// Counts files that came (+) or went (-) in the org's usage in the store. A count that
/// fails is logged: the file operation itself has happened.
pub async fn count(ctx: &SessionCtx, files: i64, bytes: i64) {
    if let Some(store) = &ctx.store {
        if let Err(e) = store.add_org_usage(ctx.org.as_str(), files, bytes).await {
            tracing::warn!(error = %e, files, bytes, "org usage not updated after a file operation");
        }
    }
}

/// What a SETSTAT asks to change, as storage attributes.
pub fn set_attrs(a: &FileAttributes) -> SetAttrs {
    let at = |s: u32| UNIX_EPOCH + Duration::from_secs(s as u64);
    SetAttrs {
        atime: a.atime.map(at),
        mtime: a.mtime.map(at),
        perm: a.permissions.map(|p| p & 0o7777),
    }
}

/// SETSTAT by path: only users who may upload may change anything, and only times and
/// plain read/write modes (WinSCP, FileZilla, rclone and paramiko set them after an
/// upload). Ownership and sizes are hookbridge's: a request to change them is refused,
/// never answered OK without being applied.
pub async fn setstat(ctx: &SessionCtx, path: &str, a: &FileAttributes) -> OpResult<()> {
    let p = ctx.resolve(path)?;
    let m = ctx.storage.stat(&ctx.org, &p).await?;
    check_setstat(ctx, &m, a, false)?;
    let changes = changed(&m, a);
    if changes.is_empty() {
        return Ok(());
    }
    Ok(ctx.storage.set_attrs(&ctx.org, &p, changes).await?)
}

/// Only what differs from `m`: a client setting what is already there changes nothing,
/// also on a storage that cannot set anything.
pub fn changed(m: &Meta, a: &FileAttributes) -> SetAttrs {
    let want = set_attrs(a);
    SetAttrs {
        atime: want.atime.filter(|&t| secs(t) != secs(m.atime)),
        mtime: want.mtime.filter(|&t| secs(t) != secs(m.mtime)),
        perm: want.perm.filter(|&p| p != m.perm & 0o7777),
    }
}

/// Whether a SETSTAT/FSETSTAT of `a` on a file with metadata `m` may be applied.
/// `own_upload`: the handle is an upload in progress, whose size the user may set.
/// Values equal to the current ones change nothing and are accepted.
pub fn check_setstat(
    ctx: &SessionCtx,
    m: &Meta,
    a: &FileAttributes,
    own_upload: bool,
) -> OpResult<()> {
    let c = changed(m, a);
    let changes_times = c.atime.is_some() || c.mtime.is_some();
    let changes_size = a.size.is_some_and(|s| s != m.size);
    let changes_mode = c.perm.is_some();
    let changes_owner = a.uid.is_some_and(|u| u != m.uid) || a.gid.is_some_and(|g| g != m.gid);
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

pub async fn statvfs(ctx: &SessionCtx, path: &str) -> OpResult<Statvfs> {
    let p = ctx.resolve(path)?;
    ctx.storage.stat(&ctx.org, &p).await?;
    let s = ctx.storage.space().await?;
    Ok(Statvfs {
        block_size: s.block_size,
        fragment_size: s.fragment_size,
        blocks: s.blocks,
        blocks_free: s.blocks_free,
        blocks_avail: s.blocks_avail,
        inodes: s.inodes,
        inodes_free: s.inodes_free,
        inodes_avail: s.inodes_avail,
        fs_id: s.fs_id,
        flags: s.flags,
        name_max: s.name_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;

    async fn ctx(upload: bool) -> (tempfile::TempDir, SessionCtx) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::open(&dir.path().join("orgs"), &dir.path().join("tmp")).unwrap();
        let org = OrgName::new("org").unwrap();
        s.create_org(&org).await.unwrap();
        let c = SessionCtx {
            user: "u".into(),
            org,
            upload,
            ip: "127.0.0.1".parse().unwrap(),
            storage: Arc::new(s),
            max_upload: 1 << 20,
            max_handles: 4,
            budget: super::super::budget::HandleBudget::new(8, 16),
            downloads: None,
            store: None,
        };
        (dir, c)
    }

    #[tokio::test]
    async fn readers_cannot_create_files() {
        let (_d, c) = ctx(false).await;
        let r = open(&c, "/x", OpenFlags::WRITE | OpenFlags::CREATE).await;
        assert!(matches!(r, Err(OpError::Denied)));
    }

    #[tokio::test]
    async fn uploads_appear_on_close_only() {
        let (d, c) = ctx(true).await;
        let (_, o) = open(
            &c,
            "/x",
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
        )
        .await
        .unwrap();
        let Opened::Upload(up) = o else { panic!() };
        up.write_at(0, bytes::Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let x = d.path().join("orgs/org/x");
        assert!(!x.exists());
        up.commit().await.unwrap();
        assert_eq!(std::fs::read(x).unwrap(), b"hello");
    }

    #[tokio::test]
    async fn plain_rename_refuses_to_replace() {
        let (d, c) = ctx(false).await;
        let root = d.path().join("orgs/org");
        std::fs::write(root.join("a"), "a").unwrap();
        std::fs::write(root.join("b"), "b").unwrap();
        assert!(rename(&c, "/a", "/b", false).await.is_err());
        rename(&c, "/a", "/b", true).await.unwrap();
        assert_eq!(std::fs::read(root.join("b")).unwrap(), b"a");
    }

    #[test]
    fn data_packet_layout() {
        let mut buf = bytes::BytesMut::zeroed(13);
        buf.extend_from_slice(b"cdef");
        let p = data_packet(buf, 13, 7).unwrap();
        assert_eq!(
            &p[..],
            &[0, 0, 0, 13, 103, 0, 0, 0, 7, 0, 0, 0, 4, b'c', b'd', b'e', b'f']
        );
        assert!(data_packet(bytes::BytesMut::zeroed(13), 13, 7).is_none());
    }

    #[test]
    fn longname_looks_like_ls() {
        let m = Meta {
            kind: crate::storage::EntryKind::Dir,
            size: 4096,
            mtime: SystemTime::now(),
            atime: SystemTime::now(),
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
        };
        let l = longname("d", &m, "u", "org");
        assert!(l.starts_with("drwxr-xr-x"), "{l}");
        assert!(l.ends_with(" d"), "{l}");
    }
}
