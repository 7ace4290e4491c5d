//! The sweeper: removes files past each org's retention and recounts folder usage
//! (which also catches what SFTP users deleted or uploaded since the last sweep).

use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::EffectiveLimits;
use crate::limits::OrgUsage;
use crate::App;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepStats {
    pub usage: OrgUsage,
    pub removed: u64,
    pub removed_undownloaded: u64,
    pub kept_undownloaded: u64,
}

/// A file counts as downloaded once it was read after it was written: with Linux's default
/// `relatime`, the first read moves atime past mtime. On `noatime` mounts nothing looks
/// downloaded, so `retention_removes_undownloaded = false` then keeps everything.
fn downloaded(meta: &std::fs::Metadata) -> bool {
    match (meta.accessed(), meta.modified()) {
        (Ok(a), Ok(m)) => a > m,
        _ => false,
    }
}

/// Walks one org folder; removes expired files per `limits`, counts what stays.
pub fn sweep_org(
    root: &Path,
    limits: &EffectiveLimits,
    now: SystemTime,
) -> std::io::Result<SweepStats> {
    let cutoff = (limits.retention_days > 0)
        .then(|| {
            now.checked_sub(Duration::from_secs(
                u64::from(limits.retention_days) * 86400,
            ))
        })
        .flatten();
    let mut stats = SweepStats::default();
    let mut stack = vec![root.to_path_buf()];
    let mut emptied = std::collections::BTreeSet::new();
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let meta = entry.metadata()?;
            let expired = cutoff.is_some_and(|c| meta.modified().is_ok_and(|m| m < c));
            if expired {
                let was_downloaded = downloaded(&meta);
                if was_downloaded || limits.retention_removes_undownloaded {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            emptied.insert(dir.clone());
                            stats.removed += 1;
                            if !was_downloaded {
                                stats.removed_undownloaded += 1;
                            }
                            continue;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    }
                }
                stats.kept_undownloaded += 1;
            }
            stats.usage.files += 1;
            stats.usage.bytes += meta.len();
        }
    }
    // Folders that retention emptied go too, and their parents up to (not including) the root.
    for mut d in emptied.into_iter().rev() {
        while d != root && d.starts_with(root) && std::fs::remove_dir(&d).is_ok() {
            match d.parent() {
                Some(p) => d = p.to_path_buf(),
                None => break,
            }
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
        let root = app.layout.org_dir(&org.id);
        let res =
            tokio::task::spawn_blocking(move || sweep_org(&root, &limits, SystemTime::now())).await;
        match res {
            Ok(Ok(stats)) => {
                app.usage.set(&org.id, stats.usage);
                metrics::gauge!("hookbridge_org_files", "org" => org.id.clone())
                    .set(stats.usage.files as f64);
                metrics::gauge!("hookbridge_org_bytes", "org" => org.id.clone())
                    .set(stats.usage.bytes as f64);
                if stats.removed > 0 || stats.kept_undownloaded > 0 {
                    metrics::counter!("hookbridge_retention_removed_total", "downloaded" => "yes")
                        .increment(stats.removed - stats.removed_undownloaded);
                    metrics::counter!("hookbridge_retention_removed_total", "downloaded" => "no")
                        .increment(stats.removed_undownloaded);
                    tracing::info!(org = %org.id, removed = stats.removed, removed_undownloaded = stats.removed_undownloaded,
                        kept_undownloaded = stats.kept_undownloaded, "retention sweep");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(org = %org.id, error = %e, "retention sweep failed; retrying next round")
            }
            Err(e) => tracing::warn!(org = %org.id, error = %e, "retention sweep panicked"),
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

    #[test]
    fn expired_files_go_per_policy_and_usage_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let day = dir.path().join("payment/2020-01-01");
        std::fs::create_dir_all(&day).unwrap();
        std::fs::write(day.join("old-read.json"), b"{}\n").unwrap();
        std::fs::write(day.join("old-unread.json"), b"{}\n").unwrap();
        std::fs::write(dir.path().join("fresh.json"), b"{\"a\":1}\n").unwrap();
        let old = SystemTime::now() - Duration::from_secs(10 * 86400);
        let set = |p: &Path, atime: SystemTime| {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_times(
                std::fs::FileTimes::new()
                    .set_modified(old)
                    .set_accessed(atime),
            )
            .unwrap();
        };
        set(&day.join("old-read.json"), old + Duration::from_secs(60));
        set(&day.join("old-unread.json"), old);
        let mut limits = crate::config::LimitsConfig {
            retention_days: 7,
            ..Default::default()
        }
        .for_org(&Default::default());
        limits.retention_removes_undownloaded = false;
        let s = sweep_org(dir.path(), &limits, SystemTime::now()).unwrap();
        assert_eq!((s.removed, s.kept_undownloaded, s.usage.files), (1, 1, 2));
        assert!(day.join("old-unread.json").exists() && !day.join("old-read.json").exists());
        limits.retention_removes_undownloaded = true;
        let s = sweep_org(dir.path(), &limits, SystemTime::now()).unwrap();
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
            !dir.path().join("payment").exists(),
            "emptied folders are removed"
        );
        assert!(dir.path().exists());
    }
}
