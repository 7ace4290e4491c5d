//! Signed HTTP delivery against a real receiver in this process: signatures, retries,
//! Retry-After, 410, dead + replay, kill -9, isolation of slow endpoints, a clean stop, and
//! admin changes reaching queued jobs. (Endpoint checks: `e2e_endpoints`.)

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Digest;

use crate::harness::*;

#[derive(Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: String,
}

/// An answer with a `Retry-After` of `secs` seconds.
pub(crate) fn reply_retry_after(status: u16, secs: u32) -> Reply {
    Reply {
        status,
        headers: vec![("retry-after", secs.to_string())],
        body: String::new(),
    }
}

pub(crate) fn reply(status: u16) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: String::new(),
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) uri: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
    /// Wall-clock arrival, to compare with times the API reports.
    pub(crate) wall: chrono::DateTime<chrono::Utc>,
}

impl Seen {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub(crate) fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
    pub(crate) fn is_ping(&self) -> bool {
        self.json()["type"] == "ping"
    }
}

#[derive(Default)]
struct RecvState {
    seen: Mutex<Vec<Seen>>,
    plan: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    delay: Mutex<Duration>,
    hang: std::sync::atomic::AtomicBool,
}

/// A webhook receiver on 127.0.0.1:0 whose answers can be changed mid-test.
#[derive(Clone)]
pub(crate) struct Receiver {
    addr: SocketAddr,
    st: Arc<RecvState>,
}

async fn receive(State(st): State<Arc<RecvState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    st.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers,
        body,
        at: Instant::now(),
        wall: chrono::Utc::now(),
    });
    if st.hang.load(std::sync::atomic::Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let r = st
        .plan
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| st.default.lock().unwrap().clone())
        .unwrap_or_else(|| reply(200));
    let mut resp = (StatusCode::from_u16(r.status).unwrap(), r.body).into_response();
    for (k, v) in r.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        let st = Arc::new(RecvState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(receive).with_state(st.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, st }
    }
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// Holds every request (unanswered) while `on`.
    pub(crate) fn hold(&self, on: bool) {
        self.st.hang.store(on, std::sync::atomic::Ordering::SeqCst);
    }
    /// Answers every request this much later (it is counted on arrival).
    pub(crate) fn set_delay(&self, d: Duration) {
        *self.st.delay.lock().unwrap() = d;
    }
    pub(crate) fn set_default(&self, r: Reply) {
        *self.st.default.lock().unwrap() = Some(r);
    }
    pub(crate) fn plan(&self, replies: Vec<Reply>) {
        self.st.plan.lock().unwrap().extend(replies);
    }
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.st.seen.lock().unwrap().clone()
    }
    /// Requests that carried events (not verification pings).
    pub(crate) fn events(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| !s.is_ping()).collect()
    }
}

/// A URL where nothing listens.
pub(crate) fn dead_url() -> String {
    format!("http://127.0.0.1:{}/hook", free_port())
}

pub(crate) async fn org(d: &Daemon, name: &str) {
    let (s, b) = d
        .admin("PUT", &format!("/v1/orgs/{name}"), Some(json!({})))
        .await;
    assert!(s == 201 || s == 200, "PUT org: {s} {b}");
}

pub(crate) async fn http_hook(
    d: &Daemon,
    org: &str,
    url: &str,
    events: &[&str],
    verify: bool,
) -> Value {
    let (s, b) = d
        .admin(
            "POST",
            &format!("/v1/orgs/{org}/webhooks"),
            Some(json!({"kind": "http", "url": url, "events": events, "verify": verify})),
        )
        .await;
    assert_eq!(s, 201, "create http hook: {b}");
    b
}

pub(crate) async fn post(d: &Daemon, org: &str, id: &str, kind: &str) {
    let r = d
        .post_event(org, &json!({"id": id, "type": kind, "data": {"n": id}}))
        .await;
    assert_eq!(r.status(), 202, "post {id}");
}

