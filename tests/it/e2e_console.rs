//! The org console in a real headless Chromium (Debian's `chromium` + `chromium-driver`):
//! sign-in by link, webhooks, tests, the delivery log and replay, SFTP users (then a real
//! OpenSSH `sftp` login), and the refusals: used or expired links, forms without their
//! CSRF token, another org's pages. Screenshots land in `target/console-screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::e2e_delivery::{reply, Receiver, Reply};
use crate::e2e_sftp::{keygen, org, sftp_batch};
use crate::harness::{wait_for, Daemon};
use crate::webdriver::Browser;

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

async fn link(d: &Daemon, org: &str, body: Option<Value>) -> (u16, Value) {
    d.admin("POST", &format!("/v1/orgs/{org}/console-links"), body)
        .await
}

async fn link_url(d: &Daemon, org: &str) -> String {
    let (s, b) = link(d, org, None).await;
    assert_eq!(s, 201, "console link: {b}");
    b["url"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn console_in_a_real_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let d = Daemon::start().await;
    org(&d, "acme").await;
    org(&d, "other").await;
    let r = Receiver::start().await;
    let dir = shots();

    // 1. Sign in through a one-time link; the link does not work twice.
    let url = link_url(&d, "acme").await;
    assert!(url.starts_with(&d.url("/console/login?token=")), "{url}");
    b.goto(&url).await;
    b.wait_text("Add a webhook", None).await;
    assert!(b.url().await.ends_with("/console/o/acme/webhooks"));
    let cookie = b.cookie("hb_console").await.expect("session cookie");

    // 2. Add an HTTP webhook pointing at the local receiver (verified with a signed ping).
    b.type_into("#add-id", "orders").await;
    b.type_into("#add-url", &r.url("/hook")).await;
    b.click("input[name=events][value=payment]").await;
    b.click("#add-webhook button[type=submit]").await;
    let page = b.wait_text("Webhook orders added.", None).await;
    assert!(b.text(".notice code").await.starts_with("whsec_"), "{page}");
    assert!(b.text("#webhooks").await.contains("enabled"));

    // A dead endpoint: the verification's cause is shown next to the URL, nothing saved.
    let dead = format!("http://127.0.0.1:{}/hook", crate::harness::free_port());
    b.type_into("#add-url", &dead).await;
    b.click("#add-webhook button[type=submit]").await;
    b.wait_text("endpoint verification failed", None).await;
    assert!(b
        .text("#add-url-error")
        .await
        .contains("endpoint verification failed"));
    // An SFTP hook, with its event types.
    b.script("document.querySelector('#add-url').value = '';")
        .await;
    b.click("input[name=kind][value=sftp]").await;
    b.type_into("#add-id", "files").await;
    b.click("input[name=events][value=inboundMessage]").await;
    b.click("#add-webhook button[type=submit]").await;
    b.wait_text("Webhook files added.", None).await;
    assert!(b
        .text("tr[data-hook=files]")
        .await
        .contains("inboundMessage"));

    // 3. The `payment` test from the dropdown succeeds.
    b.click("tr[data-hook=orders] select[name=test] option[value=payment]")
        .await;
    b.click("tr[data-hook=orders] button[value=test]").await;
    let row = b.wait_text("payment: ok", None).await;
    assert!(row.contains("HTTP 200"), "{row}");
    b.screenshot(&dir, "webhooks").await;

    // Rotate shows a new secret once; disable and enable show in the state column.
    b.click("tr[data-hook=orders] button[value=rotate]").await;
    b.wait_text("New signing secret (shown once", None).await;
    assert!(b
        .text("tr[data-hook=orders] .notice code")
        .await
        .starts_with("whsec_"));
    b.click("tr[data-hook=orders] button[value=disable]").await;
    b.wait_text("Disabled.", None).await;
    assert!(b.text("tr[data-hook=orders]").await.contains("disabled"));
    b.click("tr[data-hook=orders] button[value=enable]").await;
    b.wait_text("Enabled.", None).await;

    // 4. An event posted to the ingress shows in the delivery log as delivered.
    let log = d.url("/console/o/acme/webhooks/orders/deliveries");
    let resp = d
        .post_event(
            "acme",
            &json!({"id": "evt_ok_1", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    b.goto(&log).await;
    b.wait_text("evt_ok_1", Some(&log)).await;
    b.wait_text("delivered · HTTP 200", Some(&log)).await;

    // 5. The receiver fails: the failed attempt shows (filtered), then a replay delivers it.
    r.set_default(Reply {
        body: "receiver is down for maintenance".into(),
        ..reply(500)
    });
    let resp = d
        .post_event(
            "acme",
            &json!({"id": "evt_fail_1", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let failed = d.url("/console/o/acme/webhooks/orders/deliveries?status=failed");
    let page = b.wait_text("http_error · HTTP 500", Some(&failed)).await;
    assert!(
        page.contains("evt_fail_1") && !page.contains("evt_ok_1"),
        "{page}"
    );
    b.screenshot(&dir, "deliveries").await;
    // Let it end dead or keep failing; either way replay queues it again.
    r.set_default(reply(200));
    b.click("#deliveries button[type=submit]").await;
    b.wait_text("1 delivery(ies) queued again.", None).await;
    let delivered = d.url("/console/o/acme/webhooks/orders/deliveries?status=delivered");
    b.wait_text("evt_fail_1", Some(&delivered)).await;
    // And a time range: both deliveries are queued again.
    b.script("document.querySelector('#replay-since').value = '2020-01-01T00:00:00';")
        .await;
    b.click("#replay-since ~ p button").await;
    b.wait_text("2 delivery(ies) queued again.", None).await;

    // 6. Add an SFTP user with a key and upload right, then log in with OpenSSH `sftp`.
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "id_console", "ed25519");
    b.goto(&d.url("/console/o/acme/sftp")).await;
    b.type_into("#user-name", "acme-drop").await;
    b.type_into("#user-password", "correct horse battery").await;
    b.type_into("#user-keys", &public).await;
    b.click("input[name=upload]").await;
    b.click("#add-user button[type=submit]").await;
    b.wait_text("SFTP user acme-drop added.", None).await;
    let command = b.text("#sftp-command").await;
    assert_eq!(
        command,
        format!("sftp -P {} acme-drop@127.0.0.1", d.sftp_port)
    );
    // The fingerprint shown is the one the SFTP server presents.
    let shown_fp = b.text("#host-key").await;
    let scan = std::process::Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &d.sftp_port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let mut fp = std::process::Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut fp.stdin.take().unwrap(), &scan.stdout).unwrap();
    let fp = String::from_utf8(fp.wait_with_output().unwrap().stdout).unwrap();
    assert!(
        shown_fp.starts_with("SHA256:") && fp.contains(&shown_fp),
        "page {shown_fp:?}, server {fp:?}"
    );
    b.screenshot(&dir, "sftp").await;
    let (ok, out) = sftp_batch(&d, "acme-drop", &key, "pwd\nls /\n", keys.path()).await;
    assert!(ok, "sftp as the console's user: {out}");

    // An error is shown next to its field with the API's detail.
    b.type_into("#user-name", "short-pw").await;
    b.type_into("#user-password", "short").await;
    b.click("#add-user button[type=submit]").await;
    let err = b.wait_text("must be 8 to 1024 characters", None).await;
    assert!(
        b.text("#user-password-error").await.contains("password"),
        "{err}"
    );

    // Removing the user in the page ends its SFTP logins.
    b.goto(&d.url("/console/o/acme/sftp")).await;
    b.click("tr[data-user=acme-drop] button").await;
    b.wait_text("SFTP user acme-drop removed.", None).await;
    let (ok, out) = sftp_batch(&d, "acme-drop", &key, "pwd\n", keys.path()).await;
    assert!(!ok, "removed user still logs in: {out}");

    // Custom values: set the endpoint, run the customValue test against it.
    b.goto(&d.url("/console/o/acme/custom-values")).await;
    b.type_into("#cv-url", "ftp://nope").await;
    b.click("#cv-form button[value=set]").await;
    b.wait_text("url:", None).await;
    assert!(b.text("#cv-url-error").await.starts_with("url:"));
    b.script("document.querySelector('#cv-url').value = '';")
        .await;
    b.type_into("#cv-url", &r.url("/cv")).await;
    b.click("#cv-form button[value=set]").await;
    b.wait_text("Endpoint saved.", None).await;
    r.set_default(Reply {
        body: r#"{"tier": "gold"}"#.into(),
        ..reply(200)
    });
    b.click("#cv-form button[value=test]").await;
    b.wait_text("customValue: ok", None).await;
    b.screenshot(&dir, "custom-values").await;

    // A form posted without its CSRF token is refused.
    b.goto(&d.url("/console/o/acme/webhooks")).await;
    b.script("document.querySelector('#add-webhook input[name=csrf]').remove();")
        .await;
    b.type_into("#add-url", &r.url("/other")).await;
    b.click("#add-webhook button[type=submit]").await;
    b.wait_text("did not carry this session's security token", None)
        .await;
    let (s, hooks) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    assert_eq!((s, hooks["webhooks"].as_array().unwrap().len()), (200, 2));

    // Another org's pages are 404 for this session.
    b.goto(&d.url("/console/o/other/webhooks")).await;
    b.wait_text("There is no such page.", None).await;
    let resp = d
        .client
        .get(d.url("/console/o/other/sftp"))
        .header("cookie", format!("hb_console={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // The used link is refused.
    b.goto(&url).await;
    b.wait_text("already used or has expired", None).await;

    // A phone-sized view of the webhooks page.
    b.goto(&d.url("/console/o/acme/webhooks")).await;
    b.resize(390, 844).await;
    b.wait_text("Webhooks", None).await;
    b.screenshot(&dir, "webhooks-phone").await;
}

#[tokio::test]
async fn console_links_sessions_and_csrf() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    org(&d, "other").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // No admin token, no link; an unknown org is 404.
    let resp = http
        .post(d.url("/v1/orgs/acme/console-links"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(link(&d, "nope", None).await.0, 404);
    assert_eq!(
        link(&d, "acme", Some(json!({"ttl_seconds": 0}))).await.0,
        400
    );

    // An expired link is refused.
    let (s, b) = link(&d, "acme", Some(json!({"ttl_seconds": 1}))).await;
    assert_eq!(s, 201, "{b}");
    let expires: chrono::DateTime<chrono::Utc> = b["expires_at"].as_str().unwrap().parse().unwrap();
    wait_for("the link's expiry", Duration::from_secs(5), || async {
        (chrono::Utc::now() > expires).then_some(())
    })
    .await;
    let resp = http.get(b["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("set-cookie").is_none());

    // A fresh one starts a session with a strict cookie, once.
    let url = link_url(&d, "acme").await;
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        403,
        "second use"
    );

    // Behind a TLS proxy the cookie is Secure and the link https.
    let (_, b) = d.admin("POST", "/v1/orgs/acme/console-links", None).await;
    let tls_url = b["url"].as_str().unwrap().replace("https://", "http://");
    assert!(b["url"].as_str().unwrap().starts_with("http://"));
    let resp = http
        .get(&tls_url)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("; Secure"));

    let get = |path: &str| {
        http.get(d.url(path))
            .header("cookie", cookie.clone())
            .send()
    };
    let page = get("/console/o/acme/webhooks").await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(
        get("/console/o/other/webhooks").await.unwrap().status(),
        404
    );
    assert_eq!(get("/console/o/other/sftp").await.unwrap().status(), 404);
    assert_eq!(
        get("/console/o/ghost/custom-values")
            .await
            .unwrap()
            .status(),
        404
    );
    let anon = http
        .get(d.url("/console/o/acme/webhooks"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);

    // Forms: without the CSRF token, or with another, refused and nothing changes.
    let post = |path: &str, body: String| {
        http.post(d.url(path))
            .header("cookie", cookie.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let form = "kind=sftp&events=payment&id=h1";
    let resp = post("/console/o/acme/webhooks", form.into()).await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = post("/console/o/acme/webhooks", format!("{form}&csrf=forged"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let (_, hooks) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    assert_eq!(hooks["webhooks"].as_array().unwrap().len(), 0);

    // With it, the hook is made through the same path as the admin API.
    let page = get("/console/o/acme/webhooks")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let resp = post("/console/o/acme/webhooks", format!("{form}&csrf={csrf}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, hooks) = d.admin("GET", "/v1/orgs/acme/webhooks", None).await;
    assert_eq!(hooks["webhooks"][0]["id"], "h1");
    // A bad URL comes back with the API's own detail next to the field, as 400.
    let resp = post(
        "/console/o/acme/webhooks",
        format!("kind=http&url=ftp%3A%2F%2Fx&events=payment&csrf={csrf}"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 400);
    let page = resp.text().await.unwrap();
    assert!(page.contains("id=\"add-url-error\""), "{page}");

    // The operator page: the admin token lists the orgs and makes working links.
    assert_eq!(
        http.get(d.url("/console/operator"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let op = |body: String| {
        http.post(d.url("/console/operator"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    assert_eq!(op("token=wrong".into()).await.unwrap().status(), 401);
    let admin = crate::harness::ADMIN_TOKEN;
    let page = op(format!("token={admin}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("acme") && page.contains("other"), "{page}");
    let page = op(format!("token={admin}&org=other"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let made = page
        .split("<code class=\"secret\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or_else(|| panic!("no link in {page}"))
        .replace("&amp;", "&");
    let resp = http.get(&made).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{made}");

    // The same CSRF token does not work in another org's form (that is a 404 anyway).
    let resp = post("/console/o/other/webhooks", format!("{form}&csrf={csrf}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
