//! Any path an SFTP client may send: the jail either refuses it or resolves it to a
//! place inside the org root (checked against the real file system, with planted
//! symlinks pointing out of the root).
#![no_main]

use std::sync::OnceLock;

use hookbridge::sftp::jail::Jail;
use libfuzzer_sys::fuzz_target;

struct Tree {
    _dir: tempfile::TempDir,
    jail: Jail,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("orgs/a");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(dir.path().join("orgs/b")).unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("orgs/b"), root.join("sub/tob")).unwrap();
        std::os::unix::fs::symlink("..", root.join("up")).unwrap();
        let jail = Jail::new(&root).unwrap();
        Tree { _dir: dir, jail }
    })
}

fuzz_target!(|path: &str| {
    let t = tree();
    if let Ok(r) = t.jail.resolve(path) {
        assert!(r.real.starts_with(t.jail.root()), "{path:?} -> {:?}", r.real);
        let mut probe = r.real.clone();
        while !probe.exists() {
            probe.pop();
        }
        assert!(probe.canonicalize().unwrap().starts_with(t.jail.root()), "{path:?}");
        assert!(r.virt.starts_with('/'));
    }
});
