//! What users do with the daemon, on each storage backend: the same cases run with the
//! org folders on local disk and on S3 (a real SeaweedFS), through `backends!`. The cases
//! look at files only through SFTP clients and through `Daemon::storage()`, never at the
//! local disk, so they cannot pass on one backend by accident.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use hookbridge::storage::{EventFile, OrgName, Storage, StoragePath, UploadOptions};
use serde_json::{json, Value};

use crate::e2e_sftp::{keygen, py, run, sftp_batch, sha256_file, user};
use crate::harness::*;

async fn daemon(s3: bool) -> Option<Daemon> {
    let server = if s3 {
        Some(crate::seaweed::server().await?)
    } else {
        None
    };
    Some(
        Daemon::start_opts(Opts {
            s3: server,
            ..Default::default()
        })
        .await,
    )
}

macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(d) = super::daemon(false).await else { return };
                    super::$case(&d).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(d) = super::daemon(true).await else { return };
                    super::$case(&d).await;
                }
            )*
        }
    };
}

backends!(
    eight_types_are_found_byte_identical_with_sftp_paramiko_and_rclone,
    a_256_mib_file_downloads_with_its_checksum,
    a_listing_of_10k_files_is_complete,
    no_path_reaches_another_org,
    the_ping_test_writes_and_reads_back,
);

fn org_name(s: &str) -> OrgName {
    OrgName::new(s).unwrap()
}

/// Every file of `org`, by virtual path, as the daemon's storage holds it.
async fn files_of(d: &Daemon, org: &str) -> BTreeMap<String, Vec<u8>> {
    let s = d.storage();
    let mut out = BTreeMap::new();
    for f in s.walk(&org_name(org)).await.unwrap() {
        let body = hookbridge::storage::read_small(&*s, &org_name(org), &f.path, 1 << 20)
            .await
            .unwrap();
        out.insert(f.path.virtual_path(), body.to_vec());
    }
    out
}

fn local_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    files_under(root)
        .into_iter()
        .map(|p| {
            let v = format!("/{}", p.strip_prefix(root).unwrap().display());
            (v, std::fs::read(&p).unwrap())
        })
        .collect()
}

async fn eight_types_are_found_byte_identical_with_sftp_paramiko_and_rclone(d: &Daemon) {
    d.org_with_sftp_hook("acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(
        d,
        "acme",
        "etl",
        json!({"public_keys": [public], "password": "pw-123456"}),
    )
    .await;
    let mut posted = BTreeMap::new();
    for (i, ty) in TYPES.iter().enumerate() {
        let body =
            json!({"id": format!("evt_{i}"), "type": ty, "data": {"n": i, "text": "héllo \"q\""}});
        let r = d.post_event("acme", &body).await;
        assert_eq!(r.status(), 202, "post {ty}");
        posted.insert(format!("evt_{i}"), body);
    }
    let stored = files_of(d, "acme").await;
    assert_eq!(stored.len(), 8, "{:?}", stored.keys());
    for (path, bytes) in &stored {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        let id = v["id"].as_str().unwrap();
        assert_eq!(v["data"], posted[id]["data"], "{path}");
        assert_eq!(v["type"], posted[id]["type"], "{path}");
        assert!(bytes.ends_with(b"\n"));
    }
    // OpenSSH sftp: get -r of the whole folder.
    if require("sftp") {
        let got = tmp.path().join("openssh");
        std::fs::create_dir_all(&got).unwrap();
        let mut batch = format!("lcd {}\n", got.display());
        for ty in TYPES {
            batch.push_str(&format!("get -r /{ty}\n"));
        }
        let (ok, out) = sftp_batch(d, "etl", &key, &batch, tmp.path()).await;
        assert!(ok, "{out}");
        assert_eq!(local_tree(&got), stored, "OpenSSH sftp");
    }
    // paramiko: walk and read every file.
    let script = r#"
t, s = connect('etl', 'pw-123456')
out = {}
def walk(d):
    for a in s.listdir_attr(d):
        p = (d.rstrip('/') + '/' + a.filename)
        if stat.S_ISDIR(a.st_mode): walk(p)
        else: out[p] = s.open(p).read().decode()
walk('/')
print(json.dumps(out))
"#;
    let (ok, out) = py(d, script, &[]).await;
    assert!(ok, "{out}");
    let via: BTreeMap<String, String> = serde_json::from_str(out.trim()).unwrap();
    let via: BTreeMap<String, Vec<u8>> =
        via.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
    assert_eq!(via, stored, "paramiko");
    // rclone over SFTP.
    if require("rclone") {
        let got = tmp.path().join("rclone");
        let mut cmd = tokio::process::Command::new("rclone");
        cmd.args(["copy", "--sftp-disable-hashcheck", "--config", "/dev/null"])
            .arg(format!(
                ":sftp,host=127.0.0.1,port={},user=etl,key_file={}:/",
                d.sftp_port,
                key.display()
            ))
            .arg(&got);
        let o = run(cmd).await;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(local_tree(&got), stored, "rclone");
    }
}

