//! The closer: writes partitions whose period plus `close_after` has passed. See the
//! module docs of [`crate::rollups`] for why a crash anywhere still gives exactly once.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{build_parts, ROOT};
use crate::storage::{EventFile, OrgName, StoragePath};
use crate::store::PartitionRef;
use crate::App;

/// How often the closer looks for due partitions (real time).
const TICK: Duration = Duration::from_secs(1);
/// How long a claim holds (real time): long enough to write a day of parts; a node that
/// died holding it leaves the partition to others after this.
const LEASE: Duration = Duration::from_secs(600);
/// Partitions taken per pass.
const BATCH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
}

pub async fn run(app: App, cancel: CancellationToken) -> Result<(), String> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(TICK) => {}
        }
        if let Err(e) = pass(&app, &cancel).await {
            tracing::warn!(error = %e, "roll-up closer pass failed; retrying at the next tick");
        }
    }
}

/// Closes what is due now; returns how many partitions it closed.
pub async fn pass(app: &App, cancel: &CancellationToken) -> Result<usize, CloseError> {
    let mut closed = 0;
    loop {
        let now = crate::clock::now();
        let due = app.store.due_partitions(now, BATCH).await?;
        if due.is_empty() {
            break;
        }
        let mut any = false;
        for p in due {
            if cancel.is_cancelled() {
                return Ok(closed);
            }
            let now = crate::clock::now();
            let until = now + crate::clock::simulated(LEASE);
            if !app
                .store
                .claim_partition(&p, &app.config.node_id, now, until)
                .await?
            {
                continue;
            }
            any = true;
            match close(app, &p).await {
                Ok(()) => closed += 1,
                Err(e) => {
                    // The lease runs out and a later pass (here or on another node) redoes
                    // it; the lines stay staged meanwhile.
                    tracing::warn!(org = %p.org, hook = %p.hook, partition = %p.partition,
                        error = %e, "roll-up partition could not be closed; it will be redone");
                }
            }
        }
        if !any {
            break;
        }
    }
    let (staged, earliest) = app.store.rollup_backlog().await?;
    metrics::gauge!("hookbridge_rollup_staged_lines").set(staged as f64);
    let lag = earliest
        .map(|t| (crate::clock::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    metrics::gauge!("hookbridge_rollup_lag_seconds").set(lag);
    Ok(closed)
}

/// Writes one claimed partition from ALL its lines (a first close, a redo after a crash,
/// a rebuild by replay and a close after a late line are one and the same path):
///
/// 1. `_SUCCESS` goes first: from then on the SFTP view hides the partition
///    ([`crate::storage::complete_view`]), so no reader sees it half written;
/// 2. every file left in the folder by an earlier (possibly crashed) build goes;
/// 3. parts, `_manifest.json`, then `_SUCCESS` are written, create-only;
/// 4. the store marks the lines closed (kept for rebuilds) and drops the lease.
///
/// Why not write under a staging prefix and rename: S3 has no atomic rename (a copy per
/// part, visible one by one), so the marker is what makes a partition visible on both
/// backends. A kill -9 anywhere leaves the lines open and the partition hidden; the redo
/// clears and writes the same bytes under the same names.
async fn close(app: &App, p: &PartitionRef) -> Result<(), CloseError> {
    let lines = app.store.partition_lines(p).await?;
    let Some(through) = lines.last().map(|l| l.seq) else {
        return Ok(());
    };
    let now = crate::clock::now();
    let hook = app.store.get_webhook(&p.org, &p.hook).await?;
    let Some(hook) = hook else {
        // The hook (or its org) is gone: nothing to write for.
        tracing::info!(org = %p.org, hook = %p.hook, partition = %p.partition, lines = lines.len(),
            "roll-up hook removed; dropping its staged lines");
        app.store.close_partition(p, through, 0, 0, now).await?;
        return Ok(());
    };
    // A hook switched back to per-event files still gets what was staged (202'd) for it.
    let max_part_bytes = hook
        .rollup
        .map_or(super::DEFAULT_MAX_PART_BYTES, |r| r.max_part_bytes);
    let closed_before = lines.iter().any(|l| l.closed_before);
    let org = OrgName::new(&p.org)?;
    let folder = format!("{ROOT}/{}", p.partition);
    let rows: Vec<_> = lines
        .into_iter()
        .map(|l| (l.accepted_at, l.envelope))
        .collect();
    let Some((parts, manifest)) = build_parts(&rows, max_part_bytes) else {
        return Ok(());
    };
    let file = |name: &str, body: Bytes| -> Result<EventFile, CloseError> {
        Ok(EventFile {
            org: org.clone(),
            path: StoragePath::parse(&format!("{folder}/{name}"))?,
            body,
        })
    };
    let bytes: u64 = parts.iter().map(|p| p.body.len() as u64).sum();
    let mut m = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    m.push(b'\n');
    let manifest_len = m.len() as u64;
    let dir = StoragePath::parse(&folder)?;
    // A first close that died after its `_SUCCESS` and before the store commit: the
    // complete partition is there (same manifest, marker last), so it stays visible.
    let (gone_files, gone_bytes) = if !closed_before && complete_as(app, &org, &dir, &m).await {
        (0, 0)
    } else {
        let gone = clear(app, &org, &dir).await?;
        let part_files = parts
            .iter()
            .map(|part| file(&part.name, part.body.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        write(app, &part_files).await?;
        write(app, &[file("_manifest.json", Bytes::from(m))?]).await?;
        write(app, &[file("_SUCCESS", Bytes::new())?]).await?;
        gone
    };
    app.store
        .close_partition(p, through, manifest.events, bytes, now)
        .await?;
    // Quotas count what the org folder holds; retention and SFTP see these files as any.
    // Counted after the close commits: a crash in between under-counts until a recount
    // (`POST …/usage/recount`), it never charges a partition twice. A rebuild takes out
    // what it removed of the earlier close (counted then); what a crashed first close
    // left was never counted. A kill -9 in the middle of a rebuild can leave the count off
    // by that partition's files (what the crashed rebuild removed is never taken out);
    // a recount fixes it, as for any crash between the files and the count.
    let (out_files, out_bytes) = if closed_before {
        (gone_files as i64, gone_bytes as i64)
    } else {
        (0, 0)
    };
    if let Err(e) = app
        .store
        .add_org_usage(
            &p.org,
            parts.len() as i64 + 2 - out_files,
            (bytes + manifest_len) as i64 - out_bytes,
        )
        .await
    {
        tracing::warn!(org = %p.org, error = %e, "roll-up files not counted in the org's usage");
    }
    metrics::counter!("hookbridge_rollup_partitions_closed_total").increment(1);
    metrics::counter!("hookbridge_rollup_lines_total").increment(manifest.events);
    metrics::counter!("hookbridge_rollup_bytes_total").increment(bytes);
    if closed_before {
        metrics::counter!("hookbridge_rollup_partitions_rebuilt_total").increment(1);
    }
    tracing::info!(target: "audit", event = if closed_before { "rollup_rebuilt" } else { "rollup_closed" },
        org = %p.org, hook = %p.hook, partition = %folder, events = manifest.events,
        parts = parts.len(), bytes, "roll-up partition closed");
    Ok(())
}

/// Removes `_SUCCESS` (first: the partition is hidden from then on), then every other
/// file directly in `folder` (not sub-folders: a daily partition's folder may hold hourly
/// ones of an earlier `rollup` setting). Returns the files and bytes removed.
async fn clear(app: &App, org: &OrgName, folder: &StoragePath) -> Result<(u64, u64), CloseError> {
    let mut gone = (0u64, 0u64);
    let mut remove = |size: u64| {
        gone.0 += 1;
        gone.1 += size;
    };
    let success = folder.join("_SUCCESS")?;
    match app.storage.stat(org, &success).await {
        Ok(m) => {
            delete(app, org, &success).await?;
            remove(m.size);
        }
        Err(crate::storage::StorageError::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let mut lister = match app.storage.list(org, folder).await {
        Ok(l) => l,
        Err(crate::storage::StorageError::NotFound) => return Ok(gone),
        Err(e) => return Err(e.into()),
    };
    let mut files = Vec::new();
    while let Some(page) = lister.next_page().await? {
        files.extend(page.into_iter().filter(|e| e.meta.is_file()));
    }
    for f in files {
        delete(app, org, &folder.join(&f.name)?).await?;
        remove(f.meta.size);
    }
    Ok(gone)
}

/// Whether `folder` holds `_SUCCESS` and a `_manifest.json` of exactly `manifest`.
async fn complete_as(app: &App, org: &OrgName, folder: &StoragePath, manifest: &[u8]) -> bool {
    let (Ok(success), Ok(mpath)) = (folder.join("_SUCCESS"), folder.join("_manifest.json")) else {
        return false;
    };
    if app.storage.stat(org, &success).await.is_err() {
        return false;
    }
    crate::storage::read_small(&*app.storage, org, &mpath, manifest.len() + 1)
        .await
        .is_ok_and(|b| b[..] == *manifest)
}

async fn delete(app: &App, org: &OrgName, path: &StoragePath) -> Result<(), CloseError> {
    match app.storage.delete(org, path).await {
        Ok(()) | Err(crate::storage::StorageError::NotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write(app: &App, files: &[EventFile]) -> Result<(), CloseError> {
    for r in app.storage.write_events(files).await {
        r?;
    }
    Ok(())
}
