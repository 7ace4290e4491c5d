//! Durable event files with group commit.
//!
//! Every accepted event goes through one committer task. It takes whatever requests are
//! waiting (a batch), and for the batch as a whole:
//!   1. writes each file's temp copy under `<data>/tmp` and fdatasyncs it, while the store
//!      records the events and their delivery jobs in one fsync'd transaction;
//!   2. renames the temps into the org folders (readers only ever see complete files);
//!   3. fsyncs every directory touched once, and every directory it had to create;
//! and only then answers all requests. Concurrent posts share one commit, so durability
//! costs one round of fsyncs per batch, not per event.
//!
//! The store commit comes first logically: if the process dies after it but before the
//! renames, `recover()` at the next start writes the files of every event still marked
//! as pending, so nothing that was acknowledged is lost.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::limits::Usage;
use crate::store::{CommitOutcome, IngestResult, NewEvent, Store, StoreError};

mod place;

use place::{publish_temps, DurableDirs};

const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("disk full")]
    DiskFull,
    #[error("too many events waiting for a commit")]
    Overloaded,
    #[error("shutting down")]
    ShuttingDown,
    #[error("store: {0}")]
    Store(String),
    #[error("file system: {0}")]
    Io(String),
}

impl From<StoreError> for SpoolError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DiskFull => SpoolError::DiskFull,
            other => SpoolError::Store(other.to_string()),
        }
    }
}

fn io_err(e: io::Error) -> SpoolError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => SpoolError::DiskFull,
        _ => SpoolError::Io(e.to_string()),
    }
}

/// Whether the event was new (202) or a repost of a known id (200).
#[derive(Debug, Clone)]
pub enum Committed {
    New(IngestResult),
    Known(IngestResult),
    /// Recorded (with its deliveries) but its files wait: the org is over quota (why).
    Deferred(IngestResult, String),
}

struct Request {
    event: NewEvent,
    reply: oneshot::Sender<Result<Committed, SpoolError>>,
}

#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Request>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

/// Where files go: org folders and the temp folder, on one file system.
#[derive(Clone, Debug)]
pub struct Layout {
    pub orgs_dir: PathBuf,
    pub tmp_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            orgs_dir: data_dir.join("orgs"),
            tmp_dir: data_dir.join("tmp"),
        }
    }

    pub fn org_dir(&self, org: &str) -> PathBuf {
        self.orgs_dir.join(org)
    }

    /// Creates the folders and removes temp files a crash left behind.
    pub fn prepare(&self) -> io::Result<()> {
        fs::create_dir_all(&self.orgs_dir)?;
        fs::create_dir_all(&self.tmp_dir)?;
        for entry in fs::read_dir(&self.tmp_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    fn new_temp(&self) -> PathBuf {
        self.tmp_dir.join(format!("{}.tmp", ulid::Ulid::new()))
    }

    /// `path` was produced by a validated template: no `..`, no leading dots.
    fn target(&self, org: &str, path: &str) -> PathBuf {
        self.org_dir(org).join(path.trim_start_matches('/'))
    }
}

impl Spool {
    /// Starts the committer; it stops after `cancel` once every queued request is answered.
    pub fn start(
        store: Arc<dyn Store>,
        layout: Layout,
        usage: Arc<Usage>,
        max_waiting: usize,
        cancel: CancellationToken,
    ) -> (Spool, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(max_waiting.max(1));
        let waiting = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(committer(store, layout, usage, rx, waiting.clone(), cancel));
        (
            Spool {
                tx,
                waiting,
                max_waiting,
            },
            task,
        )
    }

    pub async fn submit(&self, event: NewEvent) -> Result<Committed, SpoolError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SpoolError::Overloaded);
        }
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Request { event, reply }).await;
        if sent.is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SpoolError::ShuttingDown);
        }
        rx.await.unwrap_or(Err(SpoolError::ShuttingDown))
    }
}

