//! Rules that used to apply silently only in part: `disable_after` for endpoints refusing
//! connections, quota under concurrent posts, config-declared webhooks going through the
//! admin API's checks, corrupt state rows, and one org's folders failing another's ingest.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

/// An endpoint that refuses connections at once: on loopback, in well under a millisecond.
fn refused_url() -> String {
    format!("http://127.0.0.1:{}/hook", free_port())
}

#[tokio::test]
async fn disable_after_fires_for_an_endpoint_refusing_connections() {
    let d = Daemon::start_with_delivery(
        "allow_private_destinations = true\nretry_delays = [\"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"]\ndisable_after = \"1s\"",
    )
    .await;
    let (s, _) = d.admin("PUT", "/v1/orgs/acme", Some(json!({}))).await;
    assert_eq!(s, 201);
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"id": "down", "kind": "http", "url": refused_url(), "verify": false})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    let hook = wait_for(
        "the webhook to be disabled after 1s of refused connections",
        Duration::from_secs(15),
        || async {
            let (_, h) = d.admin("GET", "/v1/orgs/acme/webhooks/down", None).await;
            (h["enabled"] == json!(false)).then_some(h)
        },
    )
    .await;
    let reason = hook["disabled_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("disable_after"), "{hook}");
    // The attempt log says what happened: a connect error, not "never tried".
    let (_, list) = d
        .admin("GET", "/v1/orgs/acme/webhooks/down/deliveries", None)
        .await;
    let outcome = &list["deliveries"][0]["attempt_log"][0]["outcome"];
    assert_eq!(outcome, &json!("connect_error"), "{list}");
}

