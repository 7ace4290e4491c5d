//! What SFTP clients see of an org folder: everything, except roll-up partitions that are
//! not complete. A partition (`/rollups/<type>/dt=D/hour=H/` or, daily,
//! `/rollups/<type>/dt=D/`) is visible only once its `_SUCCESS` is there; until then its
//! folder is absent from listings, and `stat`, `open`, remove and rename of it or of
//! anything in it answer "no such file".
//!
//! Why a view rather than a staging prefix and a rename: S3 has no atomic rename (a copy
//! per object, each visible at once), so publishing a multi-part partition would be seen
//! half done there. A marker checked on read works on both backends, and a rebuild (the
//! closer deletes `_SUCCESS` first) hides the partition again while it is rewritten.
//! The closer, retention and usage work on the storage itself, not through this view.
//!
//! Writes: `/rollups` and everything in it is hookbridge's output, and a replay rebuilds a
//! partition by deleting its folder whole, with whatever else is in it. So nothing may be
//! created there (files, folders, `/rollups` itself) nor moved in from outside it: that is
//! "permission denied", as OpenSSH answers in a folder the user may not write, with a
//! warning in the log naming the org and path. Reading, deleting, and renaming out of the
//! tree or within it work as anywhere else: what moves within it was hookbridge's output.
//!
//! Cost: one `stat` of `_SUCCESS` per partition folder a request touches (cached for the
//! length of one listing), and for a day folder of hourly partitions one listing page of
//! it; the per-event folders pay nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;

use super::{
    Capabilities, Entry, EventFile, FileInfo, Lister, Meta, OrgName, ReadHandle, RenameMode,
    SetAttrs, Space, StagedEvents, Storage, StorageError, StoragePath, StorageResult, UploadHandle,
    UploadOptions,
};

/// The roll-up root folder (`crate::rollups::ROOT` without its `/`; a test there keeps
/// the two equal).
pub const ROLLUP_DIR: &str = "rollups";
/// The marker a partition is complete with, written last.
pub const SUCCESS: &str = "_SUCCESS";

/// Where `path` stands in the roll-up layout.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// Not a partition, nor in one.
    Free,
    /// `/rollups/<type>/dt=D`: a daily partition, or the day folder of hourly ones.
    Day(StoragePath),
    /// In (or being) the partition folder given: visible iff it holds `_SUCCESS`.
    In(StoragePath),
}

fn place(path: &StoragePath) -> Place {
    let s = path.segments();
    if s.len() < 3 || s[0] != ROLLUP_DIR || !s[2].starts_with("dt=") {
        return Place::Free;
    }
    let day = || StoragePath::from_segments(s[..3].iter().cloned());
    if s.len() == 3 {
        return day().map(Place::Day).unwrap_or(Place::Free);
    }
    if s[3].starts_with("hour=") {
        return StoragePath::from_segments(s[..4].iter().cloned())
            .map(Place::In)
            .unwrap_or(Place::Free);
    }
    // A file (or anything) directly in the day folder belongs to a daily partition.
    day().map(Place::In).unwrap_or(Place::Free)
}

/// Whether `path` is `/rollups` or anything in it.
fn in_rollup_tree(path: &StoragePath) -> bool {
    path.segments().first().is_some_and(|s| s == ROLLUP_DIR)
}

/// Refuses `op` on `path` when it would add to the roll-up tree (see the module doc).
fn refuse_in_rollups(org: &OrgName, path: &StoragePath, op: &str) -> StorageResult<()> {
    if !in_rollup_tree(path) {
        return Ok(());
    }
    tracing::warn!(
        org = %org,
        path = %path,
        op,
        "SFTP write into /rollups refused (permission denied): the roll-up tree is \
         hookbridge's output and a replay deletes a partition whole; the client must write \
         outside /rollups"
    );
    Err(StorageError::PermissionDenied)
}

#[derive(Debug)]
pub struct CompleteView {
    inner: Arc<dyn Storage>,
}

impl CompleteView {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner }
    }
}

/// Answers visibility questions for one request, remembering folders already checked.
struct Checker<'a> {
    s: &'a dyn Storage,
    org: &'a OrgName,
    complete: HashMap<StoragePath, bool>,
}