async fn committer(
    store: Arc<dyn Store>,
    layout: Layout,
    usage: Arc<Usage>,
    mut rx: mpsc::Receiver<Request>,
    waiting: Arc<AtomicUsize>,
    cancel: CancellationToken,
) {
    let mut done_not_marked: Vec<(String, String)> = Vec::new();
    let durable = DurableDirs::default();
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = cancel.cancelled() => {
                // Stop taking new requests, answer the ones already queued.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        waiting.fetch_sub(batch.len(), Ordering::AcqRel);
        let marked = std::mem::take(&mut done_not_marked);
        commit_batch(
            &store,
            &layout,
            &usage,
            &durable,
            batch,
            marked,
            &mut done_not_marked,
        )
        .await;
        if rx.is_empty() && !done_not_marked.is_empty() {
            // Idle: record now that these files are written, or a crash before the next
            // post would rewrite them at start-up, after an ETL job may have taken them.
            let marks = std::mem::take(&mut done_not_marked);
            if let Err(e) = store.mark_files_done(marks.clone()).await {
                tracing::warn!(error = %e, "could not mark written files; retrying with the next batch");
                done_not_marked = marks;
            }
        }
    }
    if let Err(e) = store.mark_files_done(done_not_marked).await {
        tracing::warn!(error = %e, "could not mark the last files as written; they will be rewritten at the next start");
    }
}

