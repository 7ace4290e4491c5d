//! The control task of a channel: every request but READ and WRITE, in arrival order,
//! and the end of handles (upload publication, audit lines).

use super::*;

/// A request for the control task: the packet, its encoded length, its number.
pub(super) struct Control {
    pub(super) packet: Packet,
    pub(super) len: u64,
    pub(super) seq: u64,
}

/// Serves non-I/O requests in the order they arrived.
pub(super) async fn control(state: Arc<State>, mut rx: mpsc::UnboundedReceiver<Control>) {
    while let Some(c) = rx.recv().await {
        state
            .queued_control_bytes
            .fetch_sub(c.len, Ordering::Relaxed);
        let id = c.packet.get_request_id();
        let reply = serve_control(&state, c.packet).await;
        let packet = reply.unwrap_or_else(|e| status_of(id, &e));
        state.send(c.seq, packet).await;
    }
}

async fn serve_control(state: &Arc<State>, p: Packet) -> OpResult<Packet> {
    let ctx = state.ctx.clone();
    Ok(match p {
        Packet::Init(_) => {
            count_op("init");
            Packet::Version(version())
        }
        Packet::RealPath(r) => {
            count_op("realpath");
            let f = ops::realpath(&ctx, &r.path).await?;
            Packet::Name(protocol::Name {
                id: r.id,
                files: vec![f],
            })
        }
        Packet::Stat(s) => {
            count_op("stat");
            let a = ops::stat(&ctx, &s.path).await?;
            Packet::Attrs(protocol::Attrs { id: s.id, attrs: a })
        }
        Packet::Lstat(s) => {
            count_op("lstat");
            let a = ops::stat(&ctx, &s.path).await?;
            Packet::Attrs(protocol::Attrs { id: s.id, attrs: a })
        }
        Packet::Fstat(s) => {
            count_op("fstat");
            let f = file_handle(state, &s.handle)?;
            let a = ops::attrs(&handle_meta(&f));
            Packet::Attrs(protocol::Attrs { id: s.id, attrs: a })
        }
        Packet::SetStat(s) => {
            count_op("setstat");
            ops::setstat(&ctx, &s.path, &s.attrs).await?;
            ok(s.id)
        }
        Packet::FSetStat(s) => {
            count_op("fsetstat");
            let f = file_handle(state, &s.handle)?;
            let m = handle_meta(&f);
            match &f.file {
                Opened::Upload(up) => {
                    ops::check_setstat(&ctx, &m, &s.attrs, true)?;
                    if let Some(size) = s.attrs.size {
                        if size > ctx.max_upload {
                            return Err(OpError::Failure(
                                "upload larger than this server allows (sftp.max_upload_bytes)",
                            ));
                        }
                        up.set_len(size).await?;
                    }
                    // The file is published on close; its times and mode are set then.
                    let want = ops::changed(&m, &s.attrs);
                    if let Ok(mut p) = f.pending_attrs.lock() {
                        p.atime = want.atime.or(p.atime);
                        p.mtime = want.mtime.or(p.mtime);
                        p.perm = want.perm.or(p.perm);
                    }
                }
                Opened::Read(_) => {
                    ops::check_setstat(&ctx, &m, &s.attrs, false)?;
                    let want = ops::changed(&m, &s.attrs);
                    if !want.is_empty() {
                        ctx.storage.set_attrs(&ctx.org, &f.path, want).await?;
                    }
                }
            }
            ok(s.id)
        }
        Packet::Open(o) => {
            count_op("open");
            let slot = state.reserve()?;
            let (path, file) = ops::open(&ctx, &o.filename, o.pflags).await?;
            let fh = FileHandle {
                file,
                virt: path.virtual_path(),
                path,
                pending_attrs: Default::default(),
                bytes_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                write_failed: Default::default(),
                gate: Arc::new(RwLock::new(())),
            };
            let handle = state.insert(Handle::File(Arc::new(fh)), slot)?;
            Packet::Handle(protocol::Handle { id: o.id, handle })
        }
        Packet::OpenDir(o) => {
            count_op("opendir");
            let slot = state.reserve()?;
            let entries = ops::list_dir(&ctx, &o.path).await?;
            let handle = state.insert(Handle::Dir(Mutex::new(entries)), slot)?;
            Packet::Handle(protocol::Handle { id: o.id, handle })
        }
        Packet::ReadDir(r) => {
            count_op("readdir");
            let h = state.get(&r.handle).ok_or_else(bad_handle)?;
            let Handle::Dir(entries) = &*h else {
                return Err(bad_handle());
            };
            let mut entries = entries
                .lock()
                .map_err(|_| OpError::Failure("internal error"))?;
            if entries.is_empty() {
                return Ok(Packet::status(
                    r.id,
                    StatusCode::Eof,
                    "End of directory",
                    "en-US",
                ));
            }
            let rest = entries.len().saturating_sub(READDIR_BATCH);
            let files = entries.split_off(rest);
            Packet::Name(protocol::Name { id: r.id, files })
        }
        Packet::Close(c) => {
            count_op("close");
            // OpenSSH's handle_close sets ENOENT for an unknown handle: NO_SUCH_FILE.
            let h = state.take(&c.handle).ok_or(OpError::NoSuchFile)?;
            close(state, h).await?;
            ok(c.id)
        }
        Packet::Remove(r) => {
            count_op("remove");
            let path = ops::remove(&ctx, &r.filename).await?;
            audit(&state.ctx, "delete", &path.virtual_path(), 0);
            ok(r.id)
        }
        Packet::MkDir(m) => {
            count_op("mkdir");
            ops::mkdir(&ctx, &m.path).await?;
            ok(m.id)
        }
        Packet::RmDir(m) => {
            count_op("rmdir");
            let path = ops::rmdir(&ctx, &m.path).await?;
            audit(&state.ctx, "delete", &path.virtual_path(), 0);
            ok(m.id)
        }
        Packet::Rename(r) => {
            count_op("rename");
            ops::rename(&ctx, &r.oldpath, &r.newpath, false).await?;
            ok(r.id)
        }
        Packet::Extended(e) => extended(state, e).await?,
        other => {
            count_op("unsupported");
            let id = other.get_request_id();
            Packet::status(
                id,
                StatusCode::OpUnsupported,
                "Operation unsupported",
                "en-US",
            )
        }
    })
}

