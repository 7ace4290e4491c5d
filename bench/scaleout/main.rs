//! Scale-out benchmark (run through `bench/scaleout/run`, which starts PostgreSQL 15 and
//! SeaweedFS and passes them in `BENCH_PG_ADMIN_URL`, `BENCH_S3_ENDPOINT`, `BENCH_S3_BUCKET`,
//! `BENCH_PG_PID` (the postmaster) and `BENCH_WEED_PID`).
//!
//! In one run, three topologies of release daemons, each with one org holding an `sftp`
//! hook (one file per event) and an `http` hook to a receiver in this process:
//! - embedded: one node, SQLite + local org folders;
//! - one node on PostgreSQL + S3;
//! - two nodes on one PostgreSQL database + one S3 prefix; this program posts event i to
//!   node i mod 2, as a load balancer would, and both deliver to the one receiver.
//!
//! Per topology, `BENCH_ROUNDS` rounds (median printed) of: `BENCH_EVENTS` events posted by
//! 64 connections while the receiver holds its answers (ingest events/s, every 202 durable);
//! then the receiver opens and the outbox drains (deliveries/s, counted by distinct event
//! id). References measured in the same run: the disk's durable small-file rate (the
//! ceiling of one durable file per event), its fsync time, PostgreSQL's commit time, and the
//! raw rate of this program's generator against the receiver right before and after each
//! drain. What bounds each figure: CPU per event of every process (`/proc/<pid>/stat`: each
//! node, PostgreSQL with its backends, SeaweedFS, this program), the machine's busy cores
//! (`/proc/stat`, so other load on the box shows), the daemons' group commits (`/metrics`)
//! and PostgreSQL's transactions and WAL flushes (`pg_stat_database`, `pg_stat_wal`).

use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../common.rs"]
mod common;
use common::{arg, cpu_secs, median, raw_rate, Recv, ADMIN, SECRETS_KEY};

const CONC: usize = 64;

struct Topology {
    name: &'static str,
    what: &'static str,
    nodes: usize,
    pg: bool,
}

struct Env {
    bin: String,
    pg_admin: String,
    s3_endpoint: String,
    s3_bucket: String,
    pg_pid: Option<u32>,
    weed_pid: Option<u32>,
    n: usize,
    rounds: usize,
    raw_secs: f64,
    durable_limit: f64,
}

/// CPU seconds so far of every process in the picture, and of the whole machine.
#[derive(Clone)]
struct Cpu {
    nodes: Vec<f64>,
    pg: f64,
    weed: f64,
    bench: f64,
    machine: f64,
    at: Instant,
}

fn cpu_now(node_pids: &[u32], env: &Env) -> Cpu {
    Cpu {
        nodes: node_pids
            .iter()
            .map(|p| cpu_secs(&format!("/proc/{p}/stat")))
            .collect(),
        pg: env.pg_pid.map_or(0.0, common::tree_cpu_secs),
        weed: env
            .weed_pid
            .map_or(0.0, |p| cpu_secs(&format!("/proc/{p}/stat"))),
        bench: cpu_secs("/proc/self/stat"),
        machine: machine_busy_secs(),
        at: Instant::now(),
    }
}

/// Busy CPU seconds of the whole machine (all cores, everything but idle and iowait).
fn machine_busy_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy / 100.0
}

