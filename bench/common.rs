//! What the bench binaries share (each includes this file with `#[path]`): the local
//! receiver, the raw-rate generator, CPU times from `/proc`, the disk's references (fsync
//! time, durable small-file rate), PostgreSQL's commit time, percentiles, daemon start-up.
#![allow(dead_code)] // each bench uses its own part of this file

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use serde_json::json;

pub const SECRET: &str = "bench-ingress-secret-0123456789";
pub const ADMIN: &str = "bench-admin-token-0123456789";
/// Webhook secrets in a shared store are sealed with one key on every node.
pub const SECRETS_KEY: &str = "YmVuY2gtc2VjcmV0cy1rZXktMDEyMzQ1Njc4OWFiY2Q=";

pub struct Recv {
    pub count: AtomicU64,
    /// When the latest webhook request (not raw) was answered.
    pub last: Mutex<Option<Instant>>,
    /// First arrival of each event id.
    pub arrivals: Mutex<HashMap<String, Instant>>,
    /// Event ids seen for the first time (duplicates left out), and when the latest came.
    pub distinct: AtomicU64,
    pub last_new: Mutex<Option<Instant>>,
    /// Closed: webhook requests wait, so jobs pile up in the outbox during ingest.
    pub gate: tokio::sync::watch::Sender<bool>,
}

async fn receive(State(st): State<Arc<Recv>>, uri: axum::http::Uri, body: Bytes) -> &'static str {
    let mut gate = st.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    st.count.fetch_add(1, Ordering::Relaxed);
    // The same work for raw and webhook requests (parse, record), so the two rates compare.
    if uri.path() != "/raw" {
        *st.last.lock().unwrap() = Some(Instant::now());
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(id) = v["id"].as_str() {
            let mut arr = st.arrivals.lock().unwrap();
            if !arr.contains_key(id) {
                let now = Instant::now();
                arr.insert(id.to_owned(), now);
                if uri.path() != "/raw" {
                    st.distinct.fetch_add(1, Ordering::Relaxed);
                    *st.last_new.lock().unwrap() = Some(now);
                }
            }
        }
    }
    "ok"
}

/// A receiver (axum) in this process, answering every path; its gate starts open.
pub async fn start_receiver() -> (Arc<Recv>, std::net::SocketAddr) {
    let st = Arc::new(Recv {
        count: AtomicU64::new(0),
        last: Mutex::default(),
        arrivals: Mutex::default(),
        distinct: AtomicU64::new(0),
        last_new: Mutex::default(),
        gate: tokio::sync::watch::Sender::new(true),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(receive).with_state(st.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (st, addr)
}

/// utime + stime of a process, in seconds, from its `/proc/<pid>/stat` (0 if unreadable).
pub fn cpu_secs(stat_path: &str) -> f64 {
    let (user, sys) = cpu_split(stat_path);
    user + sys
}

/// (utime, stime) of a process in seconds: how much of its CPU is the kernel's (sockets,
/// fsync, futex wake-ups), which no change to our own code removes.
pub fn cpu_split(stat_path: &str) -> (f64, f64) {
    let Ok(s) = std::fs::read_to_string(stat_path) else {
        return (0.0, 0.0);
    };
    let f = stat_fields(&s);
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let hz = 100.0; // USER_HZ on Linux
    (ticks(11) / hz, ticks(12) / hz)
}

/// The fields of a `/proc/<pid>/stat` after the command name, which is in parentheses and
/// may hold spaces (field 3, the state, comes first).
fn stat_fields(s: &str) -> Vec<&str> {
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().collect()
}

/// CPU seconds of a process and of its live children (PostgreSQL's postmaster and its
/// backends, whose connections the daemons' pools keep open through a measurement).
/// Exited children count through cutime/cstime once the parent has reaped them.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f = stat_fields(&own);
    let ticks = |f: &[&str], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime, stime, cutime, cstime: fields 14 to 17.
    let mut t = ticks(&f, 11) + ticks(&f, 12) + ticks(&f, 13) + ticks(&f, 14);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let s = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let f = stat_fields(&s);
            // ppid is field 4, the second after the name.
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                t += ticks(&f, 11) + ticks(&f, 12);
            }
        }
    }
    t / 100.0
}

pub fn arg(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn summary(v: &mut [Duration]) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "p50 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(v[v.len() - 1])
    )
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The disk's fsync time where hookbridge keeps its state: 4 KiB appended and fdatasync'd,
/// `n` times.
pub fn fsync_probe(dir: &Path, n: usize) -> String {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = [7u8; 4096];
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
            t.elapsed()
        })
        .collect();
    let _ = std::fs::remove_file(&path);
    summary(&mut v)
}

/// How many small files per second the disk under `dir` takes durably: the physical
/// reference for ingest, which writes one file per event and syncs before answering.
/// The best of three ways (one at a time: temp, fdatasync, rename, fsync of the folder;
/// group commit: per batch of 128 in each of 2 threads, temps fdatasync'd, renamed, the
/// folder fsync'd once; syncfs per batch), `files` files of `size` bytes each.
/// Returns the report line and the best rate.
pub fn durable_file_limit(dir: &Path, files: usize, size: usize) -> (String, f64) {
    let payload = vec![b'x'; size];
    let each = durable_run(dir, "each", (files / 20).max(200), 1, 1, &payload, false);
    let group = durable_run(dir, "group", files, 2, 128, &payload, false);
    let syncfs = durable_run(dir, "syncfs", files, 2, 128, &payload, true);
    let best = each.max(group).max(syncfs);
    (
        format!("one at a time {each:.0}, group commit {group:.0}, syncfs per batch {syncfs:.0} files/s ({files} files of {size} B)"),
        best,
    )
}

