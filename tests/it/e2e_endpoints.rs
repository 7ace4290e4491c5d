//! A webhook's endpoint as hookbridge checks it, against a real receiver in this process:
//! the SSRF guard and the signed ping at creation, the five connection tests, the Custom
//! Value Request, and the JWKS receivers verify signatures with.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::e2e_delivery::*;
use crate::harness::*;

#[tokio::test]
async fn private_destinations_are_refused_at_creation() {
    let d = Daemon::start_with_delivery("allow_private_destinations = false").await;
    org(&d, "acme").await;
    for url in [
        "http://127.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://[::1]/hook",
    ] {
        let resp = d
            .client
            .post(d.url("/v1/orgs/acme/webhooks"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"kind": "http", "url": url, "events": ["*"]}))
            .send()
            .await
            .unwrap();
        let s = resp.status().as_u16();
        assert!(s == 400 || s == 422, "{url}: {s}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{url}"
        );
        let b: Value = resp.json().await.unwrap();
        assert!(
            b["detail"].as_str().unwrap().contains("private")
                || b["detail"].as_str().unwrap().contains("local"),
            "{url}: {b}"
        );
    }
    let (s, _) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"kind": "http", "url": "ftp://example.com/x", "events": ["*"]})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = d
        .admin(
            "PUT",
            "/v1/orgs/acme/custom-value-endpoint",
            Some(json!({"url": "http://10.1.2.3/cv"})),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn verification_on_creation_names_the_cause() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let b = http_hook(&d, "acme", &r.url("/ok"), &["*"], true).await;
    assert!(b["secret"].as_str().unwrap().starts_with("whsec_"));
    let ping = &r.seen()[0];
    assert!(ping.is_ping());
    verify_standard(ping, b["secret"].as_str().unwrap());
    let cases = [
        (dead_url(), "connection"),
        ("http://nonexistent.invalid/hook".to_owned(), "DNS"),
    ];
    for (url, cause) in cases {
        let (s, b) = d
            .admin(
                "POST",
                "/v1/orgs/acme/webhooks",
                Some(json!({"kind": "http", "url": url, "events": ["*"]})),
            )
            .await;
        assert_eq!(s, 422, "{url}: {b}");
        assert!(b["detail"].as_str().unwrap().contains(cause), "{url}: {b}");
    }
    r.set_default(reply(500));
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"kind": "http", "url": r.url("/500"), "events": ["*"]})),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("HTTP 500"), "{b}");
    // None of the failed ones was saved.
    let (_, list) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
}

async fn run_test(d: &Daemon, org: &str, hook: &str, t: &str) -> Value {
    let (s, b) = d
        .admin(
            "POST",
            &format!("/v1/orgs/{org}/webhooks/{hook}/test"),
            Some(json!({ "test": t })),
        )
        .await;
    assert_eq!(s, 200, "{t}: {b}");
    assert!(b["latency_ms"].is_u64() && b["detail"].is_string(), "{b}");
    b
}

const FIVE: [&str; 5] = [
    "ping",
    "inboundMessage",
    "deliveryReport",
    "payment",
    "customValue",
];

#[tokio::test]
async fn the_five_tests_against_live_and_dead_receivers() {
    let d = Daemon::start().await;
    let r = Receiver::start().await;
    r.set_default(Reply {
        status: 200,
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"balance": 12.5, "name": "Ann"}"#.into(),
    });
    d.org_with_sftp_hook("live").await;
    org(&d, "dead").await;
    let live = http_hook(&d, "live", &r.url("/hook"), &["*"], true).await;
    let dead = http_hook(&d, "dead", &dead_url(), &["*"], false).await;
    for (o, url) in [("live", r.url("/cv")), ("dead", dead_url())] {
        let (s, b) = d
            .admin(
                "PUT",
                &format!("/v1/orgs/{o}/custom-value-endpoint"),
                Some(json!({ "url": url })),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (_, hooks) = d.admin("GET", "/v1/orgs/live/webhooks", None).await;
    let sftp_id = hooks["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "sftp")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for t in FIVE {
        let b = run_test(&d, "live", live["id"].as_str().unwrap(), t).await;
        assert_eq!(b["ok"], true, "live {t}: {b}");
        assert_eq!(b["status"], 200, "live {t}: {b}");
        let b = run_test(&d, "dead", dead["id"].as_str().unwrap(), t).await;
        assert_eq!(b["ok"], false, "dead {t}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains("connection"),
            "dead {t}: {b}"
        );
        let b = run_test(&d, "live", &sftp_id, t).await;
        assert_eq!(b["ok"], true, "sftp {t}: {b}");
    }
    // The http samples arrived signed, with the type of the test.
    let types: Vec<String> = r
        .seen()
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| s.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "ping",
            "ping",
            "inboundMessage",
            "deliveryReport",
            "payment"
        ]
    );
    let payment = r
        .seen()
        .into_iter()
        .find(|s| s.json()["type"] == "payment")
        .unwrap();
    verify_jwt(&d, &payment, &r.url("/hook")).await;
    verify_standard(&payment, live["secret"].as_str().unwrap());
    // The sftp samples are files in the org folder.
    let files = files_under(&d.org_dir("live"));
    for t in ["inboundMessage", "deliveryReport", "payment"] {
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains(&format!("/{t}/"))),
            "{t}: {files:?}"
        );
    }
}

