//! The sweeper: removes files past each org's retention and counts them out of the
//! org's usage in the store (where every event file, upload, delete and rename is
//! counted as it happens, so that quotas hold across nodes without listing).
//!
//! It works through the storage seam, so it serves local disk and S3 alike, and every
//! removal is resolved beneath the org root with no symlink at any step. Whether a file
//! was downloaded comes from the store (SFTP records each download as it happens), not
//! from atime, which `noatime`/`relatime` mounts and S3 do not keep.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::EffectiveLimits;
use crate::limits::OrgUsage;
use crate::storage::{OrgName, Storage, StorageError, StoragePath};
use crate::App;

/// The completion marker of a roll-up partition.
const MARKER: &str = crate::storage::complete_view::SUCCESS;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepStats {
    pub usage: OrgUsage,
    pub removed: u64,
    pub removed_bytes: u64,
    pub removed_undownloaded: u64,
    pub kept_undownloaded: u64,
    /// Virtual paths removed (their download records can go).
    pub removed_paths: Vec<String>,
}

/// Walks one org folder; removes expired files per `limits`, counts what stays.
/// `downloaded`: virtual paths (`/a/b.json`) known to have been downloaded.
pub async fn sweep_org(
    storage: &dyn Storage,
    org: &OrgName,
    limits: &EffectiveLimits,
    downloaded: &HashSet<String>,
    now: SystemTime,
) -> Result<SweepStats, StorageError> {
    let cutoff = (limits.retention_days > 0)
        .then(|| {
            now.checked_sub(Duration::from_secs(
                u64::from(limits.retention_days) * 86400,
            ))
        })
        .flatten();
    let mut stats = SweepStats::default();
    let mut emptied: BTreeSet<StoragePath> = BTreeSet::new();
    // A folder with a `_SUCCESS` (a roll-up partition) expires whole, with its marker's
    // time, and the marker goes first: readers never see a "complete" partition with
    // parts missing (the SFTP view hides a partition without its marker).
    let mut files = storage.walk(org).await?;
    files.sort_by_key(|f| f.path.name() != Some(MARKER));
    let marked: std::collections::HashMap<StoragePath, SystemTime> = files
        .iter()
        // Only roll-up partitions: a `_SUCCESS` an uploader (or Spark) left in its own
        // folder says nothing of the files beside it.
        .filter(|f| {
            f.path.name() == Some(MARKER)
                && f.path
                    .virtual_path()
                    .starts_with(&format!("{}/", crate::rollups::ROOT))
        })
        .filter_map(|f| Some((f.path.parent()?, f.mtime)))
        .collect();
    for f in files {
        let mtime = f
            .path
            .parent()
            .and_then(|p| marked.get(&p).copied())
            .unwrap_or(f.mtime);
        let expired = cutoff.is_some_and(|c| mtime < c);
        if expired {
            let virt = f.path.virtual_path();
            let was_downloaded = downloaded.contains(&virt);
            if was_downloaded || limits.retention_removes_undownloaded {
                match storage.delete(org, &f.path).await {
                    Ok(()) => {
                        if let Some(p) = f.path.parent() {
                            emptied.insert(p);
                        }
                        stats.removed += 1;
                        stats.removed_bytes += f.size;
                        if !was_downloaded {
                            stats.removed_undownloaded += 1;
                        }
                        stats.removed_paths.push(virt);
                        continue;
                    }
                    Err(StorageError::NotFound) => continue,
                    Err(e) => return Err(e),
                }
            }
            stats.kept_undownloaded += 1;
        }
        stats.usage.files += 1;
        stats.usage.bytes += f.size;
    }
    // Folders that retention emptied go too, and their parents up to (not including) the
    // root; a folder that is not empty stays.
    for dir in emptied.into_iter().rev() {
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| !p.is_root()) {
            if storage.rmdir(org, &p).await.is_err() {
                break;
            }
            d = p.parent();
        }
    }
    Ok(stats)
}

