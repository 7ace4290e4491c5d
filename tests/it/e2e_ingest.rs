//! Events in, durable files out: the core promise of hookbridge.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::harness::*;

fn read_json(p: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test]
async fn each_type_becomes_exactly_one_file_with_the_exact_envelope() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    for (i, t) in TYPES.iter().enumerate() {
        let body = json!({
            "id": format!("evt_{t}"),
            "type": t,
            "timestamp": format!("2026-11-25T10:15:0{i}.123456Z"),
            "data": {"n": i, "nested": {"z": [1, 2], "a": "x"}}
        });
        let r = d.post_event("acme", &body).await;
        assert_eq!(r.status(), 202, "{t}");
        let ack: Value = r.json().await.unwrap();
        assert_eq!(ack["id"], format!("evt_{t}"));
        let expected_path = format!("/{t}/2026-11-25/20261125T10150{i}.123456Z_evt_{t}.json");
        assert_eq!(ack["files"], json!([expected_path]));
        assert_eq!(ack["deliveries"], json!([]));
        let files = d.org_files("acme").await;
        let mut want = body.clone();
        want["org"] = json!("acme");
        let stored: Value = serde_json::from_slice(&files[&expected_path]).unwrap();
        assert_eq!(stored, want, "{t}");
    }
    assert_eq!(d.org_files("acme").await.len(), 8);
}

#[tokio::test]
async fn a_hook_gets_only_its_types_and_generated_ids_and_times_are_filled() {
    let d = Daemon::start().await;
    d.admin("PUT", "/v1/orgs/acme", Some(json!({"name": "Acme Inc"})))
        .await;
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"kind": "sftp", "events": ["payment", "deliveryReport"]})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    for t in TYPES {
        let r = d.post_event("acme", &json!({"type": t, "data": {}})).await;
        assert_eq!(r.status(), 202);
    }
    let files = files_under(&d.org_dir("acme"));
    assert_eq!(files.len(), 2, "{files:?}");
    let mut kinds: Vec<String> = files
        .iter()
        .map(|f| read_json(f)["type"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["deliveryReport", "payment"]);
    for f in &files {
        let v = read_json(f);
        let id = v["id"].as_str().unwrap();
        assert!(
            id.starts_with("evt_") && id.len() == 30,
            "generated ULID id: {id}"
        );
        let name = f.file_name().unwrap().to_str().unwrap();
        // YYYYMMDDTHHMMSS.ffffffZ_<id>.json, fixed width, inside /<type>/<YYYY-MM-DD>/
        assert_eq!(
            name.len(),
            "20261125T101502.123456Z_".len() + id.len() + ".json".len(),
            "{name}"
        );
        assert!(name.ends_with(&format!("_{id}.json")));
        let ts = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap()).unwrap();
        assert!((chrono::Utc::now() - ts.to_utc()).num_seconds().abs() < 60);
        let day = f.parent().unwrap().file_name().unwrap().to_str().unwrap();
        assert_eq!(day, ts.format("%Y-%m-%d").to_string());
    }
}

#[tokio::test]
async fn concurrent_posts_are_all_durable_and_reposts_write_nothing() {
    let d = Arc::new(Daemon::start().await);
    d.org_with_sftp_hook("acme").await;
    let post_all = |expect: u16| {
        let d = d.clone();
        async move {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..500 {
                let d = d.clone();
                set.spawn(async move {
                    let body =
                        json!({"id": format!("evt_c{i}"), "type": TYPES[i % 8], "data": {"i": i}});
                    let r = d.post_event("acme", &body).await;
                    let status = r.status().as_u16();
                    let ack: Value = r.json().await.unwrap();
                    (status, ack)
                });
            }
            let mut acks = Vec::new();
            while let Some(r) = set.join_next().await {
                let (status, ack) = r.unwrap();
                assert_eq!(status, expect, "{ack}");
                acks.push(ack);
            }
            acks
        }
    };
    let first = post_all(202).await;
    let files = d.org_files("acme").await;
    assert_eq!(files.len(), 500);
    let ids: HashSet<String> = files
        .values()
        .map(|b| {
            serde_json::from_slice::<Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 500);
    let again = post_all(200).await;
    assert_eq!(d.org_files("acme").await, files, "reposts wrote nothing");
    // A repost answers with the first result.
    let by_id = |acks: &[Value]| -> std::collections::HashMap<String, Value> {
        acks.iter()
            .map(|a| (a["id"].as_str().unwrap().to_owned(), a.clone()))
            .collect()
    };
    assert_eq!(by_id(&first), by_id(&again));
}

async fn post_raw(
    d: &Daemon,
    org: &str,
    token: Option<&str>,
    ct: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value, String) {
    let mut req = d
        .client
        .post(d.url(&format!("/v1/orgs/{org}/events")))
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body, ctype)
}

/// A bad post: what it is, org, bearer token, Content-Type, body, the status it gets, and
/// a text its problem `detail` holds.
type BadPost<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Vec<u8>,
    u16,
    &'a str,
);

