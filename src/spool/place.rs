//! Placing written temps into org folders and making them durable, one event at a time.
//!
//! Org folders are shared with SFTP readers, who may rename or remove folders while a
//! batch is placed. So every event stands on its own: a folder that fails (or vanishes)
//! fails or re-places only the events whose files are in it, never the rest of the
//! batch — one org's folders can never fail another org's events.
//!
//! Each file is renamed into its folder through an open descriptor of that folder, and
//! that descriptor is fsync'd: a reader renaming the folder afterwards moves the file
//! with it, durably. An event whose folder vanished before it was opened, or whose
//! parent folders vanished before their fsync, is placed again (folders recreated, file
//! rewritten from the envelope), up to [`PLACE_ROUNDS`] times.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{io_err, write_synced, Layout, SpoolError, Temp};

/// Rounds of placing an event whose folder keeps vanishing before it counts as failed.
const PLACE_ROUNDS: usize = 20;

/// Directories whose entry is known to be durable: their parent chain was fsync'd once.
/// Folders made elsewhere (admin API, SFTP mkdir) are not trusted until then.
#[derive(Clone, Default)]
pub(crate) struct DurableDirs(Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>);

/// What `publish_temps` did: files placed, and the events that failed with why.
pub(super) struct Placed {
    pub files: usize,
    pub failed: BTreeMap<usize, SpoolError>,
}

