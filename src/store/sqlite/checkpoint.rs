//! WAL checkpoints off the commit path.
//!
//! By default SQLite checkpoints inside the commit that takes the WAL past 1,000 pages:
//! that commit (an ingest group commit, or a batch of delivery outcomes) then copies the
//! WAL into the database file and fsyncs it while it holds the one writer, and every
//! POST and outcome behind it waits: the spikes in the p99 of POST → 202 and 202 →
//! delivered under load. Here the writer never checkpoints (`wal_autocheckpoint = 0`);
//! a thread with its own connection runs passive checkpoints, which take no lock a
//! commit needs, so commits go on while the pages are copied.
//!
//! The WAL starts over from its beginning only at a commit that finds it copied whole. Under
//! steady load that never happens by itself (every copy ends behind the commits made
//! meanwhile), so the WAL grew by hundreds of MiB, reads slowed down with its index, and
//! the first commit after the load paid for dropping all of it. So once the WAL is over
//! [`RESTART_FRAMES`], the thread copies the last frames while it holds the writer (the
//! few committed since its previous pass: a millisecond or two, not a whole WAL), and
//! the next commit starts the WAL over.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use super::super::Result;

/// How often the WAL is copied into the database file. Short enough that the WAL stays
/// small (a few MiB at thousands of events per second), long enough that an idle or
/// quiet daemon does next to nothing.
const EVERY: Duration = Duration::from_millis(100);
/// WAL frames (pages) past which a pass makes the WAL start over: 16 MiB of 4 KiB pages.
const RESTART_FRAMES: i64 = 4096;
/// A WAL that still grew (a long read held its restart back) is cut back to this when it
/// starts over, rather than staying at its largest size on disk.
const WAL_KEEP_BYTES: i64 = 64 << 20;

/// Turns off the writer's own checkpoints and starts the checkpoint thread, which ends
/// when the store (its `writer`) is dropped.
pub(super) fn start(writer: &Arc<Mutex<Connection>>, path: &Path) -> Result<()> {
    {
        let w = writer.lock().unwrap_or_else(|p| p.into_inner());
        w.pragma_update(None, "wal_autocheckpoint", 0)?;
        w.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
    }
    let alive = Arc::downgrade(writer);
    let conn = super::schema::open(path)?;
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(EVERY);
                let Some(writer) = alive.upgrade() else { break };
                match pass(&conn, &writer) {
                    Ok(()) => {
                        if failing {
                            tracing::info!("state database checkpoints work again");
                        }
                        failing = false;
                    }
                    // The WAL grows meanwhile (nothing is lost: the WAL is the durable
                    // copy); logged once per failing stretch, not ten times a second.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot checkpoint the state database's WAL; it grows until this recovers");
                    }
                    Err(_) => {}
                }
            }
        })
        .map_err(|e| super::super::StoreError::Db(format!("checkpoint thread: {e}")))?;
    Ok(())
}

/// One pass: copy what the WAL holds; past [`RESTART_FRAMES`], copy the rest with the
/// writer held, so that the next commit starts the WAL over.
fn pass(conn: &Connection, writer: &Mutex<Connection>) -> rusqlite::Result<()> {
    let frames = passive(conn)?;
    if frames >= RESTART_FRAMES {
        let _held = writer.lock().unwrap_or_else(|p| p.into_inner());
        passive(conn)?;
    }
    Ok(())
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: copies the frames no reader still needs; returns the
/// WAL's length in frames.
fn passive(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Steady commits with short reads beside them (the daemon's pattern: ingest and
    /// outcomes on the writer, polls and look-ups on readers). Without the restart under
    /// the writer, the WAL grows with everything written; with it, the WAL file stays
    /// bounded. Waits for that state (bounded by the bytes written, not by time).
    #[test]
    fn the_wal_starts_over_under_steady_commits_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let writer = Arc::new(Mutex::new(super::super::schema::open(&path).unwrap()));
        writer
            .lock()
            .unwrap()
            .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        start(&writer, &path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads = {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::spawn(move || {
                let c = super::super::schema::open(&path).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let _: i64 = c
                        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                        .unwrap();
                }
            })
        };
        let wal = dir.path().join("state.db-wal");
        let blob = vec![7u8; 128 * 1024];
        let mut written: u64 = 0;
        let bounded = loop {
            {
                let c = writer.lock().unwrap();
                // The same few rows over and over: the database stays small, the WAL
                // takes every page written.
                c.execute(
                    "INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)",
                    rusqlite::params![(written / blob.len() as u64 % 8) as i64, blob],
                )
                .unwrap();
            }
            written += blob.len() as u64;
            let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            if written > 6 * RESTART_FRAMES as u64 * 4096 && size < written / 3 {
                break true;
            }
            if written > 1 << 30 {
                break false;
            }
        };
        stop.store(true, Ordering::Relaxed);
        reads.join().unwrap();
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert!(
            bounded,
            "the WAL never started over: {size} bytes after {written} written"
        );
    }
}
