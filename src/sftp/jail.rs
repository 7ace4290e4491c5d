//! The one place where a client's path becomes a host path.
//!
//! A path is first cleaned lexically against the virtual root `/` (the org folder):
//! `.` and empty segments drop out, `..` pops a segment and may never climb above `/`.
//! The host path is then built segment by segment and walked with `lstat`: any
//! symlink on the way is refused (even one planted inside the folder), and the real
//! path of the deepest existing part must still lie under the canonical org root.
//! Files are then opened with `O_NOFOLLOW`, so a symlink swapped in after the check
//! is still not followed.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("invalid path")]
    Invalid,
    #[error("path leaves your folder")]
    Escape,
    #[error("symbolic links are not served")]
    Symlink,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A client path resolved inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Canonical virtual path, always absolute (`/`, `/a/b`).
    pub virt: String,
    /// Host path under the org root.
    pub real: PathBuf,
}

impl Resolved {
    pub fn is_root(&self) -> bool {
        self.virt == "/"
    }
}

#[derive(Debug, Clone)]
pub struct Jail {
    root: PathBuf,
}

impl Jail {
    /// `root` must exist; it is canonicalised once so later checks compare real paths.
    pub fn new(root: &Path) -> io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `path` (absolute or relative to `/`) to a host path inside the root.
    pub fn resolve(&self, path: &str) -> Result<Resolved, JailError> {
        let segments = clean(path)?;
        let mut real = self.root.clone();
        let mut existing = self.root.clone();
        let mut walking = true;
        for seg in &segments {
            real.push(seg);
            if !walking {
                continue;
            }
            match std::fs::symlink_metadata(&real) {
                Ok(m) if m.file_type().is_symlink() => return Err(JailError::Symlink),
                Ok(_) => existing.clone_from(&real),
                // The rest does not exist yet (mkdir, upload target): nothing to follow.
                Err(e) if e.kind() == io::ErrorKind::NotFound => walking = false,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => walking = false,
                Err(e) => return Err(JailError::Io(e)),
            }
        }
        // Belt and braces: whatever the walk saw, the real path must stay under the root.
        let canonical = existing.canonicalize()?;
        if !canonical.starts_with(&self.root) {
            return Err(JailError::Escape);
        }
        Ok(Resolved {
            virt: virtual_path(&segments),
            real,
        })
    }
}

/// Lexically cleans a client path into its segments below `/`.
pub fn clean(path: &str) -> Result<Vec<&str>, JailError> {
    segments(path, false)
}

/// The path a chrooted OpenSSH answers to REALPATH: cleaned, with `..` at `/` staying at
/// `/` (WinSCP and `sftp`'s `cd ..` ask for the parent of the root and expect the root).
/// Only REALPATH uses it; every other operation still refuses a path that climbs above `/`.
pub fn clamp(path: &str) -> Result<String, JailError> {
    Ok(virtual_path(&segments(path, true)?))
}

/// The one lexical walk behind `clean` and `clamp`; they differ only at `..` above `/`.
fn segments(path: &str, clamp_at_root: bool) -> Result<Vec<&str>, JailError> {
    // A NUL would truncate the path in the kernel; it has no business in a file name.
    if path.contains('\0') {
        return Err(JailError::Invalid);
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() && !clamp_at_root {
                    return Err(JailError::Escape);
                }
            }
            s => out.push(s),
        }
    }
    Ok(out)
}

