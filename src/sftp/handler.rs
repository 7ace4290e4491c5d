//! The SFTP dispatcher of one channel.
//!
//! russh delivers channel data through a bounded queue, and the same session loop
//! that fills it also handles the client's WINDOW_ADJUST. If we stop reading while
//! replies wait for window space, both sides wait forever (russh-sftp's own
//! one-request-at-a-time server does exactly that on large downloads). So:
//! - a reader loop only ever waits on the channel: it frames packets and hands them on;
//! - READ and WRITE run concurrently (bounded by a semaphore); their replies still go
//!   out in request order (`replies`), as PuTTY's pscp needs;
//! - every other request runs in order in one control task, so path operations and
//!   READDIR keep their sequence;
//! - one writer task sends every reply, in request order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use russh_sftp::protocol::{self, Packet, StatusCode};
use tokio::sync::{mpsc, watch, OwnedRwLockReadGuard, RwLock, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::budget::HandleSlot;
use super::ops::{self, OpError, OpResult, Opened, SessionCtx};
use super::replies::{writer, Reply};

mod control;
use control::{control, release_all, Control};

/// Largest READ/WRITE payload we advertise (limits@openssh.com) and serve.
pub const MAX_RW_LEN: u32 = 255 * 1024;
/// Largest packet we advertise; 256 KiB like OpenSSH.
pub const MAX_PACKET_LEN: u32 = 256 * 1024;
/// A declared length above this closes the channel: never allocate what a client claims.
const MAX_ACCEPTED_LEN: usize = MAX_PACKET_LEN as usize + 1024;
/// READ/WRITE served at once per channel; more queue up without blocking the reader.
const CONCURRENT_IO: usize = 16;
/// Requests (and bytes of WRITE data) waiting per channel before we call it abuse.
const MAX_QUEUED_REQUESTS: usize = 10_000;
const MAX_QUEUED_WRITE_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of control requests (stat, realpath, …) waiting for the control thread: a client
/// that streams them without reading replies is cut off instead of growing our memory.
const MAX_QUEUED_CONTROL_BYTES: u64 = 16 * 1024 * 1024;
/// Entries per READDIR reply, as OpenSSH does.
const READDIR_BATCH: usize = 100;

const FXP_INIT: u8 = 1;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;

struct FileHandle {
    file: Opened,
    path: crate::storage::StoragePath,
    virt: String,
    /// Times and modes an FSETSTAT asked for on an upload: applied once it is published.
    pending_attrs: Mutex<crate::storage::SetAttrs>,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// A write of this upload failed: on close it is discarded, never published part-done.
    write_failed: std::sync::atomic::AtomicBool,
    /// READ/WRITE hold it shared; CLOSE takes it exclusively, so it waits for them.
    gate: Arc<RwLock<()>>,
}

enum Handle {
    File(Arc<FileHandle>),
    Dir(Mutex<Vec<protocol::File>>),
}

struct Entry {
    handle: Arc<Handle>,
    /// Counts the handle against its user and the process until it is closed.
    _slot: HandleSlot,
}

struct State {
    ctx: Arc<SessionCtx>,
    handles: Mutex<HashMap<String, Entry>>,
    /// A refused handle is logged once per channel: a client looping on it floods nothing.
    refusal_logged: std::sync::atomic::AtomicBool,
    next_handle: AtomicU64,
    io: Semaphore,
    queued_write_bytes: AtomicU64,
    queued_control_bytes: AtomicU64,
    replies: mpsc::Sender<Reply>,
    /// Open handles of the whole connection: shutdown waits for transfers to end.
    busy: Arc<watch::Sender<usize>>,
}

impl State {
    /// Sends the reply to request number `seq` (see `replies`).
    async fn send(&self, seq: u64, p: Packet) {
        let bytes = match Bytes::try_from(p) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an SFTP reply");
                None
            }
        };
        self.send_bytes(seq, bytes).await;
    }

    async fn send_bytes(&self, seq: u64, bytes: Option<Bytes>) {
        let _ = self.replies.send(Reply { seq, bytes }).await;
    }

    async fn reply<T: Into<Packet>>(&self, seq: u64, id: u32, r: OpResult<T>) {
        let p = match r {
            Ok(p) => p.into(),
            Err(e) => status_of(id, &e),
        };
        self.send(seq, p).await;
    }

    /// Room for one more handle, taken before the file is opened so that a refused
    /// handle never costs a descriptor. Refused as OpenSSH does when its handle table is
    /// full: SSH_FX_FAILURE.
    fn reserve(&self) -> OpResult<HandleSlot> {
        let open = self
            .handles
            .lock()
            .map_err(|_| OpError::Failure("internal error"))?
            .len();
        let refused = if open >= self.ctx.max_handles {
            "too many open handles on this channel (sftp.max_handles_per_session)"
        } else {
            match self.ctx.budget.acquire(&self.ctx.user) {
                Ok(slot) => return Ok(slot),
                Err(r) => r.message(),
            }
        };
        if !self.refusal_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(user = %self.ctx.user, org = %self.ctx.org, ip = %self.ctx.ip, open, "SFTP handle refused: {refused}");
        }
        metrics::counter!("hookbridge_sftp_handles_refused_total").increment(1);
        Err(OpError::Failure(refused))
    }

    fn insert(&self, h: Handle, slot: HandleSlot) -> OpResult<String> {
        let mut map = self
            .handles
            .lock()
            .map_err(|_| OpError::Failure("internal error"))?;
        let name = self.next_handle.fetch_add(1, Ordering::Relaxed).to_string();
        map.insert(
            name.clone(),
            Entry {
                handle: Arc::new(h),
                _slot: slot,
            },
        );
        self.busy.send_modify(|n| *n += 1);
        Ok(name)
    }

    fn get(&self, handle: &str) -> Option<Arc<Handle>> {
        Some(self.handles.lock().ok()?.get(handle)?.handle.clone())
    }

    fn take(&self, handle: &str) -> Option<Arc<Handle>> {
        let e = self.handles.lock().ok()?.remove(handle)?;
        self.busy.send_modify(|n| *n = n.saturating_sub(1));
        Some(e.handle)
    }

    /// A file handle for READ/WRITE, with its gate held so CLOSE waits for the operation.
    fn file_for_io(&self, handle: &str) -> Option<(Arc<FileHandle>, OwnedRwLockReadGuard<()>)> {
        let map = self.handles.lock().ok()?;
        match map.get(handle).map(|e| &*e.handle) {
            Some(Handle::File(f)) => {
                let guard = f.gate.clone().try_read_owned().ok()?;
                Some((f.clone(), guard))
            }
            _ => None,
        }
    }
}

