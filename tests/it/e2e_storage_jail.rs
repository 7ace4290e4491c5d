//! The local backend against symlinks planted on disk (issue 10, item 4): every operation
//! refuses a path through a symlink at any depth, also while an SFTP-like user keeps
//! renaming the folder that holds the link.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hookbridge::storage::{
    EventFile, RenameMode, SetAttrs, StorageError, StoragePath, UploadOptions,
};

use crate::e2e_storage::{local_backend, Backend, Kind};

fn p(s: &str) -> StoragePath {
    StoragePath::parse(s).unwrap()
}

struct Planted {
    b: Backend,
    data: PathBuf,
    host_secret: PathBuf,
}

/// acme/sub/{up → ../.., etc → /etc, globex → ../../globex, f.json}, acme/top → host file,
/// acme/deep/x/y/z → ../../../../globex; globex/secret.json.
async fn planted() -> Planted {
    let b = local_backend();
    b.storage.create_org(&b.org).await.unwrap();
    b.storage.create_org(&b.other).await.unwrap();
    let Kind::Local(data) = &b.kind else {
        unreachable!()
    };
    let data = data.clone();
    let acme = data.join("orgs/acme");
    std::fs::create_dir_all(acme.join("sub")).unwrap();
    std::fs::create_dir_all(acme.join("deep/x/y")).unwrap();
    std::fs::write(acme.join("sub/f.json"), "acme").unwrap();
    std::fs::write(data.join("orgs/globex/secret.json"), "globex").unwrap();
    let host_secret = data.join("host-secret");
    std::fs::write(&host_secret, "host").unwrap();
    symlink("../..", acme.join("sub/up")).unwrap();
    symlink("/etc", acme.join("sub/etc")).unwrap();
    symlink("../../globex", acme.join("sub/globex")).unwrap();
    symlink(&host_secret, acme.join("top")).unwrap();
    symlink("../../../../globex", acme.join("deep/x/y/z")).unwrap();
    Planted {
        b,
        data,
        host_secret,
    }
}

fn untouched(pl: &Planted) {
    let g = pl.data.join("orgs/globex");
    let names: Vec<_> = std::fs::read_dir(&g)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret.json"], "globex changed");
    assert_eq!(std::fs::read(g.join("secret.json")).unwrap(), b"globex");
    assert_eq!(std::fs::read(&pl.host_secret).unwrap(), b"host");
}

fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, StorageError>) {
    match r {
        Err(
            StorageError::Symlink
            | StorageError::NotFound
            | StorageError::Escape
            | StorageError::NotADirectory,
        ) => {}
        other => panic!("{what}: {other:?}"),
    }
}

#[tokio::test]
async fn planted_symlinks_are_refused_at_any_depth_by_every_operation() {
    let pl = planted().await;
    let (s, org) = (&*pl.b.storage, &pl.b.org);
    let through = [
        "/top",
        "/sub/up/globex/secret.json",
        "/sub/etc/passwd",
        "/sub/globex/secret.json",
        "/deep/x/y/z/secret.json",
        "/sub/up",
        "/sub/globex",
    ];
    for path in through {
        let path = p(path);
        refused("stat", s.stat(org, &path).await);
        refused("list", s.list(org, &path).await.map(|_| ()));
        refused("open_read", s.open_read(org, &path).await.map(|_| ()));
        refused("delete", s.delete(org, &path).await);
        refused("rmdir", s.rmdir(org, &path).await);
        let attrs = SetAttrs {
            mtime: Some(SystemTime::now()),
            perm: Some(0o777),
            ..Default::default()
        };
        refused("set_attrs", s.set_attrs(org, &path, attrs).await);
        refused(
            "rename from",
            s.rename(org, &path, &p("/stolen"), RenameMode::Replace)
                .await,
        );
        let into = path.join("new").unwrap();
        refused("mkdir", s.mkdir(org, &into).await);
        refused(
            "rename to",
            s.rename(org, &p("/sub/f.json"), &into, RenameMode::Replace)
                .await,
        );
        refused(
            "upload",
            s.create_upload(
                org,
                &into,
                UploadOptions {
                    max_bytes: 10,
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
        );
        let ev = EventFile {
            org: org.clone(),
            path: into.join("e.json").unwrap(),
            body: Bytes::from_static(b"x"),
        };
        refused("write_events", s.write_events(&[ev]).await.remove(0));
    }
    // Listings and walks skip the links.
    let mut l = s.list(org, &p("/sub")).await.unwrap();
    let mut names = Vec::new();
    while let Some(page) = l.next_page().await.unwrap() {
        names.extend(page.into_iter().map(|e| e.name));
    }
    assert_eq!(names, ["f.json"]);
    let walked: Vec<String> = s
        .walk(org)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path.virtual_path())
        .collect();
    assert_eq!(walked, ["/sub/f.json"]);
    untouched(&pl);
    assert!(Path::new(&pl.data.join("orgs/acme/top")).is_symlink());
}

/// The issue's attack: one user loops `rename /sub /A; rename /A /sub` while another reads,
/// deletes and makes folders through `/A/up/…` and `/A/etc/…`. Checked-then-acted paths
/// let that through; resolution beneath the org with no symlinks never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rename_race_never_reaches_through_a_symlink() {
    let pl = planted().await;
    let stop = Arc::new(AtomicBool::new(false));
    let renames = Arc::new(AtomicUsize::new(0));
    let mover = {
        let (s, org, stop, renames) = (
            pl.b.storage.clone(),
            pl.b.org.clone(),
            stop.clone(),
            renames.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = s
                    .rename(&org, &p("/sub"), &p("/A"), RenameMode::NoReplace)
                    .await;
                let _ = s
                    .rename(&org, &p("/A"), &p("/sub"), RenameMode::NoReplace)
                    .await;
                renames.fetch_add(2, Ordering::Relaxed);
            }
        })
    };
    let mut attempts = 0u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    let (s, org) = (&*pl.b.storage, &pl.b.org);
    while Instant::now() < deadline {
        for dir in ["/A", "/sub"] {
            let read = s
                .open_read(org, &p(&format!("{dir}/up/globex/secret.json")))
                .await;
            assert!(read.is_err(), "read another org's file through {dir}/up");
            let etc = s.open_read(org, &p(&format!("{dir}/etc/passwd"))).await;
            assert!(etc.is_err(), "read /etc/passwd through {dir}/etc");
            let del = s
                .delete(org, &p(&format!("{dir}/globex/secret.json")))
                .await;
            assert!(
                del.is_err(),
                "deleted another org's file through {dir}/globex"
            );
            let mk = s.mkdir(org, &p(&format!("{dir}/up/globex/made"))).await;
            assert!(mk.is_err(), "made a folder in another org through {dir}/up");
            attempts += 4;
        }
        let walked = s.walk(org).await.unwrap();
        assert!(walked.iter().all(|f| f.path.name() == Some("f.json")));
    }
    stop.store(true, Ordering::Relaxed);
    mover.await.unwrap();
    assert!(renames.load(Ordering::Relaxed) > 100, "the race ran");
    assert!(attempts > 100);
    untouched(&pl);
}

