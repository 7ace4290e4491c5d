//! Load generator for `bench/ingest`: posts N events to one org with C concurrent
//! connections and prints the rate and latency percentiles.
//!
//! usage: ingest_load URL TOKEN N C [PAYLOAD_BYTES]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: ingest_load URL TOKEN N C [PAYLOAD_BYTES]");
        std::process::exit(2);
    }
    let url = args[1].clone();
    let token = args[2].clone();
    let n: usize = args[3].parse().expect("N");
    let c: usize = args[4].parse().expect("C");
    let size: usize = args
        .get(5)
        .map(|s| s.parse().expect("PAYLOAD_BYTES"))
        .unwrap_or(512);
    let pad = "x".repeat(size);
    let run_id = ulid::Ulid::new().to_string();
    let next = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()
        .unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (client, url, token, pad, next, run_id) = (
            client.clone(),
            url.clone(),
            token.clone(),
            pad.clone(),
            next.clone(),
            run_id.clone(),
        );
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let body = format!(
                    r#"{{"id":"evt_{run_id}_{i}","type":"deliveryReport","data":{{"message_id":"m{i}","status":"delivered","pad":"{pad}"}}}}"#
                );
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().as_u16() == 202 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    let mut lat: Vec<Duration> = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r.unwrap();
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "events={} errors={} seconds={:.2} events_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        lat.len(),
        errors,
        secs,
        lat.len() as f64 / secs,
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0
    );
}