impl<'a> Checker<'a> {
    fn new(s: &'a dyn Storage, org: &'a OrgName) -> Self {
        Self {
            s,
            org,
            complete: HashMap::new(),
        }
    }

    async fn complete(&mut self, folder: &StoragePath) -> StorageResult<bool> {
        if let Some(c) = self.complete.get(folder) {
            return Ok(*c);
        }
        let c = match self.s.stat(self.org, &folder.join(SUCCESS)?).await {
            Ok(_) => true,
            Err(StorageError::NotFound | StorageError::NotADirectory) => false,
            Err(e) => return Err(e),
        };
        self.complete.insert(folder.clone(), c);
        Ok(c)
    }

    async fn visible(&mut self, path: &StoragePath) -> StorageResult<bool> {
        match place(path) {
            Place::Free => Ok(true),
            Place::In(folder) => self.complete(&folder).await,
            Place::Day(day) => {
                if self.complete(&day).await? {
                    return Ok(true);
                }
                // A day of hourly partitions: visible once one of its hours is complete.
                let mut l = match self.s.list(self.org, &day).await {
                    Ok(l) => l,
                    Err(StorageError::NotFound | StorageError::NotADirectory) => return Ok(false),
                    Err(e) => return Err(e),
                };
                while let Some(page) = l.next_page().await? {
                    for e in page {
                        if e.meta.is_dir()
                            && e.name.starts_with("hour=")
                            && self.complete(&day.join(&e.name)?).await?
                        {
                            return Ok(true);
                        }
                    }
                }
                Ok(false)
            }
        }
    }

    /// `NotFound` unless `path` is visible.
    async fn require(&mut self, path: &StoragePath) -> StorageResult<()> {
        if self.visible(path).await? {
            Ok(())
        } else {
            Err(StorageError::NotFound)
        }
    }

    /// For a new file or folder at `path`: its folder must be visible, and nothing may be
    /// added inside a partition that is not complete (the closer owns it until then).
    async fn require_parent(&mut self, path: &StoragePath) -> StorageResult<()> {
        if let Some(parent) = path.parent() {
            self.require(&parent).await?;
        }
        match place(path) {
            Place::In(folder) if &folder != path => {
                if self.complete(&folder).await? {
                    Ok(())
                } else {
                    Err(StorageError::NotFound)
                }
            }
            _ => Ok(()),
        }
    }
}

/// A listing with the entries of incomplete partitions left out.
struct FilteredLister {
    inner: Box<dyn Lister>,
    view: Arc<dyn Storage>,
    org: OrgName,
    dir: StoragePath,
    complete: HashMap<StoragePath, bool>,
}

#[async_trait]
impl Lister for FilteredLister {
    async fn next_page(&mut self) -> StorageResult<Option<Vec<Entry>>> {
        let Some(page) = self.inner.next_page().await? else {
            return Ok(None);
        };
        let mut c = Checker {
            s: &*self.view,
            org: &self.org,
            complete: std::mem::take(&mut self.complete),
        };
        let mut out = Vec::with_capacity(page.len());
        for e in page {
            if c.visible(&self.dir.join(&e.name)?).await? {
                out.push(e);
            }
        }
        self.complete = c.complete;
        Ok(Some(out))
    }
}

/// Whether a listing of `dir` can hold entries that must be checked (only folders of the
/// roll-up layout can).
fn needs_filter(dir: &StoragePath) -> bool {
    let s = dir.segments();
    !s.is_empty() && s[0] == ROLLUP_DIR && (2..=3).contains(&s.len())
}

#[async_trait]
impl Storage for CompleteView {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn check(&self) -> StorageResult<()> {
        self.inner.check().await
    }

    async fn ready(&self) -> StorageResult<()> {
        self.inner.ready().await
    }

    async fn create_org(&self, org: &OrgName) -> StorageResult<()> {
        self.inner.create_org(org).await
    }

    async fn remove_org(&self, org: &OrgName) -> StorageResult<()> {
        self.inner.remove_org(org).await
    }

