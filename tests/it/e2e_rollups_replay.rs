//! Roll-ups, continued (issue 14 items 3, 5): a partition is visible to SFTP only when
//! complete, a replay with a time range rebuilds partitions with the same names and bytes
//! (also across a kill -9 in the middle of the rebuild), and the roll-up settings change
//! by PATCH and in the console, with reasons for bad input.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::e2e_rollups::{check_manifests, clocked_daemon, closed_events, pull, rollup_hook};
use crate::e2e_sftp::{keygen, org, sftp_batch, user};
use crate::harness::*;
use crate::webdriver::Browser;

/// Posts `n` `payment` events with a padded body (so a partition is many parts).
async fn post_payments(
    d: &Daemon,
    org_name: &str,
    prefix: &str,
    n: usize,
    writers: usize,
) -> HashSet<String> {
    let url = d.url(&format!("/v1/orgs/{org_name}/events"));
    let token = d.token(org_name);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (url, token, prefix) = (url.clone(), token.clone(), prefix.to_owned());
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            for i in (w..n).step_by(writers) {
                let id = format!("evt_{prefix}{i:06}");
                let body = json!({"id": id, "type": "payment",
                    "data": {"i": i, "pad": format!("{i:0>600}")}});
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202, "post {id}");
                ids.push(id);
            }
            ids
        });
    }
    let mut all = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// Relative path -> SHA-256 of every file under `root`.
fn digests(root: &Path) -> BTreeMap<String, String> {
    files_under(root)
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(root).unwrap().display().to_string();
            let sha: String = Sha256::digest(std::fs::read(&f).unwrap())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (rel, sha)
        })
        .collect()
}

/// Paths of the files under `/rollups` of `org`, listed in the storage itself (not through
/// SFTP); `None` when a folder vanished mid-walk (a rebuild is deleting): ask again.
async fn rollup_paths(d: &Daemon, org_name: &str) -> Option<Vec<String>> {
    let s = d.storage();
    let org = hookbridge::storage::OrgName::new(org_name).unwrap();
    let files = s.walk(&org).await.ok()?;
    Some(
        files
            .into_iter()
            .map(|f| f.path.virtual_path())
            .filter(|p| p.starts_with("/rollups/"))
            .collect(),
    )
}

/// Roll-up folders with files but no `_SUCCESS`.
async fn half_written(d: &Daemon, org_name: &str) -> Vec<String> {
    let paths = loop {
        if let Some(p) = rollup_paths(d, org_name).await {
            break p;
        }
    };
    let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
    for p in &paths {
        let (dir, name) = p.rsplit_once('/').unwrap();
        *dirs.entry(dir.to_owned()).or_default() |= name == "_SUCCESS";
    }
    dirs.into_iter()
        .filter(|(_, done)| !done)
        .map(|(d, _)| d)
        .collect()
}

