//! The five connection tests an org admin starts from the UI:
//! `POST /v1/orgs/{org}/webhooks/{id}/test` `{"test": T}` → `{"ok", "status", "latency_ms", "detail"}`.
//!
//! * `http` hooks: a realistic sample envelope, signed exactly like a real delivery, POSTed
//!   to the hook's URL (`ping` uses the type `"ping"`). Not queued and not retried: the
//!   admin wants to see the endpoint's answer now. `status` is the HTTP status.
//! * `sftp` hooks: the sample is written as a file into the org folder through the spool
//!   (durably, like a real event); `ping` checks the org folder. `status` is null.
//! * `customValue` (either kind): a sample Custom Value Request to the org's custom-value
//!   endpoint, which must answer a JSON object.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::custom_values::{self, CvQuery};
use crate::event::Envelope;
use crate::ingress::admin::{find_hook, parse_body};
use crate::ingress::problem::{ApiResult, Problem};
use crate::spool::Committed;
use crate::store::{new_id, render_path_template, NewEvent, Webhook, WebhookKind};
use crate::App;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    test: String,
}

/// What a connection test found.
#[derive(Serialize)]
pub struct TestResult {
    pub ok: bool,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub detail: String,
}

/// The tests an admin can run, in the order the UI lists them.
pub const TESTS: [&str; 5] = [
    "ping",
    "inboundMessage",
    "deliveryReport",
    "payment",
    "customValue",
];

