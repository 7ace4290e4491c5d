//! One conformance suite for every storage backend: each case below runs against `local`
//! (a temp dir) and `s3` (a real SeaweedFS), instantiated by `conformance!`.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use hookbridge::storage::local::LocalStorage;
use hookbridge::storage::{
    read_small, EventFile, OrgName, RenameMode, SftpStatus, Storage, StorageError, StoragePath,
    UploadOptions,
};

use crate::seaweed;

/// A backend under test, with what the jail cases need to look behind it.
pub struct Backend {
    pub storage: Arc<dyn Storage>,
    pub org: OrgName,
    pub other: OrgName,
    pub kind: Kind,
    _dir: Option<tempfile::TempDir>,
}

pub enum Kind {
    /// The data dir (`orgs/` and `tmp/` inside).
    Local(std::path::PathBuf),
    /// The server, and the key prefix of this test.
    S3(seaweed::S3Server, String),
}

pub fn local_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = LocalStorage::open(&data.join("orgs"), &data.join("tmp")).unwrap();
    Backend {
        storage: Arc::new(s),
        org: OrgName::new("acme").unwrap(),
        other: OrgName::new("globex").unwrap(),
        kind: Kind::Local(data),
        _dir: Some(dir),
    }
}

pub async fn s3_backend(test: &str) -> Option<Backend> {
    let server = seaweed::server().await?;
    let prefix = seaweed::unique_prefix(test);
    Some(Backend {
        storage: Arc::new(server.storage(&prefix)),
        org: OrgName::new("acme").unwrap(),
        other: OrgName::new("globex").unwrap(),
        kind: Kind::S3(server, prefix),
        _dir: None,
    })
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::local_backend();
                    b.storage.create_org(&b.org).await.unwrap();
                    b.storage.create_org(&b.other).await.unwrap();
                    super::$case(&b).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(b) = super::s3_backend(stringify!($case)).await else { return };
                    b.storage.create_org(&b.org).await.unwrap();
                    b.storage.create_org(&b.other).await.unwrap();
                    super::$case(&b).await;
                }
            )*
        }
    };
}

conformance!(
    event_writes_are_create_only_and_idempotent,
    listing_is_complete_past_one_page,
    ranged_reads_in_any_order,
    rename_refuses_or_replaces,
    folders_stat_delete_and_errors,
    uploads_appear_on_commit_only,
    no_path_leaves_the_org,
    walk_and_remove_org,
    staged_events_appear_on_publish_only,
);

fn p(s: &str) -> StoragePath {
    StoragePath::parse(s).unwrap()
}

fn ev(org: &OrgName, path: &str, body: &str) -> EventFile {
    EventFile {
        org: org.clone(),
        path: p(path),
        body: Bytes::from(body.to_owned()),
    }
}

async fn read(b: &Backend, org: &OrgName, path: &str) -> Vec<u8> {
    read_small(&*b.storage, org, &p(path), 64 << 20)
        .await
        .unwrap()
        .to_vec()
}

async fn names(b: &Backend, org: &OrgName, dir: &str) -> Vec<String> {
    let mut l = b.storage.list(org, &p(dir)).await.unwrap();
    let mut out = Vec::new();
    while let Some(page) = l.next_page().await.unwrap() {
        out.extend(page.into_iter().map(|e| e.name));
    }
    out.sort();
    out
}

