//! The delivery queue's types: a delivery and its attempts, the job the scheduler runs,
//! the claims and leases jobs are taken under, and an attempt's outcome.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Webhook;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Dead => "dead",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "failed" => Some(Self::Failed),
            "dead" => Some(Self::Dead),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub id: String,
    pub org: String,
    pub webhook_id: String,
    pub event_id: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempt_log: Vec<Attempt>,
}

/// One delivery attempt as the attempt log keeps it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub result: AttemptResult,
    pub latency_ms: u64,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

impl Attempt {
    /// The HTTP status the endpoint answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self.result {
            AttemptResult::Delivered { status } | AttemptResult::HttpError { status } => {
                Some(status)
            }
            AttemptResult::Transport(_) | AttemptResult::NotAttempted => None,
        }
    }
}

impl Serialize for Attempt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            at: DateTime<Utc>,
            outcome: &'static str,
            status: Option<u16>,
            latency_ms: u64,
            error: &'a Option<String>,
            response_excerpt: &'a Option<String>,
        }
        View {
            at: self.at,
            outcome: self.result.as_str(),
            status: self.status(),
            latency_ms: self.latency_ms,
            error: &self.error,
            response_excerpt: &self.response_excerpt,
        }
        .serialize(s)
    }
}

/// What one attempt did, as far as the endpoint is concerned. This, not the latency or
/// the lack of a status, says whether the endpoint was tried (and so whether it counts
/// toward `delivery.disable_after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The endpoint answered 2xx and the answer was read whole.
    Delivered { status: u16 },
    /// The endpoint answered, but not with a success (or the answer broke off).
    HttpError { status: u16 },
    /// The endpoint could not be reached or did not answer.
    Transport(TransportError),
    /// Nothing was sent: the webhook was deleted, disabled or has no URL.
    NotAttempted,
}

/// Why an attempt got no HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    Dns,
    /// The SSRF guard refused the destination.
    Forbidden,
    Tls,
    /// Refused, reset or unreachable.
    Connect,
    Timeout,
    Other,
}

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Delivered { .. } => "delivered",
            AttemptResult::HttpError { .. } => "http_error",
            AttemptResult::Transport(t) => match t {
                TransportError::Dns => "dns_error",
                TransportError::Forbidden => "forbidden",
                TransportError::Tls => "tls_error",
                TransportError::Connect => "connect_error",
                TransportError::Timeout => "timeout",
                TransportError::Other => "transport_error",
            },
            AttemptResult::NotAttempted => "not_attempted",
        }
    }

    /// The inverse of [`as_str`](Self::as_str) plus the stored status; `None` for a value
    /// this version does not know (a corrupt row).
    pub fn parse(s: &str, status: Option<u16>) -> Option<Self> {
        let t = |t| Some(AttemptResult::Transport(t));
        match (s, status) {
            ("delivered", Some(status)) => Some(AttemptResult::Delivered { status }),
            ("http_error", Some(status)) => Some(AttemptResult::HttpError { status }),
            ("dns_error", None) => t(TransportError::Dns),
            ("forbidden", None) => t(TransportError::Forbidden),
            ("tls_error", None) => t(TransportError::Tls),
            ("connect_error", None) => t(TransportError::Connect),
            ("timeout", None) => t(TransportError::Timeout),
            ("transport_error", None) => t(TransportError::Other),
            ("not_attempted", None) => Some(AttemptResult::NotAttempted),
            _ => None,
        }
    }
}

/// A job handed to a delivery worker.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub id: String,
    pub org: String,
    pub webhook_id: String,
    pub event_id: String,
    pub payload: String,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    /// The webhook as it was when the job was taken (None: deleted since).
    pub webhook: Option<Webhook>,
    /// The lease this job was taken under (PostgreSQL, when `Busy::lease` asked for one);
    /// its outcome is recorded only while the job still carries this claim.
    pub claim: Option<ClaimId>,
    /// The claim whose lease had expired when this one took the job (a node died or
    /// stalled with it), so the scheduler can say whose job it took over.
    pub took_over: Option<ClaimId>,
}

/// One claim of due jobs by one node (`<node_id>/<ULID>`), so a stale worker whose lease
/// expired and was taken over cannot overwrite the newer claimer's outcome, and a node can
/// hand back every lease it holds by its id (at a clean stop, and at start for those its
/// previous run died with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimId(pub String);

impl ClaimId {
    pub fn new(node: &str) -> Self {
        ClaimId(format!("{}{}", Self::node_prefix(node), ulid::Ulid::new()))
    }

    /// What every claim of `node` starts with.
    pub fn node_prefix(node: &str) -> String {
        format!("{node}/")
    }
}

/// A lease on claimed jobs: who takes it and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The claiming node's id (`node_id`): unique per node.
    pub node: String,
    pub length: std::time::Duration,
}

/// Jobs the scheduler must not be handed: in flight, or for a webhook at its concurrency limit.
#[derive(Debug, Clone, Default)]
pub struct Busy {
    pub deliveries: Vec<String>,
    pub webhooks: Vec<String>,
    /// Take the jobs handed out under a lease this long (None: only look). On PostgreSQL,
    /// where several nodes share the queue, a leased job is not handed to anyone else until
    /// the lease expires (then it is claimable again: a dead node's jobs are taken over).
    /// SQLite ignores it: one process owns the file and `deliveries` is the claim.
    pub lease: Option<Lease>,
}

impl Busy {
    /// JSON arrays, so SQL can filter with `json_each` whatever the list length.
    pub fn to_json(&self) -> (String, String) {
        (
            serde_json::to_string(&self.deliveries).unwrap_or_else(|_| "[]".into()),
            serde_json::to_string(&self.webhooks).unwrap_or_else(|_| "[]".into()),
        )
    }
}

/// How an attempt ended, decided by the delivery worker.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Delivered,
    Retry {
        at: DateTime<Utc>,
    },
    Dead,
    /// The endpoint said 410 Gone: the job is dead and its webhook disabled.
    DisableWebhook {
        reason: String,
    },
}