    async fn stage_events(&self, files: Vec<EventFile>) -> Box<dyn StagedEvents> {
        self.inner.stage_events(files).await
    }

    async fn stat(&self, org: &OrgName, path: &StoragePath) -> StorageResult<Meta> {
        let m = self.inner.stat(org, path).await?;
        Checker::new(&*self.inner, org).require(path).await?;
        Ok(m)
    }

    async fn list(&self, org: &OrgName, dir: &StoragePath) -> StorageResult<Box<dyn Lister>> {
        let mut c = Checker::new(&*self.inner, org);
        c.require(dir).await?;
        let inner = self.inner.list(org, dir).await?;
        if !needs_filter(dir) {
            return Ok(inner);
        }
        Ok(Box::new(FilteredLister {
            inner,
            view: self.inner.clone(),
            org: org.clone(),
            dir: dir.clone(),
            complete: c.complete,
        }))
    }

    async fn open_read(
        &self,
        org: &OrgName,
        path: &StoragePath,
    ) -> StorageResult<Box<dyn ReadHandle>> {
        Checker::new(&*self.inner, org).require(path).await?;
        self.inner.open_read(org, path).await
    }

    async fn delete(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        Checker::new(&*self.inner, org).require(path).await?;
        self.inner.delete(org, path).await
    }

    async fn rename(
        &self,
        org: &OrgName,
        from: &StoragePath,
        to: &StoragePath,
        mode: RenameMode,
    ) -> StorageResult<()> {
        let mut c = Checker::new(&*self.inner, org);
        c.require(from).await?;
        c.require_parent(to).await?;
        if !in_rollup_tree(from) {
            refuse_in_rollups(org, to, "rename")?;
        }
        self.inner.rename(org, from, to, mode).await
    }