fn durable_run(
    root: &Path,
    mode: &str,
    n: usize,
    threads: usize,
    batch: usize,
    payload: &[u8],
    syncfs: bool,
) -> f64 {
    use std::io::Write;
    let base = root.join(format!("durable-{mode}"));
    std::fs::create_dir_all(&base).unwrap();
    let per = n / threads;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let d = base.join(t.to_string());
            s.spawn(move || {
                std::fs::create_dir_all(&d).unwrap();
                let dir = std::fs::File::open(&d).unwrap();
                let mut i = 0;
                while i < per {
                    let j = (i + batch).min(per);
                    let mut open = Vec::new();
                    for k in i..j {
                        let tmp = d.join(format!(".tmp.{k}"));
                        let mut f = std::fs::File::create_new(&tmp).unwrap();
                        f.write_all(payload).unwrap();
                        open.push((tmp, f, k));
                    }
                    if syncfs {
                        // SAFETY: syncfs on a descriptor we own.
                        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
                    } else {
                        for (_, f, _) in &open {
                            f.sync_data().unwrap();
                        }
                    }
                    for (tmp, _, k) in &open {
                        std::fs::rename(tmp, d.join(format!("{k:09}.json"))).unwrap();
                    }
                    if syncfs {
                        // SAFETY: as above.
                        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
                    } else {
                        dir.sync_all().unwrap();
                    }
                    i = j;
                }
            });
        }
    });
    let rate = (per * threads) as f64 / t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&base);
    rate
}

/// PostgreSQL's commit time as a client sees it: `n` one-row INSERTs, each its own
/// transaction (so each waits for the WAL flush, `synchronous_commit = on`), one after
/// another on one connection.
pub async fn pg_commit_probe(url: &str, n: usize) -> String {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (n bigint)")
        .await
        .unwrap();
    let mut v = Vec::with_capacity(n);
    for i in 0..n as i64 {
        let t = Instant::now();
        c.execute("INSERT INTO bench_commit_probe VALUES ($1)", &[&i])
            .await
            .unwrap();
        v.push(t.elapsed());
    }
    c.batch_execute("DROP TABLE bench_commit_probe")
        .await
        .unwrap();
    summary(&mut v)
}

/// A new, empty database on the PostgreSQL of `admin_url`; returns its URL.
pub async fn fresh_database(admin_url: &str, name: &str) -> String {
    let (c, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    match admin_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("not a database URL: {admin_url}"),
    }
}

/// The raw request rate of this program's generator (`conc` connections) against the
/// receiver for `secs`, and the CPU this process (generator and receiver) spent per request.
pub async fn raw_rate(
    client: &reqwest::Client,
    recv: std::net::SocketAddr,
    secs: f64,
    conc: usize,
) -> (f64, f64) {
    let body = json!({"id": "raw", "type": "payment", "org": "bench", "timestamp": "2026-01-01T00:00:00.000000Z",
        "data": {"paymentId": "pay_1", "amount": 1999, "currency": "EUR", "customerId": "cus_1"}})
    .to_string();
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let done = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_secs("/proc/self/stat");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, b, done) = (client.clone(), body.clone(), done.clone());
        let url = format!("http://{recv}/raw");
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                if c.post(&url)
                    .header("content-type", "application/json")
                    .body(b.clone())
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed) as f64;
    let cpu = cpu_secs("/proc/self/stat") - cpu0;
    (n / started.elapsed().as_secs_f64(), cpu * 1e6 / n.max(1.0))
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Writes `<dir>/hookbridge.toml` for a bench daemon listening on `port`: HTTP only, the
/// bench's tokens, deliveries to loopback allowed with `conc` requests per endpoint. `top`
/// holds the node's own top-level keys and sections (node id, store, storage).
pub fn write_config(dir: &Path, top: &str, port: u16, conc: usize) -> std::path::PathBuf {
    let cfg = format!(
        r#"data_dir = "{data}"
{top}[http]
listen = "127.0.0.1:{port}"
max_pending_events = 100000
[sftp]
enabled = false
[ingress]
jwt_hs256_secret = "{SECRET}"
[admin]
token = "{ADMIN}"
[delivery]
allow_private_destinations = true
workers = 128
per_endpoint_concurrency = {conc}
request_timeout = "120s"
[log]
level = "warn"
"#,
        data = dir.join("data").display()
    );
    let path = dir.join("hookbridge.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Starts `bin serve --config cfg` (stderr inherited: warnings show in the bench output)
/// once `check-config` passes (it reaches the store and the object store, which may still
/// be starting), and waits until `/readyz` answers 200.
pub async fn start_daemon(bin: &str, cfg: &Path, base: &str, client: &reqwest::Client) -> Child {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = Command::new(bin)
            .args(["check-config", "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "check-config kept failing: {cfg:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hookbridge");
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "hookbridge did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

/// An ingress token for `org`, signed with the bench's HS256 secret.
pub fn ingress_token(org: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"org": org, "exp": chrono::Utc::now().timestamp() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Posts one event; the moment its 202 came back, or None on any other answer.
pub async fn post_event(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    id: &str,
) -> Option<Instant> {
    let b = json!({"id": id, "type": "payment",
        "data": {"paymentId": "pay_1", "amount": 1999, "currency": "EUR", "customerId": "cus_1"}});
    let r = client.post(url).bearer_auth(token).json(&b).send().await;
    matches!(r, Ok(r) if r.status().as_u16() == 202).then(Instant::now)
}