async fn a_256_mib_file_downloads_with_its_checksum(d: &Daemon) {
    if !require("sftp") {
        return;
    }
    d.org_with_sftp_hook("acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(d, "acme", "etl", json!({"public_keys": [public]})).await;
    // Put in place through the storage (a multipart upload on S3).
    let src = tmp.path().join("big.bin");
    crate::e2e_sftp::big_file(&src, 256 << 20);
    let s = d.storage();
    let org = org_name("acme");
    s.create_org(&org).await.unwrap();
    let up = s
        .create_upload(
            &org,
            &StoragePath::parse("/big.bin").unwrap(),
            UploadOptions {
                max_bytes: u64::MAX,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let data = std::fs::read(&src).unwrap();
    for (i, c) in data.chunks(8 << 20).enumerate() {
        up.write_at((i * (8 << 20)) as u64, Bytes::copy_from_slice(c))
            .await
            .unwrap();
    }
    up.commit().await.unwrap();
    drop(data);
    let got = tmp.path().join("got");
    std::fs::create_dir_all(&got).unwrap();
    let (ok, out) = sftp_batch(d, "etl", &key, "get /big.bin\n", &got).await;
    assert!(ok, "{out}");
    assert_eq!(sha256_file(&got.join("big.bin")), sha256_file(&src));
}

async fn a_listing_of_10k_files_is_complete(d: &Daemon) {
    d.org_with_sftp_hook("acme").await;
    user(d, "acme", "etl", json!({"password": "pw-123456"})).await;
    let files: Vec<EventFile> = (0..10_000)
        .map(|i| EventFile {
            org: org_name("acme"),
            path: StoragePath::parse(&format!("/many/{i:05}.json")).unwrap(),
            body: Bytes::from_static(b"{}\n"),
        })
        .collect();
    let s = d.storage();
    for chunk in files.chunks(1000) {
        for r in s.write_events(chunk).await {
            r.unwrap();
        }
    }
    let script = r#"
t, s = connect('etl', 'pw-123456')
names = s.listdir('/many')
print(json.dumps({'n': len(names), 'unique': len(set(names))}))
"#;
    let (ok, out) = py(d, script, &[]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v, json!({"n": 10_000, "unique": 10_000}));
}

async fn no_path_reaches_another_org(d: &Daemon) {
    d.org_with_sftp_hook("acme").await;
    d.org_with_sftp_hook("globex").await;
    user(
        d,
        "acme",
        "etl",
        json!({"password": "pw-123456", "upload": true}),
    )
    .await;
    let r = d
        .post_event(
            "globex",
            &json!({"id": "evt_secret", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let before = files_of(d, "globex").await;
    let (path, _) = before.iter().next().unwrap();
    let script = format!(
        r#"
t, s = connect('etl', 'pw-123456')
hits = []
for p in ['../globex{path}', '/../globex{path}', '/..{path}', '%2e%2e/globex{path}',
          '..%2fglobex{path}', '/globex{path}', '//../globex{path}', '../../globex{path}']:
    for what, f in (('read', lambda: s.open(p).read()), ('stat', lambda: s.stat(p)),
                    ('remove', lambda: s.remove(p)), ('list', lambda: s.listdir(p.rsplit('/', 1)[0] or '/'))):
        try:
            r = f()
            if what == 'list' and not r: continue
            hits.append((what, p))
        except Exception:
            pass
for p in ['../globex/x.json', '/../../globex/y.json']:
    try:
        s.open(p, 'w').write(b'x'); hits.append(('write', p))
    except Exception:
        pass
print(json.dumps(hits))
"#
    );
    let (ok, out) = py(d, &script, &[]).await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "[]", "reached another org");
    assert_eq!(files_of(d, "globex").await, before);
    if let Some((server, prefix)) = &d.s3 {
        let store = server.storage(prefix);
        // Nothing of acme's was written outside <prefix>/acme/.
        assert!(store
            .walk(&org_name("globex"))
            .await
            .unwrap()
            .iter()
            .all(|f| f.path.virtual_path() == *path));
    }
}

async fn the_ping_test_writes_and_reads_back(d: &Daemon) {
    d.org_with_sftp_hook("acme").await;
    let (s, hooks) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    assert_eq!(s, 200);
    let id = hooks["webhooks"][0]["id"].as_str().unwrap().to_owned();
    let (s, b) = d
        .admin(
            "POST",
            &format!("/v1/orgs/acme/webhooks/{id}/test"),
            Some(json!({"test": "ping"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ok"], true, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("read back"), "{b}");
    // The probe is gone again.
    assert!(files_of(d, "acme").await.is_empty());
}

/// The S3 store stops during ingest: posts answer 503 with Retry-After (nothing acked),
/// and once it is back, everything continues and every acked event is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_answers_503_and_loses_nothing() {
    let Some(mut s3) = crate::seaweed::PrivateS3::start().await else {
        return;
    };
    let d = Daemon::start_opts(Opts {
        s3: Some(s3.server.clone()),
        ..Default::default()
    })
    .await;
    d.org_with_sftp_hook("acme").await;
    for i in 0..5 {
        crate::e2e_sftp::post(&d, "acme", &format!("evt_before_{i}"), "payment").await;
    }
    s3.stop();
    let r = d
        .post_event(
            "acme",
            &json!({"id": "evt_during", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap_or_default());
    // (the body was consumed above; ask again for the header)
    let r = d
        .post_event(
            "acme",
            &json!({"id": "evt_during", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    s3.resume().await;
    // The event refused during the outage is written by the repair or by the repost.
    let r = d
        .post_event(
            "acme",
            &json!({"id": "evt_during", "type": "payment", "data": {}}),
        )
        .await;
    assert!(r.status() == 200 || r.status() == 202, "{}", r.status());
    for i in 0..5 {
        crate::e2e_sftp::post(&d, "acme", &format!("evt_after_{i}"), "payment").await;
    }
    let files = wait_for(
        "every event's file",
        std::time::Duration::from_secs(30),
        || async {
            let f = files_of(&d, "acme").await;
            (f.len() == 11).then_some(f)
        },
    )
    .await;
    let mut ids: Vec<String> = files
        .values()
        .map(|b| {
            serde_json::from_slice::<Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11);
}

/// kill -9 during a burst of posts with S3, then a restart: every 202'd event is there
/// exactly once, as a complete object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_kill9_during_a_burst_keeps_every_acked_event_once() {
    let Some(mut d) = daemon(true).await else {
        return;
    };
    d.org_with_sftp_hook("acme").await;
    let burst = Burst::start(&d, "acme", 8, "k");
    wait_for(
        "posts under way",
        std::time::Duration::from_secs(30),
        || async { (burst.count() >= 200).then_some(()) },
    )
    .await;
    d.kill9();
    let acked = burst.finish().await;
    d.restart().await;
    let files = files_of(&d, "acme").await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (path, bytes) in &files {
        let v: Value = serde_json::from_slice(bytes)
            .unwrap_or_else(|e| panic!("{path} is not a complete event: {e}"));
        *seen
            .entry(v["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for a in &acked {
        let id = a["id"].as_str().unwrap();
        assert_eq!(seen.get(id), Some(&1), "acked {id} not there exactly once");
    }
    assert!(acked.len() >= 200);
    let _: &dyn Storage = &*d.storage();
}