/// FSTAT of a handle: the file as opened, or the upload as written so far.
fn handle_meta(f: &FileHandle) -> crate::storage::Meta {
    match &f.file {
        Opened::Read(r) => r.meta().clone(),
        Opened::Upload(up) => {
            let now = std::time::SystemTime::now();
            crate::storage::Meta {
                kind: crate::storage::EntryKind::File,
                size: up.size(),
                mtime: now,
                atime: now,
                perm: 0o640,
                uid: 0,
                gid: 0,
                nlink: 1,
            }
        }
    }
}

fn file_handle(state: &State, handle: &str) -> OpResult<Arc<FileHandle>> {
    match state.get(handle).as_deref() {
        Some(Handle::File(f)) => Ok(f.clone()),
        _ => Err(bad_handle()),
    }
}

fn version() -> protocol::Version {
    let mut v = protocol::Version::new();
    for (name, ver) in [
        ("posix-rename@openssh.com", "1"),
        ("statvfs@openssh.com", "2"),
        ("fsync@openssh.com", "1"),
        ("limits@openssh.com", "1"),
    ] {
        v.extensions.insert(name.to_owned(), ver.to_owned());
    }
    v
}

#[derive(serde::Deserialize)]
struct TwoPaths {
    oldpath: String,
    newpath: String,
}

