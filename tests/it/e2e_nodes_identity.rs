//! Shared identity in scale-out: two daemons with SEPARATE data dirs on one PostgreSQL
//! database and one S3 prefix behave as one service. They show the same SSH host key and
//! JWKS, accept the same (generated) admin token and ingress secret, follow each other's
//! key rotations, open each other's sealed webhook secrets, and count one org quota.
//! Without `store.secrets_key` a scale-out node refuses to start.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{require_that, wait_for, Daemon, Opts, PG_SECRETS_KEY};

const T: Duration = Duration::from_secs(30);

/// Nodes `a` and `b` of one service, each on its own disk.
async fn two_nodes(generated_secrets: bool, extra: &str) -> Option<(Daemon, Daemon)> {
    crate::harness::two_nodes_on_pg_and_s3("identity", || Opts {
        extra,
        generated_secrets,
        ..Default::default()
    })
    .await
}

/// `hookbridge ARGS --config <d's config>` with the environment `d` runs with.
fn cli(d: &Daemon, args: &[&str], secrets_key: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(args)
        .arg("--config")
        .arg(d.config_path())
        .env("HOOKBRIDGE_STORE_URL", d.store_url.as_deref().unwrap())
        .env("HOOKBRIDGE_SECRETS_KEY", secrets_key)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = cli(d, args, PG_SECRETS_KEY);
    assert!(
        out.status.success(),
        "hookbridge {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn admin(
    d: &Daemon,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = d
        .client
        .request(method.parse().unwrap(), d.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn jwks(d: &Daemon) -> Value {
    let r = d
        .client
        .get(d.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// The ed25519 host key the SFTP server on `port` presents, as OpenSSH's ssh-keyscan sees it.
fn keyscan(port: u16) -> String {
    let out = Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .unwrap_or_else(|| panic!("no host key from port {port}: {text}"));
    // "[127.0.0.1]:PORT ssh-ed25519 AAAA…": the key without the host.
    line.split_once(' ').unwrap().1.to_owned()
}

/// Host key, JWKS, generated tokens, SFTP users and event files are one service's, though
/// the nodes share no disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_separate_disks_share_host_key_jwks_tokens_users_and_files() {
    let have_keyscan = require_that(
        "`ssh-keyscan` (OpenSSH client)",
        Command::new("ssh-keyscan").output().is_ok(),
    );
    let Some((a, b)) = two_nodes(true, "").await else {
        return;
    };
    // The same host key on both ports, made once (in the store, not in either data dir).
    if have_keyscan {
        assert_eq!(keyscan(a.sftp_port), keyscan(b.sftp_port));
    }
    for d in [&a, &b] {
        assert!(!d.data_dir().join("ssh_host_ed25519_key").exists());
        assert!(!d
            .data_dir()
            .join("secrets/webhook_signing_keys.json")
            .exists());
        assert!(!d.data_dir().join("secrets/admin_token").exists());
    }
    let ja = jwks(&a).await;
    assert_eq!(kids(&ja).len(), 1, "{ja}");
    assert_eq!(ja, jwks(&b).await);

    // The admin token was generated once: the CLI prints the same for either node, and
    // it works on both; a node logs where to read it.
    let token = cli_ok(&a, &["admin-token"]);
    assert!(token.len() >= 32, "{token:?}");
    assert_eq!(cli_ok(&b, &["admin-token"]), token);
    assert!(
        a.log().contains("hookbridge admin-token"),
        "no hint where to read the token: {}",
        a.log()
    );
    assert_eq!(
        admin(&b, "wrong-token-0123456789", "GET", "/v1/orgs", None)
            .await
            .0,
        401
    );
    let (s, body) = admin(&a, &token, "PUT", "/v1/orgs/acme", Some(json!({}))).await;
    assert!(s == 201 || s == 200, "{s} {body}");
    let (s, body) = admin(
        &b,
        &token,
        "POST",
        "/v1/orgs/acme/webhooks",
        Some(json!({"kind": "sftp", "events": ["*"]})),
    )
    .await;
    assert_eq!(s, 201, "A's token on B: {body}");
    // An SFTP user made through A.
    let (s, body) = admin(
        &a,
        &token,
        "PUT",
        "/v1/orgs/acme/sftp-users/etl",
        Some(json!({"password": "etl-password-1"})),
    )
    .await;
    assert!(s == 201 || s == 200, "{s} {body}");

    // The generated ingress secret, too: a JWT minted for A's config is accepted by B… and
    // an event posted to A is pulled byte-identical over SFTP from B by that user.
    let jwt = cli_ok(&a, &["token", "--org", "acme"]);
    let post = |d: &Daemon, id: &str| {
        let req = d
            .client
            .post(d.url("/v1/orgs/acme/events"))
            .bearer_auth(&jwt)
            .json(&json!({"id": id, "type": "payment", "data": {"amount": 42, "note": "ünïcode"}}));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post(&b, "evt_on_b").await, 202);
    assert_eq!(post(&a, "evt_on_a").await, 202);
    let files = a.org_files("acme").await;
    let (path, body) = files
        .iter()
        .find(|(p, _)| p.contains("evt_on_a"))
        .unwrap_or_else(|| panic!("no file of evt_on_a in {:?}", files.keys()));
    let script = "t, s = connect('etl', 'etl-password-1')\nsys.stdout.write(s.open(sys.argv[1]).read().hex())\n";
    let (ok, out) = crate::e2e_sftp::py(&b, script, &[path]).await;
    assert!(ok, "SFTP from B: {out}\n{}", b.log());
    assert_eq!(
        out.trim(),
        hex(body),
        "bytes pulled from B differ from A's file"
    );
    assert!(String::from_utf8_lossy(body).contains("\"id\":\"evt_on_a\""));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A rotation on A is published by B within seconds, and B then signs with the new key;
/// B opens the webhook secret A sealed (one `store.secrets_key`), so its Standard Webhooks
/// signature verifies too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_node_reaches_the_other_which_then_signs_with_the_new_key() {
    let Some((mut a, b)) = two_nodes(false, "").await else {
        return;
    };
    crate::e2e_delivery::org(&a, "acme").await;
    let r = crate::e2e_delivery::Receiver::start().await;
    let hook = crate::e2e_delivery::http_hook(&a, "acme", &r.url("/h"), &["*"], false).await;
    let secret = hook["secret"].as_str().unwrap().to_owned();
    let old = kids(&jwks(&b).await);
    assert_eq!(old.len(), 1);

    let (s, body) = a.admin("POST", "/v1/signing-keys/rotate", None).await;
    assert_eq!(s, 200, "{body}");
    let kid = body["kid"].as_str().unwrap().to_owned();
    assert_ne!(kid, old[0]);
    let on_b = wait_for("B to publish the new key", T, || async {
        let j = jwks(&b).await;
        kids(&j).contains(&kid).then_some(j)
    })
    .await;
    // The old key stays published for the grace period, on both nodes alike.
    assert_eq!(on_b, jwks(&a).await);
    assert_eq!(kids(&on_b).len(), 2);
    assert!(b.log().contains("rotated on another node"), "{}", b.log());

    // Only B can deliver now.
    a.kill9();
    crate::e2e_delivery::post(&b, "acme", "evt_after_rotation", "payment").await;
    let seen = wait_for("B to deliver", T, || async {
        r.events().into_iter().next()
    })
    .await;
    let auth = seen.header("authorization");
    let jwt = auth.strip_prefix("Bearer ").unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(jwt).unwrap().kid.as_deref(),
        Some(kid.as_str()),
        "B signed with the old key"
    );
    let claims = crate::e2e_delivery::verify_jwt(&b, &seen, &r.url("/h")).await;
    assert_eq!(claims["sub"], "acme");
    crate::e2e_delivery::verify_standard(&seen, &secret);
    assert_eq!(seen.json()["id"], "evt_after_rotation");
}

/// Scale-out without `store.secrets_key` stops at start naming the key (webhook secrets and
/// the shared keys would otherwise be sealed with a key kept next to them, or one per
/// node); and a node given another key than the one the others sealed with stops too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_node_without_the_shared_secrets_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = |dir: &std::path::Path| {
        let p = dir.join("node.toml");
        std::fs::write(
            &p,
            format!(
                "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[sftp]\nlisten = \"127.0.0.1:{}\"\n",
                dir.join("data").display(),
                crate::harness::free_port(),
                crate::harness::free_port()
            ),
        )
        .unwrap();
        p
    };
    let serve = |cfg: &std::path::Path, url: &str, key: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hookbridge"));
        c.args(["serve", "--config"])
            .arg(cfg)
            .env("HOOKBRIDGE_STORE_URL", url)
            .env_remove("HOOKBRIDGE_SECRETS_KEY")
            .env("NO_COLOR", "1");
        if let Some(k) = key {
            c.env("HOOKBRIDGE_SECRETS_KEY", k);
        }
        // Refused before serving: the process ends by itself.
        c.output().unwrap()
    };
    // Refused at config validation, before the database is reached.
    let out = serve(
        &config(dir.path()),
        "postgres://hookbridge@127.0.0.1:1/none",
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("store.secrets_key"), "{err}");
    assert!(err.contains("store.url"), "{err}");
    assert!(
        !dir.path().join("data/secrets").exists(),
        "generated a key anyway"
    );

    // A node with a key of its own among nodes that sealed with another.
    let Some((db, s3)) = crate::harness::pg_and_s3_or_skip().await else {
        return;
    };
    let a = Daemon::start_opts(Opts {
        pg: Some(db.clone()),
        s3: Some(s3),
        ..Default::default()
    })
    .await;
    let other = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [42u8; 32]);
    let out = cli(&a, &["admin-token"], &other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("store.secrets_key"), "{err}");
    let dir2 = tempfile::tempdir().unwrap();
    let out = serve(&config(dir2.path()), &db.url, Some(&other));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("store.secrets_key"), "{err}");
}