pub async fn sweep_all(app: &App) {
    let orgs = match app.store.list_orgs().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "sweeper cannot list orgs; retrying next round");
            return;
        }
    };
    for org in orgs {
        let limits = app.current().limits.for_org(&org.limits);
        let Ok(name) = OrgName::new(&org.id) else {
            continue;
        };
        let downloaded = match app.store.downloaded(&org.id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(org = %org.id, error = %e, "sweeper cannot read downloads; retrying next round");
                continue;
            }
        };
        let res = sweep_org(
            &*app.storage,
            &name,
            &limits,
            &downloaded,
            SystemTime::now(),
        )
        .await;
        match res {
            Ok(stats) => {
                // Only what this sweep removed: a count set from the listing would lose
                // what other nodes committed meanwhile.
                if let Err(e) = app
                    .store
                    .add_org_usage(
                        &org.id,
                        -(stats.removed as i64),
                        -(stats.removed_bytes as i64),
                    )
                    .await
                {
                    tracing::warn!(org = %org.id, error = %e, "swept files not counted out of the org's usage");
                }
                if let Ok(Some(u)) = app.store.org_usage(&org.id).await {
                    metrics::gauge!("hookbridge_org_files", "org" => org.id.clone())
                        .set(u.files as f64);
                    metrics::gauge!("hookbridge_org_bytes", "org" => org.id.clone())
                        .set(u.bytes as f64);
                }
                if stats.removed > 0 || stats.kept_undownloaded > 0 {
                    metrics::counter!("hookbridge_retention_removed_total", "downloaded" => "yes")
                        .increment(stats.removed - stats.removed_undownloaded);
                    metrics::counter!("hookbridge_retention_removed_total", "downloaded" => "no")
                        .increment(stats.removed_undownloaded);
                    tracing::info!(org = %org.id, removed = stats.removed, removed_undownloaded = stats.removed_undownloaded,
                        kept_undownloaded = stats.kept_undownloaded, "retention sweep");
                }
                if let Err(e) = app
                    .store
                    .forget_downloads(&org.id, stats.removed_paths)
                    .await
                {
                    tracing::warn!(org = %org.id, error = %e, "cannot forget downloads of swept files");
                }
            }
            Err(e) => {
                tracing::warn!(org = %org.id, error = %e, "retention sweep failed; retrying next round")
            }
        }
        // Roll-up lines kept for rebuilds go with the retention of the files they make
        // (accept times are on the daemon's clock, as the partitions are).
        if limits.retention_days > 0 {
            let before =
                crate::clock::now() - chrono::Duration::days(i64::from(limits.retention_days));
            match app.store.prune_rollup_lines(&org.id, before).await {
                Ok(n) if n > 0 => {
                    tracing::info!(org = %org.id, lines = n, "roll-up lines past retention dropped")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(org = %org.id, error = %e, "roll-up lines past retention not dropped; retrying next round")
                }
            }
        }
    }
}

/// Counts the folder of `org` from a listing. `replace` overwrites the store's count (an
/// operator's rebuild); otherwise only an org with no count yet takes it.
pub async fn recount(
    store: &dyn crate::store::Store,
    storage: &dyn Storage,
    org: &str,
    replace: bool,
) -> Result<OrgUsage, String> {
    let name = OrgName::new(org).map_err(|e| e.to_string())?;
    let limits = EffectiveLimits {
        retention_days: 0,
        ..crate::config::LimitsConfig::default().for_org(&Default::default())
    };
    let counted = sweep_org(
        storage,
        &name,
        &limits,
        &Default::default(),
        SystemTime::now(),
    )
    .await
    .map_err(|e| e.to_string())?;
    store
        .set_org_usage(org, counted.usage, replace)
        .await
        .map_err(|e| e.to_string())?;
    Ok(counted.usage)
}

/// Gives every org that has no usage count in the store one from a listing (the first
/// start on a store, or an org folder filled before it was counted).
pub async fn count_uncounted(store: &dyn crate::store::Store, storage: &dyn Storage) {
    let orgs = match store.list_orgs().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list orgs to count their folders; quotas count from zero");
            return;
        }
    };
    for org in orgs {
        if matches!(store.org_usage(&org.id).await, Ok(Some(_))) {
            continue;
        }
        match recount(store, storage, &org.id, false).await {
            Ok(u) => {
                tracing::info!(org = %org.id, files = u.files, bytes = u.bytes, "org folder counted from a listing")
            }
            Err(e) => {
                tracing::warn!(org = %org.id, error = %e, "org folder not counted; its quota counts from zero")
            }
        }
    }
}

/// Downloads reported by SFTP sessions, written to the store in batches (a `get -r` of
/// 10k files is one transaction per batch, not 10k fsyncs). A record lost in a crash only
/// makes a file look not downloaded, which retention errs on keeping.
#[derive(Clone)]
pub struct DownloadLog {
    tx: tokio::sync::mpsc::UnboundedSender<(String, String)>,
}

impl DownloadLog {
    pub fn new() -> (Self, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// `org` downloaded the file at `/virtual/path`.
    pub fn record(&self, org: &str, path: String) {
        let _ = self.tx.send((org.to_owned(), path));
    }
}

/// Writes what the [`DownloadLog`] collects until `cancel`, then what is left.
pub async fn record_downloads(
    store: std::sync::Arc<dyn crate::store::Store>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    cancel: CancellationToken,
) -> Result<(), String> {
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = cancel.cancelled() => None,
        };
        let mut batch: Vec<(String, String)> = first.into_iter().collect();
        while batch.len() < 10_000 {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let last = batch.is_empty() || cancel.is_cancelled();
        if let Err(e) = store.record_downloads(batch).await {
            tracing::warn!(error = %e, "cannot record downloads; those files look not downloaded to retention");
        }
        if last && rx.is_empty() {
            return Ok(());
        }
    }
}