fn ok(id: u32) -> Packet {
    Packet::status(id, StatusCode::Ok, "Ok", "en-US")
}

fn status_of(id: u32, e: &OpError) -> Packet {
    let (code, msg) = e.status();
    Packet::status(id, code, &msg, "en-US")
}

/// OpenSSH's answer to READ, WRITE, FSTAT, FSETSTAT or READDIR on an unknown handle.
fn bad_handle() -> OpError {
    OpError::Failure("invalid handle")
}

fn count_op(op: &'static str) {
    metrics::counter!("hookbridge_sftp_operations_total", "op" => op).increment(1);
}

/// Serves SFTP on `channel` until the client sends EOF or the channel closes.
pub async fn run(channel: Channel<Msg>, ctx: SessionCtx, busy: Arc<watch::Sender<usize>>) {
    let (mut rx, tx) = channel.split();
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(64);
    // Cancelled once the channel is closed or its connection gone: replies then have
    // nowhere to go, and a writer waiting for window space would wait forever.
    let gone = CancellationToken::new();
    let writer = tokio::spawn(writer(tx, reply_rx, gone.clone()));
    let state = Arc::new(State {
        ctx: Arc::new(ctx),
        handles: Mutex::new(HashMap::new()),
        refusal_logged: Default::default(),
        next_handle: AtomicU64::new(1),
        io: Semaphore::new(CONCURRENT_IO),
        queued_write_bytes: AtomicU64::new(0),
        queued_control_bytes: AtomicU64::new(0),
        replies: reply_tx,
        busy,
    });
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel::<Control>();
    // Path operations run in order on a thread of their own, apart from READ/WRITE.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Handle::current();
    let st = state.clone();
    let spawned = std::thread::Builder::new()
        .name("sftp-control".into())
        .stack_size(512 * 1024)
        .spawn(move || {
            rt.block_on(control(st, ctl_rx));
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start an SFTP control thread");
        return;
    }
    let mut io_tasks = JoinSet::new();
    let mut buf = BytesMut::new();
    let mut initialized = false;
    // Request numbers, in arrival order: replies go out in this order.
    let mut seq: u64 = 0;

    // Stays true only if the channel was closed or its connection ended (no more messages).
    let mut closed = true;
    'read: while let Some(msg) = rx.wait().await {
        let data = match msg {
            ChannelMsg::Data { data } => data,
            ChannelMsg::Eof => {
                closed = false;
                break;
            }
            ChannelMsg::Close => break,
            _ => continue,
        };
        buf.extend_from_slice(&data);
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len == 0 || len > MAX_ACCEPTED_LEN {
                tracing::warn!(user = %state.ctx.user, len, "SFTP packet too large; closing the channel");
                closed = false;
                break 'read;
            }
            if buf.len() < 4 + len {
                break;
            }
            buf.advance(4);
            let pkt = buf.split_to(len).freeze();
            // INIT first and only once, as OpenSSH's sftp-server insists: a client that
            // skips or repeats the handshake is lost or probing, and has no request id to
            // answer a STATUS to (INIT carries a version there), so the channel closes.
            if (pkt[0] == FXP_INIT) == initialized {
                tracing::warn!(user = %state.ctx.user, packet_type = pkt[0], "SFTP INIT missing or repeated; closing the channel");
                closed = false;
                break 'read;
            }
            initialized = true;
            let this = seq;
            seq += 1;
            if !dispatch(&state, this, pkt, &ctl_tx, &mut io_tasks).await {
                closed = false;
                break 'read;
            }
        }
        // Reap finished transfers so the set does not grow with the session.
        while io_tasks.try_join_next().is_some() {}
    }

    // After EOF (or when we close a misbehaving channel) the client may still read the
    // replies in flight; keep watching for its close, or the connection's end (the
    // channel's queue is dropped), while they go out.
    let watcher = if !closed {
        let gone = gone.clone();
        Some(tokio::spawn(async move {
            while let Some(msg) = rx.wait().await {
                if matches!(msg, ChannelMsg::Close) {
                    break;
                }
            }
            gone.cancel();
        }))
    } else {
        gone.cancel();
        None
    };
    drop(ctl_tx);
    let _ = done_rx.await;
    while io_tasks.join_next().await.is_some() {}
    release_all(&state).await;
    drop(state);
    // Every reply sender is gone now, so the writer drains its queue and hands the channel back.
    if let Ok(tx) = writer.await {
        if !gone.is_cancelled() {
            // scp (SFTP mode) exits 1 unless it sees an exit status before the close.
            let _ = tx.exit_status(0).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
        }
    }
    if let Some(w) = watcher {
        // Our close is sent: the client's close or the connection's end stops it anyway.
        w.abort();
    }
}