/// A folder (or one on its way) went away under us: place the event again.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Renames the temp into its folder, opened first: once the folder is open, a reader
/// renaming it cannot make the rename fail, and the fsync of that open folder makes the
/// entry durable wherever the folder was moved. Returns the open folder.
fn place(layout: &Layout, t: &Temp, to_sync: &mut BTreeSet<PathBuf>) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let parent = t
        .target
        .parent()
        .ok_or_else(|| io::Error::other("target has no parent"))?;
    let name = t
        .target
        .file_name()
        .ok_or_else(|| io::Error::other("target has no name"))?;
    create_dirs(&layout.orgs_dir, parent, to_sync)?;
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(parent)?;
    let from = CString::new(t.tmp.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let to = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both names are NUL-terminated and outlive the call; `dir` is open.
    let rc = unsafe { libc::renameat(libc::AT_FDCWD, from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dir)
}

/// The identity of an open folder, so each is fsync'd once per round.
fn inode(f: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Renames the temps of `publish` into place and fsyncs the directories each event
/// needs; removes the other temps. Each event succeeds or fails on its own.
pub(super) fn publish_temps(
    layout: &Layout,
    durable: &DurableDirs,
    temps: Vec<Temp>,
    publish: &[usize],
) -> Placed {
    let mut placed = Placed {
        files: 0,
        failed: Default::default(),
    };
    let mut pending: BTreeMap<usize, Vec<Temp>> = BTreeMap::new();
    for t in temps {
        if publish.contains(&t.event) {
            pending.entry(t.event).or_default().push(t);
        } else {
            let _ = fs::remove_file(&t.tmp);
        }
    }
    let data_dir = layout
        .orgs_dir
        .parent()
        .unwrap_or(&layout.orgs_dir)
        .to_owned();
    for round in 0..PLACE_ROUNDS {
        if pending.is_empty() {
            break;
        }
        if round > 0 {
            metrics::counter!("hookbridge_files_placed_again_total")
                .increment(pending.len() as u64);
            rewrite(layout, &mut pending, &mut placed.failed);
        }
        // 1. Rename into place; note the folders each event needs fsync'd: its open
        //    target folders, and by path the parents of folders made or not yet trusted.
        let mut needs: BTreeMap<usize, BTreeSet<PathBuf>> = BTreeMap::new();
        let mut opened: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        let mut dirs_open: HashMap<(u64, u64), File> = HashMap::new();
        let mut again: BTreeSet<usize> = BTreeSet::new();
        for (&ev, ts) in &pending {
            let dirs = needs.entry(ev).or_default();
            for t in ts {
                match place(layout, t, dirs).and_then(|d| Ok((inode(&d)?, d))) {
                    Ok((id, d)) => {
                        opened.entry(ev).or_default().push(id);
                        dirs_open.entry(id).or_insert(d);
                    }
                    Err(e) if vanished(&e) => {
                        again.insert(ev);
                    }
                    Err(e) => {
                        placed.failed.insert(ev, io_err(e));
                    }
                }
            }
        }
        {
            let known = durable.0.lock().unwrap_or_else(|p| p.into_inner());
            for (ev, ts) in &pending {
                let dirs = needs.entry(*ev).or_default();
                for p in ts.iter().filter_map(|t| t.target.parent()) {
                    if !known.contains(p) {
                        dirs.extend(
                            p.ancestors()
                                .skip(1)
                                .take_while(|a| a.starts_with(&data_dir))
                                .map(Path::to_path_buf),
                        );
                    }
                }
            }
        }
        // 2. Fsync every folder once: open target folders by descriptor, the others by path.
        let settled: BTreeSet<usize> = pending
            .keys()
            .copied()
            .filter(|ev| placed.failed.contains_key(ev) || again.contains(ev))
            .collect();
        let wanted: BTreeSet<&PathBuf> = needs
            .iter()
            .filter(|(ev, _)| !settled.contains(ev))
            .flat_map(|(_, d)| d.iter())
            .collect();
        let t0 = Instant::now();
        let synced: HashMap<&PathBuf, io::Result<()>> = wanted
            .into_iter()
            .map(|d| (d, File::open(d).and_then(|f| f.sync_all())))
            .collect();
        let synced_open: HashMap<(u64, u64), io::Result<()>> = dirs_open
            .iter()
            .map(|(id, f)| (*id, f.sync_all()))
            .collect();
        metrics::histogram!("hookbridge_fsync_seconds", "what" => "dirs")
            .record(t0.elapsed().as_secs_f64());
        // 3. Judge each event by its own directories only.
        let mut done: Vec<usize> = Vec::new();
        let mut failed_now: Vec<(usize, SpoolError)> = Vec::new();
        for &ev in pending.keys() {
            if settled.contains(&ev) {
                continue;
            }
            let mut verdict: Result<(), Option<io::Error>> = Ok(());
            let results = needs[&ev].iter().filter_map(|d| synced.get(d)).chain(
                opened
                    .get(&ev)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| synced_open.get(id)),
            );
            for r in results {
                match r {
                    Ok(()) => {}
                    Err(e) if vanished(e) => verdict = Err(None),
                    Err(e) => {
                        verdict = Err(Some(io::Error::new(e.kind(), e.to_string())));
                        break;
                    }
                }
            }
            match verdict {
                Ok(()) => done.push(ev),
                Err(None) => {
                    again.insert(ev);
                }
                Err(Some(e)) => failed_now.push((ev, io_err(e))),
            }
        }
        placed.failed.extend(failed_now);
        {
            let mut known = durable.0.lock().unwrap_or_else(|p| p.into_inner());
            for ev in &done {
                if let Some(ts) = pending.remove(ev) {
                    placed.files += ts.len();
                    known.extend(
                        ts.iter()
                            .filter_map(|t| t.target.parent().map(Path::to_path_buf)),
                    );
                }
            }
        }
        for ev in placed.failed.keys() {
            if let Some(ts) = pending.remove(ev) {
                for t in ts {
                    let _ = fs::remove_file(&t.tmp);
                }
            }
        }
        if !again.is_empty() {
            tracing::warn!(events = again.len(), round,
                "a folder vanished while event files were placed (renamed or removed by a reader?); placing them again");
        }
    }
    for (ev, ts) in std::mem::take(&mut pending) {
        for t in ts {
            let _ = fs::remove_file(&t.tmp);
        }
        placed.failed.insert(
            ev,
            SpoolError::Io(format!(
                "the target folder kept vanishing over {PLACE_ROUNDS} attempts"
            )),
        );
    }
    placed
}

/// Writes fresh temps for events to be placed again (their first temps were renamed).
fn rewrite(
    layout: &Layout,
    pending: &mut BTreeMap<usize, Vec<Temp>>,
    failed: &mut BTreeMap<usize, SpoolError>,
) {
    for (&ev, ts) in pending.iter_mut() {
        for t in ts.iter_mut() {
            let _ = fs::remove_file(&t.tmp);
            t.tmp = layout.new_temp();
            if let Err(e) = write_synced(&t.tmp, t.body.as_bytes()) {
                failed.insert(ev, io_err(e));
                break;
            }
        }
    }
    for ev in failed.keys() {
        if let Some(ts) = pending.remove(ev) {
            for t in ts {
                let _ = fs::remove_file(&t.tmp);
            }
        }
    }
}

/// Like `create_dir_all`, but remembers the parent of every directory it creates, whose
/// entry must be fsync'd too.
fn create_dirs(root: &Path, dir: &Path, to_sync: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().ok_or_else(|| io::Error::other("no parent"))?;
    if dir != root {
        create_dirs(root, parent, to_sync)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            to_sync.insert(parent.to_owned());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