pub fn virtual_path(segments: &[&str]) -> String {
    if segments.is_empty() {
        "/".to_owned()
    } else {
        let mut s = String::new();
        for seg in segments {
            s.push('/');
            s.push_str(seg);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::symlink;

    struct Tree {
        _dir: tempfile::TempDir,
        orgs: PathBuf,
        secret: PathBuf,
    }

    /// orgs/a (the jail) with a planted symlink, orgs/b (another org), and a host secret.
    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let orgs = dir.path().join("orgs");
        std::fs::create_dir_all(orgs.join("a/sub")).unwrap();
        std::fs::create_dir_all(orgs.join("b")).unwrap();
        std::fs::write(orgs.join("a/sub/f.json"), "{}").unwrap();
        std::fs::write(orgs.join("b/other.json"), "{}").unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        symlink(&secret, orgs.join("a/link")).unwrap();
        symlink(orgs.join("b"), orgs.join("a/sub/tob")).unwrap();
        symlink("..", orgs.join("a/up")).unwrap();
        Tree {
            secret,
            orgs,
            _dir: dir,
        }
    }

    #[test]
    fn cleans_lexically() {
        assert_eq!(clean("/").unwrap(), Vec::<&str>::new());
        assert_eq!(clean(".").unwrap(), Vec::<&str>::new());
        assert_eq!(clean("a//b/./c/..").unwrap(), vec!["a", "b"]);
        assert_eq!(virtual_path(&clean("/a/../b/").unwrap()), "/b");
        assert!(matches!(clean(".."), Err(JailError::Escape)));
        assert!(matches!(clean("/a/../.."), Err(JailError::Escape)));
        assert!(matches!(clean("/../../etc/passwd"), Err(JailError::Escape)));
        assert!(matches!(clean("a\0b"), Err(JailError::Invalid)));
        // Encodings are not decoded: these are plain (odd) names inside the folder.
        assert_eq!(clean("%2e%2e/x").unwrap(), vec!["%2e%2e", "x"]);
        assert_eq!(clean("..\\..\\x").unwrap(), vec!["..\\..\\x"]);
    }

    #[test]
    fn clamps_for_realpath() {
        for (p, want) in [
            ("", "/"),
            (".", "/"),
            ("..", "/"),
            ("/..", "/"),
            ("/../../a", "/a"),
            ("//a//b/..", "/a"),
            ("a/./b/../../..", "/"),
        ] {
            assert_eq!(clamp(p).unwrap(), want, "{p:?}");
        }
        assert!(matches!(clamp("/a\0"), Err(JailError::Invalid)));
    }

    #[test]
    fn resolves_inside() {
        let t = tree();
        let j = Jail::new(&t.orgs.join("a")).unwrap();
        let r = j.resolve("/sub/f.json").unwrap();
        assert_eq!(r.virt, "/sub/f.json");
        assert_eq!(r.real, j.root().join("sub/f.json"));
        let r = j.resolve("sub/new/deeper").unwrap();
        assert_eq!(r.real, j.root().join("sub/new/deeper"));
        assert!(j.resolve("/").unwrap().is_root());
    }

    #[test]
    fn refuses_escapes_and_symlinks() {
        let t = tree();
        let j = Jail::new(&t.orgs.join("a")).unwrap();
        for p in ["..", "/../b/other.json", "../../secret"] {
            assert!(matches!(j.resolve(p), Err(JailError::Escape)), "{p}");
        }
        for p in ["/link", "/sub/tob/other.json", "/up/b", "/up", "/sub/tob"] {
            assert!(matches!(j.resolve(p), Err(JailError::Symlink)), "{p}");
        }
        // Another org's name is just a missing folder inside this one.
        let r = j.resolve("/b/other.json").unwrap();
        assert!(!r.real.exists());
        assert!(t.secret.exists());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("".to_owned()),
            Just("sub".to_owned()),
            Just("link".to_owned()),
            Just("tob".to_owned()),
            Just("up".to_owned()),
            Just("b".to_owned()),
            Just("f.json".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("..\\".to_owned()),
            "[a-z./\\\\%]{0,6}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn no_generated_path_escapes(lead in prop::bool::ANY, segs in prop::collection::vec(segment(), 0..8)) {
            let t = tree();
            let j = Jail::new(&t.orgs.join("a")).unwrap();
            let mut p = segs.join("/");
            if lead { p.insert(0, '/'); }
            if let Ok(r) = j.resolve(&p) {
                prop_assert!(r.real.starts_with(j.root()), "{p} -> {:?}", r.real);
                // Whatever exists of it resolves, through the real file system, inside the root.
                let mut probe = r.real.clone();
                while !probe.exists() { probe.pop(); }
                prop_assert!(probe.canonicalize().unwrap().starts_with(j.root()), "{p}");
                prop_assert!(r.virt.starts_with('/'));
                prop_assert!(!r.virt.split('/').any(|s| s == ".." || s == "."));
            }
        }
    }
}
