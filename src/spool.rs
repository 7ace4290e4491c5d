//! Durable event files with group commit.
//!
//! Every accepted event goes through one committer task. It takes whatever requests are
//! waiting (a batch), and for the batch as a whole:
//!   1. stages every file in the org storage (local: a temp copy fdatasync'd) while the
//!      store records the events and their delivery jobs in one fsync'd transaction;
//!   2. publishes the files of the events the store took, create-only (local: renames
//!      the temps into the org folders and fsyncs each folder once; S3: one conditional
//!      PUT per file), so readers only ever see complete files;
//!
//! and only then answers all requests. Concurrent posts share one commit, so durability
//! costs one round of syncs per batch, not per event. Each event stands on its own: one
//! org's folders (moved or removed by its SFTP users) never fail another org's events.
//!
//! The store commit comes first logically: if the process dies after it but before the
//! files are published, `recover()` at the next start (on any node sharing the store)
//! writes the files of every event still marked as pending, so nothing that was
//! acknowledged is lost; create-only writes make a rewrite of a file already there a no-op.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::delivery::{Announcer, Handed};
use crate::storage::{EventFile, OrgName, Storage, StorageError, StoragePath, StorageResult};
use crate::store::{CommitOutcome, IngestResult, NewEvent, Store, StoreError, Webhook};

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
    /// The state store cannot be reached (PostgreSQL down): retry later.
    #[error("state store unavailable: {0}")]
    StoreUnavailable(String),
    /// The org storage cannot be reached (S3 down): retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("file system: {0}")]
    Io(String),
}

impl From<StoreError> for SpoolError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DiskFull => SpoolError::DiskFull,
            StoreError::Unavailable(m) => SpoolError::StoreUnavailable(m),
            other => SpoolError::Store(other.to_string()),
        }
    }
}

impl From<StorageError> for SpoolError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NoSpace => SpoolError::DiskFull,
            StorageError::Unavailable(m) => SpoolError::Unavailable(m),
            other => SpoolError::Io(other.to_string()),
        }
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
    /// The webhooks of `event.deliveries`, as the request read them: handed to the
    /// scheduler with the jobs, so a new job needs no read of the store.
    hooks: Vec<Webhook>,
    reply: oneshot::Sender<Result<Committed, SpoolError>>,
}

#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Request>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl Spool {
    /// Starts the committer; it stops after `cancel` once every queued request is answered.
    pub fn start(
        store: Arc<dyn Store>,
        storage: Arc<dyn Storage>,
        max_waiting: usize,
        announce: Announcer,
        cancel: CancellationToken,
    ) -> (Spool, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(max_waiting.max(1));
        let waiting = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(committer(
            store,
            storage,
            rx,
            waiting.clone(),
            announce,
            cancel,
        ));
        (
            Spool {
                tx,
                waiting,
                max_waiting,
            },
            task,
        )
    }

    /// Commits `event`; `hooks` holds the webhooks its deliveries go to.
    pub async fn submit(
        &self,
        event: NewEvent,
        hooks: Vec<Webhook>,
    ) -> Result<Committed, SpoolError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SpoolError::Overloaded);
        }
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(Request {
                event,
                hooks,
                reply,
            })
            .await;
        if sent.is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SpoolError::ShuttingDown);
        }
        rx.await.unwrap_or(Err(SpoolError::ShuttingDown))
    }
}