#[tokio::test]
async fn concurrent_posts_at_the_quota_edge_never_exceed_it() {
    const QUOTA: usize = 5;
    const POSTS: usize = 40;
    let d = Daemon::start_with(&format!("[limits]\nquota_files = {QUOTA}\n")).await;
    d.org_with_sftp_hook("acme").await;
    let mut tasks = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Barrier::new(POSTS));
    for i in 0..POSTS {
        let (client, url, token, gate) = (
            d.client.clone(),
            d.url("/v1/orgs/acme/events"),
            d.token("acme"),
            gate.clone(),
        );
        tasks.spawn(async move {
            gate.wait().await;
            let body = json!({"id": format!("evt_q{i}"), "type": "payment", "data": {}});
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    let mut codes = Vec::new();
    while let Some(c) = tasks.join_next().await {
        codes.push(c.unwrap());
    }
    let accepted = codes.iter().filter(|&&c| c == 202).count();
    let full = codes.iter().filter(|&&c| c == 507).count();
    assert_eq!((accepted, full), (QUOTA, POSTS - QUOTA), "{codes:?}");
    assert_eq!(files_under(&d.org_dir("acme")).len(), QUOTA);
}

/// Runs the daemon on `config` and expects it to refuse to start; returns its stderr.
fn refused_start(dir: &std::path::Path, config: &str) -> String {
    let path = dir.join("hookbridge.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.join("refused.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hookbridge started (still running after 30s) on {config}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "hookbridge started on {config}");
    std::fs::read_to_string(&log).unwrap()
}

#[tokio::test]
async fn a_declared_webhook_to_a_private_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[sftp]\nenabled = false\n\
         [ingress]\njwt_hs256_secret = \"{INGRESS_SECRET}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
        dir.path().join("data").display(),
        free_port()
    );
    let orgs = "[[orgs]]\nname = \"acme\"\n[[orgs.webhooks]]\nid = \"files\"\nkind = \"sftp\"\n\
                [[orgs.webhooks]]\nid = \"meta\"\nkind = \"http\"\nurl = \"http://169.254.169.254/latest\"\n";
    let err = refused_start(dir.path(), &format!("{base}{orgs}"));
    assert!(err.contains("orgs[0].webhooks[1].url"), "{err}");
    // Same checks as the admin API: a url on an sftp hook is refused too, naming the key.
    let err = refused_start(
        dir.path(),
        &format!("{base}[[orgs]]\nname = \"acme\"\n[[orgs.webhooks]]\nid = \"f\"\nkind = \"sftp\"\nurl = \"https://example.com/\"\n"),
    );
    assert!(err.contains("orgs[0].webhooks[0].url"), "{err}");

    // Allowed with allow_private_destinations (the harness sets it).
    let d = Daemon::start_with(orgs).await;
    let (s, h) = d.admin("GET", "/v1/orgs/acme/webhooks/meta", None).await;
    assert_eq!(s, 200, "{h}");
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn corrupt_rows_are_reported_and_skipped_never_read_as_defaults() {
    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    for (id, template) in [("other", "/other/{id}.json"), ("third", "/third/{id}.json")] {
        let (s, b) = d
            .admin(
                "POST",
                "/v1/orgs/acme/webhooks",
                Some(json!({"id": id, "kind": "sftp", "path_template": template})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"id": "out", "kind": "http", "url": refused_url(), "verify": false})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = d.admin("PUT", "/v1/orgs/beta", Some(json!({}))).await;
    assert_eq!(s, 201);
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(d.terminate(), Some(0));

    {
        let db = rusqlite::Connection::open(d.data_dir().join("state.db")).unwrap();
        db.execute("UPDATE webhooks SET kind = 'ftp' WHERE id = 'other'", [])
            .unwrap();
        db.execute("UPDATE webhooks SET events = '{bad' WHERE id = 'third'", [])
            .unwrap();
        db.execute("UPDATE deliveries SET status = 'weird'", [])
            .unwrap();
        db.execute(
            "UPDATE orgs SET created_at = 9000000000000000000 WHERE name = 'beta'",
            [],
        )
        .unwrap();
    }
    d.spawn().await;

    let r = d
        .post_event(
            "acme",
            &json!({"id": "evt_after", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let files = files_under(&d.org_dir("acme"));
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(d.org_dir("acme"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert!(
        names.iter().any(|n| n.contains("evt_after")),
        "the sound hook still writes: {names:?}"
    );
    // Before: kind 'ftp' was read as sftp and wrote /other/evt_after.json.
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("other/") && n.contains("evt_after")),
        "{names:?}"
    );
    let (_, orgs) = d.admin("GET", "/v1/orgs", None).await;
    let listed: Vec<&str> = orgs["orgs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["id"].as_str())
        .collect();
    assert_eq!(listed, vec!["acme"], "beta's bad time is not 1970: {orgs}");
    let (_, list) = d
        .admin("GET", "/v1/orgs/acme/webhooks/out/deliveries", None)
        .await;
    // Only the delivery made after the restart: the corrupt one is not shown as pending.
    let events: Vec<&str> = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["event_id"].as_str())
        .collect();
    assert_eq!(
        events,
        vec!["evt_after"],
        "a bad status is not pending: {list}"
    );
    let (_, hooks) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    let ids: HashSet<&str> = hooks["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["id"].as_str())
        .collect();
    assert!(!ids.contains("other") && !ids.contains("third"), "{hooks}");

    let m = d.metrics().await;
    assert_eq!(
        metric(
            &m,
            "hookbridge_store_corrupt_rows_total{table=\"webhooks\"}"
        ),
        2.0,
        "{m}"
    );
    assert!(metric(&m, "hookbridge_store_corrupt_rows_total{table=\"orgs\"}") >= 1.0);
    assert!(
        metric(
            &m,
            "hookbridge_store_corrupt_rows_total{table=\"deliveries\"}"
        ) >= 1.0
    );
    let log = d.log();
    for needle in [
        "unknown webhook kind \"ftp\"",
        "events:",
        "out of range",
        "weird",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("corrupt row") && l.contains(needle)),
            "log names {needle}: {log}"
        );
    }
}

/// Posts `payment` events to `org` until `stop`; returns (acked ids, 5xx count, total).
async fn post_until(d: &Daemon, org: &str, stop: Arc<AtomicBool>) -> (Vec<String>, usize, usize) {
    let (url, token) = (d.url(&format!("/v1/orgs/{org}/events")), d.token(org));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (url, token, stop, org) = (url.clone(), token.clone(), stop.clone(), org.to_owned());
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            let (mut acked, mut errors, mut total) = (Vec::new(), 0, 0);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("evt_{org}_{w}_{i}");
                let body = json!({"id": id, "type": "payment", "data": {}});
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                total += 1;
                match r.status().as_u16() {
                    202 => acked.push(id),
                    s if s >= 500 => errors += 1,
                    _ => {}
                }
            }
            (acked, errors, total)
        });
    }
    let mut out = (Vec::new(), 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (a, e, t) = r.unwrap();
        out.0.extend(a);
        out.1 += e;
        out.2 += t;
    }
    out
}

