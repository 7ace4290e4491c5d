//! The one place where a client's path becomes a path in the org folder.
//!
//! A path is cleaned lexically against the virtual root `/` (the org folder): `.` and
//! empty segments drop out, `..` pops a segment and may never climb above `/`. What comes
//! out is a [`StoragePath`] of plain names, which the storage resolves beneath the org's
//! root with no symlink at any step (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` on
//! local disk, `<prefix>/<org>/…` keys on S3). There is no check here that a later call
//! could outrun: the check and the use are one system call, in the storage.

use crate::storage::{StorageError, StoragePath};

/// Resolves `path` (absolute or relative to `/`) to a path inside the org folder.
pub fn resolve(path: &str) -> Result<StoragePath, StorageError> {
    StoragePath::parse(path)
}

/// The path a chrooted OpenSSH answers to REALPATH: cleaned, with `..` at `/` staying at
/// `/` (WinSCP and `sftp`'s `cd ..` ask for the parent of the root and expect the root).
/// Only REALPATH uses it; every other operation still refuses a path that climbs above `/`.
pub fn clamp(path: &str) -> Result<String, StorageError> {
    if path.contains('\0') {
        return Err(StorageError::InvalidPath("NUL in a path"));
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    Ok(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cleans_lexically() {
        let v = |p: &str| resolve(p).map(|r| r.virtual_path());
        assert_eq!(v("/").unwrap(), "/");
        assert_eq!(v(".").unwrap(), "/");
        assert_eq!(v("a//b/./c/..").unwrap(), "/a/b");
        assert_eq!(v("/a/../b/").unwrap(), "/b");
        assert!(matches!(v(".."), Err(StorageError::Escape)));
        assert!(matches!(v("/a/../.."), Err(StorageError::Escape)));
        assert!(matches!(v("/../../etc/passwd"), Err(StorageError::Escape)));
        assert!(matches!(v("a\0b"), Err(StorageError::InvalidPath(_))));
        // Encodings are not decoded: these are plain (odd) names inside the folder.
        assert_eq!(v("%2e%2e/x").unwrap(), "/%2e%2e/x");
        assert_eq!(v("..\\..\\x").unwrap(), "/..\\..\\x");
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
        assert!(clamp("/a\0").is_err());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("".to_owned()),
            Just("sub".to_owned()),
            Just("b".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("..\\".to_owned()),
            "[a-z./\\\\%]{0,6}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn no_generated_path_climbs(lead in prop::bool::ANY, segs in prop::collection::vec(segment(), 0..8)) {
            let mut p = segs.join("/");
            if lead { p.insert(0, '/'); }
            if let Ok(r) = resolve(&p) {
                prop_assert!(r.segments().iter().all(|s| s != ".." && s != "." && !s.is_empty() && !s.contains('/')));
                prop_assert!(r.virtual_path().starts_with('/'));
            }
        }
    }
}
