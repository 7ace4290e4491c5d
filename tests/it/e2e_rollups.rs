//! Roll-ups (`"format": "ndjson.gz"`): posted over simulated hours (the daemon's
//! `HOOKBRIDGE_TEST_CLOCK`), pulled with OpenSSH `sftp`, read with DuckDB, manifests
//! checked byte for byte, and exactly once across kill -9 while partitions close.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Timelike, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::e2e_sftp::{keygen, org, post, sftp_batch, user};
use crate::harness::*;

/// The test clock: 1 real second is `SPEED` simulated seconds, from `origin` on.
pub(crate) struct Clock {
    pub(crate) origin: i64,
    pub(crate) speed: f64,
}

impl Clock {
    pub(crate) fn new(speed: f64) -> Clock {
        Clock {
            origin: Utc::now().timestamp(),
            speed,
        }
    }
    pub(crate) fn env(&self) -> (String, String) {
        (
            "HOOKBRIDGE_TEST_CLOCK".into(),
            format!("{}:{}", self.origin, self.speed),
        )
    }
    /// Simulated now, as the daemon computes it.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let o = self.origin * 1_000_000;
        let us = o + ((Utc::now().timestamp_micros() - o) as f64 * self.speed) as i64;
        Utc.timestamp_micros(us).unwrap()
    }
}

/// A daemon on a test clock of `speed` simulated seconds a real second, with org `org_name`.
pub(crate) async fn clocked_daemon(speed: f64, org_name: &str) -> (Clock, Daemon) {
    let clock = Clock::new(speed);
    let d = Daemon::start_opts(Opts {
        env: vec![clock.env()],
        ..Opts::default()
    })
    .await;
    org(&d, org_name).await;
    (clock, d)
}

fn hour_key(t: DateTime<Utc>) -> String {
    format!("{}/{:02}", t.format("%Y-%m-%d"), t.hour())
}