async fn committer(
    store: Arc<dyn Store>,
    storage: Arc<dyn Storage>,
    mut rx: mpsc::Receiver<Request>,
    waiting: Arc<AtomicUsize>,
    announce: Announcer,
    cancel: CancellationToken,
) {
    let mut done_not_marked: Vec<(String, String)> = Vec::new();
    // When publishing failed (S3 down, disk full), the events stay pending in the store:
    // this node writes them once the storage is back, without waiting for a repost.
    // Besides, every REPAIR_EVERY it writes what any node left pending (a node that died
    // between its store commit and its mark): safe on several nodes at once, since writes
    // are create-only and paths users took are left out.
    let mut repair_at: Option<tokio::time::Instant> =
        Some(tokio::time::Instant::now() + REPAIR_EVERY);
    loop {
        let repair = async {
            match repair_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = cancel.cancelled() => {
                // Stop taking new requests, answer the ones already queued.
                rx.close();
                rx.recv().await
            }
            _ = repair => {
                repair_at = repair_pending(&store, &storage, &mut done_not_marked).await;
                continue;
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
        let (fresh_jobs, failed) = commit_batch(
            &store,
            &storage,
            &announce,
            batch,
            marked,
            &mut done_not_marked,
        )
        .await;
        // Durable and answered: the scheduler sends them without polling the store.
        announce.hand_over(fresh_jobs);
        if failed {
            let soon = tokio::time::Instant::now() + REPAIR_FIRST;
            repair_at = Some(repair_at.map_or(soon, |t| t.min(soon)));
        }
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

/// First repair after a failed publish, and the pause between repairs that fail again.
const REPAIR_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
const REPAIR_AGAIN: std::time::Duration = std::time::Duration::from_secs(15);
/// The periodic repair of events left pending by any node sharing the store.
const REPAIR_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes the files of events left pending. Files this node wrote but has not yet marked
/// are marked first: pending then means "never written", so a file an ETL job already
/// took is never written again. Returns when to try again, if needed.
async fn repair_pending(
    store: &Arc<dyn Store>,
    storage: &Arc<dyn Storage>,
    done_not_marked: &mut Vec<(String, String)>,
) -> Option<tokio::time::Instant> {
    let again = Some(tokio::time::Instant::now() + REPAIR_AGAIN);
    let marks = std::mem::take(done_not_marked);
    if let Err(e) = store.mark_files_done(marks.clone()).await {
        *done_not_marked = marks;
        tracing::warn!(error = %e, "repair of pending event files waits: cannot mark written files");
        return again;
    }
    match recover(store, storage).await {
        Ok(_) => Some(tokio::time::Instant::now() + REPAIR_EVERY),
        Err(e) => {
            tracing::warn!(error = %e, "pending event files still cannot be written; retrying");
            again
        }
    }
}

/// Commits and answers one batch; returns the jobs its commit inserted, for the committer
/// to hand to the scheduler, and whether any event's files failed.
async fn commit_batch(
    store: &Arc<dyn Store>,
    storage: &Arc<dyn Storage>,
    announce: &Announcer,
    mut batch: Vec<Request>,
    marked: Vec<(String, String)>,
    done: &mut Vec<(String, String)>,
) -> (Handed, bool) {
    let started = Instant::now();
    let n = batch.len();
    // One accept time per batch, taken here rather than in the request handler, so that
    // an event's roll-up partition is the one open when its line becomes durable.
    let accepted = crate::clock::now();
    for r in batch.iter_mut() {
        let ev = &mut r.event;
        ev.accepted_at = Some(accepted);
        if let Some(kind) = ev.kind {
            ev.lines = crate::rollups::stage(&ev.rollups, kind, accepted);
        }
    }
    let events: Vec<NewEvent> = batch.iter().map(|r| r.event.clone()).collect();
    let job_ids = || {
        batch
            .iter()
            .flat_map(|r| r.event.deliveries.iter().map(|(d, _)| d.as_str()))
    };
    // No poll hands these jobs out from the moment they are committed: they are ours.
    announce.reserve(job_ids());
    // Staged while the store commits; the store charges each event to its org's quota in
    // the commit itself, and what it defers is dropped with the rest not published.
    let (files, owner) = event_files(&events);
    let (commit, staged) = tokio::join!(
        store.commit_and_claim(events, marked.clone(), Some(announce.lease())),
        storage.stage_events(files)
    );
    let commit = match commit {
        Ok(c) => c,
        Err(e) => {
            drop(staged);
            announce.release(job_ids());
            // The marks were not applied: keep them for the next batch.
            done.extend(marked);
            let e = SpoolError::from(e);
            tracing::error!(error = %e, events = n, "state commit failed; events refused");
            for r in batch {
                let _ = r.reply.send(Err(clone_err(&e)));
            }
            return (
                Handed {
                    since: started,
                    jobs: Vec::new(),
                },
                false,
            );
        }
    };

    // The jobs the commit inserted are durable now (new events, deferred ones too): the
    // committer hands them over once the files are in place as well (a receiver may go
    // and fetch them).
    let fresh_jobs = announce.committed(
        started,
        &commit,
        accepted,
        batch.iter().map(|r| (&r.event, r.hooks.as_slice())),
    );
    let outcomes = commit.outcomes;

    // Events whose files must now appear: new ones (their temps are written), and known
    // ones left pending earlier (`redo`: written now from the envelope first recorded).
    let mut publish = Vec::new();
    let mut redo = Vec::new();
    let mut replies: Vec<Result<Committed, SpoolError>> = Vec::with_capacity(n);
    for (i, out) in outcomes.into_iter().enumerate() {
        let ev = &batch[i].event;
        match out {
            CommitOutcome::Deferred { result, why } => {
                replies.push(Ok(Committed::Deferred(result, why)))
            }
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
                        quota: None,
                        kind: None,
                        rollups: vec![],
                        lines: vec![],
                        accepted_at: None,
                    },
                ));
                publish.push(i);
                replies.push(Ok(Committed::Known(result)));
            }
            CommitOutcome::Known {
                result,
                pending_envelope: None,
            } => {
                replies.push(Ok(Committed::Known(result)));
            }
        }
    }

    // Staged files of the events published as first posted; events left pending earlier
    // are written again from the envelope first recorded, so a retry never changes a file.
    let redo_set: Vec<usize> = redo.iter().map(|(i, _)| *i).collect();
    let keep: Vec<bool> = owner
        .iter()
        .map(|i| publish.contains(i) && !redo_set.contains(i))
        .collect();
    let mut results = staged.publish(keep).await;
    let mut owners = owner;
    if !redo.is_empty() {
        let (index, events): (Vec<usize>, Vec<NewEvent>) = redo.into_iter().unzip();
        let (files, of) = event_files(&events);
        results.extend(storage.write_events(&files).await);
        owners.extend(of.into_iter().map(|k| index[k]));
    }
    let failed = failures(&owners, results, n);
    let mut written = 0u64;
    let any_failed = publish.iter().any(|&i| failed[i].is_some());
    for &i in &publish {
        let ev = &batch[i].event;
        if let Some(e) = &failed[i] {
            tracing::error!(org = %ev.org, event_id = %ev.id, error = %e,
                "event files could not be written; the event stays pending and is written on repost or at the next start");
            // Still charged: the event's files stay owed, and are written by a repair.
            replies[i] = Err(clone_err(e));
            continue;
        }
        written += ev.files.len() as u64;
        done.push((ev.org.clone(), ev.id.clone()));
    }
    metrics::counter!("hookbridge_files_written_total").increment(written);
    metrics::histogram!("hookbridge_group_commit_batch_size").record(n as f64);
    metrics::histogram!("hookbridge_group_commit_seconds").record(started.elapsed().as_secs_f64());
    for (r, reply) in batch.into_iter().zip(replies) {
        let _ = r.reply.send(reply);
    }
    (fresh_jobs, any_failed)
}

