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
        self.inner.rename(org, from, to, mode).await
    }

    async fn mkdir(&self, org: &OrgName, path: &StoragePath) -> StorageResult<()> {
        Checker::new(&*self.inner, org).require_parent(path).await?;
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
}
