//! Nodes: the node id in logs, metrics and `/readyz`; readiness following the store and
//! the object store; state the nodes of one service share through the store (bans,
//! keys); and two real daemons on one PostgreSQL database and one S3 prefix.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{wait_for, Daemon, Opts};

async fn readyz(d: &Daemon) -> (u16, Value) {
    let r = d.client.get(d.url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_is_in_every_log_line_in_metrics_and_in_readyz() {
    let d = Daemon::start_opts(Opts {
        top: r#"node_id = "node-a.eu_1""#,
        ..Default::default()
    })
    .await;
    let (status, body) = readyz(&d).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node_id"], "node-a.eu_1", "{body}");
    assert_eq!(body["store"], true, "{body}");
    assert_eq!(body["storage"], true, "{body}");
    let m = d.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.trim() == r#"hookbridge_node_info{node_id="node-a.eu_1"} 1"#),
        "no node info metric in:\n{m}"
    );
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{log}");
    for l in &lines {
        assert!(
            l.starts_with("node_id=node-a.eu_1 "),
            "line without the node id: {l}"
        );
    }
}

#[test]
fn a_bad_node_id_stops_the_start_with_the_key_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(["check-config"])
        .current_dir(dir.path())
        .env("HOOKBRIDGE_NODE_ID", "a b")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("node_id"), "{text}");
}

/// `/readyz` answers 503 naming the storage while the object store is down, so a load
/// balancer takes the node out, and 200 again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_object_store_is_down_and_recovers() {
    let Some(mut s3) = crate::seaweed::PrivateS3::start().await else {
        return;
    };
    let d = Daemon::start_opts(Opts {
        s3: Some(s3.server.clone()),
        ..Default::default()
    })
    .await;
    assert_eq!(readyz(&d).await.0, 200);
    s3.stop();
    let body = wait_for("readyz to fail", Duration::from_secs(30), || async {
        let (s, b) = readyz(&d).await;
        (s == 503).then_some(b)
    })
    .await;
    assert_eq!(body["status"], 503, "{body}");
    assert_eq!(body["storage"], false, "{body}");
    assert_eq!(body["store"], true, "{body}");
    assert!(body["down"]["storage"].is_string(), "{body}");
    assert!(d
        .log()
        .contains("not ready: the org storage does not answer"));
    s3.resume().await;
    wait_for("readyz to recover", Duration::from_secs(30), || async {
        (readyz(&d).await.0 == 200).then_some(())
    })
    .await;
}

/// Two nodes on one store (here one SQLite database both open; the scale-out runs below
/// use PostgreSQL): an address banned on A is refused by B within seconds, others are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_node_refuses_the_address_on_the_other() {
    let defender = "[defender]\nthreshold = 1\n";
    let a = Daemon::start_opts(Opts {
        top: r#"node_id = "a""#,
        extra: defender,
        ..Default::default()
    })
    .await;
    let b = Daemon::start_opts(Opts {
        top: r#"node_id = "b""#,
        extra: defender,
        data_dir: Some(a.data_dir()),
        ..Default::default()
    })
    .await;
    let (_, ok) = crate::e2e_preauth::banner_from("127.0.0.7", b.sftp_port).await;
    assert!(ok, "B refused an address before any ban: {}", b.log());
    // A protocol error on A: not SSH at all.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.7:0".parse().unwrap()).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{}", a.sftp_port).parse().unwrap())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut sink)).await;
    wait_for("A to ban 127.0.0.7", Duration::from_secs(30), || async {
        a.metrics()
            .await
            .contains("hookbridge_defender_bans_total 1")
            .then_some(())
    })
    .await;
    wait_for("B to refuse 127.0.0.7", Duration::from_secs(30), || async {
        let (_, ok) = crate::e2e_preauth::banner_from("127.0.0.7", b.sftp_port).await;
        (!ok).then_some(())
    })
    .await;
    assert!(
        b.log().contains("address banned by another node"),
        "{}",
        b.log()
    );
    let (_, ok) = crate::e2e_preauth::banner_from("127.0.0.8", b.sftp_port).await;
    assert!(ok, "B refused an address nobody banned");
}