pub(crate) async fn rollup_hook(d: &Daemon, org_name: &str, extra: Value) -> Value {
    let mut body = json!({"id": "etl", "kind": "sftp", "events": ["*"], "format": "ndjson.gz", "rollup": "hour", "close_after": "1m"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, b) = d
        .admin("POST", &format!("/v1/orgs/{org_name}/webhooks"), Some(body))
        .await;
    assert_eq!(s, 201, "create roll-up hook: {b}");
    b
}

/// Posted event: id, type, simulated time before the post and after its 202.
struct Posted {
    id: String,
    kind: &'static str,
    before: DateTime<Utc>,
    after: DateTime<Utc>,
}

/// Posts `n` events of mixed types with `writers` concurrent clients; every one must 202
/// (or the test fails), pausing `pause` between the posts of a writer.
async fn post_many(
    d: &Daemon,
    clock: &Clock,
    org_name: &str,
    n: usize,
    writers: usize,
    prefix: &str,
) -> Vec<Posted> {
    let url = d.url(&format!("/v1/orgs/{org_name}/events"));
    let token = d.token(org_name);
    let clock = std::sync::Arc::new(Clock {
        origin: clock.origin,
        speed: clock.speed,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (url, token, clock, prefix) =
            (url.clone(), token.clone(), clock.clone(), prefix.to_owned());
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            let mut out = Vec::new();
            for i in (w..n).step_by(writers) {
                let kind = TYPES[(i * 7 + i / 3) % TYPES.len()];
                let id = format!("evt_{prefix}{i:06}");
                let body =
                    json!({"id": id, "type": kind, "data": {"i": i, "note": "roll-up test"}});
                let before = clock.now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status(),
                    202,
                    "post {id}: {}",
                    r.text().await.unwrap_or_default()
                );
                out.push(Posted {
                    id,
                    kind,
                    before,
                    after: clock.now(),
                });
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// Events in the closed partitions (those with `_SUCCESS`) of `org`, read from its storage.
pub(crate) async fn closed_events(d: &Daemon, org_name: &str) -> u64 {
    let files = d.org_files(org_name).await;
    files
        .iter()
        .filter(|(p, _)| p.starts_with("/rollups/") && p.ends_with("/_manifest.json"))
        .filter(|(p, _)| files.contains_key(&p.replace("/_manifest.json", "/_SUCCESS")))
        .map(|(_, b)| {
            serde_json::from_slice::<Value>(b).unwrap()["events"]
                .as_u64()
                .unwrap()
        })
        .sum()
}

/// Pulls `/rollups` with OpenSSH `sftp` (`get -r`) into `into`; returns the local folder.
pub(crate) async fn pull(d: &Daemon, org_name: &str, into: &Path) -> std::path::PathBuf {
    let (key, public) = keygen(into, "key", "ed25519");
    user(
        d,
        org_name,
        &format!("{org_name}-etl"),
        json!({"public_keys": [public]}),
    )
    .await;
    let (ok, out) = sftp_batch(
        d,
        &format!("{org_name}-etl"),
        &key,
        "get -r /rollups\n",
        into,
    )
    .await;
    assert!(ok, "sftp get -r /rollups: {out}");
    into.join("rollups")
}

/// Checks every partition's `_manifest.json` against its parts and `_SUCCESS`; returns
/// the ids of all lines (with partition folder) in the order read.
pub(crate) fn check_manifests(root: &Path) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    let mut partitions = 0;
    for f in files_under(root) {
        if f.file_name().unwrap() != "_manifest.json" {
            continue;
        }
        partitions += 1;
        let dir = f.parent().unwrap();
        assert!(
            dir.join("_SUCCESS").is_file(),
            "{}: no _SUCCESS",
            dir.display()
        );
        let m: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let mut total = 0;
        let mut names = HashSet::new();
        for p in m["parts"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            names.insert(name.to_owned());
            let body = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(
                body.len() as u64,
                p["bytes"].as_u64().unwrap(),
                "{name} size"
            );
            let sha: String = Sha256::digest(&body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sha, p["sha256"].as_str().unwrap(), "{name} sha256");
            let mut text = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut text)
                .unwrap();
            assert!(text.ends_with('\n'));
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(
                lines.len() as u64,
                p["events"].as_u64().unwrap(),
                "{name} events"
            );
            total += lines.len() as u64;
            for l in lines {
                let v: Value = serde_json::from_str(l).unwrap();
                ids.push((
                    v["id"].as_str().unwrap().to_owned(),
                    dir.display().to_string(),
                ));
            }
        }
        assert_eq!(
            total,
            m["events"].as_u64().unwrap(),
            "{} events",
            f.display()
        );
        // Nothing in the folder but the parts of the manifest and the two markers.
        // (A day whose period changed holds hourly folders next to its daily parts.)
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                continue;
            }
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(
                n == "_SUCCESS" || n == "_manifest.json" || names.contains(&n),
                "stray file {n} in {}",
                dir.display()
            );
        }
    }
    assert!(partitions > 0, "no partitions under {}", root.display());
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_events_over_simulated_hours_read_by_duckdb() {
    if !require("sftp") {
        return;
    }
    let py = python();
    let has_duckdb = std::process::Command::new(&py)
        .args(["-c", "import duckdb"])
        .status()
        .is_ok_and(|s| s.success());
    if !require_that("python duckdb (tests/requirements.txt)", has_duckdb) {
        return;
    }
    // 1 real second = 30 simulated minutes: 20,000 posts span a few simulated hours.
    let (clock, d) = clocked_daemon(1800.0, "etl").await;
    let hook = rollup_hook(&d, "etl", json!({"max_part_bytes": 262144})).await;
    assert_eq!(hook["format"], "ndjson.gz");
    assert_eq!(hook["rollup"], "hour");
    assert_eq!(hook["close_after"], "1m");
    const N: usize = 20_000;
    let posted = post_many(&d, &clock, "etl", N, 16, "r").await;
    assert_eq!(posted.len(), N);
    wait_for(
        "every posted event in a closed partition",
        Duration::from_secs(120),
        || async { (closed_events(&d, "etl").await == N as u64).then_some(()) },
    )
    .await;

    let tmp = tempfile::tempdir().unwrap();
    let root = pull(&d, "etl", tmp.path()).await;
    let lines = check_manifests(&root);
    assert_eq!(lines.len(), N);

    let script = r#"
import duckdb, json, sys
rows = duckdb.sql(f"""
  SELECT id, type, CAST(dt AS VARCHAR), CAST(hour AS INTEGER)
  FROM read_json_auto('{sys.argv[1]}/**/*.ndjson.gz', hive_partitioning = true)
""").fetchall()
for r in rows:
    print(json.dumps(r))
"#;
    let out = std::process::Command::new(&py)
        .args(["-c", script])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "duckdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, String, String, u32)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), N, "DuckDB reads every line");

    // Ids unique, each the type posted, and in an hour its post could have been accepted in.
    let by_id: HashMap<&str, &Posted> = posted.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut seen = HashSet::new();
    let mut got: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (id, kind, dt, hour) in &rows {
        assert!(seen.insert(id.clone()), "id {id} twice");
        let p = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("unknown id {id}"));
        assert_eq!(kind, p.kind);
        let h = format!("{dt}/{hour:02}");
        assert!(
            hour_key(p.before) <= h && h <= hour_key(p.after),
            "{id} in hour {h}, posted between {} and {}",
            p.before,
            p.after
        );
        *got.entry((kind.clone(), h)).or_default() += 1;
    }
    // Per type and hour: what was posted there (events whose post spanned an hour's end
    // may be in either hour, so they widen the bound).
    let mut sure: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut maybe: BTreeMap<(String, String), usize> = BTreeMap::new();
    for p in &posted {
        let (a, b) = (hour_key(p.before), hour_key(p.after));
        if a == b {
            *sure.entry((p.kind.into(), a)).or_default() += 1;
        } else {
            *maybe.entry((p.kind.into(), a)).or_default() += 1;
            *maybe.entry((p.kind.into(), b)).or_default() += 1;
        }
    }
    let hours: HashSet<&String> = got.keys().map(|(_, h)| h).collect();
    assert!(hours.len() >= 2, "posts spanned only {hours:?}");
    for key in sure.keys().chain(maybe.keys()).chain(got.keys()) {
        let (s, m, g) = (
            sure.get(key).copied().unwrap_or(0),
            maybe.get(key).copied().unwrap_or(0),
            got.get(key).copied().unwrap_or(0),
        );
        assert!(
            s <= g && g <= s + m,
            "{key:?}: DuckDB counts {g}, posted {s} (+{m} at an hour's end)"
        );
    }
    for t in TYPES {
        let posted_t = posted.iter().filter(|p| p.kind == t).count();
        let read_t = rows.iter().filter(|r| r.1 == t).count();
        assert_eq!(posted_t, read_t, "{t}");
    }
    let m = d.metrics().await;
    assert!(
        m.contains("hookbridge_rollup_partitions_closed_total"),
        "{m}"
    );
    assert!(d.log().contains("rollup_closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_closing_keeps_exactly_once_and_per_event_hook_gets_all_too() {
    if !require("sftp") {
        return;
    }
    // 1 real second = 20 simulated minutes.
    let (clock, mut d) = clocked_daemon(1200.0, "both").await;
    // Small parts: closing a partition writes many files, so the kill lands mid-close.
    rollup_hook(&d, "both", json!({"max_part_bytes": 65536})).await;
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/both/webhooks",
            Some(json!({"id": "files", "kind": "sftp", "events": ["*"]})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let posted = post_many(&d, &clock, "both", 3000, 8, "k").await;

    // Kill as soon as a partition is partly written (parts without _SUCCESS), or failing
    // that once some partitions are closed and others are not.
    let mid = wait_for(
        "a partition being closed",
        Duration::from_secs(60),
        || async {
            let files = d.org_files("both").await;
            let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
            for p in files.keys().filter(|p| p.starts_with("/rollups/")) {
                let (dir, name) = p.rsplit_once('/').unwrap();
                *dirs.entry(dir.to_owned()).or_default() |= name == "_SUCCESS";
            }
            let partial = dirs.values().any(|done| !done);
            let some_done = dirs.values().any(|done| *done);
            (partial || some_done).then_some(partial)
        },
    )
    .await;
    d.kill9();
    eprintln!("killed with a partition half written: {mid}");
    d.spawn().await;

    wait_for(
        "every event in a closed partition after restart",
        Duration::from_secs(120),
        || async { (closed_events(&d, "both").await == posted.len() as u64).then_some(()) },
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let root = pull(&d, "both", tmp.path()).await;
    let lines = check_manifests(&root);
    let ids: HashSet<&str> = lines.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), lines.len(), "an event in two lines");
    let want: HashSet<&str> = posted.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, want, "roll-ups hold exactly the acknowledged events");

    // The per-event hook got one file per event as well, outside /rollups.
    let files = d.org_files("both").await;
    let per_event: HashSet<String> = files
        .iter()
        .filter(|(p, _)| !p.starts_with("/rollups/"))
        .map(|(_, b)| {
            serde_json::from_slice::<Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(per_event.len(), posted.len());
    assert!(want.iter().all(|id| per_event.contains(*id)));
}

#[tokio::test]
async fn bad_rollup_settings_are_refused_with_a_reason() {
    let d = Daemon::start().await;
    org(&d, "bad").await;
    for (body, field) in [
        (json!({"kind": "sftp", "format": "csv"}), "format"),
        (json!({"kind": "sftp", "format": "ndjson.gz"}), "rollup"),
        (
            json!({"kind": "sftp", "format": "ndjson.gz", "rollup": "week"}),
            "rollup",
        ),
        (json!({"kind": "sftp", "rollup": "hour"}), "rollup"),
        (
            json!({"kind": "sftp", "format": "ndjson.gz", "rollup": "hour", "close_after": "soon"}),
            "close_after",
        ),
        (
            json!({"kind": "sftp", "format": "ndjson.gz", "rollup": "day", "max_part_bytes": 10}),
            "max_part_bytes",
        ),
        (
            json!({"kind": "sftp", "format": "ndjson.gz", "rollup": "day", "path_template": "/x/{id}.json"}),
            "path_template",
        ),
        (
            json!({"kind": "http", "url": "https://example.com/", "format": "ndjson.gz", "rollup": "day", "verify": false}),
            "format",
        ),
    ] {
        let (s, b) = d
            .admin("POST", "/v1/orgs/bad/webhooks", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b.to_string().contains(field), "{body}: {b}");
    }
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/bad/webhooks",
            Some(json!({"kind": "sftp", "format": "ndjson.gz", "rollup": "day"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["close_after"], "5m");
    assert_eq!(b["max_part_bytes"], 134217728);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sftp_users_cannot_write_into_the_rollup_tree_and_its_partitions_stay_whole() {
    if !require("sftp") {
        return;
    }
    // 1 real second = 1 simulated hour: an hourly partition closes within seconds.
    let (_clock, d) = clocked_daemon(3600.0, "ro").await;
    rollup_hook(&d, "ro", json!({})).await;
    for i in 0..5 {
        post(&d, "ro", &format!("evt_ro{i}"), "payment").await;
    }
    wait_for(
        "the events in a closed partition",
        Duration::from_secs(60),
        || async { (closed_events(&d, "ro").await == 5).then_some(()) },
    )
    .await;
    let rollups = || async {
        let mut files = d.org_files("ro").await;
        files.retain(|p, _| p.starts_with("/rollups/"));
        files
    };
    let before = rollups().await;
    let success = before.keys().find(|p| p.ends_with("/_SUCCESS")).unwrap();
    let partition = success.trim_end_matches("/_SUCCESS").to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "up", "ed25519");
    let body = json!({"public_keys": [public], "upload": true});
    user(&d, "ro", "up", body).await;
    std::fs::write(tmp.path().join("mine.txt"), "the user's own bytes").unwrap();
    let (ok, out) = sftp_batch(&d, "up", &key, "put mine.txt /mine.txt\n", tmp.path()).await;
    assert!(ok, "an upload outside /rollups: {out}");
    for batch in [
        format!("put mine.txt {partition}/mine.txt\n"),
        format!("put mine.txt {partition}/_SUCCESS.tmp\n"),
        format!("mkdir {partition}/mine\n"),
        "put mine.txt /rollups/mine.txt\n".to_owned(),
        "mkdir /rollups/payment/dt=2000-01-01\n".to_owned(),
        format!("rename /mine.txt {partition}/mine.txt\n"),
    ] {
        let (ok, out) = sftp_batch(&d, "up", &key, &batch, tmp.path()).await;
        assert!(!ok, "{batch} worked: {out}");
        assert!(out.contains("Permission denied"), "{batch}: {out}");
    }
    assert_eq!(rollups().await, before, "the roll-up tree changed");
    assert!(
        d.log().contains("SFTP write into /rollups refused"),
        "no log line says why"
    );

    // Its files are still the user's to read, move within or out, and delete.
    let part = before
        .keys()
        .find(|p| p.starts_with(&partition) && p.ends_with(".ndjson.gz"))
        .unwrap();
    let batch = format!(
        "get {part} got.gz\nrename {part} {partition}/moved.gz\n\
         rename {partition}/moved.gz /taken.gz\nrm {partition}/_manifest.json\n"
    );
    let (ok, out) = sftp_batch(&d, "up", &key, &batch, tmp.path()).await;
    assert!(ok, "{batch}: {out}");
    assert_eq!(
        std::fs::read(tmp.path().join("got.gz")).unwrap(),
        before[part]
    );
    let files = d.org_files("ro").await;
    assert_eq!(files.get("/taken.gz"), Some(&before[part]));
    assert!(!files.contains_key(&format!("{partition}/_manifest.json")));
}