#[tokio::test]
async fn every_error_is_problem_json_with_a_reason_and_writes_nothing() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    d.org_with_sftp_hook("beta").await;
    let good =
        |id: &str| serde_json::to_vec(&json!({"id": id, "type": "payment", "data": {}})).unwrap();
    let tok = d.token("acme");
    let now = chrono::Utc::now().timestamp();
    let expired = token_with(INGRESS_SECRET, json!({"org": "acme", "exp": now - 3600}));
    let no_exp = token_with(INGRESS_SECRET, json!({"org": "acme"}));
    let wrong_secret = token_with(
        "another-secret-0123456789abcdef",
        json!({"org": "acme", "exp": now + 600}),
    );
    let other_org = token_with(INGRESS_SECRET, json!({"org": "beta", "exp": now + 600}));
    let ghost = token_with(INGRESS_SECRET, json!({"org": "ghost", "exp": now + 600}));
    let json_ct = Some("application/json");
    let big = {
        let pad = "x".repeat(1 << 20);
        serde_json::to_vec(&json!({"type": "payment", "data": {"pad": pad}})).unwrap()
    };
    let cases: Vec<BadPost> = vec![
        (
            "malformed JSON",
            "acme",
            Some(&tok),
            json_ct,
            b"{\"type\":".to_vec(),
            400,
            "JSON",
        ),
        (
            "unknown type",
            "acme",
            Some(&tok),
            json_ct,
            br#"{"type":"nope","data":{}}"#.to_vec(),
            400,
            "unknown event type",
        ),
        (
            "bad field",
            "acme",
            Some(&tok),
            json_ct,
            br#"{"type":"payment","data":{},"timestamp":"soon"}"#.to_vec(),
            400,
            "timestamp",
        ),
        (
            "bad id",
            "acme",
            Some(&tok),
            json_ct,
            br#"{"id":"../../x","type":"payment","data":{}}"#.to_vec(),
            400,
            "id",
        ),
        (
            "missing token",
            "acme",
            None,
            json_ct,
            good("e1"),
            401,
            "bearer",
        ),
        (
            "expired token",
            "acme",
            Some(&expired),
            json_ct,
            good("e2"),
            401,
            "expired",
        ),
        (
            "token without exp",
            "acme",
            Some(&no_exp),
            json_ct,
            good("e3"),
            401,
            "exp",
        ),
        (
            "wrong secret",
            "acme",
            Some(&wrong_secret),
            json_ct,
            good("e4"),
            401,
            "signature",
        ),
        (
            "org claim mismatch",
            "acme",
            Some(&other_org),
            json_ct,
            good("e5"),
            403,
            "beta",
        ),
        (
            "unknown org",
            "ghost",
            Some(&ghost),
            json_ct,
            good("e6"),
            404,
            "ghost",
        ),
        (
            "body over the limit",
            "acme",
            Some(&tok),
            json_ct,
            big,
            413,
            "limit",
        ),
        (
            "wrong content type",
            "acme",
            Some(&tok),
            Some("text/plain"),
            good("e7"),
            415,
            "Content-Type",
        ),
        (
            "no content type",
            "acme",
            Some(&tok),
            None,
            good("e8"),
            415,
            "Content-Type",
        ),
    ];
    for (what, org, token, ct, body, want, needle) in cases {
        let (status, problem, ctype) = post_raw(&d, org, token, ct, body).await;
        assert_eq!(status, want, "{what}: {problem}");
        assert_eq!(ctype, "application/problem+json", "{what}");
        assert_eq!(problem["status"], want, "{what}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            detail.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: detail {detail:?} lacks {needle:?}"
        );
    }
    assert!(files_under(&d.org_dir("acme")).is_empty());
    assert!(files_under(&d.org_dir("beta")).is_empty());
    assert!(files_under(&d.data_dir().join("tmp")).is_empty());
}

#[tokio::test]
async fn kill_9_during_a_burst_loses_no_acknowledged_event() {
    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let burst = Burst::start(&d, "acme", 16, "k");
    wait_for(
        "some acknowledged events",
        std::time::Duration::from_secs(30),
        || {
            let n = burst.count();
            async move { (n >= 200).then_some(()) }
        },
    )
    .await;
    d.kill9();
    let acked = burst.finish().await;
    d.spawn().await;
    let files = d.org_files("acme").await;
    for ack in &acked {
        let path = ack["files"][0].as_str().unwrap();
        let v: Value = serde_json::from_slice(&files[path]).unwrap();
        assert_eq!(v["id"], ack["id"]);
    }
    // No temp file inside any org folder, and every file there parses.
    for (path, bytes) in &files {
        assert!(path.ends_with(".json"), "stray file {path}");
        serde_json::from_slice::<Value>(bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    assert!(
        files_under(&d.data_dir().join("tmp")).is_empty(),
        "temp files are cleaned at start"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    assert!(d.log().contains("stopped cleanly"));
}

/// An ETL job takes a file, then the daemon is killed before any other event arrives:
/// the restart must not bring the taken file back.
#[tokio::test]
async fn a_file_taken_before_a_crash_does_not_come_back() {
    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let r = d
        .post_event(
            "acme",
            &json!({"id": "evt_taken", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let ack: Value = r.json().await.unwrap();
    let path = d
        .org_dir("acme")
        .join(ack["files"][0].as_str().unwrap().trim_start_matches('/'));
    let db = d.data_dir().join("state.db");
    wait_for(
        "the write to be recorded as finished",
        std::time::Duration::from_secs(10),
        || {
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let pending: i64 = conn
                .query_row(
                    "SELECT files_pending FROM events WHERE id = 'evt_taken'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            async move { (pending == 0).then_some(()) }
        },
    )
    .await;
    std::fs::remove_file(&path).unwrap();
    d.kill9();
    d.spawn().await;
    assert!(
        !path.exists(),
        "a file the customer took reappeared after a restart"
    );
}