/// Crash repair by a live node: an event some node committed to the store and died before
/// writing its file (made here with the store the daemon uses, as that node would have
/// left it) is written by another running node at its next periodic repair (every 60 s),
/// with no restart of anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_node_writes_the_files_of_events_another_node_left_pending() {
    let d = Daemon::start_opts(Opts {
        top: r#"node_id = "survivor""#,
        http_extra: r#"request_timeout = "1s""#,
        ..Default::default()
    })
    .await;
    let (s, _) = d
        .admin("PUT", "/v1/orgs/acme", Some(serde_json::json!({})))
        .await;
    assert!(s == 200 || s == 201, "{s}");
    let cfg = hookbridge::config::Config {
        data_dir: d.data_dir(),
        ..Default::default()
    };
    let sealer = hookbridge::secrets::SecretBox::load_or_create(&cfg).unwrap();
    let dead_node = hookbridge::store::SqliteStore::open(
        &d.data_dir().join("state.db"),
        std::sync::Arc::new(sealer),
    )
    .unwrap();
    use hookbridge::store::Store;
    let envelope = r#"{"id":"evt_left","type":"payment","data":{"n":1}}"#;
    dead_node
        .commit_events(
            vec![hookbridge::store::NewEvent {
                org: "acme".into(),
                id: "evt_left".into(),
                envelope_json: envelope.into(),
                files: vec!["/left/evt_left.json".into()],
                deliveries: vec![],
                quota: None,
                ..Default::default()
            }],
            vec![],
        )
        .await
        .unwrap();
    drop(dead_node);
    let files = wait_for(
        "the survivor to write the file",
        Duration::from_secs(120),
        || async {
            let f = d.org_files("acme").await;
            f.contains_key("/left/evt_left.json").then_some(f)
        },
    )
    .await;
    assert_eq!(
        files["/left/evt_left.json"],
        format!("{envelope}\n").into_bytes()
    );
    wait_for(
        "the event to be marked written",
        Duration::from_secs(30),
        || async {
            d.log()
                .contains("wrote files of events accepted before the last stop")
                .then_some(())
        },
    )
    .await;
}

/// Two nodes on one PostgreSQL database and one S3 prefix (they share the data dir only
/// for their key files): events posted alternately to A and B for one HTTP webhook made
/// through A are each delivered exactly once, counted by `webhook-id` at a real receiver,
/// though both nodes' workers claim from the same queue; and a file written by A is read
/// byte-identical through B's storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_postgres_deliver_each_event_once() {
    if !crate::harness::require_that(
        "HOOKBRIDGE_TEST_PG_URL (a PostgreSQL admin URL)",
        std::env::var("HOOKBRIDGE_TEST_PG_URL").is_ok(),
    ) {
        return;
    }
    let Some(s3) = crate::seaweed::server().await else {
        assert!(
            crate::harness::require_that("SeaweedFS (weed)", false),
            "unreachable"
        );
        return;
    };
    let url = crate::harness::fresh_pg_database().await;
    let prefix = crate::seaweed::unique_prefix("nodes");
    let a = Daemon::start_opts(Opts {
        top: r#"node_id = "a""#,
        store_url: Some(url.clone()),
        s3: Some(s3.clone()),
        s3_prefix: Some(prefix.clone()),
        ..Default::default()
    })
    .await;
    let b = Daemon::start_opts(Opts {
        top: r#"node_id = "b""#,
        store_url: Some(url),
        s3: Some(s3),
        s3_prefix: Some(prefix),
        data_dir: Some(a.data_dir()),
        ..Default::default()
    })
    .await;
    a.org_with_sftp_hook("acme").await;
    let r = crate::e2e_delivery::Receiver::start().await;
    crate::e2e_delivery::http_hook(&a, "acme", &r.url("/h"), &["*"], false).await;
    let n = 2000;
    let mut posters = tokio::task::JoinSet::new();
    let nodes = std::sync::Arc::new([a, b]);
    for w in 0..8 {
        let nodes = nodes.clone();
        posters.spawn(async move {
            for i in (w..n).step_by(8) {
                crate::e2e_delivery::post(&nodes[i % 2], "acme", &format!("evt_{i}"), "payment")
                    .await;
            }
        });
    }
    while let Some(r) = posters.join_next().await {
        r.unwrap();
    }
    let seen = wait_for(
        "every event delivered",
        Duration::from_secs(120),
        || async {
            let seen = r.events();
            let ids: std::collections::HashSet<String> = seen
                .iter()
                .map(|s| s.json()["id"].as_str().unwrap().to_owned())
                .collect();
            (ids.len() == n).then_some(seen)
        },
    )
    .await;
    let hooks: std::collections::HashSet<String> =
        seen.iter().map(|s| s.header("webhook-id")).collect();
    assert_eq!(hooks.len(), n, "one webhook-id per event");
    assert_eq!(seen.len(), n, "each event sent exactly once (no faults)");
    // Both nodes delivered (each takes what it was posted, and polls the rest).
    for d in nodes.iter() {
        let m = d.metrics().await;
        assert!(
            m.lines()
                .any(|l| l.starts_with("hookbridge_delivery_attempts_total{")
                    && l.contains("delivered")),
            "a node delivered nothing: {m}"
        );
    }
    // A file A wrote is the same object through B.
    let (fa, fb) = (
        nodes[0].org_files("acme").await,
        nodes[1].org_files("acme").await,
    );
    assert_eq!(fa.len(), n);
    assert_eq!(fa, fb);
}