async fn extended(state: &Arc<State>, e: protocol::Extended) -> OpResult<Packet> {
    let ctx = state.ctx.clone();
    let id = e.id;
    let mut data = Bytes::from(e.data);
    let reply_data = |v: Bytes| {
        Packet::ExtendedReply(protocol::ExtendedReply {
            id,
            data: v.to_vec(),
        })
    };
    Ok(match e.request.as_str() {
        "posix-rename@openssh.com" => {
            count_op("posix-rename");
            let p: TwoPaths =
                russh_sftp::de::from_bytes(&mut data).map_err(|_| OpError::BadMessage)?;
            ops::rename(&ctx, &p.oldpath, &p.newpath, true).await?;
            ok(id)
        }
        "statvfs@openssh.com" => {
            count_op("statvfs");
            let p: russh_sftp::extensions::StatvfsExtension =
                russh_sftp::de::from_bytes(&mut data).map_err(|_| OpError::BadMessage)?;
            let s = ops::statvfs(&ctx, &p.path).await?;
            reply_data(russh_sftp::ser::to_bytes(&s).map_err(|_| OpError::Failure("encode"))?)
        }
        "fsync@openssh.com" => {
            count_op("fsync");
            let p: russh_sftp::extensions::FsyncExtension =
                russh_sftp::de::from_bytes(&mut data).map_err(|_| OpError::BadMessage)?;
            // OpenSSH answers NO_SUCH_FILE to an fsync of an unknown handle.
            // Data is made durable when an upload is published on close (an upload is
            // never visible before), so there is nothing to sync before that.
            file_handle(state, &p.handle).map_err(|_| OpError::NoSuchFile)?;
            ok(id)
        }
        "limits@openssh.com" => {
            count_op("limits");
            let l = russh_sftp::extensions::LimitsExtension {
                max_packet_len: MAX_PACKET_LEN as u64,
                max_read_len: MAX_RW_LEN as u64,
                max_write_len: MAX_RW_LEN as u64,
                max_open_handles: ctx.max_handles as u64,
            };
            reply_data(russh_sftp::ser::to_bytes(&l).map_err(|_| OpError::Failure("encode"))?)
        }
        _ => {
            count_op("unsupported");
            return Err(OpError::Unsupported);
        }
    })
}

/// Waits for the handle's in-flight I/O, then finishes it (upload rename, audit).
async fn close(state: &Arc<State>, h: Arc<Handle>) -> OpResult<()> {
    let Handle::File(f) = &*h else { return Ok(()) };
    let _exclusive = f.gate.clone().write_owned().await;
    let f = f.clone();
    let ctx = &state.ctx;
    match &f.file {
        Opened::Upload(up) => {
            let res = if f.write_failed.load(Ordering::Relaxed) {
                up.abort().await;
                Err(OpError::Failure(
                    "a write of this upload failed; nothing was kept",
                ))
            } else {
                up.commit().await.map_err(OpError::from)
            };
            if res.is_ok() {
                let size = match ctx.storage.stat(&ctx.org, &f.path).await {
                    Ok(m) => m.size,
                    Err(_) => f.bytes_written.load(Ordering::Relaxed),
                };
                ops::count(ctx, 1, size as i64).await;
                audit(
                    ctx,
                    "upload",
                    &f.virt,
                    f.bytes_written.load(Ordering::Relaxed),
                );
                let attrs = f.pending_attrs.lock().map(|a| *a).unwrap_or_default();
                if !attrs.is_empty() {
                    // Published already: a storage that cannot set times keeps the file.
                    if let Err(e) = ctx.storage.set_attrs(&ctx.org, &f.path, attrs).await {
                        tracing::debug!(error = %e, path = %f.virt, "times/mode of an upload not applied");
                    }
                }
            }
            res
        }
        Opened::Read(_) => {
            finish_download(ctx, &f);
            Ok(())
        }
    }
}

/// Audits a download and records it for retention (a file read at all counts, as a
/// read moving atime did).
fn finish_download(ctx: &SessionCtx, f: &FileHandle) {
    let bytes = f.bytes_read.load(Ordering::Relaxed);
    audit(ctx, "download", &f.virt, bytes);
    if let (true, Some(log)) = (bytes > 0, &ctx.downloads) {
        log.record(ctx.org.as_str(), f.virt.clone());
    }
}

/// Handles the client left open: downloads are still audited, uploads are discarded.
pub(super) async fn release_all(state: &Arc<State>) {
    let handles: Vec<String> = match state.handles.lock() {
        Ok(map) => map.keys().cloned().collect(),
        Err(_) => return,
    };
    for name in handles {
        let Some(h) = state.take(&name) else { continue };
        if let Handle::File(f) = &*h {
            match &f.file {
                Opened::Upload(up) => {
                    tracing::info!(user = %state.ctx.user, path = %f.virt, "upload abandoned; discarded");
                    up.abort().await;
                }
                Opened::Read(_) => finish_download(&state.ctx, f),
            }
        }
    }
}

fn audit(ctx: &SessionCtx, event: &str, path: &str, bytes: u64) {
    tracing::info!(
        target: "audit",
        event,
        user = %ctx.user,
        org = %ctx.org,
        path,
        bytes,
        ip = %ctx.ip,
        "sftp {event}"
    );
}
