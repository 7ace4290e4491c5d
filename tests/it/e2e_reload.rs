//! SIGHUP re-reads the config file; a bad file is refused and the old config stays.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn sighup_applies_new_orgs_and_limits_and_refuses_a_bad_file() {
    let mut d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let r = d
        .post_event("acme", &json!({"type": "payment", "data": {}}))
        .await;
    assert_eq!(r.status(), 202);

    d.extra_config =
        "[limits]\ningest_rate = 0.001\ningest_burst = 1\n[[orgs]]\nname = \"newco\"\n".into();
    d.write_config();
    d.signal(libc::SIGHUP);
    wait_for("the new org to appear", Duration::from_secs(10), || async {
        (d.admin("GET", "/v1/orgs/newco", None).await.0 == 200).then_some(())
    })
    .await;
    // The new default rate (burst 1) applies to existing orgs without a restart.
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                d.post_event("acme", &json!({"type": "payment", "data": {}}))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        v
    };
    assert!(codes.contains(&429), "{codes:?}");

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