async fn event_writes_are_create_only_and_idempotent(b: &Backend) {
    let s = &*b.storage;
    let batch = vec![
        ev(&b.org, "/payment/2026-11-28/a.json", "{\"a\":1}\n"),
        ev(&b.org, "/payment/2026-11-28/b.json", "{\"b\":1}\n"),
        ev(&b.other, "/payment/2026-11-28/a.json", "{\"other\":1}\n"),
    ];
    for r in s.write_events(&batch).await {
        r.unwrap();
    }
    // The same batch again (a rewrite after a crash) is success, nothing doubled.
    for r in s.write_events(&batch).await {
        r.unwrap();
    }
    // Create-only: a different body under a name already there does not replace it.
    let again = vec![ev(&b.org, "/payment/2026-11-28/a.json", "{\"forged\":1}\n")];
    s.write_events(&again).await[0].as_ref().unwrap();
    assert_eq!(
        read(b, &b.org, "/payment/2026-11-28/a.json").await,
        b"{\"a\":1}\n"
    );
    assert_eq!(
        read(b, &b.other, "/payment/2026-11-28/a.json").await,
        b"{\"other\":1}\n"
    );
    assert_eq!(
        names(b, &b.org, "/payment/2026-11-28").await,
        ["a.json", "b.json"]
    );
    assert_eq!(names(b, &b.org, "/").await, ["payment"]);
    let m = s
        .stat(&b.org, &p("/payment/2026-11-28/b.json"))
        .await
        .unwrap();
    assert!(m.is_file() && m.size == 8, "{m:?}");
    assert!(s.stat(&b.org, &p("/payment")).await.unwrap().is_dir());
}

async fn listing_is_complete_past_one_page(b: &Backend) {
    let n = 2500;
    let files: Vec<EventFile> = (0..n)
        .map(|i| ev(&b.org, &format!("/big/{i:05}.json"), "{}\n"))
        .collect();
    for chunk in files.chunks(500) {
        for r in b.storage.write_events(chunk).await {
            r.unwrap();
        }
    }
    b.storage.mkdir(&b.org, &p("/big/sub")).await.unwrap();
    let mut l = b.storage.list(&b.org, &p("/big")).await.unwrap();
    let mut seen = BTreeSet::new();
    let mut pages = 0;
    while let Some(page) = l.next_page().await.unwrap() {
        pages += 1;
        for e in page {
            assert!(seen.insert(e.name.clone()), "{} listed twice", e.name);
            if e.name == "sub" {
                assert!(e.meta.is_dir());
            } else {
                assert!(e.meta.is_file() && e.meta.size == 3, "{e:?}");
            }
        }
    }
    assert_eq!(seen.len(), n + 1, "every entry exactly once");
    assert!(pages >= 3, "listed in pages, not all at once ({pages})");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8)
        .collect()
}

async fn upload(b: &Backend, path: &str, data: &[u8]) {
    let up = b
        .storage
        .create_upload(
            &b.org,
            &p(path),
            UploadOptions {
                max_bytes: u64::MAX,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for (i, c) in data.chunks(255 * 1024).enumerate() {
        up.write_at((i * 255 * 1024) as u64, Bytes::copy_from_slice(c))
            .await
            .unwrap();
    }
    up.commit().await.unwrap();
}

async fn ranged_reads_in_any_order(b: &Backend) {
    let data = pattern(13 << 20);
    upload(b, "/big.bin", &data).await;
    let h: Arc<dyn hookbridge::storage::ReadHandle> =
        Arc::from(b.storage.open_read(&b.org, &p("/big.bin")).await.unwrap());
    assert_eq!(h.meta().size, data.len() as u64);
    // Pipelined READs, out of order, at once, with a 13-byte header room each.
    let mut offsets: Vec<u64> = (0..data.len() as u64).step_by(200_000).collect();
    offsets.reverse();
    offsets.swap(1, 7);
    let reads = offsets.iter().map(|&o| {
        let h = h.clone();
        async move { (o, h.read_at(o, 200_000, 13).await.unwrap()) }
    });
    for (o, buf) in futures::future::join_all(reads).await {
        let end = (o as usize + 200_000).min(data.len());
        assert_eq!(&buf[13..], &data[o as usize..end], "read at {o}");
    }
    // At the end: nothing, not an error.
    let tail = h.read_at(data.len() as u64, 100, 13).await.unwrap();
    assert_eq!(tail.len(), 13);
    let last = h.read_at(data.len() as u64 - 5, 100, 0).await.unwrap();
    assert_eq!(&last[..], &data[data.len() - 5..]);
}

async fn rename_refuses_or_replaces(b: &Backend) {
    let s = &*b.storage;
    for r in s
        .write_events(&[ev(&b.org, "/d/a", "A"), ev(&b.org, "/d/b", "B")])
        .await
    {
        r.unwrap();
    }
    let e = s
        .rename(&b.org, &p("/d/a"), &p("/d/b"), RenameMode::NoReplace)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists), "{e:?}");
    assert_eq!(e.sftp_status(), SftpStatus::Failure);
    assert_eq!(read(b, &b.org, "/d/b").await, b"B");
    s.rename(&b.org, &p("/d/a"), &p("/d/b"), RenameMode::Replace)
        .await
        .unwrap();
    assert_eq!(read(b, &b.org, "/d/b").await, b"A");
    assert!(matches!(
        s.stat(&b.org, &p("/d/a")).await,
        Err(StorageError::NotFound)
    ));
    s.rename(&b.org, &p("/d/b"), &p("/d/c"), RenameMode::NoReplace)
        .await
        .unwrap();
    assert_eq!(names(b, &b.org, "/d").await, ["c"]);
    // A folder moves with what is in it.
    s.rename(&b.org, &p("/d"), &p("/moved"), RenameMode::NoReplace)
        .await
        .unwrap();
    assert_eq!(read(b, &b.org, "/moved/c").await, b"A");
    assert!(matches!(
        s.stat(&b.org, &p("/d")).await,
        Err(StorageError::NotFound)
    ));
    let e = s
        .rename(&b.org, &p("/nope"), &p("/x"), RenameMode::NoReplace)
        .await
        .unwrap_err();
    assert_eq!(e.sftp_status(), SftpStatus::NoSuchFile, "{e:?}");
}

