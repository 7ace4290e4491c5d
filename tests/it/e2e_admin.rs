//! Admin API against the real daemon.

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn admin_requires_the_token() {
    let d = Daemon::start().await;
    let r = d.client.get(d.url("/v1/orgs")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = d.client.get(d.url("/v1/orgs")).bearer_auth("wrong-token-0123456789").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (s, b) = d.admin("GET", "/v1/orgs", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["orgs"], json!([]));
}