/// Issue 10 item 4 against the real daemon over SFTP: with symlinks planted in `acme`'s
/// folder, a user loops `rename /sub /A; rename /A /sub` on one connection while another
/// reads `/A/up/globex/…` and `/A/etc/passwd`, deletes through `/A/globex/…` and makes a
/// folder through `/A/up/globex/`. None of it may reach outside `acme`.
#[tokio::test]
async fn sftp_rename_race_through_planted_symlinks_reaches_nothing() {
    use crate::e2e_sftp::{org, py, user};
    use serde_json::json;
    if !crate::harness::require_that(
        "paramiko in .venv",
        crate::harness::python().ends_with(".venv/bin/python"),
    ) {
        return;
    }
    let d = crate::harness::Daemon::start().await;
    org(&d, "acme").await;
    org(&d, "globex").await;
    user(
        &d,
        "acme",
        "w",
        json!({"password": "pw-123456", "upload": true}),
    )
    .await;
    let orgs = d.data_dir().join("orgs");
    std::fs::create_dir_all(orgs.join("acme/sub")).unwrap();
    std::fs::create_dir_all(orgs.join("globex")).unwrap();
    std::fs::write(orgs.join("globex/secret.json"), "globex").unwrap();
    symlink("../..", orgs.join("acme/sub/up")).unwrap();
    symlink("/etc", orgs.join("acme/sub/etc")).unwrap();
    symlink("../../globex", orgs.join("acme/sub/globex")).unwrap();
    let script = r#"
import threading
stop = time.time() + 5
def mover():
    t, s = connect('w', 'pw-123456')
    n = 0
    while time.time() < stop:
        for a, b in (('/sub', '/A'), ('/A', '/sub')):
            try:
                s.rename(a, b); n += 1
            except Exception:
                pass
    print('renames', n, file=sys.stderr)
th = threading.Thread(target=mover); th.start()
t, s = connect('w', 'pw-123456')
hits, tries = [], 0
while time.time() < stop:
    for d in ('/A', '/sub'):
        for what, f in (
            ('read globex', lambda: s.open(d + '/up/globex/secret.json').read()),
            ('read passwd', lambda: s.open(d + '/etc/passwd').read()),
            ('delete globex', lambda: s.remove(d + '/globex/secret.json')),
            ('mkdir in globex', lambda: s.mkdir(d + '/up/globex/made')),
            ('list globex', lambda: s.listdir(d + '/globex')),
        ):
            tries += 1
            try:
                f(); hits.append(what)
            except Exception:
                pass
th.join()
print(json.dumps({'hits': hits, 'tries': tries}))
"#;
    let (ok, out) = py(&d, script, &[]).await;
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert!(v["tries"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["hits"], json!([]), "reached outside the org: {v}");
    let globex: Vec<_> = std::fs::read_dir(orgs.join("globex"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(globex, ["secret.json"]);
    assert_eq!(
        std::fs::read(orgs.join("globex/secret.json")).unwrap(),
        b"globex"
    );
}