/// Lines waiting for a close or rebuild (`hookbridge_rollup_staged_lines`, set by the
/// closer after each pass); `None` before the first pass.
async fn staged_lines(d: &Daemon) -> Option<u64> {
    let m = d.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix("hookbridge_rollup_staged_lines "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Events in complete partitions, or `None` while files change under the count (a
/// rebuild deleting what was just listed).
async fn complete_events(d: &Daemon, org_name: &str) -> Option<u64> {
    let s = d.storage();
    let org = hookbridge::storage::OrgName::new(org_name).unwrap();
    let paths = rollup_paths(d, org_name).await?;
    let mut n = 0;
    for p in paths.iter().filter(|p| p.ends_with("/_manifest.json")) {
        if !paths.contains(&p.replace("/_manifest.json", "/_SUCCESS")) {
            continue;
        }
        let path = hookbridge::storage::StoragePath::parse(p).unwrap();
        let body = hookbridge::storage::read_small(&*s, &org, &path, 1 << 20)
            .await
            .ok()?;
        n += serde_json::from_slice::<Value>(&body).unwrap()["events"]
            .as_u64()
            .unwrap();
    }
    Some(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_rebuilds_a_range_hidden_until_whole_with_the_same_bytes_across_kill_9() {
    if !require("sftp") {
        return;
    }
    // 1 real second = 1 simulated hour: a day closes within half a minute.
    let (clock, mut d) = clocked_daemon(3600.0, "rb").await;
    // Smallest parts: one daily partition is ~90 parts, so a rebuild takes a while.
    rollup_hook(
        &d,
        "rb",
        json!({"rollup": "day", "events": ["payment"], "max_part_bytes": 65536}),
    )
    .await;
    let since = clock.now() - chrono::Duration::seconds(1);
    const N: usize = 8000;
    let posted = post_payments(&d, "rb", "rb", N, 8).await;
    wait_for(
        "every event in a closed partition",
        Duration::from_secs(120),
        || async { (closed_events(&d, "rb").await == N as u64).then_some(()) },
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    std::fs::create_dir(&first).unwrap();
    let root = pull(&d, "rb", &first).await;
    let ids: HashSet<String> = check_manifests(&root)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, posted);
    let before = digests(&root);
    let parts = before.keys().filter(|k| k.ends_with(".ndjson.gz")).count();
    assert!(
        parts > 20,
        "only {parts} parts: the rebuild would be too quick to catch"
    );

    // Replay the range, and kill -9 while a rebuilt partition is half written (retrying
    // when the rebuild was over before the kill landed).
    let mut caught = None;
    for attempt in 0..8 {
        let (s, b) = d
            .admin(
                "POST",
                "/v1/orgs/rb/webhooks/etl/replay",
                Some(json!({"since": since.to_rfc3339(), "until": clock.now().to_rfc3339()})),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        assert!(b["replayed"].as_u64().unwrap() >= 1, "{b}");
        assert!(
            b["partitions"][0]
                .as_str()
                .unwrap()
                .starts_with("/rollups/payment/dt="),
            "{b}"
        );
        let seen = wait_for_opt(Duration::from_secs(10), || async {
            let h = half_written(&d, "rb").await;
            (!h.is_empty()).then_some(h)
        })
        .await;
        if seen.is_some() {
            d.kill9();
            // Frozen by the kill: is a partition still half written?
            let h = half_written(&d, "rb").await;
            if !h.is_empty() {
                caught = Some(h);
                break;
            }
            d.spawn().await;
        }
        eprintln!("attempt {attempt}: the rebuild finished before the kill; again");
        wait_for("the rebuild done", Duration::from_secs(60), || async {
            (staged_lines(&d).await == Some(0)
                && half_written(&d, "rb").await.is_empty()
                && complete_events(&d, "rb").await == Some(N as u64))
            .then_some(())
        })
        .await;
    }
    let caught = caught.expect("never caught a rebuild half written in 8 replays");

    // Restarted on a clock that stands still before the reopened partitions are due: the
    // half-written partition stays so while an SFTP client looks, and it is not there.
    let env = d.env.clone();
    d.env = vec![(
        "HOOKBRIDGE_TEST_CLOCK".into(),
        format!("{}:0.000001", clock.origin),
    )];
    d.spawn().await;
    let (key, public) = keygen(tmp.path(), "peek", "ed25519");
    user(&d, "rb", "peek", json!({"public_keys": [public]})).await;
    let (ok, listing) = sftp_batch(&d, "peek", &key, "ls -1 /rollups/payment\n", tmp.path()).await;
    assert!(ok, "{listing}");
    for dir in &caught {
        let leaf = dir.rsplit('/').next().unwrap();
        assert!(
            !listing.contains(leaf),
            "half-written {dir} listed: {listing}"
        );
        for probe in [format!("ls {dir}\n"), format!("get {dir}/_manifest.json\n")] {
            let (ok, out) = sftp_batch(&d, "peek", &key, &probe, tmp.path()).await;
            assert!(!ok, "{probe} of a half-written partition worked: {out}");
            assert!(out.contains("not found"), "{probe}: {out}");
        }
    }
    assert!(
        half_written(&d, "rb").await == caught,
        "the frozen clock let a close run"
    );

    // Time runs again (past any lease the killed daemon held): the rebuild finishes and
    // the partitions are back whole, byte for byte, every event once.
    d.terminate();
    d.env = env;
    let jump = clock.origin - 720; // 720 s earlier at 3600x: 30 simulated days later
    d.env.retain(|(k, _)| k != "HOOKBRIDGE_TEST_CLOCK");
    d.env.push((
        "HOOKBRIDGE_TEST_CLOCK".into(),
        format!("{jump}:{}", clock.speed),
    ));
    d.spawn().await;
    wait_for(
        "the rebuilt partitions complete",
        Duration::from_secs(120),
        || async {
            (staged_lines(&d).await == Some(0)
                && half_written(&d, "rb").await.is_empty()
                && complete_events(&d, "rb").await == Some(N as u64))
            .then_some(())
        },
    )
    .await;
    let second = tmp.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let root = pull(&d, "rb", &second).await;
    let lines = check_manifests(&root);
    assert_eq!(lines.len(), N, "an event lost or doubled by the rebuild");
    assert_eq!(digests(&root), before, "the rebuild changed names or bytes");
}

/// `wait_for` without the panic: `None` when `f` gave nothing within `limit`.
async fn wait_for_opt<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn replay_and_patch_of_a_rollup_hook_refuse_bad_input_with_a_reason() {
    let d = Daemon::start().await;
    org(&d, "pr").await;
    rollup_hook(&d, "pr", json!({})).await;
    let replay = "/v1/orgs/pr/webhooks/etl/replay";
    let now = chrono::Utc::now();
    let t = |d: chrono::Duration| (now + d).to_rfc3339();
    for (body, reason) in [
        (json!({}), "since"),
        (json!({"delivery_id": "d1"}), "no deliveries"),
        (json!({"since": t(chrono::Duration::hours(1))}), "future"),
        (
            json!({"since": t(-chrono::Duration::hours(1)), "until": t(-chrono::Duration::hours(2))}),
            "must be after",
        ),
        (json!({"since": "yesterday"}), "invalid"),
        (
            json!({"since": t(-chrono::Duration::hours(1)), "rebuild": true}),
            "rebuild",
        ),
    ] {
        let (s, b) = d.admin("POST", replay, Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {b}");
        assert_eq!(b["status"], 400, "problem+json: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains(reason),
            "{body}: {b}"
        );
    }
    // A valid range with nothing closed in it rebuilds nothing.
    let (s, b) = d
        .admin(
            "POST",
            replay,
            Some(json!({"since": t(-chrono::Duration::hours(2))})),
        )
        .await;
    assert_eq!((s, b["replayed"].as_u64()), (202, Some(0)), "{b}");
    assert_eq!(b["partitions"], json!([]));

    // PATCH: bad values name their field; good ones keep what they do not change.
    let hook = "/v1/orgs/pr/webhooks/etl";
    for (body, field) in [
        (json!({"rollup": "week"}), "rollup"),
        (json!({"close_after": "soon"}), "close_after"),
        (json!({"max_part_bytes": 10}), "max_part_bytes"),
        (json!({"format": "csv"}), "format"),
        (json!({"path_template": "/x/{id}.json"}), "path_template"),
        (json!({"format": "json", "rollup": "day"}), "rollup"),
        (json!({"rollup": null}), "null"),
    ] {
        let (s, b) = d.admin("PATCH", hook, Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b.to_string().contains(field), "{body}: {b}");
    }
    let (s, b) = d.admin("PATCH", hook, Some(json!({"rollup": "day"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["rollup"].as_str(), b["close_after"].as_str()),
        (Some("day"), Some("1m"))
    );
    let (s, b) = d
        .admin(
            "PATCH",
            hook,
            Some(json!({"max_part_bytes": 1048576, "close_after": "10m"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["rollup"].as_str(),
            b["close_after"].as_str(),
            b["max_part_bytes"].as_u64()
        ),
        (Some("day"), Some("10m"), Some(1048576))
    );
    let (_, got) = d.admin("GET", hook, None).await;
    assert_eq!(got["max_part_bytes"], 1048576, "not stored: {got}");
    // Back to one file per event, and to roll-ups again.
    let (s, b) = d
        .admin("PATCH", hook, Some(json!({"format": "json"})))
        .await;
    assert_eq!((s, b["format"].as_str()), (200, Some("json")), "{b}");
    assert!(b.get("rollup").is_none_or(Value::is_null), "{b}");
    let (s, b) = d
        .admin("PATCH", hook, Some(json!({"format": "ndjson.gz"})))
        .await;
    assert_eq!(s, 400, "a roll-up needs its period: {b}");
    let (s, b) = d
        .admin(
            "PATCH",
            hook,
            Some(json!({"format": "ndjson.gz", "rollup": "hour"})),
        )
        .await;
    assert_eq!((s, b["rollup"].as_str()), (200, Some("hour")), "{b}");
    // An http hook cannot roll up, and its replays take no `until`.
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/pr/webhooks",
            Some(json!({"id": "web", "kind": "http", "url": "https://example.com/h", "events": ["*"], "verify": false})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = d
        .admin(
            "PATCH",
            "/v1/orgs/pr/webhooks/web",
            Some(json!({"format": "ndjson.gz", "rollup": "day"})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(b.to_string().contains("format"), "{b}");
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/pr/webhooks/web/replay",
            Some(json!({"since": t(-chrono::Duration::hours(1)), "until": t(chrono::Duration::zero())})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("until"), "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn console_changes_rollup_settings_in_a_real_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let d = Daemon::start().await;
    org(&d, "cr").await;
    let (s, h) = d
        .admin(
            "POST",
            "/v1/orgs/cr/webhooks",
            Some(json!({"id": "files", "kind": "sftp", "events": ["*"]})),
        )
        .await;
    assert_eq!(s, 201, "{h}");
    let (s, l) = d.admin("POST", "/v1/orgs/cr/console-links", None).await;
    assert_eq!(s, 201, "{l}");
    b.goto(l["url"].as_str().unwrap()).await;
    b.wait_text("Add a webhook", None).await;

    // A bad part size: the reason shows on the row, nothing changes.
    let row = "tr[data-hook=files]";
    b.click(&format!("{row} details.rollup summary")).await;
    b.click(&format!(
        "{row} select[name=format] option[value='ndjson.gz']"
    ))
    .await;
    b.click(&format!("{row} select[name=rollup] option[value=hour]"))
        .await;
    b.type_into(&format!("{row} input[name=max_part_bytes]"), "100")
        .await;
    b.click(&format!("{row} button[value=rollup]")).await;
    let page = b.wait_text("max_part_bytes", None).await;
    assert!(page.contains("at least"), "{page}");
    let (_, got) = d.admin("GET", "/v1/orgs/cr/webhooks/files", None).await;
    assert_eq!(got["format"], "json", "{got}");

    // Good settings: saved, shown, and what the API reads back.
    b.click(&format!("{row} details.rollup summary")).await;
    b.click(&format!(
        "{row} select[name=format] option[value='ndjson.gz']"
    ))
    .await;
    b.click(&format!("{row} select[name=rollup] option[value=day]"))
        .await;
    b.script(&format!(
        "document.querySelector(\"{row} input[name=max_part_bytes]\").value = '';"
    ))
    .await;
    b.type_into(&format!("{row} input[name=close_after]"), "2m")
        .await;
    b.click(&format!("{row} button[value=rollup]")).await;
    b.wait_text("Roll-up settings saved.", None).await;
    assert!(
        b.text(row).await.contains("/rollups/"),
        "{}",
        b.text(row).await
    );
    let (_, got) = d.admin("GET", "/v1/orgs/cr/webhooks/files", None).await;
    assert_eq!(
        (
            got["format"].as_str(),
            got["rollup"].as_str(),
            got["close_after"].as_str()
        ),
        (Some("ndjson.gz"), Some("day"), Some("2m")),
        "{got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_period_changed_by_patch_applies_to_new_events_and_open_partitions_still_close() {
    if !require("sftp") {
        return;
    }
    let (_clock, d) = clocked_daemon(3600.0, "pc").await;
    rollup_hook(&d, "pc", json!({"events": ["payment"]})).await;
    let hourly = post_payments(&d, "pc", "h", 300, 4).await;
    let (s, b) = d
        .admin(
            "PATCH",
            "/v1/orgs/pc/webhooks/etl",
            Some(json!({"rollup": "day"})),
        )
        .await;
    assert_eq!((s, b["rollup"].as_str()), (200, Some("day")), "{b}");
    let daily = post_payments(&d, "pc", "d", 300, 4).await;
    wait_for(
        "every event in a complete partition",
        Duration::from_secs(120),
        || async {
            (staged_lines(&d).await == Some(0) && complete_events(&d, "pc").await == Some(600))
                .then_some(())
        },
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let root = pull(&d, "pc", tmp.path()).await;
    let lines = check_manifests(&root);
    assert_eq!(
        lines.len(),
        600,
        "an event lost or doubled across the change"
    );
    for (id, dir) in &lines {
        let in_hour = dir.rsplit('/').next().unwrap().starts_with("hour=");
        if hourly.contains(id) {
            assert!(in_hour, "{id} (before the change) in {dir}");
        } else {
            assert!(
                daily.contains(id) && !in_hour,
                "{id} (after the change) in {dir}"
            );
        }
    }
}