fn clone_err(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::DiskFull => SpoolError::DiskFull,
        SpoolError::Overloaded => SpoolError::Overloaded,
        SpoolError::ShuttingDown => SpoolError::ShuttingDown,
        SpoolError::Store(s) => SpoolError::Store(s.clone()),
        SpoolError::StoreUnavailable(s) => SpoolError::StoreUnavailable(s.clone()),
        SpoolError::Unavailable(s) => SpoolError::Unavailable(s.clone()),
        SpoolError::Io(s) => SpoolError::Io(s.clone()),
    }
}

/// The files of `events`, and for each the index of its event.
/// A path that is not a plain relative path (it comes from a validated template, so
/// this is a bug) fails its event alone.
fn event_files(events: &[NewEvent]) -> (Vec<EventFile>, Vec<usize>) {
    let mut files = Vec::new();
    let mut owner = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        let Ok(org) = OrgName::new(&ev.org) else {
            continue;
        };
        let mut body = Vec::with_capacity(ev.envelope_json.len() + 1);
        body.extend_from_slice(ev.envelope_json.as_bytes());
        body.push(b'\n');
        let body = Bytes::from(body);
        for path in &ev.files {
            let Ok(path) = StoragePath::parse(path) else {
                continue;
            };
            files.push(EventFile {
                org: org.clone(),
                path,
                body: body.clone(),
            });
            owner.push(i);
        }
    }
    (files, owner)
}

