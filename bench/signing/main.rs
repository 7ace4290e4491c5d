//! Signing micro-benchmark (run through `bench/signing/run`): the cost of one Ed25519
//! signature over a typical JWT signing input with aws-lc-rs and with ed25519-dalek (its
//! precomputed basepoint tables, the `fast` feature), each checked against the other's
//! verification, and of hookbridge's whole `Signer::sign` (JWT + Standard Webhooks HMAC).
//! Rounds alternate the implementations so that load from other processes hits both
//! alike; the figure is the median round, and the ratios are printed.
//!   BENCH_ITERS=20000 BENCH_ROUNDS=5 bench/signing/run

use std::time::Instant;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use ed25519_dalek::Signer as _;

fn arg(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds per call of `f`, over `iters` calls.
fn time<F: FnMut() -> usize>(iters: u64, mut f: F) -> f64 {
    let mut sink = 0usize;
    let t = Instant::now();
    for _ in 0..iters {
        sink = sink.wrapping_add(f());
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64;
    std::hint::black_box(sink);
    ns
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let iters = arg("BENCH_ITERS", 20_000);
    let rounds = arg("BENCH_ROUNDS", 5) as usize;
    let seed = [7u8; 32];
    // A JWT signing input of the size hookbridge signs: base64url(header).base64url(claims).
    let msg = format!(
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJFZERTQSIsImtpZCI6ImhiXzAxa2Y4In0.{}",
        "eyJpc3MiOiJob29rYnJpZGdlIiwic3ViIjoiYmVuY2giLCJhdWQiOiJodHRwOi8vMTI3LjAuMC4xOjQ1Njc4L2hvb2siLCJpYXQiOjE3OTk5OTk5OTl9"
            .repeat(3)
    );
    let msg = msg.as_bytes();

    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    let lc = Ed25519KeyPair::from_pkcs8(&der).expect("aws-lc-rs key");
    let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
    // Same key, same deterministic signature, each verified by the other library.
    assert_eq!(lc.public_key().as_ref(), dalek.verifying_key().as_bytes());
    let s_lc = lc.sign(msg);
    let s_dalek = dalek.sign(msg);
    assert_eq!(s_lc.as_ref(), s_dalek.to_bytes().as_slice());
    UnparsedPublicKey::new(&ED25519, lc.public_key().as_ref())
        .verify(msg, &s_dalek.to_bytes())
        .expect("aws-lc-rs verifies the ed25519-dalek signature");

    use hookbridge::delivery::signing::Signer;
    let signer = Signer::from_ring("hookbridge", &Signer::new_ring().unwrap(), 0).unwrap();
    let body = br#"{"id":"evt_01","type":"payment","org":"bench","timestamp":"2026-01-01T00:00:00.000000Z","data":{"paymentId":"pay_1","amount":1999,"currency":"EUR","customerId":"cus_1"}}"#;
    let whole = || {
        let h = signer
            .sign(
                "bench",
                "http://127.0.0.1:45678/hook",
                "dlv_01kf8x9c2m3n4p5q6r7s8t9v0w",
                body,
                Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            )
            .unwrap();
        h.authorization.len()
    };

    let (mut t_lc, mut t_dalek, mut t_whole) = (Vec::new(), Vec::new(), Vec::new());
    // Warm-up (tables, caches, CPU frequency).
    time(iters / 10, || lc.sign(msg).as_ref()[0] as usize);
    time(iters / 10, || dalek.sign(msg).to_bytes()[0] as usize);
    for _ in 0..rounds {
        t_lc.push(time(iters, || lc.sign(msg).as_ref()[0] as usize));
        t_dalek.push(time(iters, || dalek.sign(msg).to_bytes()[0] as usize));
        t_whole.push(time(iters, whole));
    }
    let (lc_ns, dalek_ns, whole_ns) = (
        median(&mut t_lc),
        median(&mut t_dalek),
        median(&mut t_whole),
    );
    println!(
        "Ed25519 sign of {} bytes, median of {rounds} rounds x {iters}:",
        msg.len()
    );
    println!("  aws-lc-rs Ed25519KeyPair     {:8.2} us", lc_ns / 1e3);
    println!(
        "  ed25519-dalek SigningKey     {:8.2} us  ({:.2}x aws-lc-rs)",
        dalek_ns / 1e3,
        dalek_ns / lc_ns
    );
    println!(
        "  hookbridge Signer::sign      {:8.2} us  (JWT + HMAC; {:.2}x one aws-lc-rs signature)",
        whole_ns / 1e3,
        whole_ns / lc_ns
    );
}
