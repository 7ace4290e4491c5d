//! Delivery benchmark (run through `bench/delivery/run`).
//!
//! In one run, against one local receiver (axum, in this process):
//! 1. throughput, in `BENCH_ROUNDS` rounds (median printed): `N` events posted to a
//!    release hookbridge (SQLite, fsync'd ingest and fsync'd delivery outcomes) with one
//!    subscribed http webhook while the receiver holds its answers (so the outbox fills
//!    up); then the receiver opens and deliveries/s is N / (last delivery − opening). Right
//!    before and after each drain, the raw rate of this program's own load generator
//!    (reqwest, `CONC` connections, the same HTTP stack hookbridge uses) against the same
//!    receiver: the ratio compares rates measured under the same machine load. CPU per
//!    delivery of both processes comes from `/proc/<pid>/stat`. With `BENCH_CALLGRIND`
//!    set (hookbridge run under callgrind), the drains are the only instrumented part and
//!    the bench stops after them;
//! 3. sustained: 64 posters with the receiver answering, so ingest and delivery run
//!    together; the rate at which events are both accepted and delivered;
//! 4. latency: events paced (open loop) at half that sustained rate, then 1,000 ev/s posted from 16 connections; for each, p50/p99/max
//!    of "POST sent" → "202 received" (bound by the group commit's fsync, printed next to
//!    the disk's own fsync time) and "202 received" → "receiver got it" (our scheduling).
//!
//! With `BENCH_PG_ADMIN_URL` (`bench/delivery/run --postgres` starts the engines), the same
//! run with the daemon's state in a fresh PostgreSQL database and its org folders on S3
//! (`BENCH_S3_ENDPOINT`, `BENCH_S3_BUCKET`), as a scaled-out node runs; POST → 202 is then
//! printed next to PostgreSQL's own commit time as well.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../common.rs"]
mod common;
use common::{
    arg, cpu_secs, cpu_split, fsync_probe, median, raw_rate, summary, Recv, ADMIN, SECRETS_KEY,
};

const CONC: usize = 64;