pub(crate) async fn deliveries(d: &Daemon, org: &str, hook: &str, status: &str) -> Vec<Value> {
    let q = if status.is_empty() {
        String::new()
    } else {
        format!("?status={status}")
    };
    let (s, b) = d
        .admin(
            "GET",
            &format!("/v1/orgs/{org}/webhooks/{hook}/deliveries{q}"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["deliveries"].as_array().cloned().unwrap_or_default()
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

pub(crate) async fn verify_jwt(d: &Daemon, seen: &Seen, aud: &str) -> Value {
    let jwks: jsonwebtoken::jwk::JwkSet = d
        .client
        .get(d.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = seen.header("authorization");
    let token = auth.strip_prefix("Bearer ").expect("bearer JWT");
    let kid = jsonwebtoken::decode_header(token)
        .unwrap()
        .kid
        .expect("kid");
    let jwk = jwks.find(&kid).expect("kid in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&[aud]);
    v.set_issuer(&["hookbridge"]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .expect("JWT verifies against the JWKS")
        .claims
}

pub(crate) fn verify_standard(seen: &Seen, secret: &str) {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
    let signed = format!(
        "{}.{}.{}",
        seen.header("webhook-id"),
        seen.header("webhook-timestamp"),
        String::from_utf8_lossy(&seen.body)
    );
    mac.update(signed.as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(seen.header("webhook-signature"), expected);
    let ts: i64 = seen.header("webhook-timestamp").parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
}

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn signed_event_reaches_each_subscribed_endpoint_once() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let (r1, r2) = (Receiver::start().await, Receiver::start().await);
    let h1 = http_hook(
        &d,
        "acme",
        &r1.url("/one"),
        &["payment", "inboundMessage"],
        true,
    )
    .await;
    let h2 = http_hook(&d, "acme", &r2.url("/two"), &["payment"], true).await;
    // Verification on creation sent one signed ping each.
    assert_eq!(r1.seen().iter().filter(|s| s.is_ping()).count(), 1);
    post(&d, "acme", "evt_p1", "payment").await;
    post(&d, "acme", "evt_i1", "inboundMessage").await;
    post(&d, "acme", "evt_d1", "deliveryReport").await;
    for (h, n) in [(&h1, 2), (&h2, 1)] {
        let id = h["id"].as_str().unwrap();
        wait_for("deliveries delivered", T, || async {
            (deliveries(&d, "acme", id, "delivered").await.len() == n).then_some(())
        })
        .await;
    }
    let e1 = r1.events();
    let e2 = r2.events();
    let types = |v: &[Seen]| {
        let mut t: Vec<String> = v
            .iter()
            .map(|s| s.json()["type"].as_str().unwrap().to_owned())
            .collect();
        t.sort();
        t
    };
    assert_eq!(types(&e1), ["inboundMessage", "payment"]);
    assert_eq!(types(&e2), ["payment"]);
    for (seen, h, url) in [
        (&e1[0], &h1, r1.url("/one")),
        (&e1[1], &h1, r1.url("/one")),
        (&e2[0], &h2, r2.url("/two")),
    ] {
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.header("content-type"), "application/json");
        let claims = verify_jwt(&d, seen, &url).await;
        assert_eq!(claims["sub"], "acme");
        assert_eq!(claims["jti"], seen.header("webhook-id"));
        assert_eq!(claims["body_sha256"], sha256_hex(&seen.body));
        assert!(seen.header("webhook-id").starts_with("dlv_"));
        verify_standard(seen, h["secret"].as_str().unwrap());
        let env = seen.json();
        assert_eq!(env["org"], "acme");
        assert!(env["timestamp"].is_string());
    }
}

#[tokio::test]
async fn failing_twice_then_ok_is_delivered_on_the_third_attempt_with_one_webhook_id() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let h = http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    r.plan(vec![reply(500), reply(500)]);
    post(&d, "acme", "evt_1", "payment").await;
    let id = h["id"].as_str().unwrap();
    let done = wait_for("delivered", T, || async {
        deliveries(&d, "acme", id, "delivered").await.pop()
    })
    .await;
    let seen = r.events();
    assert_eq!(seen.len(), 3);
    let ids: HashSet<String> = seen.iter().map(|s| s.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "same webhook-id on every retry");
    assert_eq!(done["attempts"], 3);
    let log = done["attempt_log"].as_array().unwrap();
    let statuses: Vec<u64> = log.iter().map(|a| a["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert!(log[0]["latency_ms"].is_u64());
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    r.plan(vec![Reply {
        status: 429,
        headers: vec![("retry-after", "2".into())],
        body: "slow down".into(),
    }]);
    post(&d, "acme", "evt_1", "payment").await;
    wait_for("second attempt", T, || async {
        (r.events().len() >= 2).then_some(())
    })
    .await;
    let seen = r.events();
    let gap = seen[1].at - seen[0].at;
    // Without Retry-After the first retry comes after 200 ms ± 20 %.
    assert!(gap >= Duration::from_millis(1900), "gap {gap:?}");
}

#[tokio::test]
async fn gone_disables_the_webhook() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let h = http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    let id = h["id"].as_str().unwrap().to_owned();
    r.set_default(reply(410));
    post(&d, "acme", "evt_1", "payment").await;
    let hook = wait_for("webhook disabled", T, || async {
        let (_, b) = d
            .admin("GET", &format!("/v1/orgs/acme/webhooks/{id}"), None)
            .await;
        (b["enabled"] == false).then_some(b)
    })
    .await;
    assert!(
        hook["disabled_reason"].as_str().unwrap().contains("410"),
        "{hook}"
    );
    wait_for("the 410'd delivery to be dead", T, || async {
        (deliveries(&d, "acme", &id, "dead").await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(r.events().len(), 1, "410 is not retried");
}

#[tokio::test]
async fn endpoint_down_ends_dead_and_replay_delivers_once_up() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let h = http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    let id = h["id"].as_str().unwrap().to_owned();
    r.set_default(Reply {
        status: 503,
        headers: vec![],
        body: "maintenance".into(),
    });
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    post(&d, "acme", "evt_1", "payment").await;
    let dead = wait_for("dead", T, || async {
        deliveries(&d, "acme", &id, "dead").await.pop()
    })
    .await;
    let log = dead["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 4, "1 attempt + 3 retries: {dead}");
    assert_eq!(log[3]["status"], 503);
    assert_eq!(log[3]["response_excerpt"], "maintenance");
    assert_eq!(deliveries(&d, "acme", &id, "failed").await.len(), 1);
    r.set_default(reply(200));
    let (s, b) = d
        .admin(
            "POST",
            &format!("/v1/orgs/acme/webhooks/{id}/replay"),
            Some(json!({"since": since.to_rfc3339()})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["replayed"], 1);
    wait_for("delivered after replay", T, || async {
        deliveries(&d, "acme", &id, "delivered").await.pop()
    })
    .await;
    let seen = r.events();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0].header("webhook-id"), seen[4].header("webhook-id"));
    // Replay of one delivery by id works too.
    let did = dead["id"].as_str().unwrap();
    let (s, _) = d
        .admin(
            "POST",
            &format!("/v1/orgs/acme/webhooks/{id}/replay"),
            Some(json!({"delivery_id": did})),
        )
        .await;
    assert_eq!(s, 202);
    wait_for("delivered again", T, || async {
        (r.events().len() == 6).then_some(())
    })
    .await;
}

#[tokio::test]
async fn kill9_with_jobs_pending_loses_none() {
    let mut d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    // The receiver holds every request until the kill, so jobs are surely pending at it
    // (a slow delay alone is a guess: on a loaded machine posting is slower still).
    r.st.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let n = 40;
    for i in 0..n {
        post(&d, "acme", &format!("evt_{i}"), "payment").await;
    }
    d.kill9();
    let before = r.events().len();
    r.st.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    d.spawn().await;
    let got = wait_for(
        "all delivered after restart",
        Duration::from_secs(40),
        || async {
            let ids: HashSet<String> = r
                .events()
                .iter()
                .map(|s| s.json()["id"].as_str().unwrap().to_owned())
                .collect();
            (ids.len() == n).then_some(ids)
        },
    )
    .await;
    assert_eq!(got.len(), n);
    assert!(
        before < n,
        "some jobs were pending at the kill ({before} seen)"
    );
}

#[tokio::test]
async fn an_endpoint_that_never_answers_does_not_slow_another() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let (slow, fast) = (Receiver::start().await, Receiver::start().await);
    slow.st
        .hang
        .store(true, std::sync::atomic::Ordering::SeqCst);
    http_hook(&d, "acme", &slow.url("/slow"), &["*"], false).await;
    http_hook(&d, "acme", &fast.url("/fast"), &["*"], false).await;
    let n = 30;
    for i in 0..n {
        post(&d, "acme", &format!("evt_{i}"), "payment").await;
    }
    // Timed from the last post (posting speed is the machine's, not the scheduler's): waiting
    // behind the hanging endpoint would take its 15 s request timeout.
    let posted = Instant::now();
    wait_for(
        "fast endpoint got everything",
        Duration::from_secs(60),
        || async { (fast.events().len() == n).then_some(()) },
    )
    .await;
    assert!(
        posted.elapsed() < Duration::from_secs(10),
        "{:?}",
        posted.elapsed()
    );
    // The hanging one holds at most per_endpoint_concurrency (4) requests.
    assert!(slow.events().len() <= 4, "{}", slow.events().len());
}

// Multi-threaded: `terminate` blocks its thread while the receiver must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_attempt_under_way_finish_and_records_it() {
    let mut d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let h = http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    let id = h["id"].as_str().unwrap().to_owned();
    *r.st.delay.lock().unwrap() = Duration::from_millis(1500);
    post(&d, "acme", "evt_1", "payment").await;
    wait_for("attempt under way", T, || async {
        (!r.events().is_empty()).then_some(())
    })
    .await;
    assert_eq!(d.terminate(), Some(0), "clean exit: {}", d.log());
    // The outcome was recorded before exit: a restart does not deliver it again.
    *r.st.delay.lock().unwrap() = Duration::ZERO;
    d.spawn().await;
    let done = deliveries(&d, "acme", &id, "delivered").await;
    assert_eq!(done.len(), 1, "{done:?}\n{}", d.log());
    post(&d, "acme", "evt_2", "payment").await;
    wait_for("second event", T, || async {
        (r.events().len() == 2).then_some(())
    })
    .await;
    assert_eq!(r.events()[1].json()["id"], "evt_2");
}

/// Jobs already queued for a slow endpoint follow an admin change made while they wait:
/// once the webhook is disabled, no request is sent any more (the one under way finishes);
/// the queued jobs end dead, "webhook disabled", though each was taken with the webhook
/// enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_see_a_webhook_disabled_while_they_wait() {
    let d = Daemon::start_with_delivery(
        "allow_private_destinations = true\nper_endpoint_concurrency = 1\nrequest_timeout = \"20s\"",
    )
    .await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let hook = http_hook(&d, "acme", &r.url("/slow"), &["*"], false).await;
    let hook_id = hook["id"].as_str().unwrap();
    // One request at a time, each held 3 s: the other jobs wait in the queue.
    r.set_delay(Duration::from_secs(3));
    let n = 5;
    for i in 0..n {
        post(&d, "acme", &format!("evt_q{i}"), "payment").await;
    }
    wait_for("the first request", Duration::from_secs(20), || async {
        (!r.events().is_empty()).then_some(())
    })
    .await;
    let (s, b) = d
        .admin(
            "PATCH",
            &format!("/v1/orgs/acme/webhooks/{hook_id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let disabled = Instant::now();
    let (delivered, dead) = wait_for("every job ends", Duration::from_secs(60), || async {
        let delivered = deliveries(&d, "acme", hook_id, "delivered").await;
        let dead = deliveries(&d, "acme", hook_id, "dead").await;
        (delivered.len() + dead.len() == n).then_some((delivered, dead))
    })
    .await;
    let late = r.events().iter().filter(|s| s.at > disabled).count();
    assert_eq!(
        late, 0,
        "{late} requests were sent after the webhook was disabled"
    );
    assert_eq!(
        delivered.len(),
        r.events().len(),
        "what was sent is recorded as delivered"
    );
    assert!(
        !dead.is_empty(),
        "no job was still queued when the webhook was disabled: the test proves nothing"
    );
    for j in &dead {
        assert!(
            j.to_string().contains("webhook disabled"),
            "dead for another reason: {j}"
        );
    }
}