async fn folders_stat_delete_and_errors(b: &Backend) {
    let s = &*b.storage;
    s.mkdir(&b.org, &p("/empty")).await.unwrap();
    assert!(s.stat(&b.org, &p("/empty")).await.unwrap().is_dir());
    assert_eq!(names(b, &b.org, "/").await, ["empty"]);
    assert!(names(b, &b.org, "/empty").await.is_empty());
    assert!(matches!(
        s.mkdir(&b.org, &p("/empty")).await,
        Err(StorageError::AlreadyExists)
    ));
    assert!(matches!(
        s.mkdir(&b.org, &p("/no/such/parent")).await,
        Err(StorageError::NotFound)
    ));
    s.write_events(&[ev(&b.org, "/full/f", "x")]).await[0]
        .as_ref()
        .unwrap();
    let e = s.rmdir(&b.org, &p("/full")).await.unwrap_err();
    assert!(matches!(e, StorageError::NotEmpty), "{e:?}");
    let e = s.delete(&b.org, &p("/full")).await.unwrap_err();
    assert!(matches!(e, StorageError::IsADirectory), "{e:?}");
    let e = s.delete(&b.org, &p("/full/none")).await.unwrap_err();
    assert_eq!(e.sftp_status(), SftpStatus::NoSuchFile);
    let e = s.list(&b.org, &p("/full/f")).await.err().unwrap();
    assert!(matches!(e, StorageError::NotADirectory), "{e:?}");
    let e = s.open_read(&b.org, &p("/full")).await.err().unwrap();
    assert!(matches!(e, StorageError::IsADirectory), "{e:?}");
    s.delete(&b.org, &p("/full/f")).await.unwrap();
    s.rmdir(&b.org, &p("/empty")).await.unwrap();
    assert!(matches!(
        s.stat(&b.org, &p("/empty")).await,
        Err(StorageError::NotFound)
    ));
    assert!(s.stat(&b.org, &StoragePath::root()).await.unwrap().is_dir());
}