pub(super) async fn run_test(
    State(app): State<App>,
    Path((org, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<TestResult>> {
    let hook = find_hook(&app, &org, &id).await?;
    let req: TestRequest = parse_body(&body)?;
    Ok(Json(connection_test(&app, &hook, &req.test).await?))
}

/// Runs test `test` against `hook`: the one path of the admin API and the console.
pub async fn connection_test(app: &App, hook: &Webhook, test: &str) -> ApiResult<TestResult> {
    if !TESTS.contains(&test) {
        return Err(Problem::bad_request(format!(
            "test {test:?} is unknown; allowed: {}",
            TESTS.join(", ")
        )));
    }
    let started = Instant::now();
    let (ok, status, detail) = match (test, hook.kind) {
        ("customValue", _) => custom_value_test(app, &hook.org).await,
        (t, WebhookKind::Http) => http_test(app, hook, t).await,
        (t, WebhookKind::Sftp) => sftp_test(app, hook, t).await?,
    };
    let result = TestResult {
        ok,
        status,
        latency_ms: started.elapsed().as_millis() as u64,
        detail,
    };
    tracing::info!(org = %hook.org, webhook = %hook.id, test, ok, "connection test");
    Ok(result)
}

/// The body of a `ping`: the envelope shape with type `"ping"`.
pub(super) fn ping_envelope(org: &str, webhook_id: &str, id: &str) -> Vec<u8> {
    json!({
        "id": format!("evt_ping_{}", id.trim_start_matches("dlv_")),
        "type": "ping",
        "org": org,
        "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        "data": {"webhook_id": webhook_id, "message": "hookbridge endpoint check"},
    })
    .to_string()
    .into_bytes()
}

/// Sample `data` of each event type, shaped like what the platform sends.
fn sample_data(test: &str) -> Value {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let msg = new_id("msg_test");
    match test {
        "inboundMessage" => json!({
            "messageId": msg, "conversationId": "conv_test_1", "channelId": "+15550100",
            "customerId": "cus_test_1", "from": "+15550199", "text": "Hello! This is a hookbridge test message.",
            "receivedAt": now,
        }),
        "deliveryReport" => json!({
            "messageId": msg, "conversationId": "conv_test_1", "channelId": "+15550100",
            "status": "delivered", "statusAt": now, "errorCode": null,
        }),
        _ => json!({
            "paymentId": new_id("pay_test"), "conversationId": "conv_test_1", "customerId": "cus_test_1",
            "amount": 1999, "currency": "EUR", "status": "succeeded", "paidAt": now,
        }),
    }
}

fn sample_envelope(org: &str, test: &str) -> Result<Envelope, String> {
    let body = json!({
        "id": format!("evt_test_{}", ulid::Ulid::new()),
        "type": test,
        "data": sample_data(test),
    });
    Envelope::from_request(body.to_string().as_bytes(), org, Utc::now()).map_err(|e| e.to_string())
}

async fn http_test(app: &App, hook: &Webhook, test: &str) -> (bool, Option<u16>, String) {
    let Some(url) = hook.url.as_deref() else {
        return (false, None, "webhook has no url".into());
    };
    let id = new_id("dlv_test");
    let body = if test == "ping" {
        ping_envelope(&hook.org, &hook.id, &id)
    } else {
        match sample_envelope(&hook.org, test) {
            Ok(e) => e.to_json().into_bytes(),
            Err(e) => return (false, None, format!("cannot build the sample: {e}")),
        }
    };
    let ex = super::post_signed(app, &hook.org, url, hook.secret.as_deref(), &id, body).await;
    let mut detail = match (&ex.error, ex.status) {
        (Some(e), _) => e.to_string(),
        (None, Some(s)) if (200..300).contains(&s) => format!("the endpoint answered HTTP {s}"),
        (None, Some(s)) => format!("the endpoint answered HTTP {s}; a delivery needs 2xx"),
        (None, None) => "no answer".into(),
    };
    if ex.error.is_none() && !ex.status.is_some_and(|s| (200..300).contains(&s)) {
        if let Some(x) = ex.excerpt() {
            detail.push_str(&format!(": {}", x.chars().take(200).collect::<String>()));
        }
    }
    if !hook.enabled {
        detail.push_str(" (note: this webhook is disabled; real events are not sent)");
    }
    let ok = ex.error.is_none() && ex.status.is_some_and(|s| (200..300).contains(&s));
    (ok, ex.status, detail)
}

async fn sftp_test(
    app: &App,
    hook: &Webhook,
    test: &str,
) -> ApiResult<(bool, Option<u16>, String)> {
    if test == "ping" {
        return Ok(storage_ping(app, &hook.org).await);
    }
    let env = sample_envelope(&hook.org, test).map_err(|e| Problem::internal("sample", e))?;
    let path = render_path_template(hook.template(), &env);
    let new = NewEvent {
        org: hook.org.clone(),
        id: env.id.clone(),
        envelope_json: env.to_json(),
        files: vec![path.clone()],
        deliveries: Vec::new(),
        // An admin asked for this sample: it is not held back by the org quota.
        quota: None,
        kind: None,
        rollups: vec![],
        lines: vec![],
        accepted_at: None,
    };
    Ok(match app.spool.submit(new, Vec::new()).await {
        Ok(Committed::New(_)) | Ok(Committed::Known(_)) => {
            (true, None, format!("wrote the sample file {path}"))
        }
        Ok(Committed::Deferred(..)) => (false, None, "the org is over its quota".into()),
        Err(e) => (false, None, format!("could not write the sample file: {e}")),
    })
}

/// The SFTP hook's connection test: a probe file is written into the org folder through
/// the storage (durably, as an event file is), read back, compared and removed. It proves
/// the folder SFTP users see is writable and readable, on local disk or S3 alike.
async fn storage_ping(app: &App, org: &str) -> (bool, Option<u16>, String) {
    use crate::storage::{read_small, EventFile, OrgName, StoragePath};
    let Ok(org) = OrgName::new(org) else {
        return (false, None, "the org name cannot be a folder".into());
    };
    let name = format!(".hookbridge-ping-{}", ulid::Ulid::new());
    let Ok(path) = StoragePath::parse(&name) else {
        return (false, None, "internal error: probe name".into());
    };
    let body = bytes::Bytes::from(format!("hookbridge connection test {name}\n"));
    let file = EventFile {
        org: org.clone(),
        path: path.clone(),
        body: body.clone(),
    };
    let s = &app.storage;
    if let Some(Err(e)) = s.write_events(std::slice::from_ref(&file)).await.pop() {
        return (
            false,
            None,
            format!("could not write a file into the org folder: {e}"),
        );
    }
    let back = read_small(&**s, &org, &path, 4096).await;
    let removed = s.delete(&org, &path).await;
    match (back, removed) {
        (Ok(b), Ok(())) if b == body => (
            true,
            None,
            "wrote, read back and removed a file in the org folder; SFTP users see it as /".into(),
        ),
        (Ok(_), _) => (
            false,
            None,
            "the file read back differs from what was written".into(),
        ),
        (Err(e), _) => (
            false,
            None,
            format!("wrote a file but could not read it back: {e}"),
        ),
    }
}

async fn custom_value_test(app: &App, org: &str) -> (bool, Option<u16>, String) {
    let q = CvQuery {
        customer_id: "cus_test_1".into(),
        channel_id: "+15550100".into(),
        fields: vec!["balance".into(), "name".into()],
    };
    match custom_values::fetch(app, org, &q).await {
        Ok((status, values)) => (
            true,
            Some(status),
            format!(
                "the custom-value endpoint answered HTTP {status} with {}",
                Value::Object(values)
            ),
        ),
        Err(e) => (false, None, e.to_string()),
    }
}
