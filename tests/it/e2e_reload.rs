//! SIGHUP re-reads the config file; a bad file is refused and the old config stays; SFTP
//! sessions open during the reload keep working.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test]
async fn sighup_applies_new_orgs_and_limits_and_refuses_a_bad_file() {
    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);
    d.sftp_user("acme", "etl", "etl password").await;

    // An SFTP session opened before the reload must still work after it.
    let script = r#"
import sys, paramiko
t = paramiko.Transport(('127.0.0.1', int(sys.argv[1]))); t.connect(username='etl', password='etl password')
s = paramiko.SFTPClient.from_transport(t)
print(len(s.listdir('/payment')), flush=True)
sys.stdin.readline()
print(len(s.listdir('/payment')), flush=True)
"#;
    let mut session = tokio::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(d.sftp_port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(session.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "1", "session open before the reload");

    d.extra_config =
        "[limits]\ningest_rate = 0.001\ningest_burst = 1\n[[orgs]]\nname = \"newco\"\n".into();
    d.write_config();
    d.signal(libc::SIGHUP);
    wait_for("the new org to appear", Duration::from_secs(10), || async {
        (d.admin("GET", "/v1/orgs/newco", None).await.0 == 200).then_some(())
    })
    .await;
    // The new default rate (burst 1) applies to existing orgs without a restart: waited for
    // itself, since the org appearing does not order it.
    wait_for(
        "the new rate to refuse a post",
        Duration::from_secs(30),
        || async {
            let status = d
                .post_event("acme", &json!({"type": "payment", "data": {}}))
                .await
                .status()
                .as_u16();
            (status == 429).then_some(())
        },
    )
    .await;

    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    line.clear();
    out.read_line(&mut line).await.unwrap();
    assert!(
        line.trim().parse::<u32>().is_ok_and(|n| n >= 1),
        "the SFTP session survived the reload: {line:?}"
    );
    assert!(session.wait().await.unwrap().success());

    std::fs::write(d.config_path(), "[http]\nlisten = 12\nwhat = true\n").unwrap();
    d.signal(libc::SIGHUP);
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        let refused = d.log().contains("new configuration refused");
        async move { refused.then_some(()) }
    })
    .await;
    let r = d.client.get(d.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "still serving with the old config");
    assert_eq!(d.admin("GET", "/v1/orgs/newco", None).await.0, 200);
}
