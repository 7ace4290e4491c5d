//! HTTP edges a probe broke: JWT claims and headers, SSRF literals, a public `/metrics`,
//! duplicate keys and out-of-range timestamps in events, the `customValue` test status.

use base64::Engine;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

use crate::harness::*;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An HS256 token with a header of our choosing (jsonwebtoken cannot write `crit`).
fn raw_token(header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(INGRESS_SECRET.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

async fn post_with(d: &Daemon, org: &str, token: &str, body: &str) -> (u16, Value) {
    let r = d
        .client
        .post(d.url(&format!("/v1/orgs/{org}/events")))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

const EVENT: &str = r#"{"type":"payment","data":{"amount":1}}"#;

#[tokio::test]
async fn jwt_edges_are_refused() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let now = chrono::Utc::now().timestamp();
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    let cases = [
        (
            "org null",
            raw_token(&hs, &json!({"org": null, "exp": now + 600})),
            "org",
        ),
        (
            "org number",
            raw_token(&hs, &json!({"org": 7, "exp": now + 600})),
            "org",
        ),
        (
            "nbf ahead",
            raw_token(&hs, &json!({"exp": now + 600, "nbf": now + 3600})),
            "nbf",
        ),
        (
            "crit header",
            raw_token(
                &json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}),
                &json!({"org": "acme", "exp": now + 600}),
            ),
            "crit",
        ),
        (
            "exp 10^18",
            raw_token(&hs, &json!({"exp": 1_000_000_000_000_000_000i64})),
            "max_token_lifetime",
        ),
        (
            "exp 25h ahead",
            raw_token(&hs, &json!({"exp": now + 25 * 3600})),
            "max_token_lifetime",
        ),
    ];
    for (what, token, needle) in cases {
        let (s, b) = post_with(&d, "acme", &token, EVENT).await;
        assert_eq!(s, 401, "{what}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains(needle),
            "{what}: {b}"
        );
    }
    // What stays valid: no org claim, a past nbf, an exp within the 24 h default.
    for (what, token) in [
        ("no org", raw_token(&hs, &json!({"exp": now + 23 * 3600}))),
        (
            "past nbf",
            raw_token(
                &hs,
                &json!({"org": "acme", "exp": now + 600, "nbf": now - 10}),
            ),
        ),
    ] {
        let (s, b) = post_with(&d, "acme", &token, EVENT).await;
        assert_eq!(s, 202, "{what}: {b}");
    }
}

#[tokio::test]
async fn duplicate_keys_and_unfit_timestamps_are_refused_with_nothing_written() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let token = d.token("acme");
    for (body, needle) in [
        (r#"{"type":"payment","data":{"a":1,"a":2}}"#, r#""a""#),
        (
            r#"{"type":"payment","data":{"x":[{"deep":1,"deep":2}]}}"#,
            r#""deep""#,
        ),
        (
            r#"{"type":"payment","timestamp":"9999-12-31T23:59:59-01:00","data":{}}"#,
            "timestamp",
        ),
        (
            r#"{"type":"payment","timestamp":"2026-06-30T23:59:60Z","data":{}}"#,
            "leap",
        ),
        (r#"{"type":"payment","org":null,"data":{}}"#, "org"),
    ] {
        let (s, b) = post_with(&d, "acme", &token, body).await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains(needle),
            "{body}: {b}"
        );
    }
    assert!(files_under(&d.org_dir("acme")).is_empty());
    // The last second of year 9999 still fits, with a fixed-width name.
    let (s, b) = post_with(
        &d,
        "acme",
        &token,
        r#"{"id":"last","type":"payment","timestamp":"9999-12-31T23:59:59.999999Z","data":{}}"#,
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(
        b["files"][0],
        "/payment/9999-12-31/99991231T235959.999999Z_last.json"
    );
}

#[tokio::test]
async fn metrics_needs_a_token_on_the_api_address() {
    let d = Daemon::start().await;
    let get = |token: Option<&'static str>| {
        let mut r = d.client.get(d.url("/metrics"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = get(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(!r.text().await.unwrap().contains("hookbridge_"));
    assert_eq!(
        get(Some("wrong-token-wrong-token")).await.unwrap().status(),
        401
    );
    let r = get(Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("hookbridge_"));
}

#[tokio::test]
async fn metrics_token_and_a_separate_listener() {
    let port = free_port();
    let http_extra = format!(
        "metrics_listen = \"127.0.0.1:{port}\"\nmetrics_token = \"scrape-token-0123456789\""
    );
    let d = Daemon::start_opts(Opts {
        http_extra: &http_extra,
        ..Opts::default()
    })
    .await;
    d.org_with_sftp_hook("acme").await;
    // The scraper's own token works on the API address, and is no admin token.
    let r = d
        .client
        .get(d.url("/metrics"))
        .bearer_auth("scrape-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = {
        let r = d
            .client
            .get(d.url("/v1/orgs"))
            .bearer_auth("scrape-token-0123456789")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(s, 401, "the metrics token opens no admin route");
    // The separate address serves /metrics without auth, and nothing else.
    let other = format!("http://127.0.0.1:{port}");
    let r = d
        .client
        .get(format!("{other}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("hookbridge_"));
    for path in ["/v1/orgs", "/healthz", "/openapi.json"] {
        let r = d
            .client
            .get(format!("{other}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn ssrf_literals_are_refused_at_creation() {
    let d = Daemon::start_with_delivery("allow_private_destinations = false").await;
    d.org_with_sftp_hook("acme").await;
    for host in [
        "[::127.0.0.1]",
        "[::ffff:0:7f00:1]",
        "[2002:7f00:1::]",
        "[2001::1]",
        "[fec0::1]",
        "[100::1]",
        "[64:ff9b::a9fe:a9fe]",
        "192.88.99.1",
        "localhost.",
        "metadata.google.internal.",
    ] {
        let url = format!("http://{host}/hook");
        let (s, b) = d
            .admin(
                "POST",
                "/v1/orgs/acme/webhooks",
                Some(json!({"kind": "http", "url": url, "events": ["*"], "verify": false})),
            )
            .await;
        assert_eq!(s, 400, "{url}: {b}");
        let (s, b) = d
            .admin(
                "PUT",
                "/v1/orgs/acme/custom-value-endpoint",
                Some(json!({ "url": url })),
            )
            .await;
        assert_eq!(s, 400, "{url}: {b}");
    }
    let (_, list) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    assert_eq!(
        list["webhooks"].as_array().unwrap().len(),
        1,
        "only the sftp hook"
    );
}

#[tokio::test]
async fn custom_value_test_reports_the_status_the_endpoint_answered() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::NON_AUTHORITATIVE_INFORMATION,
            [("content-type", "application/json")],
            r#"{"balance": 1}"#,
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (s, b) = d
        .admin(
            "PUT",
            "/v1/orgs/acme/custom-value-endpoint",
            Some(json!({ "url": format!("http://{addr}/cv") })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, hooks) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    let id = hooks["webhooks"][0]["id"].as_str().unwrap().to_owned();
    let (s, b) = d
        .admin(
            "POST",
            &format!("/v1/orgs/acme/webhooks/{id}/test"),
            Some(json!({"test": "customValue"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ok"], true, "{b}");
    assert_eq!(b["status"], 203, "{b}");
}
