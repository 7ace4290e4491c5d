//! Admin API against the real daemon.

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn admin_requires_the_token() {
    let d = Daemon::start().await;
    let r = d.client.get(d.url("/v1/orgs")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = d
        .client
        .get(d.url("/v1/orgs"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = d
        .client
        .put(d.url("/v1/orgs/acme"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (s, b) = d.admin("GET", "/v1/orgs", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["orgs"], json!([]));
}

#[tokio::test]
async fn orgs_users_and_hooks_lifecycle() {
    let d = Daemon::start().await;
    let (s, b) = d
        .admin("PUT", "/v1/orgs/acme", Some(json!({"name": "Acme Inc"})))
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["id"], "acme");
    assert_eq!(b["name"], "Acme Inc");
    let (s, _) = d
        .admin("PUT", "/v1/orgs/acme", Some(json!({"name": "Acme Inc"})))
        .await;
    assert_eq!(s, 200, "second PUT is an update");
    let (s, b) = d
        .admin(
            "PUT",
            "/v1/orgs/acme/sftp-users/etl",
            Some(json!({"password": "correct horse battery"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["has_password"], true);
    assert!(
        b.get("password_hash").is_none(),
        "hashes never leave the server"
    );
    let (s, b) = d
        .admin(
            "POST",
            "/v1/orgs/acme/webhooks",
            Some(json!({"kind": "sftp", "events": ["payment"]})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let (s, b) = d
        .admin(
            "PATCH",
            &format!("/v1/orgs/acme/webhooks/{id}"),
            Some(json!({"events": ["*"]})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["events"].as_array().unwrap().len(), 8);
    let (s, b) = d.admin("GET", "/v1/orgs/acme", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["sftp_users"][0]["name"], "etl");
    assert_eq!(b["webhooks"][0]["id"], id.as_str());
    let (s, _) = d
        .admin("DELETE", &format!("/v1/orgs/acme/webhooks/{id}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = d
        .admin("DELETE", "/v1/orgs/acme/sftp-users/etl", None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = d
        .admin("DELETE", "/v1/orgs/acme/sftp-users/etl", None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = d.admin("DELETE", "/v1/orgs/acme", None).await;
    assert_eq!(s, 204);
    let (s, b) = d.admin("GET", "/v1/orgs/acme", None).await;
    assert_eq!(s, 404);
    assert_eq!(b["status"], 404);
    assert!(!d.org_dir("acme").exists());
}

#[tokio::test]
async fn bad_names_keys_and_event_types_are_rejected() {
    let d = Daemon::start().await;
    for bad in ["Acme", "a%2Fb", ".hidden", "-x", "a%20b", &"x".repeat(65)] {
        let (s, b) = d
            .admin("PUT", &format!("/v1/orgs/{bad}"), Some(json!({})))
            .await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert!(b["detail"].as_str().unwrap().contains("name"), "{b}");
    }
    d.admin("PUT", "/v1/orgs/acme", Some(json!({}))).await;
    let cases = [
        (
            "/v1/orgs/acme/sftp-users/Bad!",
            json!({"password": "long enough pw"}),
            "name",
        ),
        ("/v1/orgs/acme/sftp-users/etl", json!({}), "password"),
        (
            "/v1/orgs/acme/sftp-users/etl",
            json!({"public_keys": ["ssh-ed25519 notakey"]}),
            "public_keys[0]",
        ),
        (
            "/v1/orgs/acme/sftp-users/etl",
            json!({"password": "short"}),
            "password",
        ),
        (
            "/v1/orgs/acme/sftp-users/etl",
            json!({"password": "long enough pw", "shell": "/bin/sh"}),
            "unknown field",
        ),
    ];
    for (path, body, needle) in cases {
        let (s, b) = d.admin("PUT", path, Some(body.clone())).await;
        assert_eq!(s, 400, "{path} {body}: {b}");
        assert!(b["detail"].as_str().unwrap().contains(needle), "{b}");
    }
    let hooks = [
        (
            json!({"kind": "sftp", "events": ["payment", "nope"]}),
            "nope",
        ),
        (json!({"kind": "ftp", "events": ["payment"]}), "kind"),
        (
            json!({"kind": "sftp", "path_template": "/../{id}.json"}),
            "path_template",
        ),
        (
            json!({"kind": "http", "url": "ftp://example.com/x", "verify": false}),
            "url",
        ),
    ];
    for (body, needle) in hooks {
        let (s, b) = d
            .admin("POST", "/v1/orgs/acme/webhooks", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b["detail"].as_str().unwrap().contains(needle), "{b}");
    }
    let (s, _) = d
        .admin(
            "POST",
            "/v1/orgs/ghost/webhooks",
            Some(json!({"kind": "sftp"})),
        )
        .await;
    assert_eq!(s, 404);
    // A user name belongs to one org: SSH logins carry only the name.
    d.admin("PUT", "/v1/orgs/beta", Some(json!({}))).await;
    let (s, _) = d
        .admin(
            "PUT",
            "/v1/orgs/acme/sftp-users/etl",
            Some(json!({"password": "long enough pw"})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, b) = d
        .admin(
            "PUT",
            "/v1/orgs/beta/sftp-users/etl",
            Some(json!({"password": "long enough pw"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
}

const DECLARED: &str = r#"
[[orgs]]
name = "acme"
[[orgs.sftp_users]]
name = "acme-etl"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$5aYz6hKx0j2WSr3rqQw0vUHe0Gf5cCTcy2HT1ZYbXtA"
public_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ5Pv7nYwLsvyKQ4hZ8eXqHe0yD3V8sJ4C6W6W6W6W6 etl@host"]
[[orgs.webhooks]]
id = "acme-files"
kind = "sftp"
events = ["payment", "deliveryReport"]
"#;

#[tokio::test]
async fn config_declared_orgs_applied_twice_give_the_same_state() {
    let mut d = Daemon::start_with(DECLARED).await;
    let (_, first) = d.admin("GET", "/v1/orgs/acme", None).await;
    assert_eq!(first["sftp_users"][0]["name"], "acme-etl");
    assert_eq!(first["webhooks"][0]["id"], "acme-files");
    assert_eq!(first["webhooks"].as_array().unwrap().len(), 1);
    d.restart().await;
    let (_, second) = d.admin("GET", "/v1/orgs/acme", None).await;
    assert_eq!(first, second);
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(files_under(&d.org_dir("acme")).len(), 1);
}

fn check_config(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[http]\nlisten = \"127.0.0.1:1\"\nlisten_backlog = 5\n",
    )
    .unwrap();
    let out = check_config(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_backlog"), "{err}");

    std::fs::write(&bad, "[[orgs]]\nname = \"Bad Name\"\n").unwrap();
    let out = check_config(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("orgs[0].name"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "data_dir = \"{}\"\n{DECLARED}",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = check_config(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme"));
}

#[test]
fn hash_password_prints_an_argon2id_hash() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hunter2hunter2\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let h = String::from_utf8(out.stdout).unwrap();
    assert!(h.starts_with("$argon2id$"), "{h}");
}

#[test]
fn example_config_is_valid() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hookbridge.example.toml");
    let out = check_config(&example);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `systemd-analyze verify` is clean and the sandbox exposure stays at or below 2.0.
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    if !require("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/hookbridge.service"),
    )
    .unwrap()
    .replace("/usr/bin/hookbridge", env!("CARGO_BIN_EXE_hookbridge"));
    let path = dir.path().join("hookbridge.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "verify: {text}"
    );
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for hookbridge.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0");
}

#[tokio::test]
async fn openapi_lists_every_route_of_the_spec() {
    let d = Daemon::start().await;
    let doc: serde_json::Value = d
        .client
        .get(d.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/orgs/{org}/events",
        "/v1/orgs/{org}/custom-values",
        "/v1/orgs/{org}/sftp-users/{user}",
        "/v1/orgs/{org}/webhooks/{id}/test",
        "/v1/orgs/{org}/webhooks/{id}/replay",
        "/.well-known/jwks.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let r = d.client.get(d.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