#[tokio::test]
async fn one_org_renaming_its_day_folder_never_fails_another_orgs_posts() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    d.org_with_sftp_hook("globex").await;
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let payment = d.org_dir("acme").join("payment");

    // The attack, on disk (what a reader's SFTP rename does): move acme's day folder
    // away, wait about an SFTP round trip, move it back, over and over, for a few
    // bounded seconds. The folder is missing about half of the time.
    let stop = Arc::new(AtomicBool::new(false));
    let renames = {
        let (stop, payment, day) = (stop.clone(), payment.clone(), day.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let moved = payment.join(format!("moved-{n}"));
                if std::fs::rename(payment.join(&day), &moved).is_ok() {
                    n += 1;
                    std::thread::sleep(Duration::from_micros(500));
                    let _ = std::fs::rename(&moved, payment.join(&day));
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            n
        })
    };
    let started = Instant::now();
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let (acme, globex) = tokio::join!(
        post_until(&d, "acme", stop.clone()),
        post_until(&d, "globex", stop.clone())
    );
    timer.await.unwrap();
    let renamed = renames.join().unwrap();
    assert!(
        renamed > 100,
        "the attack ran: {renamed} renames in {:?}",
        started.elapsed()
    );
    assert!(
        globex.2 > 20 && acme.2 > 20,
        "both orgs posted: {} / {}",
        acme.2,
        globex.2
    );
    assert_eq!(globex.1, 0, "globex 5xx out of {} posts", globex.2);
    assert_eq!(acme.1, 0, "acme 5xx out of {} posts", acme.2);

    // Every acknowledged event of both orgs is on disk (acme's maybe in a moved folder).
    for (org, acked) in [("acme", &acme.0), ("globex", &globex.0)] {
        let on_disk: HashSet<String> = files_under(&d.org_dir(org))
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        for id in acked {
            assert!(
                on_disk.iter().any(|n| n.ends_with(&format!("_{id}.json"))),
                "{org} {id} acknowledged but not on disk"
            );
        }
    }
}

#[tokio::test]
async fn state_files_are_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask only changes this process's file-creation mask; the daemon inherits it.
    let old = unsafe { libc::umask(0o022) };
    let d = Daemon::start().await;
    unsafe { libc::umask(old) };
    d.org_with_sftp_hook("acme").await;
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    let mode = |p: std::path::PathBuf| {
        std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let dd = d.data_dir();
    assert_eq!(mode(dd.clone()), 0o700, "data dir");
    assert_eq!(mode(dd.join("secrets")), 0o700, "secrets dir");
    for f in [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "ssh_host_ed25519_key",
    ] {
        assert_eq!(mode(dd.join(f)), 0o600, "{f}");
    }
}

#[tokio::test]
async fn sighup_applies_live_keys_and_names_the_ones_needing_a_restart() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let big = json!({"type": "payment", "data": {"pad": "x".repeat(4000)}});
    assert_eq!(d.post_event("acme", &big).await.status(), 202);

    // One key of each kind: http.max_body applies live, sftp.max_sessions needs a restart.
    let cfg = std::fs::read_to_string(d.config_path()).unwrap();
    let cfg = cfg
        .replacen("[http]\n", "[http]\nmax_body = 2048\n", 1)
        .replacen("[sftp]\n", "[sftp]\nmax_sessions = 7\n", 1);
    std::fs::write(d.config_path(), cfg).unwrap();
    d.signal(libc::SIGHUP);
    let line = wait_for("the reload's log line", Duration::from_secs(10), || {
        let line = d
            .log()
            .lines()
            .find(|l| l.contains("SIGHUP: configuration reloaded"))
            .map(str::to_owned);
        async move { line }
    })
    .await;
    assert!(
        line.contains("need_restart") && line.contains("sftp.max_sessions"),
        "{line}"
    );
    assert!(line.contains("http.max_body"), "named as applied: {line}");
    let r = d.post_event("acme", &big).await;
    assert_eq!(r.status(), 413, "the new http.max_body is in force");
    let small = json!({"type": "payment", "data": {}});
    assert_eq!(d.post_event("acme", &small).await.status(), 202);
}

#[tokio::test]
async fn webhook_secrets_are_encrypted_at_rest_and_plain_rows_are_migrated() {
    let mut d = Daemon::start().await;
    let (s, _) = d.admin("PUT", "/v1/orgs/acme", Some(json!({}))).await;
    assert_eq!(s, 201);
    let (s, h) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"id": "out", "kind": "http", "url": refused_url(), "verify": false})),
        )
        .await;
    assert_eq!(s, 201, "{h}");
    let secret = h["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(d.terminate(), Some(0));
    let stored = |d: &Daemon| -> String {
        let db = rusqlite::Connection::open(d.data_dir().join("state.db")).unwrap();
        db.query_row("SELECT secret FROM webhooks WHERE id = 'out'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let sealed = stored(&d);
    assert!(
        sealed.starts_with("enc:v1:") && !sealed.contains(&secret),
        "{sealed}"
    );
    for f in ["state.db", "state.db-wal"] {
        let raw = std::fs::read(d.data_dir().join(f)).unwrap_or_default();
        assert!(
            !raw.windows(6).any(|w| w == b"whsec_"),
            "no plain secret in {f}"
        );
    }

    // A row written in plain text by an older version is sealed at the next start.
    {
        let db = rusqlite::Connection::open(d.data_dir().join("state.db")).unwrap();
        db.execute(
            "UPDATE webhooks SET secret = 'whsec_plain' WHERE id = 'out'",
            [],
        )
        .unwrap();
    }
    d.spawn().await;
    let (s, _) = d.admin("GET", "/v1/orgs/acme/webhooks/out", None).await;
    assert_eq!(s, 200);
    let sealed = stored(&d);
    assert!(sealed.starts_with("enc:v1:"), "{sealed}");
}