/// Per event of a batch of `n`: the first failure among its files, if any. An event
/// whose files could not all be made (bad path or org name) fails too.
fn failures(owner: &[usize], results: Vec<StorageResult<()>>, n: usize) -> Vec<Option<SpoolError>> {
    let mut failed: Vec<Option<SpoolError>> = (0..n).map(|_| None).collect();
    for (&i, r) in owner.iter().zip(results) {
        if let (Err(e), true) = (r, failed[i].is_none()) {
            failed[i] = Some(SpoolError::from(e));
        }
    }
    failed
}

/// Writes the files of events recorded but not finished before a crash, a full disk or
/// an S3 outage. Any node sharing the store may do it: writes are create-only.
pub async fn recover(
    store: &Arc<dyn Store>,
    storage: &Arc<dyn Storage>,
) -> Result<usize, SpoolError> {
    let pending = store.pending_files().await?;
    repair(store, storage, pending).await
}

/// Writes the missing files of `pending`, read from the store a moment ago. A user may
/// take one of them (SFTP records the take, then deletes) between that read and the write:
/// a file this repair created is checked against the takes after it is written, and
/// removed again if taken. Files already there are not written at all.
async fn repair(
    store: &Arc<dyn Store>,
    storage: &Arc<dyn Storage>,
    pending: Vec<crate::store::PendingFiles>,
) -> Result<usize, SpoolError> {
    if pending.is_empty() {
        return Ok(0);
    }
    let n = pending.len();
    let events: Vec<NewEvent> = pending
        .into_iter()
        .map(|p| NewEvent {
            org: p.org,
            id: p.id,
            envelope_json: p.envelope_json,
            files: p.files,
            deliveries: vec![],
            quota: None,
            kind: None,
            rollups: vec![],
            lines: vec![],
            accepted_at: None,
        })
        .collect();
    let (files, owner) = event_files(&events);
    // Missing, there, or unknown (storage unreachable: that event stays pending).
    let mut missing = Vec::with_capacity(files.len());
    let mut unknown: Vec<Option<StorageError>> = Vec::with_capacity(files.len());
    for f in &files {
        let (m, u) = match storage.stat(&f.org, &f.path).await {
            Ok(_) => (false, None),
            Err(StorageError::NotFound) => (true, None),
            Err(e) => (false, Some(e)),
        };
        missing.push(m);
        unknown.push(u);
    }
    let to_write: Vec<EventFile> = files
        .iter()
        .zip(&missing)
        .filter(|(_, m)| **m)
        .map(|(f, _)| f.clone())
        .collect();
    let mut wrote = storage.write_events(&to_write).await.into_iter();
    let results: Vec<StorageResult<()>> = missing
        .iter()
        .zip(unknown)
        .map(|(m, u)| match (m, u) {
            (true, _) => wrote.next().unwrap_or(Ok(())),
            (false, Some(e)) => Err(e),
            (false, None) => Ok(()),
        })
        .collect();
    for (f, _) in files
        .iter()
        .zip(missing.iter().zip(&results))
        .filter(|(_, (m, r))| **m && r.is_ok())
    {
        let vpath = f.path.virtual_path();
        let taken = store
            .taken_paths(f.org.as_str(), vec![vpath.clone()])
            .await?;
        if !taken.is_empty() {
            tracing::info!(org = %f.org.as_str(), path = %vpath, "a repair re-created a file a user took meanwhile; removing it");
            match storage.delete(&f.org, &f.path).await {
                Ok(()) | Err(StorageError::NotFound) => {}
                Err(e) => return Err(SpoolError::from(e)),
            }
        }
    }
    let failed = failures(&owner, results, events.len());
    let mut done = Vec::new();
    let mut first_err = None;
    for (ev, f) in events.into_iter().zip(failed) {
        match f {
            None => done.push((ev.org, ev.id)),
            Some(e) => {
                tracing::warn!(org = %ev.org, event_id = %ev.id, error = %e, "event files still not written; retrying later");
                first_err.get_or_insert(e);
            }
        }
    }
    let written = done.len();
    store.mark_files_done(done).await?;
    if written > 0 {
        tracing::info!(
            events = written,
            "wrote files of events accepted before the last stop"
        );
    }
    match first_err {
        Some(e) if written == 0 => Err(e),
        _ => Ok(n),
    }
}

#[cfg(test)]
#[path = "spool_repair_tests.rs"]
mod repair_tests;
