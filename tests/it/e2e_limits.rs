//! Per-org ingest rate limits, quotas and retention.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

#[tokio::test]
async fn an_org_over_its_rate_gets_429_with_retry_after() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    d.org_with_sftp_hook("beta").await;
    let (s, b) = d
        .admin(
            "PUT",
            "/v1/orgs/acme",
            Some(json!({"limits": {"ingest_rate": 1.0, "ingest_burst": 3}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut codes = Vec::new();
    // Post until refused: on a loaded machine the bucket may refill between slow posts.
    for i in 0..20 {
        if codes.len() >= 6 && codes.contains(&429) {
            break;
        }
        let r = d
            .post_event(
                "acme",
                &json!({"id": format!("r{i}"), "type": "payment", "data": {}}),
            )
            .await;
        let status = r.status().as_u16();
        if status == 429 {
            assert!(
                r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            let p: Value = r.json().await.unwrap();
            assert!(p["detail"].as_str().unwrap().contains("limit"), "{p}");
        }
        codes.push(status);
    }
    assert_eq!(&codes[..3], &[202, 202, 202]);
    assert!(codes[3..].contains(&429), "{codes:?}");
    // Another org is not affected.
    let r = d
        .post_event("beta", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        files_under(&d.org_dir("acme")).len(),
        codes.iter().filter(|&&c| c == 202).count()
    );
}

#[tokio::test]
async fn over_quota_gives_507_writes_nothing_and_recovers_when_files_go() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let (s, _) = d
        .admin(
            "PUT",
            "/v1/orgs/acme",
            Some(json!({"limits": {"quota_files": 3}})),
        )
        .await;
    assert_eq!(s, 200);
    for i in 0..3 {
        let r = d
            .post_event(
                "acme",
                &json!({"id": format!("q{i}"), "type": "payment", "data": {}}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    let r = d
        .post_event("acme", &json!({"id": "q3", "type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 507);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    assert!(
        p["detail"].as_str().unwrap().contains("3 of 3 files"),
        "{p}"
    );
    assert_eq!(
        d.org_files("acme").await.len(),
        3,
        "nothing written over quota"
    );
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(
        (u["files"].as_u64(), u["full"].as_bool()),
        (Some(3), Some(true)),
        "{u}"
    );

    // The ETL job takes a file over SFTP (download, delete): the count in the store
    // follows at once, on either backend.
    d.sftp_user("acme", "etl", "etl-password").await;
    let first = d.org_files("acme").await.into_keys().next().unwrap();
    let script = "t, s = connect('etl', 'etl-password')\nassert len(s.open(sys.argv[1]).read()) > 0\ns.remove(sys.argv[1])\nprint('ok')\n";
    let (ok, out) = crate::e2e_sftp::py(&d, script, &[&first]).await;
    assert!(ok, "{out}");
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(
        (u["files"].as_u64(), u["full"].as_bool()),
        (Some(2), Some(false)),
        "{u}"
    );
    let r = d
        .post_event("acme", &json!({"id": "q3", "type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 200, "the repost writes the deferred file");
    let ack: Value = r.json().await.unwrap();
    let files = d.org_files("acme").await;
    assert!(files.contains_key(ack["files"][0].as_str().unwrap()));
    assert_eq!(files.len(), 3);
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(u["files"], 3, "{u}");
    // A restart keeps the count (it is in the store, not counted again from a listing).
    let mut d = d;
    d.restart().await;
    let r = d
        .post_event("acme", &json!({"id": "q4", "type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 507);
}

#[tokio::test]
async fn usage_is_counted_in_the_store_and_recounted_on_request() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let r = d
        .post_event("acme", &json!({"id": "u1", "type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    let size = d.org_files("acme").await.values().next().unwrap().len() as u64;
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(
        (u["files"].as_u64(), u["bytes"].as_u64()),
        (Some(1), Some(size)),
        "{u}"
    );

    // A file put there behind hookbridge's back is not counted as it happens...
    let org = hookbridge::storage::OrgName::new("acme").unwrap();
    let outside = hookbridge::storage::EventFile {
        org: org.clone(),
        path: hookbridge::storage::StoragePath::parse("/outside.json").unwrap(),
        body: "{\"x\":1}\n".into(),
    };
    for r in d.storage().write_events(&[outside]).await {
        r.unwrap();
    }
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(u["files"], 1, "{u}");
    // ... until the operator asks for a recount from a listing.
    let (s, u) = d.admin("POST", "/v1/orgs/acme/usage/recount", None).await;
    assert_eq!(s, 200, "{u}");
    assert_eq!(
        (u["files"].as_u64(), u["bytes"].as_u64()),
        (Some(2), Some(size + 8)),
        "{u}"
    );
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(u["files"], 2, "{u}");
    let (s, _) = d.admin("POST", "/v1/orgs/nobody/usage/recount", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn retention_removes_old_files_and_empty_day_folders() {
    let d = Daemon::start_with("[limits]\nretention_days = 1\nsweep_interval = \"200ms\"\n").await;
    d.org_with_sftp_hook("acme").await;
    let old = d
        .post_event(
            "acme",
            &json!({"type": "payment", "timestamp": "2020-01-01T00:00:00Z", "data": {}}),
        )
        .await;
    assert_eq!(old.status(), 202);
    let old: Value = old.json().await.unwrap();
    let fresh = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    let fresh: Value = fresh.json().await.unwrap();
    let path = |ack: &Value| {
        d.org_dir("acme")
            .join(ack["files"][0].as_str().unwrap().trim_start_matches('/'))
    };
    // Age the first file as if it was written ten days ago.
    let ten_days = std::time::SystemTime::now() - Duration::from_secs(10 * 86400);
    std::fs::File::options()
        .write(true)
        .open(path(&old))
        .unwrap()
        .set_times(
            std::fs::FileTimes::new()
                .set_modified(ten_days)
                .set_accessed(ten_days),
        )
        .unwrap();
    let old_day = path(&old).parent().unwrap().to_path_buf();
    // The sweeper removes the file, then its emptied day folder, then counts: wait for all
    // three, not for the first alone.
    let metrics = wait_for(
        "retention to remove the old file and its emptied day folder",
        Duration::from_secs(60),
        || async {
            if path(&old).exists() || old_day.exists() {
                return None;
            }
            let m = d.metrics().await;
            m.contains("hookbridge_retention_removed_total")
                .then_some(m)
        },
    )
    .await;
    assert!(path(&fresh).exists(), "fresh files stay");
    assert!(
        metrics.contains("hookbridge_retention_removed_total"),
        "{metrics}"
    );
}
