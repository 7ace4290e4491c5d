//! The server keeps the contract of its own `/openapi.json`: every answer is documented and
//! matches its schema (Schemathesis against the real daemon), and the rules the document
//! states are the rules the server applies.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

async fn admin_raw(
    d: &Daemon,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = d
        .client
        .request(m, d.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let s = r.status().as_u16();
    assert_eq!(
        r.headers().get("content-type").map(|v| v.to_str().unwrap()),
        Some(if s >= 400 {
            "application/problem+json"
        } else {
            "application/json"
        }),
        "{method} {path}"
    );
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn admin_bodies_are_json_required_bounded_and_never_null() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let json_ct = Some("application/json");
    // Required bodies may not be left out (an empty body is not `{}`).
    for (m, p) in [
        ("PUT", "/v1/orgs/beta"),
        ("PUT", "/v1/orgs/acme/sftp-users/etl"),
        ("POST", "/v1/orgs/acme/webhooks"),
        ("PUT", "/v1/orgs/acme/custom-value-endpoint"),
    ] {
        for ct in [None, json_ct] {
            let (s, b) = admin_raw(&d, m, p, ct, Vec::new()).await;
            assert_eq!(s, 400, "{m} {p} {ct:?}: {b}");
            assert!(
                b["detail"].as_str().unwrap().contains("body is required"),
                "{b}"
            );
        }
    }
    // Not JSON: 415, whatever the route.
    for ct in [
        Some("text/plain"),
        None,
        Some("application/x-www-form-urlencoded"),
    ] {
        let (s, b) = admin_raw(&d, "PUT", "/v1/orgs/beta", ct, b"{}".to_vec()).await;
        assert_eq!(s, 415, "{ct:?}: {b}");
    }
    // Over http.max_body (1 MiB by default), not axum's 2 MiB.
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(1_100_000));
    let (s, b) = admin_raw(&d, "PUT", "/v1/orgs/beta", json_ct, big.into_bytes()).await;
    assert_eq!(s, 413, "{b}");
    // An array is no object, at the top or inside.
    for (p, body) in [
        ("/v1/orgs/beta", json!([null, null])),
        ("/v1/orgs/beta", json!({"limits": [null, null]})),
        ("/v1/orgs/acme/sftp-users/etl", json!(["long enough pw"])),
    ] {
        let (s, b) = d.admin("PUT", p, Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains("object"),
            "{body}: {b}"
        );
    }
    // null is not a string.
    for (m, p, body) in [
        (
            "PUT",
            "/v1/orgs/acme/sftp-users/etl",
            json!({"password": "long enough pw", "password_hash": null}),
        ),
        ("PUT", "/v1/orgs/beta", json!({"name": null})),
        (
            "POST",
            "/v1/orgs/acme/webhooks",
            json!({"kind": "sftp", "id": null}),
        ),
    ] {
        let (s, b) = d.admin(m, p, Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains("null"),
            "{body}: {b}"
        );
    }
    // The rules the document states: a credential is required, not both password forms.
    for body in [
        json!({"upload": true}),
        json!({"public_keys": []}),
        json!({"password": "long enough pw", "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$5aYz6hKx0j2WSr3rqQw0vUHe0Gf5cCTcy2HT1ZYbXtA"}),
    ] {
        let (s, b) = d
            .admin("PUT", "/v1/orgs/acme/sftp-users/etl", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}: {b}");
    }
    // Still fine: a JSON body on a JSON content type.
    let (s, b) = admin_raw(
        &d,
        "PUT",
        "/v1/orgs/beta",
        Some("application/json; charset=utf-8"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn replay_answers_202_and_409_as_documented() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let (s, hook) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"kind": "http", "url": "http://127.0.0.1:9/x", "verify": false})),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    let replay = format!(
        "/v1/orgs/acme/webhooks/{}/replay",
        hook["id"].as_str().unwrap()
    );
    let (s, b) = d
        .admin(
            "POST",
            &replay,
            Some(json!({"since": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["replayed"], 0);
    for body in [
        json!({}),
        json!({"since": "2026-01-01T00:00:00Z", "delivery_id": "dlv_x"}),
        json!({"delivery_id": null}),
    ] {
        let (s, b) = d.admin("POST", &replay, Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {b}");
    }
    let doc = openapi(&d).await;
    let op = &doc["paths"]["/v1/orgs/{org}/webhooks/{id}/replay"]["post"];
    for code in ["202", "409"] {
        assert!(
            op["responses"].get(code).is_some(),
            "replay {code} undocumented"
        );
    }
    assert!(op["responses"].get("200").is_none());
    let (s, _) = d
        .admin(
            "PATCH",
            &format!("/v1/orgs/acme/webhooks/{}", hook["id"].as_str().unwrap()),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = d
        .admin(
            "POST",
            &replay,
            Some(json!({"since": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
}

async fn openapi(d: &Daemon) -> Value {
    d.client
        .get(d.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn schemathesis() -> Option<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/schemathesis");
    crate::harness::require_that(
        ".venv/bin/schemathesis (pip install -r tests/requirements.txt)",
        p.exists(),
    )
    .then_some(p)
}

/// Schemathesis generates requests from the document (valid and invalid ones) and checks
/// every answer: status documented, content type, headers and body matching their schemas,
/// invalid input refused, valid input not refused, auth not ignored. A fixed seed and a
/// small budget keep it to about a minute; any mismatch fails the test with the report.
#[tokio::test]
async fn schemathesis_finds_no_mismatch_between_server_and_document() {
    let Some(st) = schemathesis() else { return };
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    d.sftp_user("acme", "etl", "long enough pw").await;
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            // Nothing listens on port 9: tests and replays fail fast, as documented.
            Some(json!({"id": "hook1", "kind": "http", "url": "http://127.0.0.1:9/x", "verify": false})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    // The org's system answers custom-value requests with a JSON object.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cv = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        (
            [("content-type", "application/json")],
            r#"{"balance": 1, "name": "Ann"}"#,
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (s, b) = d
        .admin(
            "PUT",
            "/v1/orgs/acme/custom-value-endpoint",
            Some(json!({ "url": format!("http://{cv}/cv") })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // Most requests should reach a real org, user and webhook, not only answer 404: a run
    // where an operation only ever answers 404 fails. Deletes go last and are the
    // exception, since the first one that works makes the next ones 404.
    let params =
        "[parameters]\n\"path.org\" = \"acme\"\n\"path.user\" = \"etl\"\n\"path.id\" = \"hook1\"\n";
    let strict = d.dir.path().join("schemathesis.toml");
    let lenient = d.dir.path().join("schemathesis-deletes.toml");
    std::fs::write(
        &strict,
        format!(
            "[warnings]\nfail-on = [\"missing_test_data\", \"missing_auth\", \
             \"validation_mismatch\", \"unresolvable_reference\", \"unsupported_regex\"]\n{params}"
        ),
    )
    .unwrap();
    std::fs::write(
        &lenient,
        format!(
            "[warnings]\nfail-on = [\"missing_auth\", \"validation_mismatch\", \
             \"unresolvable_reference\", \"unsupported_regex\"]\n{params}"
        ),
    )
    .unwrap();
    let ingress = d.token("acme");
    // Deletes last, so that the other operations find the org, user and webhook.
    let runs: [(&str, &[&str], &str, &Path); 4] = [
        ("ingress", &["--include-tag", "ingress"], &ingress, &strict),
        ("ops", &["--include-tag", "ops"], ADMIN_TOKEN, &strict),
        (
            "admin",
            &["--include-tag", "admin", "--exclude-method", "DELETE"],
            ADMIN_TOKEN,
            &strict,
        ),
        (
            "deletes",
            &["--include-method", "DELETE"],
            ADMIN_TOKEN,
            &lenient,
        ),
    ];
    for (tag, filter, token, config) in runs {
        let started = std::time::Instant::now();
        let run = tokio::process::Command::new(&st)
            .arg("--config-file")
            .arg(config)
            .args(["run", &d.url("/openapi.json")])
            .args(filter)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["--seed", "20261128", "--max-examples", "8"])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--checks", CHECKS])
            .args(["--request-timeout", "20", "--generation-database", "none"])
            .args(["--no-color", "--workers", "1"])
            .current_dir(d.dir.path())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(240), run)
            .await
            .unwrap_or_else(|_| panic!("schemathesis ({tag}) ran over 240 s"))
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "schemathesis {tag}: {:?}\n{}",
            started.elapsed(),
            tail(&text, 40)
        );
        assert!(
            out.status.success(),
            "schemathesis found mismatches in {tag} operations:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every check but `positive_data_acceptance`: the document cannot express every rule
/// of valid input (a public key that parses, an argon2 hash that decodes, a URL that
/// answers its verification ping), so schema-valid bodies are legitimately refused.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_headers_conformance,response_schema_conformance,negative_data_rejection,\
missing_required_header,unsupported_method,ignored_auth";

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