async fn uploads_appear_on_commit_only(b: &Backend) {
    let s = &*b.storage;
    let opts = UploadOptions {
        max_bytes: 64 << 20,
        ..Default::default()
    };
    let up = s.create_upload(&b.org, &p("/up.bin"), opts).await.unwrap();
    // Pipelined WRITEs arrive a little out of order.
    let data = pattern(11 << 20);
    let chunks: Vec<(usize, &[u8])> = data.chunks(32 * 1024).enumerate().collect();
    for pair in chunks.chunks(2) {
        for &(i, c) in pair.iter().rev() {
            up.write_at((i * 32 * 1024) as u64, Bytes::copy_from_slice(c))
                .await
                .unwrap();
        }
    }
    assert_eq!(up.size(), data.len() as u64);
    assert!(matches!(
        s.stat(&b.org, &p("/up.bin")).await,
        Err(StorageError::NotFound)
    ));
    up.commit().await.unwrap();
    assert_eq!(read(b, &b.org, "/up.bin").await, data);

    // Aborted: nothing left.
    let up = s
        .create_upload(&b.org, &p("/gone.bin"), opts)
        .await
        .unwrap();
    up.write_at(0, Bytes::from_static(b"partial"))
        .await
        .unwrap();
    up.abort().await;
    assert!(matches!(
        s.stat(&b.org, &p("/gone.bin")).await,
        Err(StorageError::NotFound)
    ));
    // O_EXCL on an existing file; a write past the limit.
    let excl = UploadOptions {
        exclusive: true,
        ..opts
    };
    let e = s
        .create_upload(&b.org, &p("/up.bin"), excl)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, StorageError::AlreadyExists), "{e:?}");
    let small = UploadOptions {
        max_bytes: 10,
        ..opts
    };
    let up = s
        .create_upload(&b.org, &p("/cap.bin"), small)
        .await
        .unwrap();
    let e = up
        .write_at(5, Bytes::from_static(b"123456"))
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::TooLarge), "{e:?}");
    up.abort().await;
    let e = s
        .create_upload(&b.org, &p("/no/dir/x"), opts)
        .await
        .err()
        .unwrap();
    assert_eq!(e.sftp_status(), SftpStatus::NoSuchFile, "{e:?}");
}

async fn no_path_leaves_the_org(b: &Backend) {
    let s = &*b.storage;
    s.write_events(&[ev(&b.other, "/secret.json", "globex")])
        .await[0]
        .as_ref()
        .unwrap();
    for bad in [
        "..",
        "/../globex/secret.json",
        "../../etc/passwd",
        "/a/../../x",
    ] {
        assert!(
            matches!(StoragePath::parse(bad), Err(StorageError::Escape)),
            "{bad}"
        );
    }
    for bad in ["globex/../..", "a\0b", "a\nb"] {
        assert!(StoragePath::parse(bad).is_err(), "{bad:?}");
    }
    // Names that look like escapes are plain names inside the org.
    for odd in [
        "%2e%2e",
        "..%2f..%2fglobex",
        "..\\..\\globex",
        "...",
        "globex",
    ] {
        let path = format!("/{odd}/x.json");
        s.write_events(&[ev(&b.org, &path, "mine")]).await[0]
            .as_ref()
            .unwrap();
        assert_eq!(read(b, &b.org, &path).await, b"mine");
    }
    assert!(matches!(
        s.stat(&b.org, &p("/secret.json")).await,
        Err(StorageError::NotFound)
    ));
    assert_eq!(names(b, &b.other, "/").await, ["secret.json"]);
    assert_eq!(read(b, &b.other, "/secret.json").await, b"globex");
    match &b.kind {
        Kind::S3(server, prefix) => {
            // Every key written lies under <prefix>/<org>/.
            let keys = all_keys(server, prefix).await;
            assert!(!keys.is_empty());
            for k in &keys {
                assert!(
                    k.starts_with(&format!("{prefix}/acme/"))
                        || k == &format!("{prefix}/globex/secret.json"),
                    "key outside its org: {k}"
                );
            }
        }
        Kind::Local(data) => {
            let mut outside = Vec::new();
            for e in std::fs::read_dir(data.join("orgs")).unwrap() {
                outside.push(e.unwrap().file_name().into_string().unwrap());
            }
            outside.sort();
            assert_eq!(outside, ["acme", "globex"]);
            assert_eq!(
                std::fs::read_dir(data.join("orgs/globex")).unwrap().count(),
                1
            );
        }
    }
}