#[tokio::main]
async fn main() {
    let n_events = arg("BENCH_EVENTS", 20_000) as usize;
    let raw_secs = arg("BENCH_RAW_SECS", 5);
    let bin = std::env::args()
        .nth(1)
        .expect("usage: bench_delivery <path to release hookbridge>");

    let (st, recv_addr) = common::start_receiver().await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONC)
        .build()
        .unwrap();

    // 2. hookbridge, release build, durable state: SQLite in the data dir by default; with
    // BENCH_PG_ADMIN_URL, PostgreSQL (a fresh database on that server) and the org folders
    // on S3 (BENCH_S3_ENDPOINT, bucket BENCH_S3_BUCKET), as a scaled-out node runs.
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let pg_admin = std::env::var("BENCH_PG_ADMIN_URL").ok();
    let (top, backend) = match &pg_admin {
        Some(admin_url) => {
            let url = common::fresh_database(admin_url, "hb_bench_delivery").await;
            let endpoint = std::env::var("BENCH_S3_ENDPOINT").expect("BENCH_S3_ENDPOINT");
            let bucket = std::env::var("BENCH_S3_BUCKET").expect("BENCH_S3_BUCKET");
            let prefix = format!("bench-delivery-{}", ulid::Ulid::new());
            (
                format!(
                    r#"node_id = "bench"
[store]
url = "{url}"
secrets_key = "{SECRETS_KEY}"
[storage]
kind = "s3"
bucket = "{bucket}"
prefix = "{prefix}"
endpoint = "{endpoint}"
allow_http = true
"#
                ),
                "PostgreSQL (synchronous_commit on) + org folders on S3 (SeaweedFS)",
            )
        }
        None => (
            String::new(),
            "SQLite (synchronous=FULL) + local org folders",
        ),
    };
    println!("state: {backend}");
    let cfg_path = common::write_config(dir.path(), &top, port, CONC);
    let base = format!("http://127.0.0.1:{port}");
    // Stopped however this program ends, a failed assertion included.
    let child = Reaped(common::start_daemon(&bin, &cfg_path, &base, &client).await);
    let admin = |m: reqwest::Method, p: &str, b: serde_json::Value| {
        client
            .request(m, format!("{base}{p}"))
            .bearer_auth(ADMIN)
            .json(&b)
            .send()
    };
    admin(reqwest::Method::PUT, "/v1/orgs/bench", json!({}))
        .await
        .unwrap();
    let r = admin(
        reqwest::Method::POST,
        "/v1/orgs/bench/webhooks",
        json!({"kind": "http", "url": format!("http://{recv_addr}/hook"), "events": ["*"], "verify": false}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let token = common::ingress_token("bench");
    let events_url = format!("{base}/v1/orgs/bench/events");
    let post = {
        let (client, token, url) = (client.clone(), token.clone(), events_url.clone());
        move |id: String| {
            let (client, token, url) = (client.clone(), token.clone(), url.clone());
            async move { common::post_event(&client, &url, &token, &id).await }
        }
    };

    // Rounds: each measures the raw rate right before and right after a drain, so the
    // ratio compares the two under the same machine load (other builds on the box come and
    // go within seconds); the median round is the figure.
    // At least one: the figures below are medians of the rounds.
    let rounds = (arg("BENCH_ROUNDS", 3) as usize).max(1);
    let (mut ratios, mut rates, mut hb_us, mut recv_us, mut raw_us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hb_sys_share = Vec::new();
    let hb_stat = format!("/proc/{}/stat", child.id());
    for round in 0..rounds {
        let (raw_before, raw_cpu) = raw_rate(&client, recv_addr, raw_secs as f64 / 2.0, CONC).await;
        // Hold the receiver while ingesting, so the outbox fills; then measure the drain.
        st.gate.send_replace(false);
        let t0 = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..CONC {
            let (next, post) = (next.clone(), post.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n_events {
                        break;
                    }
                    assert!(
                        post(format!("tp{round}_{i}")).await.is_some(),
                        "ingest refused an event"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let ingest_rate = n_events as f64 / t0.elapsed().as_secs_f64();
        // Requests held at the gate are counted once they pass it, so all N are ahead.
        let target = st.count.load(Ordering::Relaxed) + n_events as u64;
        callgrind(&["-z"], child.id());
        callgrind(&["-i", "on"], child.id());
        let cpu_open = (cpu_split(&hb_stat), cpu_secs("/proc/self/stat"));
        let t_open = Instant::now();
        st.gate.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(300);
        while st.count.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "timed out: {} of {n_events} delivered",
                st.count.load(Ordering::Relaxed) + n_events as u64 - target
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let hb_cpu = cpu_split(&hb_stat);
        let hb_sys = hb_cpu.1 - cpu_open.0 .1;
        let hb_cpu = hb_cpu.0 + hb_cpu.1 - cpu_open.0 .0 - cpu_open.0 .1;
        let recv_cpu = cpu_secs("/proc/self/stat") - cpu_open.1;
        callgrind(&["-i", "off"], child.id());
        callgrind(&["-d"], child.id());
        let last = st.last.lock().unwrap().unwrap_or_else(Instant::now);
        let rate = n_events as f64 / (last - t_open).as_secs_f64();
        let (raw_after, _) = raw_rate(&client, recv_addr, raw_secs as f64 / 2.0, CONC).await;
        let raw = (raw_before + raw_after) / 2.0;
        println!(
            "round {}: ingest {n_events} events (durable, {CONC} posters) at {ingest_rate:.0} ev/s; drain {rate:.0} deliveries/s; raw {raw_before:.0} / {raw_after:.0} req/s before / after; ratio {:.2}",
            round + 1,
            rate / raw
        );
        ratios.push(rate / raw);
        rates.push(rate);
        raw_us.push(raw_cpu);
        hb_us.push(hb_cpu * 1e6 / n_events as f64);
        hb_sys_share.push(hb_sys / hb_cpu.max(1e-9));
        recv_us.push(recv_cpu * 1e6 / n_events as f64);
    }
    println!(
        "hookbridge delivery, median of {rounds} rounds: {:.0} deliveries/s = {:.2} of the raw rate (rounds: {})",
        median(&mut rates),
        median(&mut ratios.clone()),
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  CPU per delivery (median): hookbridge {:.0} us ({:.0}% in the kernel), receiver process {:.0} us; raw: generator + receiver {:.0} us per request",
        median(&mut hb_us),
        median(&mut hb_sys_share) * 100.0,
        median(&mut recv_us),
        median(&mut raw_us)
    );
    if std::env::var_os("BENCH_CALLGRIND").is_some() || std::env::var_os("BENCH_PERF").is_some() {
        // Under a profiler the timings below mean nothing; the profile is written.
        return;
    }
    // Sustained: ingest and delivery at once (64 posters, receiver open), which is
    // what the latency load must fit through; the two rates above are each alone.
    let sustained = sustained_phase(&st, post.clone()).await;
    let lat_rate = match std::env::var("BENCH_LAT_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(r) => r,
        None => sustained / 2.0,
    };
    println!(
        "disk fsync (4 KiB append + fdatasync, data dir)  {}",
        fsync_probe(dir.path(), 200)
    );
    if let Some(admin_url) = &pg_admin {
        // On PostgreSQL, POST -> 202 waits for its commit (the WAL flush), not a local fsync.
        println!(
            "PostgreSQL commit (one-row INSERT per transaction, one connection)  {}",
            common::pg_commit_probe(admin_url, 200).await
        );
    }
    latency_phase(&st, "half", lat_rate, None, post.clone()).await;
    let rate16 = arg("BENCH_RATE16", 1000) as f64;
    latency_phase(&st, "c16", rate16, Some(16), post.clone()).await;
}

/// The daemon under test, killed when dropped.
struct Reaped(Child);

impl Reaped {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Closed loop: `CONC` posters for `BENCH_LAT_SECS` while the receiver answers at once;
/// returns the rate at which events were both accepted and delivered.
async fn sustained_phase<F, Fut>(st: &Arc<Recv>, post: F) -> f64
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Instant>> + Send,
{
    let secs = arg("BENCH_LAT_SECS", 5);
    let stop = Instant::now() + Duration::from_secs(secs);
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONC {
        let (next, post) = (next.clone(), post.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                assert!(
                    post(format!("sus_{i}")).await.is_some(),
                    "ingest refused an event"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = next.load(Ordering::Relaxed) as usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let got: Vec<Instant> = st
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("sus_"))
            .map(|(_, v)| *v)
            .collect();
        if got.len() >= n || Instant::now() > deadline {
            break got.into_iter().max().unwrap_or_else(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rate = n as f64 / (last - t0).as_secs_f64();
    println!(
        "sustained, ingest and delivery together ({CONC} posters, {secs}s): {n} events accepted and delivered at {rate:.0} ev/s"
    );
    rate
}

/// Posts `rate` ev/s for `BENCH_LAT_SECS` (open loop: event i is due at i / rate), from
/// `conns` connections (None: a new task, so a connection, whenever all are busy), and
/// prints p50/p99/max of POST → 202 and of 202 → receiver got it.
async fn latency_phase<F, Fut>(
    st: &Arc<Recv>,
    label: &str,
    rate: f64,
    conns: Option<usize>,
    post: F,
) where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Instant>> + Send,
{
    let secs = arg("BENCH_LAT_SECS", 5) as f64;
    let n = (rate * secs) as usize;
    // (sent, 202 received) per event id
    let times: Arc<Mutex<HashMap<String, (Instant, Instant)>>> = Arc::default();
    let t0 = Instant::now() + Duration::from_millis(20);
    let due = move |i: usize| t0 + Duration::from_secs_f64(i as f64 / rate);
    let one = {
        let times = times.clone();
        let post = post.clone();
        let label = label.to_owned();
        move |i: usize| {
            let (times, post, id) = (times.clone(), post.clone(), format!("{label}_{i}"));
            async move {
                let sent = Instant::now();
                let acked = post(id.clone()).await.expect("ingest refused an event");
                times.lock().unwrap().insert(id, (sent, acked));
            }
        }
    };
    match conns {
        None => {
            let mut tasks = Vec::new();
            for i in 0..n {
                tokio::time::sleep_until(due(i).into()).await;
                tasks.push(tokio::spawn(one(i)));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
        Some(c) => {
            // `c` posters share one schedule; a poster late for its slot posts at once.
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..c {
                let (next, one) = (next.clone(), one.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= n {
                            break;
                        }
                        tokio::time::sleep_until(due(i).into()).await;
                        one(i).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    }
    let offered = n as f64 / (Instant::now() - t0).as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    if std::env::var_os("BENCH_LAT_WORST").is_some() {
        // The worst latencies per quarter second of sending: one stall (and when: at the
        // start, mid-run) or a steady tail.
        let arr = st.arrivals.lock().unwrap();
        let times = times.lock().unwrap();
        let v: Vec<(Duration, Duration, Duration)> = times
            .iter()
            .filter_map(|(id, (s, a))| {
                arr.get(id).map(|r| {
                    (
                        s.saturating_duration_since(t0),
                        a.saturating_duration_since(*s),
                        r.saturating_duration_since(*a),
                    )
                })
            })
            .collect();
        let mut buckets = std::collections::BTreeMap::<u64, (f64, f64)>::new();
        for (at, a, r) in &v {
            let b = buckets.entry((at.as_secs_f64() * 4.0) as u64).or_default();
            b.0 = b.0.max(a.as_secs_f64() * 1e3);
            b.1 = b.1.max(r.as_secs_f64() * 1e3);
        }
        let line: Vec<String> = buckets
            .iter()
            .map(|(k, (a, r))| format!("{:.2}s:{a:.0}/{r:.0}", *k as f64 / 4.0))
            .collect();
        println!(
            "  worst per 250 ms (POST->202/202->delivered, ms): {}",
            line.join(" ")
        );
    }
    let (mut to_202, mut to_recv) = loop {
        let got: (Vec<Duration>, Vec<Duration>) = {
            let arr = st.arrivals.lock().unwrap();
            let times = times.lock().unwrap();
            times
                .iter()
                .filter_map(|(id, (s, a))| {
                    arr.get(id).map(|r| {
                        (
                            a.saturating_duration_since(*s),
                            r.saturating_duration_since(*a),
                        )
                    })
                })
                .unzip()
        };
        if got.0.len() == n || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let conns = conns.map_or("a connection per event in flight".into(), |c| {
        format!("{c} connections")
    });
    println!(
        "latency, {label}: {rate:.0} ev/s for {secs:.0}s from {conns} (achieved {offered:.0} ev/s; {} of {n} delivered)",
        to_202.len()
    );
    println!("  POST -> 202      {}", summary(&mut to_202));
    println!("  202 -> delivered {}", summary(&mut to_recv));
}

/// Runs `callgrind_control <args> <pid>` when `BENCH_CALLGRIND` is set (hookbridge started
/// under `valgrind --tool=callgrind --instr-atstart=no`), to count the drain's instructions.
/// With `BENCH_PERF=<file>` instead, the drain of a native daemon is sampled by
/// `perf record -e cpu-clock -g` into that file (valgrind hides ADX and SHA-NI from aws-lc,
/// so only a native profile shows the crypto's real share).
fn callgrind(args: &[&str], pid: u32) {
    if let Some(out) = std::env::var_os("BENCH_PERF") {
        static PERF: Mutex<Option<Child>> = Mutex::new(None);
        match args {
            ["-i", "on"] => {
                // BENCH_PERF_DWARF=1: unwind with DWARF (the release build keeps no frame
                // pointers, so `-g` stacks stop at the first Rust frame); fewer samples.
                let (freq, graph) = if std::env::var_os("BENCH_PERF_DWARF").is_some() {
                    ("999", "--call-graph=dwarf,32768")
                } else {
                    ("4999", "-g")
                };
                let child = Command::new("perf")
                    .args(["record", "-e", "cpu-clock", "-F", freq, graph, "-p"])
                    .arg(pid.to_string())
                    .arg("-o")
                    .arg(&out)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start perf record");
                *PERF.lock().unwrap() = Some(child);
            }
            ["-i", "off"] => {
                if let Some(mut child) = PERF.lock().unwrap().take() {
                    // perf writes its file on SIGINT.
                    let _ = Command::new("kill")
                        .args(["-INT", &child.id().to_string()])
                        .status();
                    let _ = child.wait();
                }
            }
            _ => {}
        }
        return;
    }
    if std::env::var_os("BENCH_CALLGRIND").is_some() {
        let ok = Command::new("callgrind_control")
            .args(args)
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "callgrind_control {args:?} failed"
        );
    }
}