/// Returns false when the channel must be closed.
async fn dispatch(
    state: &Arc<State>,
    seq: u64,
    pkt: Bytes,
    ctl: &mpsc::UnboundedSender<Control>,
    io_tasks: &mut JoinSet<()>,
) -> bool {
    let ty = pkt[0];
    let id = if pkt.len() >= 5 {
        u32::from_be_bytes([pkt[1], pkt[2], pkt[3], pkt[4]])
    } else {
        0
    };
    if io_tasks.len() >= MAX_QUEUED_REQUESTS {
        tracing::warn!(user = %state.ctx.user, "too many queued SFTP requests; closing the channel");
        return false;
    }
    let parsed = Packet::try_from(&mut pkt.clone());
    let packet = match parsed {
        Ok(p) => p,
        Err(_) => {
            let code = if (1..=20).contains(&ty) || ty == 200 {
                StatusCode::BadMessage
            } else {
                StatusCode::OpUnsupported
            };
            count_op("unsupported");
            state
                .send(seq, Packet::status(id, code, &code.to_string(), "en-US"))
                .await;
            return true;
        }
    };
    match (ty, packet) {
        (FXP_READ, Packet::Read(r)) => {
            count_op("read");
            let Some((h, gate)) = state.file_for_io(&r.handle) else {
                state.send(seq, status_of(r.id, &bad_handle())).await;
                return true;
            };
            io_tasks.spawn(read(state.clone(), seq, h, gate, r));
        }
        (FXP_WRITE, Packet::Write(w)) => {
            count_op("write");
            let Some((h, gate)) = state.file_for_io(&w.handle) else {
                state.send(seq, status_of(w.id, &bad_handle())).await;
                return true;
            };
            let n = w.data.len() as u64;
            if state.queued_write_bytes.fetch_add(n, Ordering::Relaxed) + n > MAX_QUEUED_WRITE_BYTES
            {
                tracing::warn!(user = %state.ctx.user, "too much queued SFTP write data; closing the channel");
                return false;
            }
            io_tasks.spawn(write(state.clone(), seq, h, gate, w));
        }
        (_, p) => {
            let n = pkt.len() as u64;
            if state.queued_control_bytes.fetch_add(n, Ordering::Relaxed) + n
                > MAX_QUEUED_CONTROL_BYTES
            {
                tracing::warn!(user = %state.ctx.user, "too many queued SFTP requests; closing the channel");
                return false;
            }
            let _ = ctl.send(Control {
                packet: p,
                len: n,
                seq,
            });
        }
    }
    true
}

