//! Events in, durable files out.

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn an_event_becomes_one_file() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let r = d.post_event("acme", &json!({"id": "evt_1", "type": "payment", "data": {"amount": 5}})).await;
    assert_eq!(r.status(), 202);
    let files = files_under(&d.org_dir("acme"));
    assert_eq!(files.len(), 1, "{files:?}");
}