    async fn mkdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        Checker::new(&*self.inner, org).require_parent(path).await?;
        refuse_in_rollups(org, path, "mkdir")?;
        self.inner.mkdir(org, path).await
    }

    async fn rmdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        Checker::new(&*self.inner, org).require(path).await?;
        self.inner.rmdir(org, path).await
    }

    async fn create_upload(
        &self,
        org: &OrgName,
        path: &StoragePath,
        opts: UploadOptions,
    ) -> StorageResult<Box<dyn UploadHandle>> {
        Checker::new(&*self.inner, org).require_parent(path).await?;
        refuse_in_rollups(org, path, "create")?;
        self.inner.create_upload(org, path, opts).await
    }

    async fn set_attrs(
        &self,
        org: &OrgName,
        path: &StoragePath,
        attrs: SetAttrs,
    ) -> StorageResult<()> {
        Checker::new(&*self.inner, org).require(path).await?;
        self.inner.set_attrs(org, path, attrs).await
    }

    async fn space(&self) -> StorageResult<Space> {
        self.inner.space().await
    }

    /// Every visible file: partitions count as complete when the walk itself finds their
    /// `_SUCCESS` (no extra request).
    async fn walk(&self, org: &OrgName) -> StorageResult<Vec<FileInfo>> {
        let all = self.inner.walk(org).await?;
        let complete: HashSet<StoragePath> = all
            .iter()
            .filter(|f| f.path.name() == Some(SUCCESS))
            .filter_map(|f| f.path.parent())
            .collect();
        Ok(all
            .into_iter()
            .filter(|f| match place(&f.path) {
                Place::Free => true,
                Place::In(folder) | Place::Day(folder) => complete.contains(&folder),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> StoragePath {
        StoragePath::parse(s).unwrap()
    }

    #[test]
    fn places() {
        assert_eq!(place(&p("/rollups")), Place::Free);
        assert_eq!(place(&p("/rollups/order.created")), Place::Free);
        assert_eq!(place(&p("/order.created/dt=2026-01-01")), Place::Free);
        assert_eq!(
            place(&p("/rollups/t/dt=2026-01-01")),
            Place::Day(p("/rollups/t/dt=2026-01-01"))
        );
        assert_eq!(
            place(&p("/rollups/t/dt=2026-01-01/part-0.ndjson.gz")),
            Place::In(p("/rollups/t/dt=2026-01-01"))
        );
        assert_eq!(
            place(&p("/rollups/t/dt=2026-01-01/hour=03")),
            Place::In(p("/rollups/t/dt=2026-01-01/hour=03"))
        );
        assert_eq!(
            place(&p("/rollups/t/dt=2026-01-01/hour=03/_manifest.json")),
            Place::In(p("/rollups/t/dt=2026-01-01/hour=03"))
        );
    }

    /// A view over local storage holding one complete and one incomplete daily partition
    /// and a user file `/mine.txt`.
    async fn fixture() -> (tempfile::TempDir, CompleteView, OrgName) {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::local::LocalStorage::open(
            &dir.path().join("orgs"),
            &dir.path().join("tmp"),
        )
        .unwrap();
        let org = OrgName::new("org").unwrap();
        s.create_org(&org).await.unwrap();
        let root = dir.path().join("orgs/org");
        for (day, done) in [("2026-01-01", true), ("2026-01-02", false)] {
            let d = root.join(format!("rollups/t/dt={day}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("part-0.ndjson.gz"), day).unwrap();
            if done {
                std::fs::write(d.join(SUCCESS), "").unwrap();
            }
        }
        std::fs::write(root.join("mine.txt"), "mine").unwrap();
        (dir, CompleteView::new(Arc::new(s)), org)
    }

    /// Every file under `dir`, with its bytes.
    fn tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn nothing_is_added_to_the_rollup_tree_but_its_files_move_and_go() {
        let (dir, v, org) = fixture().await;
        let rollups = dir.path().join("orgs/org/rollups");
        let before = tree(&rollups);
        let opts = UploadOptions {
            exclusive: true,
            keep_existing: false,
            max_bytes: 1 << 20,
        };
        let denied = |r: StorageResult<()>, what: &str| {
            assert!(
                matches!(r, Err(StorageError::PermissionDenied)),
                "{what}: {r:?}"
            )
        };
        let mine = p("/mine.txt");
        for path in [
            "/rollups",
            "/rollups/x",
            "/rollups/t/x",
            "/rollups/t/dt=2026-01-01/x",
            "/rollups/t/dt=2026-01-03",
            "/rollups/t/dt=2026-01-01/hour=00",
        ] {
            let to = p(path);
            let r = v.create_upload(&org, &to, opts).await;
            denied(r.map(|_| ()), &format!("create {path}"));
            denied(v.mkdir(&org, &to).await, &format!("mkdir {path}"));
            let r = v.rename(&org, &mine, &to, RenameMode::NoReplace).await;
            denied(r, &format!("rename into {path}"));
        }
        // The incomplete partition stays out of sight rather than refused.
        let hidden = p("/rollups/t/dt=2026-01-02/x");
        let r = v.create_upload(&org, &hidden, opts).await;
        assert!(matches!(r.err(), Some(StorageError::NotFound)));
        assert_eq!(tree(&rollups), before, "the roll-up tree changed");

        // Outside the tree (even under a similar name) writes work; inside, files are read,
        // moved within and out, and deleted.
        v.mkdir(&org, &p("/rollups-old")).await.unwrap();
        let part = p("/rollups/t/dt=2026-01-01/part-0.ndjson.gz");
        let h = v.open_read(&org, &part).await.unwrap();
        assert_eq!(&h.read_at(0, 64, 0).await.unwrap()[..], b"2026-01-01");
        let moved = p("/rollups/t/dt=2026-01-01/part-9.ndjson.gz");
        let mode = RenameMode::NoReplace;
        v.rename(&org, &part, &moved, mode).await.unwrap();
        v.rename(&org, &moved, &p("/rollups-old/part"), mode)
            .await
            .unwrap();
        v.delete(&org, &p("/rollups/t/dt=2026-01-01/_SUCCESS"))
            .await
            .unwrap();
        assert!(rollups.join("t/dt=2026-01-02/part-0.ndjson.gz").exists());
        assert!(!rollups.join("t/dt=2026-01-01/_SUCCESS").exists());
        assert!(dir.path().join("orgs/org/rollups-old/part").exists());
    }
}