/// "node 0 152 µs, node 1 …, PostgreSQL …, SeaweedFS …, generator+receiver …" per event,
/// and the busy cores: ours, and the machine's (other load on the box shows as the gap).
fn cpu_report(a: &Cpu, b: &Cpu, events: usize, topo: &Topology) -> (String, f64) {
    let us = |x: f64| x * 1e6 / events as f64;
    let secs = (b.at - a.at).as_secs_f64();
    let mut parts: Vec<String> = a
        .nodes
        .iter()
        .zip(&b.nodes)
        .enumerate()
        .map(|(i, (x, y))| format!("node {i} {:.0}", us(y - x)))
        .collect();
    if topo.pg {
        parts.push(format!("PostgreSQL {:.0}", us(b.pg - a.pg)));
        parts.push(format!("SeaweedFS {:.0}", us(b.weed - a.weed)));
    }
    parts.push(format!("generator+receiver {:.0}", us(b.bench - a.bench)));
    let ours: f64 = a
        .nodes
        .iter()
        .zip(&b.nodes)
        .map(|(x, y)| y - x)
        .sum::<f64>()
        + (b.pg - a.pg)
        + (b.weed - a.weed)
        + (b.bench - a.bench);
    let cores = ours / secs;
    let machine = (b.machine - a.machine) / secs;
    (
        format!(
            "{} µs per event; total {:.0} µs; busy cores: ours {cores:.2}, whole machine {machine:.2} of {}",
            parts.join(", "),
            us(ours),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        cores,
    )
}

/// Sums of the daemons' histograms that explain ingest: group commit batch sizes and times.
#[derive(Default, Clone)]
struct Commits {
    batch_sum: f64,
    batch_count: f64,
    secs_sum: f64,
    fsync_secs: f64,
}

async fn commits(client: &reqwest::Client, base: &str) -> Commits {
    let text = client
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Commits {
        batch_sum: sum("hookbridge_group_commit_batch_size_sum"),
        batch_count: sum("hookbridge_group_commit_batch_size_count"),
        secs_sum: sum("hookbridge_group_commit_seconds_sum"),
        fsync_secs: sum("hookbridge_fsync_seconds_sum"),
    }
}

/// PostgreSQL cluster-wide counters: committed transactions, WAL flushes and their time.
#[derive(Default, Clone, Copy)]
struct PgStats {
    xacts: f64,
    wal_syncs: f64,
    wal_sync_ms: f64,
}

async fn pg_stats(c: &tokio_postgres::Client) -> PgStats {
    // The cumulative statistics are read from a snapshot per transaction: start afresh.
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    let x = c
        .query_one("SELECT sum(xact_commit)::float8 FROM pg_stat_database", &[])
        .await
        .unwrap();
    let w = c
        .query_one(
            "SELECT wal_sync::float8, wal_sync_time FROM pg_stat_wal",
            &[],
        )
        .await
        .unwrap();
    PgStats {
        xacts: x.get(0),
        wal_syncs: w.get(0),
        wal_sync_ms: w.get(1),
    }
}

struct RoundResult {
    ingest: f64,
    drain: f64,
    raw: f64,
    ingest_cores: f64,
    drain_cores: f64,
}

#[tokio::main]
async fn main() {
    let bin = std::env::args()
        .nth(1)
        .expect("usage: bench_scaleout <path to release hookbridge>");
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let pid = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse().ok());
    let base_dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let mut env = Env {
        bin,
        pg_admin: var("BENCH_PG_ADMIN_URL"),
        s3_endpoint: var("BENCH_S3_ENDPOINT"),
        s3_bucket: var("BENCH_S3_BUCKET"),
        pg_pid: pid("BENCH_PG_PID"),
        weed_pid: pid("BENCH_WEED_PID"),
        n: arg("BENCH_EVENTS", 10_000) as usize,
        rounds: arg("BENCH_ROUNDS", 3) as usize,
        raw_secs: arg("BENCH_RAW_SECS", 4) as f64,
        durable_limit: 0.0,
    };
    let work = tempfile::Builder::new()
        .prefix("hookbridge-scaleout.")
        .tempdir_in(&base_dir)
        .unwrap();
    let (st, recv) = common::start_receiver().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONC)
        .build()
        .unwrap();

    println!(
        "== references, same run; disk of {base_dir} (the data dirs; PostgreSQL's and SeaweedFS's are on {})",
        std::env::temp_dir().display()
    );
    let (line, limit) = common::durable_file_limit(work.path(), 10_000, 700);
    env.durable_limit = limit;
    println!("durable small files: {line}; limit {limit:.0} files/s");
    println!(
        "disk fsync (4 KiB append + fdatasync)  {}",
        common::fsync_probe(work.path(), 200)
    );
    let (pg, conn) = tokio_postgres::connect(&env.pg_admin, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    // WAL flush times in pg_stat_wal need this (off by default).
    pg.batch_execute("ALTER SYSTEM SET track_wal_io_timing = on")
        .await
        .unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    println!(
        "PostgreSQL commit (one-row INSERT per transaction, one connection)  {}",
        common::pg_commit_probe(&env.pg_admin, 200).await
    );

    let topologies = [
        Topology {
            name: "embedded",
            what: "SQLite + local folder, 1 node",
            nodes: 1,
            pg: false,
        },
        Topology {
            name: "pg1",
            what: "PostgreSQL + S3, 1 node",
            nodes: 1,
            pg: true,
        },
        Topology {
            name: "pg2",
            what: "PostgreSQL + S3, 2 nodes",
            nodes: 2,
            pg: true,
        },
    ];
    let mut table = Vec::new();
    for t in &topologies {
        let results = run_topology(&env, t, work.path(), &st, recv, &client, &pg).await;
        let col =
            |f: fn(&RoundResult) -> f64| median(&mut results.iter().map(f).collect::<Vec<_>>());
        let ingest = col(|r| r.ingest);
        let drain = col(|r| r.drain);
        let raw = col(|r| r.raw);
        let ratio = col(|r| r.drain / r.raw);
        let ic = col(|r| r.ingest_cores);
        let dc = col(|r| r.drain_cores);
        let spread = |f: fn(&RoundResult) -> f64| {
            results
                .iter()
                .map(|r| format!("{:.0}", f(r)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        table.push(format!(
            "{:<34} {:>8.0} {:>7.2} {:>9.0} {:>7.2} {:>9.0} {:>6.2} {:>6.2}   ingest {}; drain {}",
            t.what,
            ingest,
            ingest / env.durable_limit,
            drain,
            ratio,
            raw,
            ic,
            dc,
            spread(|r| r.ingest),
            spread(|r| r.drain)
        ));
    }
    println!(
        "\n== summary: median of {} rounds of {} events (references: durable small files {:.0}/s; raw rate per round)",
        env.rounds, env.n, env.durable_limit
    );
    println!(
        "{:<34} {:>8} {:>7} {:>9} {:>7} {:>9} {:>6} {:>6}   rounds",
        "topology", "ingest/s", "×disk", "deliv/s", "×raw", "raw/s", "cores", "cores"
    );
    println!(
        "{:<34} {:>8} {:>7} {:>9} {:>7} {:>9} {:>6} {:>6}",
        "", "", "", "", "", "", "ingest", "drain"
    );
    for l in table {
        println!("{l}");
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_topology(
    env: &Env,
    t: &Topology,
    work: &std::path::Path,
    st: &Arc<Recv>,
    recv: std::net::SocketAddr,
    client: &reqwest::Client,
    pg: &tokio_postgres::Client,
) -> Vec<RoundResult> {
    println!("\n== {}: {}", t.name, t.what);
    let dir = work.join(t.name);
    // Every node seals webhook secrets with the same key (a scaled-out service must).
    let mut shared = format!("[store]\nsecrets_key = \"{SECRETS_KEY}\"\n");
    if t.pg {
        let url = common::fresh_database(&env.pg_admin, &format!("hb_scaleout_{}", t.name)).await;
        shared = format!(
            r#"[store]
url = "{url}"
secrets_key = "{SECRETS_KEY}"
[storage]
kind = "s3"
bucket = "{bucket}"
prefix = "scaleout-{name}-{ulid}"
endpoint = "{endpoint}"
allow_http = true
"#,
            bucket = env.s3_bucket,
            name = t.name,
            ulid = ulid::Ulid::new(),
            endpoint = env.s3_endpoint,
        );
    }
    let mut children: Vec<Child> = Vec::new();
    let mut bases = Vec::new();
    for k in 0..t.nodes {
        let port = common::free_port();
        let node_dir = dir.join(format!("node{k}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        // The same file on every node but `node_id` (and, here, the data dir and port).
        let top = format!("node_id = \"node{k}\"\n{shared}");
        let cfg_path = common::write_config(&node_dir, &top, port, CONC);
        let base = format!("http://127.0.0.1:{port}");
        children.push(common::start_daemon(&env.bin, &cfg_path, &base, client).await);
        bases.push(base);
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let admin = |m: reqwest::Method, p: &str, b: serde_json::Value| {
        client
            .request(m, format!("{}{p}", bases[0]))
            .bearer_auth(ADMIN)
            .json(&b)
            .send()
    };
    let r = admin(reqwest::Method::PUT, "/v1/orgs/bench", json!({}))
        .await
        .unwrap();
    assert!(r.status().is_success(), "create org: {}", r.status());
    for hook in [
        json!({"kind": "sftp", "events": ["*"]}),
        json!({"kind": "http", "url": format!("http://{recv}/hook"), "events": ["*"], "verify": false}),
    ] {
        let r = admin(reqwest::Method::POST, "/v1/orgs/bench/webhooks", hook)
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "create webhook");
    }
    let token = common::ingress_token("bench");
    let urls: Arc<Vec<String>> = Arc::new(
        bases
            .iter()
            .map(|b| format!("{b}/v1/orgs/bench/events"))
            .collect(),
    );

    // Warm-up (not measured): connections, pools and caches of every node.
    let warm = 256;
    let before = st.distinct.load(Ordering::Relaxed);
    post_all(client, &urls, &token, &format!("{}_warm", t.name), warm).await;
    wait_distinct(st, before + warm as u64).await;

    let mut results = Vec::new();
    for round in 0..env.rounds {
        let (raw_before, _) = raw_rate(client, recv, env.raw_secs / 2.0, CONC).await;
        st.gate.send_replace(false);
        let distinct0 = st.distinct.load(Ordering::Relaxed);
        let count0 = st.count.load(Ordering::Relaxed);
        let mut m0 = Vec::new();
        for b in &bases {
            m0.push(commits(client, b).await);
        }
        let pg0 = pg_stats(pg).await;
        let c0 = cpu_now(&pids, env);
        let ids = format!("{}_r{round}", t.name);
        post_all(client, &urls, &token, &ids, env.n).await;
        let c1 = cpu_now(&pids, env);
        let ingest_secs = (c1.at - c0.at).as_secs_f64();
        let pg1 = pg_stats(pg).await;
        let mut m1 = Vec::new();
        for b in &bases {
            m1.push(commits(client, b).await);
        }
        let ingest = env.n as f64 / ingest_secs;

        let c2 = cpu_now(&pids, env);
        st.gate.send_replace(true);
        wait_distinct(st, distinct0 + env.n as u64).await;
        let last = st.last_new.lock().unwrap().unwrap_or_else(Instant::now);
        let c3 = cpu_now(&pids, env);
        let drain = env.n as f64 / (last - c2.at).as_secs_f64();
        let sent = st.count.load(Ordering::Relaxed) - count0;
        let (raw_after, _) = raw_rate(client, recv, env.raw_secs / 2.0, CONC).await;
        let raw = (raw_before + raw_after) / 2.0;

        println!(
            "round {}: ingest {} events at {ingest:.0} ev/s = {:.2} × durable small files; drain {drain:.0} deliveries/s = {:.2} × raw ({raw_before:.0} / {raw_after:.0} req/s before / after); {} requests for {} events",
            round + 1,
            env.n,
            ingest / env.durable_limit,
            drain / raw,
            sent,
            env.n
        );
        let (line, ingest_cores) = cpu_report(&c0, &c1, env.n, t);
        println!("  ingest CPU: {line}");
        let per_node: Vec<String> = m0
            .iter()
            .zip(&m1)
            .enumerate()
            .map(|(i, (a, b))| {
                let batches = (b.batch_count - a.batch_count).max(1.0);
                format!(
                    "node {i}: {:.0} group commits, mean batch {:.1} events, mean commit {:.1} ms, committer busy {:.0}%, fsync time (summed) {:.0} µs per event",
                    b.batch_count - a.batch_count,
                    (b.batch_sum - a.batch_sum) / batches,
                    (b.secs_sum - a.secs_sum) * 1e3 / batches,
                    (b.secs_sum - a.secs_sum) * 100.0 / ingest_secs,
                    (b.fsync_secs - a.fsync_secs) * 1e6 / env.n as f64
                )
            })
            .collect();
        println!("  ingest commits: {}", per_node.join("; "));
        if t.pg {
            let syncs = (pg1.wal_syncs - pg0.wal_syncs).max(1.0);
            println!(
                "  PostgreSQL during ingest: {:.2} transactions and {:.3} WAL flushes per event, mean WAL flush {:.2} ms",
                (pg1.xacts - pg0.xacts) / env.n as f64,
                (pg1.wal_syncs - pg0.wal_syncs) / env.n as f64,
                (pg1.wal_sync_ms - pg0.wal_sync_ms) / syncs
            );
        }
        let (line, drain_cores) = cpu_report(&c2, &c3, env.n, t);
        println!("  drain CPU: {line}");
        results.push(RoundResult {
            ingest,
            drain,
            raw,
            ingest_cores,
            drain_cores,
        });
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    results
}

/// Posts `n` events from `CONC` connections, event i to node i mod the number of nodes (a
/// round-robin load balancer); every one must be answered 202.
async fn post_all(
    client: &reqwest::Client,
    urls: &Arc<Vec<String>>,
    token: &str,
    prefix: &str,
    n: usize,
) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONC {
        let (next, urls, client) = (next.clone(), urls.clone(), client.clone());
        let (token, prefix) = (token.to_owned(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let url = &urls[i % urls.len()];
                let id = format!("{prefix}_{i}");
                assert!(
                    common::post_event(&client, url, &token, &id)
                        .await
                        .is_some(),
                    "ingest refused {id} at {url}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn wait_distinct(st: &Recv, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while st.distinct.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "timed out: {} events short of delivered",
            target - st.distinct.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
