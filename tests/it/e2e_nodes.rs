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

/// Two nodes on one PostgreSQL database and one S3 prefix, each with its own data dir:
/// events posted alternately to A and B for one HTTP webhook made
/// through A are each delivered exactly once, counted by `webhook-id` at a real receiver,
/// though both nodes' workers claim from the same queue; and a file written by A is read
/// byte-identical through B's storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_postgres_deliver_each_event_once() {
    let Some((a, b)) = crate::harness::two_nodes_on_pg_and_s3("nodes", Opts::default).await else {
        return;
    };
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

/// A sum over the lines of one metric whose labels contain `label` ("" for any), 0 if absent.
async fn metric(d: &Daemon, name: &str, label: &str) -> f64 {
    d.metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with(name)
                && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two nodes on one PostgreSQL and one S3 prefix, for the kill test: short leases (16 s,
/// so a dead node's jobs are taken over within seconds) and per-node concurrency of 16.
const KILL_DELIVERY: &str = "allow_private_destinations = true
retry_delays = [\"200ms\", \"400ms\", \"800ms\"]
request_timeout = \"5s\"
lease_margin = \"6s\"
workers = 16
per_endpoint_concurrency = 16";

/// `kill -9` of node A in the middle of draining 2,000 events posted alternately to A and
/// B: every event is still delivered; the duplicates keep their `webhook-id` and are all
/// jobs whose lease, under A's claim, B took over after the kill (what A had in flight);
/// B logs and counts those takeovers; and B was woken by A's commits (NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_mid_drain_loses_nothing_and_its_leases_are_taken_over() {
    let node = || Opts {
        delivery: KILL_DELIVERY,
        ..Default::default()
    };
    let Some((a, b)) = crate::harness::two_nodes_on_pg_and_s3("kill", node).await else {
        return;
    };
    a.org_with_sftp_hook("acme").await;
    let r = crate::e2e_delivery::Receiver::start().await;
    crate::e2e_delivery::http_hook(&a, "acme", &r.url("/h"), &["*"], false).await;
    // While posting, each answer takes 1.5 s (well within the 5 s request timeout, so no
    // attempt times out and is retried): at most 21 deliveries a second, so most of the
    // 2,000 are still to deliver when posting ends, even on a slow machine. A job waits
    // at most 4 rounds (6 s) for a worker: within its lease less the request timeout.
    r.set_delay(Duration::from_millis(1500));
    let n = 2000;
    let mut posters = tokio::task::JoinSet::new();
    let nodes = std::sync::Arc::new(tokio::sync::RwLock::new([a, b]));
    for w in 0..8 {
        let nodes = nodes.clone();
        posters.spawn(async move {
            for i in (w..n).step_by(8) {
                let nodes = nodes.read().await;
                crate::e2e_delivery::post(&nodes[i % 2], "acme", &format!("evt_{i}"), "payment")
                    .await;
            }
        });
    }
    while let Some(res) = posters.join_next().await {
        res.unwrap();
    }
    let distinct = |seen: &[crate::e2e_delivery::Seen]| {
        seen.iter()
            .map(|s| s.json()["id"].as_str().unwrap_or_default().to_owned())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let before = distinct(&r.events());
    assert!(
        n - before >= 300,
        "{before} of {n} delivered while posting: too little left to kill A in the middle of"
    );
    // The drain at full speed; A dies a third of the way through what is left.
    r.set_delay(Duration::from_millis(5));
    let kill_at = before + (n - before) / 3;
    wait_for("a third of the drain", Duration::from_secs(120), || async {
        (distinct(&r.events()) >= kill_at).then_some(())
    })
    .await;
    nodes.write().await[0].kill9();
    let at_kill = distinct(&r.events());
    assert!(at_kill < n, "the drain was over when A died");
    let seen = wait_for(
        "every event delivered after the kill",
        Duration::from_secs(180),
        || async {
            let seen = r.events();
            (distinct(&seen) == n).then_some(seen)
        },
    )
    .await;
    let nodes = nodes.read().await;
    let b = &nodes[1];
    // Same webhook-id on every send of an event.
    let mut by_event: std::collections::HashMap<String, Vec<String>> = Default::default();
    for s in &seen {
        by_event
            .entry(s.json()["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(s.header("webhook-id"));
    }
    for (ev, ids) in &by_event {
        assert!(
            ids.iter().all(|i| !i.is_empty() && *i == ids[0]),
            "{ev} was sent with different webhook-ids: {ids:?}"
        );
    }
    // B's takeovers of A's expired leases, as its log names them.
    let took_over: std::collections::HashSet<String> = b
        .log()
        .lines()
        .filter(|l| l.contains("took over a delivery job") && l.contains("from_node=a "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("delivery="))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        !took_over.is_empty(),
        "B took over none of A's leases: {}",
        b.log()
    );
    assert!(metric(b, "hookbridge_delivery_lease_takeovers_total", "").await >= 1.0);
    let dups: Vec<&String> = by_event
        .values()
        .filter(|ids| ids.len() > 1)
        .map(|ids| &ids[0])
        .collect();
    for d in &dups {
        assert!(
            took_over.contains(*d),
            "{d} was sent twice but B never took it over from A: a duplicate not caused by the kill"
        );
    }
    assert!(dups.len() <= took_over.len());
    // What A had made and not yet recorded: a worker slot is held until the outcome is
    // queued for the recorder, which holds 4 per worker waiting and writes 4 per worker a
    // batch (`delivery::worker`): at most 9 × `workers` (16).
    assert!(
        dups.len() <= 9 * 16,
        "{} duplicates: more than A can have in flight",
        dups.len()
    );
    assert!(
        metric(b, "hookbridge_delivery_wakeups_total", r#"source="notify""#).await >= 1.0,
        "B was never woken by A's commits"
    );
    eprintln!(
        "kill -9 mid-drain: {before} delivered before the drain, A killed at {at_kill}/{n}; \
         B took over {} of A's jobs; {} events sent twice ({} sends in all)",
        took_over.len(),
        dups.len(),
        seen.len()
    );
}

/// A clean stop (SIGTERM) of node A while it holds claimed jobs it has not started (its
/// queue for a slow endpoint): A hands their leases back as it stops, so B delivers them
/// at once, not when A's leases (here over two minutes) run out, and takes none of them
/// over as an expired lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_hands_its_unsent_jobs_to_the_other_node_at_once() {
    let node = || Opts {
        delivery: "allow_private_destinations = true
request_timeout = \"3s\"
lease_margin = \"120s\"
workers = 4
per_endpoint_concurrency = 4",
        ..Default::default()
    };
    let Some((mut a, b)) = crate::harness::two_nodes_on_pg_and_s3("stop", node).await else {
        return;
    };
    a.org_with_sftp_hook("acme").await;
    let r = crate::e2e_delivery::Receiver::start().await;
    crate::e2e_delivery::http_hook(&a, "acme", &r.url("/h"), &["*"], false).await;
    // Each answer takes 1 s: A's 4 slots are busy and its queue for the webhook holds
    // what its commits claimed (16 at most; beyond that jobs wait in the store for any node).
    r.set_delay(Duration::from_millis(1000));
    let n = 40;
    for i in 0..n {
        crate::e2e_delivery::post(&a, "acme", &format!("evt_{i}"), "payment").await;
    }
    assert_eq!(
        tokio::task::block_in_place(|| a.terminate()),
        Some(0),
        "A did not stop cleanly: {}",
        a.log()
    );
    let delivered_at_stop = r.events().len();
    r.set_delay(Duration::from_millis(0));
    assert!(
        a.log().contains("handed back the leases this run still held"),
        "A stopped holding no unsent claims ({delivered_at_stop} of {n} delivered): the test proves nothing\n{}",
        a.log()
    );
    // Well within A's lease (2 × 3 s + 120 s): only a hand-back makes them due this soon.
    let ids = |seen: &[crate::e2e_delivery::Seen]| {
        seen.iter()
            .map(|s| s.json()["id"].as_str().unwrap_or_default().to_owned())
            .collect::<std::collections::HashSet<_>>()
    };
    wait_for(
        "B delivers what A left",
        Duration::from_secs(60),
        || async { (ids(&r.events()).len() == n).then_some(()) },
    )
    .await;
    assert!(
        !b.log().contains("took over a delivery job"),
        "B waited for A's leases to expire: {}",
        b.log()
    );
    assert_eq!(r.events().len(), n, "an event was sent twice");
}

/// A job committed by another node that then delivers nothing (here the test's own
/// PostgreSQL store on the daemon's database: a node that committed and died) reaches B
/// by NOTIFY: B counts a wake-up from `notify` and delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_committed_by_another_node_wakes_this_one_by_notify() {
    let Some(db) = crate::harness::pg_database_or_skip().await else {
        return;
    };
    let b = Daemon::start_opts(Opts {
        top: r#"node_id = "b""#,
        pg: Some(db.clone()),
        ..Default::default()
    })
    .await;
    crate::e2e_delivery::org(&b, "acme").await;
    let r = crate::e2e_delivery::Receiver::start().await;
    let hook = crate::e2e_delivery::http_hook(&b, "acme", &r.url("/h"), &["*"], false).await;
    let hook_id = hook["id"].as_str().unwrap().to_owned();
    wait_for(
        "B to listen for other nodes' jobs",
        Duration::from_secs(30),
        || async {
            (metric(&b, "hookbridge_store_listener_connected", "").await == 1.0).then_some(())
        },
    )
    .await;
    let notified = metric(
        &b,
        "hookbridge_delivery_wakeups_total",
        r#"source="notify""#,
    )
    .await;
    let cfg = hookbridge::config::Config {
        data_dir: b.data_dir(),
        ..Default::default()
    };
    let sealer = hookbridge::secrets::SecretBox::load_or_create(&cfg).unwrap();
    let other = hookbridge::store::PostgresStore::open(&db.url, std::sync::Arc::new(sealer))
        .await
        .unwrap();
    use hookbridge::store::Store;
    other
        .commit_events(
            vec![hookbridge::store::NewEvent {
                org: "acme".into(),
                id: "evt_elsewhere".into(),
                envelope_json: r#"{"id":"evt_elsewhere","type":"payment","data":{}}"#.into(),
                deliveries: vec![("dlv_elsewhere".into(), hook_id)],
                ..Default::default()
            }],
            vec![],
        )
        .await
        .unwrap();
    wait_for(
        "B to be woken by NOTIFY",
        Duration::from_secs(30),
        || async {
            (metric(
                &b,
                "hookbridge_delivery_wakeups_total",
                r#"source="notify""#,
            )
            .await
                > notified)
                .then_some(())
        },
    )
    .await;
    let seen = wait_for("B to deliver the job", Duration::from_secs(30), || async {
        r.events()
            .into_iter()
            .find(|s| s.json()["id"] == "evt_elsewhere")
    })
    .await;
    assert_eq!(seen.header("webhook-id"), "dlv_elsewhere");
}
