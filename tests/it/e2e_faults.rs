//! Faults: a full disk refuses events cleanly and recovers when space returns.

use serde_json::{json, Value};

use crate::harness::*;

/// A small tmpfs, unmounted on drop. `None` where mounting is not permitted.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn disk_full_gives_503_writes_nothing_partial_and_recovers() {
    let fs = SmallFs::mount("6m");
    if !require_that("permission to mount a tmpfs (needs root)", fs.is_some()) {
        return;
    }
    let Some(fs) = fs else { return };
    let d = Daemon::start_opts(Opts {
        data_dir: Some(fs.0.path().join("data")),
        ..Opts::default()
    })
    .await;
    d.org_with_sftp_hook("acme").await;
    let pad = "x".repeat(200 * 1024);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let r = d
            .post_event(
                "acme",
                &json!({"id": format!("evt_big{i}"), "type": "payment", "data": {"pad": pad}}),
            )
            .await;
        match r.status().as_u16() {
            202 => accepted.push(format!("evt_big{i}")),
            503 => {
                assert!(
                    r.headers().contains_key("retry-after"),
                    "503 carries Retry-After"
                );
                assert_eq!(r.headers()["content-type"], "application/problem+json");
                let p: Value = r.json().await.unwrap();
                assert!(p["detail"].as_str().unwrap().contains("full"), "{p}");
                refused = Some(i);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert!(!accepted.is_empty());
    // Every file present is complete, no temp file is left, every 202 is there.
    let files = files_under(&d.org_dir("acme"));
    for f in &files {
        let v: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).expect("complete file");
        assert_eq!(v["data"]["pad"].as_str().unwrap().len(), pad.len());
    }
    assert_eq!(
        files.len(),
        accepted.len(),
        "only acknowledged events have files"
    );
    assert!(
        files_under(&d.data_dir().join("tmp")).is_empty(),
        "no temp file left behind"
    );

    // Space returns: the customer's ETL job deletes what it fetched.
    for f in &files[..files.len() / 2] {
        std::fs::remove_file(f).unwrap();
    }
    let r = d
        .post_event(
            "acme",
            &json!({"id": format!("evt_big{refused}"), "type": "payment", "data": {"pad": pad}}),
        )
        .await;
    assert!(
        r.status() == 202 || r.status() == 200,
        "the refused event is accepted on retry: {}",
        r.status()
    );
    let ack: Value = r.json().await.unwrap();
    let p = d
        .org_dir("acme")
        .join(ack["files"][0].as_str().unwrap().trim_start_matches('/'));
    assert!(p.exists(), "retried event's file is written");
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {"small": true}}))
        .await;
    assert_eq!(r.status(), 202);
}

/// kill -9 while events are posted, files downloaded and webhooks delivered; after the
/// restart every acknowledged event is on disk exactly once and delivered.
#[tokio::test]
async fn kill_9_under_mixed_load_loses_and_duplicates_nothing() {
    use crate::e2e_delivery::{http_hook, Receiver};
    use std::collections::{HashMap, HashSet};

    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let rx = Receiver::start().await;
    http_hook(&d, "acme", &rx.url("/hook"), &["*"], false).await;
    d.sftp_user("acme", "etl", "etl password").await;

    // A downloader that keeps listing and fetching over SFTP until it is cut off.
    let script = r#"
import sys, paramiko, time
n = 0
try:
    t = paramiko.Transport(('127.0.0.1', int(sys.argv[1]))); t.connect(username='etl', password='etl password')
    s = paramiko.SFTPClient.from_transport(t)
    # Reads until the daemon is killed under it (bounded, should the kill never come).
    end = time.time() + 300
    while time.time() < end:
        if 'payment' not in s.listdir('/'):
            time.sleep(0.05); continue
        for day in s.listdir('/payment'):
            for f in s.listdir('/payment/' + day)[:20]:
                s.open('/payment/%s/%s' % (day, f)).read(); n += 1
except Exception:
    pass
print(n, flush=True)
"#;
    let downloader = tokio::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(d.sftp_port.to_string())
        .output();
    let downloader = tokio::spawn(downloader);

    let burst = Burst::start(&d, "acme", 8, "m");
    wait_for(
        "load to build up",
        std::time::Duration::from_secs(120),
        || {
            let (n, delivered) = (burst.count(), rx.events().len());
            let d = &d;
            async move {
                // Downloads under way too: the SFTP read counter has moved.
                let reading = d.metrics().await.lines().any(|l| {
                    l.strip_prefix("hookbridge_sftp_bytes_read_total ")
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v > 0.0)
                });
                (n >= 300 && delivered >= 50 && reading).then_some(())
            }
        },
    )
    .await;
    d.kill9();
    let acked = burst.finish().await;
    // The downloader was reading when the daemon died (the wait above saw bytes served);
    // cut off, it must end rather than hang.
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), downloader)
        .await
        .expect("the SFTP client ends once the daemon is gone")
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.spawn().await;

    // Files: every acknowledged event once, complete; nothing else, no temp files.
    let mut on_disk: HashMap<String, usize> = HashMap::new();
    for f in files_under(&d.org_dir("acme")) {
        let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).expect("complete file");
        *on_disk
            .entry(v["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for a in &acked {
        assert_eq!(on_disk.get(a["id"].as_str().unwrap()), Some(&1), "{a}");
    }
    assert!(on_disk.values().all(|&n| n == 1), "no event written twice");
    assert!(files_under(&d.data_dir().join("tmp")).is_empty());

    // Deliveries: every acknowledged event reaches the receiver (retries may repeat a
    // webhook-id, which receivers dedupe on; that is the contract).
    let want: HashSet<String> = acked
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    wait_for(
        "every acknowledged event delivered",
        std::time::Duration::from_secs(60),
        || {
            let got: HashSet<String> = rx
                .events()
                .iter()
                .filter_map(|s| s.json()["id"].as_str().map(str::to_owned))
                .collect();
            let missing = want.difference(&got).count();
            async move { (missing == 0).then_some(()) }
        },
    )
    .await;
    let ids: Vec<String> = rx.events().iter().map(|s| s.header("webhook-id")).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert!(distinct.len() >= want.len());
}