async fn commit_batch(
    store: &Arc<dyn Store>,
    layout: &Layout,
    usage: &Usage,
    durable: &DurableDirs,
    mut batch: Vec<Request>,
    marked: Vec<(String, String)>,
    done: &mut Vec<(String, String)>,
) {
    let started = Instant::now();
    let n = batch.len();
    // Quota: each event's room is reserved here, in batch order, before anything is
    // written — one check-and-charge under one lock, so concurrent posts never all pass.
    let mut reserved: Vec<Option<(u64, u64)>> = vec![None; n];
    let mut over: Vec<Option<String>> = vec![None; n];
    for (i, r) in batch.iter_mut().enumerate() {
        let ev = &mut r.event;
        if ev.files.is_empty() || ev.defer_files {
            continue;
        }
        let files = ev.files.len() as u64;
        let bytes = files * (ev.envelope_json.len() as u64 + 1);
        match usage.reserve(&ev.org, ev.quota.unwrap_or_default(), files, bytes) {
            Ok(()) => reserved[i] = Some((files, bytes)),
            Err(why) => {
                ev.defer_files = true;
                over[i] = Some(why);
            }
        }
    }
    let settle = |i: usize, ev: &NewEvent, placed: bool| {
        if let Some((files, bytes)) = reserved[i] {
            usage.settle(&ev.org, files, bytes, placed);
        }
    };
    let events: Vec<NewEvent> = batch.iter().map(|r| r.event.clone()).collect();
    let writes = {
        let layout = layout.clone();
        let events = events.clone();
        tokio::task::spawn_blocking(move || write_temps(&layout, &events))
    };
    let (commit, temps) = tokio::join!(store.commit_events(events, marked.clone()), writes);
    let temps = temps.unwrap_or_else(|e| Err(SpoolError::Io(e.to_string())));
    let outcomes = match commit {
        Ok(o) => o,
        Err(e) => {
            if let Ok(t) = temps {
                discard(t);
            }
            // The marks were not applied: keep them for the next batch.
            done.extend(marked);
            let e = SpoolError::from(e);
            tracing::error!(error = %e, events = n, "state commit failed; events refused");
            for (i, r) in batch.into_iter().enumerate() {
                settle(i, &r.event, false);
                let _ = r.reply.send(Err(clone_err(&e)));
            }
            return;
        }
    };

    // Events whose files must now appear: new ones (their temps are written), and known
    // ones left pending earlier (`redo`: written now from the envelope first recorded).
    let mut publish = Vec::new();
    let mut redo = Vec::new();
    let mut replies: Vec<Result<Committed, SpoolError>> = Vec::with_capacity(n);
    let deferred = |i: usize| {
        over[i]
            .clone()
            .unwrap_or_else(|| "the org is over its quota".into())
    };
    for (i, out) in outcomes.into_iter().enumerate() {
        let ev = &batch[i].event;
        match out {
            CommitOutcome::New(r) if ev.defer_files => {
                replies.push(Ok(Committed::Deferred(r, deferred(i))))
            }
            CommitOutcome::Known {
                result,
                pending_envelope: Some(_),
            } if ev.defer_files => replies.push(Ok(Committed::Deferred(result, deferred(i)))),
            CommitOutcome::New(r) => {
                publish.push(i);
                replies.push(Ok(Committed::New(r)));
            }
            CommitOutcome::Known {
                result,
                pending_envelope: Some(envelope_json),
            } => {
                redo.push((
                    i,
                    NewEvent {
                        org: ev.org.clone(),
                        id: ev.id.clone(),
                        envelope_json,
                        files: result.files.clone(),
                        deliveries: vec![],
                        defer_files: false,
                        quota: None,
                    },
                ));
                publish.push(i);
                replies.push(Ok(Committed::Known(result)));
            }
            CommitOutcome::Known {
                result,
                pending_envelope: None,
            } => {
                // Already on disk: nothing new to hold.
                settle(i, ev, false);
                replies.push(Ok(Committed::Known(result)));
            }
        }
    }

    let placed = match temps {
        Ok(temps) => {
            let (layout, durable, publish_set) = (layout.clone(), durable.clone(), publish.clone());
            tokio::task::spawn_blocking(move || {
                let temps = with_redo(&layout, temps, redo)?;
                Ok(publish_temps(&layout, &durable, temps, &publish_set))
            })
            .await
            .unwrap_or_else(|e| Err(SpoolError::Io(e.to_string())))
        }
        Err(e) => Err(e),
    };
    match placed {
        Ok(placed) => {
            metrics::counter!("hookbridge_files_written_total").increment(placed.files as u64);
            for &i in &publish {
                let ev = &batch[i].event;
                if let Some(e) = placed.failed.get(&i) {
                    tracing::error!(org = %ev.org, event_id = %ev.id, error = %e,
                        "event files could not be written; the event stays pending and is written on repost or at the next start");
                    replies[i] = Err(clone_err(e));
                    settle(i, ev, false);
                    continue;
                }
                settle(i, ev, true);
                done.push((ev.org.clone(), ev.id.clone()));
            }
        }
        Err(e) => {
            for &i in &publish {
                settle(i, &batch[i].event, false);
            }
            fail_published(&e, &publish, &mut replies)
        }
    }
    metrics::histogram!("hookbridge_group_commit_batch_size").record(n as f64);
    metrics::histogram!("hookbridge_group_commit_seconds").record(started.elapsed().as_secs_f64());
    for (r, reply) in batch.into_iter().zip(replies) {
        let _ = r.reply.send(reply);
    }
}

/// Swaps the fresh temps of events left pending earlier for temps of the envelope first
/// recorded (`redo`, with the batch index of each), so a retry never changes a file.
fn with_redo(
    layout: &Layout,
    mut temps: Vec<Temp>,
    redo: Vec<(usize, NewEvent)>,
) -> Result<Vec<Temp>, SpoolError> {
    if redo.is_empty() {
        return Ok(temps);
    }
    let (index, events): (Vec<usize>, Vec<NewEvent>) = redo.into_iter().unzip();
    let mut extra = match write_temps(layout, &events) {
        Ok(extra) => extra,
        Err(e) => {
            discard(temps);
            return Err(e);
        }
    };
    for t in &mut extra {
        t.event = index[t.event];
    }
    temps.retain(|t| {
        let keep = !index.contains(&t.event);
        if !keep {
            let _ = fs::remove_file(&t.tmp);
        }
        keep
    });
    temps.extend(extra);
    Ok(temps)
}