async fn custom_values(d: &Daemon, org: &str, query: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let resp = d
        .client
        .get(d.url(&format!("/v1/orgs/{org}/custom-values?{query}")))
        .bearer_auth(d.token(org))
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    (
        s,
        resp.json().await.unwrap_or(Value::Null),
        started.elapsed(),
    )
}

#[tokio::test]
async fn custom_value_round_trip_errors_and_timeout() {
    let d = Daemon::start_with_delivery(&format!(
        "{DEFAULT_DELIVERY}\ncustom_value_timeout = \"1s\""
    ))
    .await;
    org(&d, "acme").await;
    org(&d, "none").await;
    let r = Receiver::start().await;
    r.set_default(Reply {
        status: 200,
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"balance": 12.5, "name": "Ann", "secret": "not asked"}"#.into(),
    });
    let (s, _) = d
        .admin(
            "PUT",
            "/v1/orgs/acme/custom-value-endpoint",
            Some(json!({"url": r.url("/cv?tenant=7")})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b, _) = custom_values(
        &d,
        "acme",
        "customer_id=&channel_id=%2B15550100&fields=balance,missing",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b, json!({"values": {"balance": 12.5, "missing": null}}));
    let seen = r.seen().pop().unwrap();
    assert_eq!(seen.method, "GET");
    let q: Vec<(String, String)> = url::Url::parse(&format!("http://x{}", seen.uri))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    for (k, v) in [
        ("tenant", "7"),
        ("customer_id", ""),
        ("channel_id", "+15550100"),
        ("fields", "balance,missing"),
    ] {
        assert!(q.contains(&(k.into(), v.into())), "{k}={v} in {q:?}");
    }
    let claims = verify_jwt(&d, &seen, &r.url("/cv?tenant=7")).await;
    assert_eq!(claims["sub"], "acme");
    assert_eq!(claims["body_sha256"], sha256_hex(b""));

    // Auth is the platform's ingress JWT.
    let resp = d
        .client
        .get(d.url("/v1/orgs/acme/custom-values?fields=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // No endpoint → 404.
    let (s, _, _) = custom_values(&d, "none", "fields=a").await;
    assert_eq!(s, 404);
    // The org's system fails → 502.
    r.plan(vec![reply(500)]);
    let (s, b, _) = custom_values(&d, "acme", "fields=a").await;
    assert_eq!(s, 502, "{b}");
    r.plan(vec![Reply {
        status: 200,
        headers: vec![],
        body: "<html>".into(),
    }]);
    let (s, _, _) = custom_values(&d, "acme", "fields=a").await;
    assert_eq!(s, 502);
    // Slow → 504 within the timeout.
    r.set_delay(Duration::from_secs(10));
    let (s, b, took) = custom_values(&d, "acme", "fields=a").await;
    assert_eq!(s, 504, "{b}");
    // 1 s timeout against a 10 s answer; the margin is for a loaded machine.
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn jwks_is_public_and_rotation_keeps_the_old_key() {
    let d = Daemon::start().await;
    let jwks = |d: &Daemon| {
        let c = d.client.clone();
        let u = d.url("/.well-known/jwks.json");
        async move {
            c.get(u)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let before = jwks(&d).await;
    assert_eq!(before["keys"].as_array().unwrap().len(), 1);
    assert_eq!(before["keys"][0]["crv"], "Ed25519");
    let (s, b) = d.admin("POST", "/v1/signing-keys/rotate", None).await;
    assert_eq!(s, 200, "{b}");
    let after = jwks(&d).await;
    assert_eq!(after["keys"].as_array().unwrap().len(), 2);
    // Still two after a restart: the key file holds both.
    let mut d = d;
    d.restart().await;
    assert_eq!(jwks(&d).await["keys"].as_array().unwrap().len(), 2);
}
