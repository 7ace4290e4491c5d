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
    let Some(fs) = SmallFs::mount("6m") else {
        eprintln!("SKIPPED: this machine does not allow mounting a tmpfs (needs root)");
        return;
    };
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