fn fail_published(
    e: &SpoolError,
    publish: &[usize],
    replies: &mut [Result<Committed, SpoolError>],
) {
    tracing::error!(error = %e, events = publish.len(),
        "event files could not be written; the events stay pending and are written on repost or at the next start");
    for &i in publish {
        replies[i] = Err(clone_err(e));
    }
}

fn clone_err(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::DiskFull => SpoolError::DiskFull,
        SpoolError::Overloaded => SpoolError::Overloaded,
        SpoolError::ShuttingDown => SpoolError::ShuttingDown,
        SpoolError::Store(s) => SpoolError::Store(s.clone()),
        SpoolError::Io(s) => SpoolError::Io(s.clone()),
    }
}

/// One temp file per (event, path); `event` indexes the batch. `body` is kept so that a
/// file whose folder vanished before it was durable can be placed again.
struct Temp {
    event: usize,
    tmp: PathBuf,
    target: PathBuf,
    body: Arc<str>,
}

/// Threads that write and fdatasync temps side by side: concurrent fdatasyncs on one
/// file system share journal commits, which one thread calling them in turn cannot.
const SYNC_THREADS: usize = 4;

fn write_temps(layout: &Layout, events: &[NewEvent]) -> Result<Vec<Temp>, SpoolError> {
    let mut temps = Vec::new();
    for (i, ev) in events.iter().enumerate().filter(|(_, ev)| !ev.defer_files) {
        let body: Arc<str> = Arc::from(ev.envelope_json.as_str());
        for path in &ev.files {
            temps.push(Temp {
                event: i,
                tmp: layout.new_temp(),
                target: layout.target(&ev.org, path),
                body: body.clone(),
            });
        }
    }
    let chunk = temps.len().div_ceil(SYNC_THREADS).max(8);
    let results: Vec<io::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = temps
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .try_for_each(|t| write_synced(&t.tmp, t.body.as_bytes()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")))
            })
            .collect()
    });
    if let Some(e) = results.into_iter().find_map(Result::err) {
        discard(temps);
        return Err(io_err(e));
    }
    Ok(temps)
}

fn write_synced(path: &Path, body: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(body)?;
    f.write_all(b"\n")?;
    let t = Instant::now();
    f.sync_data()?;
    metrics::histogram!("hookbridge_fsync_seconds", "what" => "file")
        .record(t.elapsed().as_secs_f64());
    Ok(())
}

fn discard(temps: Vec<Temp>) {
    for t in temps {
        let _ = fs::remove_file(&t.tmp);
    }
}

/// Writes the files of events recorded but not finished before a crash or a full disk.
pub async fn recover(store: &Arc<dyn Store>, layout: &Layout) -> Result<usize, SpoolError> {
    let pending = store.pending_files().await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let n = pending.len();
    let layout = layout.clone();
    let done = tokio::task::spawn_blocking(move || -> Result<Vec<(String, String)>, SpoolError> {
        let events: Vec<NewEvent> = pending
            .into_iter()
            .map(|p| NewEvent {
                org: p.org,
                id: p.id,
                envelope_json: p.envelope_json,
                files: p.files,
                deliveries: vec![],
                defer_files: false,
                quota: None,
            })
            .collect();
        let temps = write_temps(&layout, &events)?;
        let all: Vec<usize> = (0..events.len()).collect();
        let placed = publish_temps(&layout, &DurableDirs::default(), temps, &all);
        if let Some(e) = placed.failed.values().next() {
            return Err(clone_err(e));
        }
        Ok(events.into_iter().map(|e| (e.org, e.id)).collect())
    })
    .await
    .map_err(|e| SpoolError::Io(e.to_string()))??;
    store.mark_files_done(done).await?;
    tracing::info!(
        events = n,
        "wrote files of events accepted before the last stop"
    );
    Ok(n)
}