/// One org quota, counted in the store: events posted alternately to A and B stop at the
/// quota (507 from both), and the bytes stored never exceed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_byte_quota_is_counted_across_nodes() {
    let Some((a, b)) = two_nodes(false, "").await else {
        return;
    };
    a.org_with_sftp_hook("acme").await;
    let quota = 4000u64;
    let (s, body) = a
        .admin(
            "PUT",
            "/v1/orgs/acme",
            Some(json!({"limits": {"quota_bytes": quota}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let nodes = [&a, &b];
    let mut accepted = 0;
    let mut refused_by = None;
    for i in 0..100 {
        let d = nodes[i % 2];
        let r = d
            .post_event(
                "acme",
                &json!({"id": format!("q{i}"), "type": "payment", "data": {"pad": "x".repeat(300)}}),
            )
            .await;
        match r.status().as_u16() {
            202 => accepted += 1,
            507 => {
                refused_by = Some(i % 2);
                break;
            }
            s => panic!("post {i}: {s} {}", r.text().await.unwrap_or_default()),
        }
    }
    let first = refused_by.expect("no 507 before 100 events of ~400 bytes under 4000");
    assert!(accepted >= 4, "only {accepted} accepted");
    // Once full, the other node refuses too (it reads the same count).
    let other = nodes[1 - first];
    let r = other
        .post_event(
            "acme",
            &json!({"id": "q_more", "type": "payment", "data": {"pad": "x".repeat(300)}}),
        )
        .await;
    assert_eq!(r.status(), 507);
    let stored: u64 = a
        .org_files("acme")
        .await
        .values()
        .map(|f| f.len() as u64)
        .sum();
    assert!(
        stored <= quota,
        "{stored} bytes stored over a {quota}-byte quota"
    );
    assert_eq!(a.org_files("acme").await.len(), accepted);
    for d in nodes {
        let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
        assert_eq!(u["bytes"].as_u64(), Some(stored), "{u}");
    }
}

/// A single node moving to PostgreSQL keeps its identity: its host key and signing keys
/// (files in its data dir) become the shared ones, so `known_hosts` entries and JWKS
/// caches stay valid; a second node on another disk then serves the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_moving_to_postgres_keeps_its_host_key_and_signing_keys() {
    let have_keyscan = require_that(
        "`ssh-keyscan` (OpenSSH client)",
        Command::new("ssh-keyscan").output().is_ok(),
    );
    let Some((db, _)) = crate::harness::pg_and_s3_or_skip().await else {
        return;
    };
    let mut single = Daemon::start_opts(Opts {
        store_url: None,
        ..Default::default()
    })
    .await;
    if single.store_url.is_some() {
        // HOOKBRIDGE_TEST_STORE=postgres: this daemon is no single node to begin with.
        return;
    }
    // The SFTP server makes its key as it starts, maybe just after HTTP answers.
    let key_file = single.data_dir().join("ssh_host_ed25519_key");
    wait_for("the host key file", T, || async {
        key_file.exists().then_some(())
    })
    .await;
    let host_key = have_keyscan.then(|| keyscan(single.sftp_port));
    let keys = jwks(&single).await;
    assert_eq!(single.terminate(), Some(0));
    single.store_url = Some(db.url.clone());
    single.spawn().await;
    assert!(
        single.log().contains("imported this file"),
        "{}",
        single.log()
    );
    let other = Daemon::start_opts(Opts {
        pg: Some(db.clone()),
        ..Default::default()
    })
    .await;
    for d in [&single, &other] {
        assert_eq!(jwks(d).await, keys);
        if let Some(k) = &host_key {
            assert_eq!(&keyscan(d.sftp_port), k);
        }
    }
}

/// One node (SQLite, files): `hookbridge admin-token` prints the generated token of the
/// data dir, which the daemon accepts; nothing else is made by the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_prints_the_generated_token_of_a_single_node() {
    let d = Daemon::start_opts(Opts {
        generated_secrets: true,
        store_url: None,
        ..Default::default()
    })
    .await;
    if d.store_url.is_some() {
        return; // HOOKBRIDGE_TEST_STORE=postgres: covered by the two-node test.
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(["admin-token", "--config"])
        .arg(d.config_path())
        .env_remove("HOOKBRIDGE_STORE_URL")
        .env_remove("HOOKBRIDGE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let file = std::fs::read_to_string(d.data_dir().join("secrets/admin_token")).unwrap();
    assert_eq!(token, file.trim());
    assert_eq!(admin(&d, &token, "GET", "/v1/orgs", None).await.0, 200);
    assert!(
        d.log()
            .contains("admin.token not set; using the generated token in this file"),
        "{}",
        d.log()
    );
}