pub async fn run(app: App, cancel: CancellationToken) -> Result<(), String> {
    loop {
        sweep_all(&app).await;
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(app.current().limits.sweep_interval.0) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;

    /// Local storage in a temp dir holding the org `o` (its folder: `<dir>/orgs/o`).
    async fn org_o() -> (tempfile::TempDir, LocalStorage, OrgName) {
        let dir = tempfile::tempdir().unwrap();
        let storage =
            LocalStorage::open(&dir.path().join("orgs"), &dir.path().join("tmp")).unwrap();
        let org = OrgName::new("o").unwrap();
        storage.create_org(&org).await.unwrap();
        (dir, storage, org)
    }

    /// Sets the mtime of `path` to `t`.
    fn age(path: &std::path::Path, t: SystemTime) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(t))
            .unwrap();
    }

    #[tokio::test]
    async fn expired_files_go_per_policy_and_usage_counts_the_rest() {
        let (dir, storage, org) = org_o().await;
        let root = dir.path().join("orgs/o");
        let day = root.join("payment/2020-01-01");
        std::fs::create_dir_all(&day).unwrap();
        std::fs::write(day.join("old-read.json"), b"{}\n").unwrap();
        std::fs::write(day.join("old-unread.json"), b"{}\n").unwrap();
        std::fs::write(root.join("fresh.json"), b"{\"a\":1}\n").unwrap();
        let old = SystemTime::now() - Duration::from_secs(10 * 86400);
        for f in ["old-read.json", "old-unread.json"] {
            age(&day.join(f), old);
        }
        // Downloads come from the store, not from atime.
        let downloaded: HashSet<String> = ["/payment/2020-01-01/old-read.json".to_owned()].into();
        let mut limits = crate::config::LimitsConfig {
            retention_days: 7,
            ..Default::default()
        }
        .for_org(&Default::default());
        limits.retention_removes_undownloaded = false;
        let s = sweep_org(&storage, &org, &limits, &downloaded, SystemTime::now())
            .await
            .unwrap();
        assert_eq!((s.removed, s.kept_undownloaded, s.usage.files), (1, 1, 2));
        assert_eq!(s.removed_paths, ["/payment/2020-01-01/old-read.json"]);
        assert!(day.join("old-unread.json").exists() && !day.join("old-read.json").exists());
        limits.retention_removes_undownloaded = true;
        let s = sweep_org(&storage, &org, &limits, &downloaded, SystemTime::now())
            .await
            .unwrap();
        assert_eq!(
            (
                s.removed,
                s.removed_undownloaded,
                s.usage.files,
                s.usage.bytes
            ),
            (1, 1, 1, 8)
        );
        assert!(
            !root.join("payment").exists(),
            "emptied folders are removed"
        );
        assert!(root.exists());
    }

    /// A roll-up partition expires whole with its `_SUCCESS`'s time; a `_SUCCESS` outside
    /// `/rollups` (an uploader's) does not make the old files beside it look fresh.
    #[tokio::test]
    async fn only_rollup_markers_date_their_folder() {
        let (dir, storage, org) = org_o().await;
        let root = dir.path().join("orgs/o");
        let part = root.join("rollups/payment/dt=2020-01-01/hour=00");
        let upload = root.join("uploads");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::create_dir_all(&upload).unwrap();
        let old = SystemTime::now() - Duration::from_secs(10 * 86400);
        for (folder, name) in [
            (&part, "part-0.ndjson.gz"),
            (&part, "_SUCCESS"),
            (&upload, "old.csv"),
            (&upload, "_SUCCESS"),
        ] {
            std::fs::write(folder.join(name), b"x").unwrap();
        }
        // The parts are old, the partition's marker fresh: the partition stays whole.
        // In the upload folder the marker is fresh but the old file beside it expires.
        for f in [part.join("part-0.ndjson.gz"), upload.join("old.csv")] {
            age(&f, old);
        }
        let limits = crate::config::LimitsConfig {
            retention_days: 7,
            retention_removes_undownloaded: true,
            ..Default::default()
        }
        .for_org(&Default::default());
        let s = sweep_org(&storage, &org, &limits, &HashSet::new(), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(s.removed_paths, ["/uploads/old.csv"]);
        assert!(part.join("part-0.ndjson.gz").exists() && part.join("_SUCCESS").exists());
        assert!(upload.join("_SUCCESS").exists());
    }
}