async fn read(
    state: Arc<State>,
    seq: u64,
    h: Arc<FileHandle>,
    _gate: OwnedRwLockReadGuard<()>,
    r: protocol::Read,
) {
    let Ok(_permit) = state.io.acquire().await else {
        state.send_bytes(seq, None).await;
        return;
    };
    let len = r.len.min(MAX_RW_LEN) as usize;
    let id = r.id;
    // The DATA reply is built in place: the storage reads behind 13 bytes of header room.
    const HDR: usize = 13;
    let res = match &h.file {
        Opened::Read(f) => f.read_at(r.offset, len, HDR).await.map_err(OpError::from),
        // OpenSSH: read(2) on a handle opened for writing only fails with EBADF.
        Opened::Upload(_) => Err(ops::errno(libc::EBADF)),
    };
    let reply = match res.map(|buf| ops::data_packet(buf, HDR, id)) {
        Ok(Some(bytes)) => {
            let n = (bytes.len() - HDR) as u64;
            h.bytes_read.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("hookbridge_sftp_bytes_read_total").increment(n);
            bytes
        }
        Ok(None) => {
            let p = Packet::status(id, StatusCode::Eof, "End of file", "en-US");
            return state.send(seq, p).await;
        }
        Err(e) => return state.send(seq, status_of(id, &e)).await,
    };
    state.send_bytes(seq, Some(reply)).await;
}

async fn write(
    state: Arc<State>,
    seq: u64,
    h: Arc<FileHandle>,
    _gate: OwnedRwLockReadGuard<()>,
    w: protocol::Write,
) {
    let n = w.data.len() as u64;
    let Ok(permit) = state.io.acquire().await else {
        state.send_bytes(seq, None).await;
        return;
    };
    let res = match &h.file {
        // OpenSSH: a reader is refused writes (read-only mode); anyone else's write(2)
        // on a handle opened for reading fails with EBADF (NO_SUCH_FILE).
        Opened::Read(_) if state.ctx.upload => Err(ops::errno(libc::EBADF)),
        Opened::Read(_) => Err(OpError::Denied),
        Opened::Upload(_) if w.offset.saturating_add(n) > state.ctx.max_upload => Err(
            OpError::Failure("upload larger than this server allows (sftp.max_upload_bytes)"),
        ),
        Opened::Upload(up) => up
            .write_at(w.offset, bytes::Bytes::from(w.data))
            .await
            .map_err(OpError::from),
    };
    drop(permit);
    state.queued_write_bytes.fetch_sub(n, Ordering::Relaxed);
    if res.is_ok() {
        h.bytes_written.fetch_add(n, Ordering::Relaxed);
    } else {
        h.write_failed.store(true, Ordering::Relaxed);
    }
    state.reply(seq, w.id, res.map(|_| ok(w.id))).await;
}
