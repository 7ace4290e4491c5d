//! Any path an SFTP client may send: the jail either refuses it or the local storage
//! resolves it inside the org root (checked against the real file system, with planted
//! symlinks pointing out of the root: no operation may reach through them).
#![no_main]

use std::sync::OnceLock;

use hookbridge::sftp::jail;
use hookbridge::storage::local::LocalStorage;
use hookbridge::storage::{OrgName, Storage};
use libfuzzer_sys::fuzz_target;

struct Tree {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    storage: LocalStorage,
    org: OrgName,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let orgs = dir.path().join("orgs");
        let root = orgs.join("a");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(orgs.join("b")).unwrap();
        std::fs::write(orgs.join("b/x"), b"b").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(orgs.join("b"), root.join("sub/tob")).unwrap();
        std::os::unix::fs::symlink("..", root.join("up")).unwrap();
        let storage = LocalStorage::open(&orgs, &dir.path().join("tmp")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Tree {
            _dir: dir,
            rt,
            storage,
            org: OrgName::new("a").unwrap(),
        }
    })
}

fuzz_target!(|path: &str| {
    let t = tree();
    if let Ok(p) = jail::resolve(path) {
        assert!(p.segments().iter().all(|s| s != ".." && s != "."), "{path:?}");
        // Whatever it names, reading it never yields a file outside the org.
        if let Ok(h) = t.rt.block_on(t.storage.open_read(&t.org, &p)) {
            let data = t.rt.block_on(h.read_at(0, 16, 0)).unwrap();
            assert_ne!(&data[..], b"x", "{path:?} reached a file outside the org");
            assert_ne!(&data[..], b"b", "{path:?} reached another org");
        }
    }
});
