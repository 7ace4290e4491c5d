//! Names inside an org folder, checked once, before any backend sees them.
//!
//! A [`StoragePath`] is a list of plain segments below the org root: no empty segment, no
//! `.` or `..`, no `/`, NUL or other control character. It cannot name anything outside
//! the org by construction, so a backend only has to join it onto its own root (a
//! directory fd for `local`, the key prefix `<prefix>/<org>/` for `s3`). Encodings are
//! never decoded: `%2e%2e` is an odd but harmless file name.

use std::fmt;

use super::StorageError;

/// A relative path below an org's root; empty means the root itself.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StoragePath {
    segments: Vec<String>,
}

/// An org's folder name: one segment, also safe as an S3 key part.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrgName(String);

fn check_segment(seg: &str) -> Result<(), StorageError> {
    if seg.is_empty() || seg == "." || seg == ".." {
        return Err(StorageError::InvalidPath("empty, `.` or `..` segment"));
    }
    if seg.chars().any(|c| c == '/' || c.is_control()) {
        return Err(StorageError::InvalidPath("control character in a name"));
    }
    // The longest name ext4 (and most S3 key schemes) accept per segment.
    if seg.len() > 255 {
        return Err(StorageError::InvalidPath("name longer than 255 bytes"));
    }
    Ok(())
}

impl StoragePath {
    pub fn root() -> Self {
        Self::default()
    }

    /// Cleans a client path lexically against `/`: empty and `.` segments drop out, `..`
    /// pops one, and climbing above the root is refused (never clamped silently).
    pub fn parse(path: &str) -> Result<Self, StorageError> {
        if path.contains('\0') {
            return Err(StorageError::InvalidPath("NUL in a path"));
        }
        let mut segments: Vec<String> = Vec::new();
        for seg in path.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    if segments.pop().is_none() {
                        return Err(StorageError::Escape);
                    }
                }
                s => {
                    check_segment(s)?;
                    segments.push(s.to_owned());
                }
            }
        }
        Ok(Self { segments })
    }

    /// From segments already split (e.g. a listing); each must be a plain name.
    pub fn from_segments<I, S>(segs: I) -> Result<Self, StorageError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut segments = Vec::new();
        for s in segs {
            let s = s.into();
            check_segment(&s)?;
            segments.push(s);
        }
        Ok(Self { segments })
    }

    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    pub fn name(&self) -> Option<&str> {
        self.segments.last().map(String::as_str)
    }

    pub fn parent(&self) -> Option<StoragePath> {
        let (_, rest) = self.segments.split_last()?;
        Some(Self {
            segments: rest.to_vec(),
        })
    }

    pub fn join(&self, name: &str) -> Result<StoragePath, StorageError> {
        check_segment(name)?;
        let mut segments = self.segments.clone();
        segments.push(name.to_owned());
        Ok(Self { segments })
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &StoragePath) -> bool {
        self.segments.starts_with(&other.segments)
    }

    /// `a/b/c` (no leading slash); empty for the root.
    pub fn relative(&self) -> String {
        self.segments.join("/")
    }

    /// `/a/b/c`, as SFTP shows it.
    pub fn virtual_path(&self) -> String {
        if self.segments.is_empty() {
            return "/".to_owned();
        }
        let mut s = String::new();
        for seg in &self.segments {
            s.push('/');
            s.push_str(seg);
        }
        s
    }
}

impl fmt::Debug for StoragePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.virtual_path())
    }
}

impl fmt::Display for StoragePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.virtual_path())
    }
}

impl OrgName {
    /// Org ids are validated by the admin API too; this is the storage's own guard, so
    /// that no caller can make `..` or `a/b` an org folder.
    pub fn new(org: &str) -> Result<Self, StorageError> {
        check_segment(org)?;
        if org.starts_with('.') {
            return Err(StorageError::InvalidPath("org name starting with a dot"));
        }
        Ok(Self(org.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OrgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for OrgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_and_refuses_climbing() {
        let p = |s: &str| StoragePath::parse(s).map(|p| p.virtual_path());
        assert_eq!(p("/").unwrap(), "/");
        assert_eq!(p("a//b/./c/..").unwrap(), "/a/b");
        assert_eq!(p("/a/../b/").unwrap(), "/b");
        for bad in ["..", "/a/../..", "/../../etc/passwd", "a/../../x"] {
            assert!(matches!(p(bad), Err(StorageError::Escape)), "{bad}");
        }
        assert!(matches!(p("a\0b"), Err(StorageError::InvalidPath(_))));
        assert!(matches!(p("a\nb"), Err(StorageError::InvalidPath(_))));
        // Encodings are not decoded.
        assert_eq!(p("%2e%2e/x").unwrap(), "/%2e%2e/x");
        assert_eq!(p("..\\..\\x").unwrap(), "/..\\..\\x");
    }

    #[test]
    fn org_names_are_single_segments() {
        assert!(OrgName::new("acme").is_ok());
        for bad in ["", ".", "..", "a/b", ".hidden", "a\0"] {
            assert!(OrgName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parents_and_joins() {
        let p = StoragePath::parse("/a/b").unwrap();
        assert_eq!(p.parent().unwrap().virtual_path(), "/a");
        assert_eq!(p.name(), Some("b"));
        assert!(StoragePath::root().parent().is_none());
        assert!(p.join("..").is_err());
        assert!(p.join("c/d").is_err());
        assert!(p.join("c").unwrap().starts_with(&p));
    }
}