/// Every key of the bucket under `prefix`, through a client of our own.
async fn all_keys(server: &seaweed::S3Server, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(seaweed::BUCKET)
        .with_region("us-east-1")
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_access_key_id(seaweed::ACCESS_KEY)
        .with_secret_access_key(seaweed::SECRET_KEY)
        .build()
        .unwrap();
    let p = object_store::path::Path::from(prefix);
    store
        .list(Some(&p))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

async fn walk_and_remove_org(b: &Backend) {
    let s = &*b.storage;
    for r in s
        .write_events(&[
            ev(&b.org, "/t/2026-01-01/a", "12345"),
            ev(&b.org, "/t/2026-01-02/b", "1"),
            ev(&b.other, "/t/keep", "k"),
        ])
        .await
    {
        r.unwrap();
    }
    s.mkdir(&b.org, &p("/emptydir")).await.unwrap();
    let mut w: Vec<(String, u64)> = s
        .walk(&b.org)
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.path.virtual_path(), f.size))
        .collect();
    w.sort();
    assert_eq!(
        w,
        [
            ("/t/2026-01-01/a".to_owned(), 5),
            ("/t/2026-01-02/b".to_owned(), 1)
        ]
    );
    s.remove_org(&b.org).await.unwrap();
    assert!(s.walk(&b.org).await.unwrap().is_empty());
    assert_eq!(s.walk(&b.other).await.unwrap().len(), 1);
    // Removing twice is fine.
    s.remove_org(&b.org).await.unwrap();
}

/// `check-config` with `[storage] kind = "s3"` reaches the bucket, and says which key is
/// wrong when it cannot.
#[tokio::test]
async fn check_config_reaches_the_bucket_or_says_what_is_wrong() {
    let Some(server) = seaweed::server().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |storage: String, key: &str| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!("data_dir = {:?}\n{storage}", dir.path().join("data")),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookbridge"))
            .args(["check-config", "--config"])
            .arg(&cfg)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", seaweed::SECRET_KEY)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let good = server.toml("cc");
    let (ok, text) = run(good.clone(), seaweed::ACCESS_KEY);
    assert!(ok && text.contains("reached"), "{text}");
    let (ok, text) = run(
        good.replace(seaweed::BUCKET, "no-such-bucket-here"),
        seaweed::ACCESS_KEY,
    );
    assert!(!ok && text.contains("storage.bucket"), "{text}");
    let (ok, text) = run(good.clone(), "wrong-key");
    assert!(!ok && text.contains("AWS_ACCESS_KEY_ID"), "{text}");
    let closed = format!("http://127.0.0.1:{}", crate::harness::free_port());
    let (ok, text) = run(good.replace(&server.endpoint, &closed), seaweed::ACCESS_KEY);
    assert!(!ok && text.contains("storage.endpoint"), "{text}");
    let (ok, text) = run(good.replace("allow_http = true", "allow_http = false"), "k");
    assert!(!ok && text.contains("storage.allow_http"), "{text}");
}

async fn staged_events_appear_on_publish_only(b: &Backend) {
    let s = &*b.storage;
    let files = vec![
        ev(&b.org, "/s/kept.json", "k"),
        ev(&b.org, "/s/dropped.json", "d"),
    ];
    let staged = s.stage_events(files.clone()).await;
    assert!(matches!(
        s.stat(&b.org, &p("/s/kept.json")).await,
        Err(StorageError::NotFound)
    ));
    let res = staged.publish(vec![true, false]).await;
    assert!(res.iter().all(Result::is_ok), "{res:?}");
    assert_eq!(names(b, &b.org, "/s").await, ["kept.json"]);
    // Staged, then dropped (the store commit failed): nothing appears, no temp is left.
    drop(s.stage_events(vec![ev(&b.org, "/s/never.json", "n")]).await);
    assert_eq!(names(b, &b.org, "/s").await, ["kept.json"]);
    if let Kind::Local(data) = &b.kind {
        assert_eq!(std::fs::read_dir(data.join("tmp")).unwrap().count(), 0);
    }
}
