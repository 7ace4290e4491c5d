//! Hostile HTTP: slow headers, huge headers, garbage. The server answers or hangs up,
//! never stalls for others.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

async fn read_all(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut buf)).await {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn slowloris_is_cut_off_and_others_are_served_meanwhile() {
    let d = Daemon::start().await;
    let started = Instant::now();
    let mut slow = TcpStream::connect(("127.0.0.1", d.http_port))
        .await
        .unwrap();
    slow.write_all(b"POST /v1/orgs/acme/events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let dribble = tokio::spawn(async move {
        for _ in 0..30 {
            if slow.write_all(b"X-a: b\r\n").await.is_err() {
                return (slow, true);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (slow, false)
    });
    // Others are served while the slow client dribbles.
    let r = d.client.get(d.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (mut slow, write_failed) = dribble.await.unwrap();
    let closed = write_failed || read_all(&mut slow, Duration::from_secs(5)).await.is_some();
    assert!(closed, "a client sending headers for 15 s is disconnected");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn huge_headers_and_garbage_get_an_error_not_a_hang() {
    let d = Daemon::start().await;
    let mut s = TcpStream::connect(("127.0.0.1", d.http_port))
        .await
        .unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let answer = read_all(&mut s, Duration::from_secs(10))
        .await
        .expect("server answers or closes");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:.80}"
    );

    let mut s = TcpStream::connect(("127.0.0.1", d.http_port))
        .await
        .unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
        .await
        .unwrap();
    let answer = read_all(&mut s, Duration::from_secs(10))
        .await
        .expect("server answers or closes");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:.80}"
    );

    let r = d.client.get(d.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn errors_made_by_the_framework_are_problem_json_too() {
    let d = Daemon::start().await;
    // A path segment that is not UTF-8 fails axum's Path extractor.
    let r = d
        .client
        .post(d.url("/v1/orgs/%FF/events"))
        .bearer_auth(d.token("acme"))
        .json(&serde_json::json!({"type": "payment", "data": {}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // An admin body over axum's default body limit.
    let big = vec![b' '; 3 << 20];
    let r = d
        .client
        .put(d.url("/v1/orgs/acme"))
        .bearer_auth(ADMIN_TOKEN)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["status"], 413);
}
