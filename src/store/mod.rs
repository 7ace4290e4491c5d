//! State: orgs, SFTP users, webhooks, processed events (idempotency) and delivery jobs.
//! One trait so that a PostgreSQL implementation can sit beside SQLite.

#[cfg(test)]
mod conformance;
pub mod health;
mod jobs;
mod names;
mod postgres;
mod rows;
mod rules;
mod sqlite;
#[cfg(test)]
pub(crate) mod usage_cases;

/// A SQLite store for the library's own tests (the module itself stays private).
#[cfg(test)]
pub(crate) fn sqlite_for_tests(
    path: &std::path::Path,
    secrets: std::sync::Arc<crate::secrets::SecretBox>,
) -> Result<sqlite::SqliteStore> {
    sqlite::SqliteStore::open(path, secrets)
}

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::event::EventType;

pub use jobs::{
    Attempt, AttemptOutcome, AttemptResult, Busy, ClaimId, Delivery, DeliveryJob, DeliveryStatus,
    Lease, TransportError,
};
pub use names::{
    new_id, render_path_template, validate_name, validate_path_template, validate_url,
    DEFAULT_PATH_TEMPLATE, MAX_NAME_LEN,
};
pub use postgres::PostgresStore;
pub use rules::{failing_since_on_put, DELETED_WEBHOOK_ERROR, DELETED_WEBHOOK_JOB_STATE};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("disk full")]
    DiskFull,
    #[error("database: {0}")]
    Db(String),
    /// The database cannot be reached now (a shared store down or restarting): callers
    /// answer 503 and retry, nothing acknowledged is lost.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The schema was migrated by a newer hookbridge; this binary refuses to run on it.
    #[error("the state schema is at version {found}, newer than this binary knows ({known}); run the newer hookbridge or restore a backup")]
    SchemaTooNew { found: i64, known: i64 },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return StoreError::DiskFull;
            }
        }
        StoreError::Db(e.to_string())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize)]
pub struct Org {
    /// The key used in paths and SFTP folders.
    pub id: String,
    /// Display name; defaults to the id.
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// Overrides of the `[limits]` defaults.
    pub limits: crate::config::OrgLimits,
}

#[derive(Debug, Clone, Serialize)]
pub struct SftpUser {
    pub org: String,
    pub name: String,
    #[serde(skip)]
    pub password_hash: Option<String>,
    pub has_password: bool,
    pub public_keys: Vec<String>,
    pub upload: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookKind {
    Sftp,
    Http,
}

impl WebhookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::Sftp => "sftp",
            WebhookKind::Http => "http",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sftp" => Some(WebhookKind::Sftp),
            "http" => Some(WebhookKind::Http),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Webhook {
    pub id: String,
    pub org: String,
    pub kind: WebhookKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub events: Vec<EventType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_template: Option<String>,
    #[serde(skip)]
    pub secret: Option<String>,
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Set at the first failed attempt after a success; a webhook failing for
    /// `delivery.disable_after` is disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
    /// `sftp` only: one file per event (`json`) or roll-ups (`ndjson.gz`).
    pub format: crate::rollups::Format,
    /// Set exactly when `format` is `ndjson.gz`: `rollup`, `close_after`, `max_part_bytes`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rollup: Option<crate::rollups::RollupSpec>,
}

impl Webhook {
    pub fn subscribed(&self, t: EventType) -> bool {
        self.enabled && self.events.contains(&t)
    }
    pub fn template(&self) -> &str {
        self.path_template
            .as_deref()
            .unwrap_or(DEFAULT_PATH_TEMPLATE)
    }
}

/// An event ready to commit: its envelope, the files it becomes and the deliveries it needs.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub org: String,
    pub id: String,
    pub envelope_json: String,
    /// Paths inside the org folder, starting with `/`.
    pub files: Vec<String>,
    /// `(delivery id, webhook id)` for every subscribed http webhook.
    pub deliveries: Vec<(String, String)>,
    /// The org's quota: the store charges the event's files to the org's usage in the
    /// commit transaction, or records the event with its files deferred when they do not
    /// fit. `None` charges without a limit (start-up repair, tests).
    pub quota: Option<crate::limits::Quota>,
    /// The event's type and the roll-up hooks it goes to (set by the request handler).
    pub kind: Option<crate::event::EventType>,
    pub rollups: Vec<crate::rollups::Target>,
    /// Lines to stage with the event, in the same transaction; computed by the committer
    /// from `rollups` and the batch's accept time. Staged only when the event is new.
    pub lines: Vec<crate::rollups::StagedLine>,
    /// The accept time the committer stamped (the roll-up partition clock).
    pub accepted_at: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// What the event's files add to the org's usage: (files, bytes).
    pub fn usage(&self) -> (u64, u64) {
        file_usage(self.files.len(), self.envelope_json.len())
    }
}

/// Every file of an event holds its envelope and a newline.
pub fn file_usage(files: usize, envelope_len: usize) -> (u64, u64) {
    let files = files as u64;
    (files, files * (envelope_len as u64 + 1))
}

/// What `POST …/events` answers; stored so that a repost answers the same.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct IngestResult {
    pub id: String,
    pub files: Vec<String>,
    pub deliveries: Vec<String>,
}

/// What `commit_and_claim` recorded.
#[derive(Debug, Clone, Default)]
pub struct CommitClaim {
    /// One per event of the batch, in order.
    pub outcomes: Vec<CommitOutcome>,
    /// The delivery jobs the transaction inserted (of new events, deferred ones included).
    pub inserted: Vec<String>,
    /// The claim those jobs were inserted under, when a lease was asked for.
    pub claim: Option<ClaimId>,
}

#[derive(Debug, Clone)]
pub enum CommitOutcome {
    /// First time this id is seen: files must now be written.
    New(IngestResult),
    /// Known id: nothing to write, unless an earlier attempt recorded the event but could
    /// not finish its files (disk full, over quota): then `pending_envelope` holds the
    /// envelope as first recorded, to write to `result.files`.
    Known {
        result: IngestResult,
        pending_envelope: Option<String>,
    },
    /// Recorded (new, or known and still deferred) but its files do not fit the org's
    /// quota: nothing to write; `why` says what is full.
    Deferred { result: IngestResult, why: String },
}

/// A pending event whose files may not be on disk yet (start-up recovery).
#[derive(Debug, Clone)]
pub struct PendingFiles {
    pub org: String,
    pub id: String,
    pub envelope_json: String,
    pub files: Vec<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Orgs
    async fn put_org(&self, id: &str, name: &str) -> Result<(Org, bool)>;
    async fn get_org(&self, name: &str) -> Result<Option<Org>>;
    async fn list_orgs(&self) -> Result<Vec<Org>>;
    async fn set_org_limits(&self, name: &str, limits: &crate::config::OrgLimits) -> Result<bool>;
    async fn delete_org(&self, name: &str) -> Result<bool>;

    // SFTP users (names are unique across orgs: SSH logins carry only the user name)
    async fn put_sftp_user(&self, user: &SftpUser) -> Result<bool>;
    async fn get_sftp_user(&self, name: &str) -> Result<Option<SftpUser>>;
    async fn list_sftp_users(&self, org: &str) -> Result<Vec<SftpUser>>;
    async fn delete_sftp_user(&self, org: &str, name: &str) -> Result<bool>;

    // Webhooks
    async fn put_webhook(&self, hook: &Webhook) -> Result<()>;
    async fn get_webhook(&self, org: &str, id: &str) -> Result<Option<Webhook>>;
    async fn list_webhooks(&self, org: &str) -> Result<Vec<Webhook>>;
    async fn delete_webhook(&self, org: &str, id: &str) -> Result<bool>;

    // Custom value endpoint
    async fn put_custom_value_endpoint(&self, org: &str, url: &str) -> Result<()>;
    async fn get_custom_value_endpoint(&self, org: &str) -> Result<Option<String>>;

    // Ingest (one durable transaction per group commit)
    /// Records a batch of events, their delivery jobs and staged lines in one durable
    /// transaction. With `lease`, the jobs it inserts are claimed by that node in the same
    /// transaction (the claim `due_jobs` takes, so no other node is handed them while the
    /// lease runs): the committer hands them to its own scheduler directly, and they never
    /// wait for a poll or a claim round trip. SQLite ignores the lease (one process owns
    /// the file; the scheduler's in-flight set is the claim).
    async fn commit_and_claim(
        &self,
        batch: Vec<NewEvent>,
        files_done: Vec<(String, String)>,
        lease: Option<Lease>,
    ) -> Result<CommitClaim>;
    /// `commit_and_claim` without a lease: the jobs stay due for any scheduler's poll.
    async fn commit_events(
        &self,
        batch: Vec<NewEvent>,
        files_done: Vec<(String, String)>,
    ) -> Result<Vec<CommitOutcome>> {
        Ok(self
            .commit_and_claim(batch, files_done, None)
            .await?
            .outcomes)
    }
    async fn mark_files_done(&self, done: Vec<(String, String)>) -> Result<()>;
    /// Events whose files are charged but not marked written (crash, storage outage),
    /// without paths recorded as taken; deferred events wait for their repost.
    async fn pending_files(&self) -> Result<Vec<PendingFiles>>;

    // Delivery queue
    /// Due jobs, oldest first, leaving out the ones `busy` names.
    async fn due_jobs(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        busy: Busy,
    ) -> Result<Vec<DeliveryJob>>;
    /// Hands back jobs `claim` holds that the scheduler will not send soon (handed over
    /// while their webhook's queue was deep, or their lease got too short while they
    /// waited), so any node's poll takes them when due instead of when the lease expires.
    /// Returns how many. SQLite: 0.
    async fn release_claims(&self, claim: &ClaimId, ids: Vec<String>) -> Result<u64>;
    /// When the next job outside `busy` is due (may be in the past).
    async fn next_due_at(&self, busy: Busy) -> Result<Option<DateTime<Utc>>>;
    /// Records attempts and their outcomes in one durable transaction (group commit).
    /// Shared, not owned: the recorder keeps the batch to try again if the commit fails,
    /// and would otherwise clone every record (ids, errors, response excerpts) per try.
    async fn record_attempts(&self, batch: std::sync::Arc<[health::AttemptRecord]>) -> Result<()>;
    async fn list_deliveries(
        &self,
        org: &str,
        webhook_id: &str,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> Result<Vec<Delivery>>;
    async fn replay(
        &self,
        org: &str,
        webhook_id: &str,
        delivery_id: Option<&str>,
        since: Option<DateTime<Utc>>,
    ) -> Result<u64>;
    async fn queue_stats(&self) -> Result<(u64, Option<DateTime<Utc>>)>;

    // Downloads: retention keeps what no one downloaded, on any storage, without atime.
    /// Records that these files (org, `/virtual/path`) were downloaded.
    async fn record_downloads(&self, files: Vec<(String, String)>) -> Result<()>;
    /// The downloaded files of an org still recorded.
    async fn downloaded(&self, org: &str) -> Result<std::collections::HashSet<String>>;
    /// Forgets files that are gone (deleted, swept).
    async fn forget_downloads(&self, org: &str, paths: Vec<String>) -> Result<()>;
    /// A rename moves the records of the file, or of everything under a folder.
    async fn move_downloads(&self, org: &str, from: &str, to: &str) -> Result<()>;

    // ---- Org folder usage, counted in the store (issue 11 item 4) ----
    // Event files are charged by `commit_events` itself (atomically with the quota check);
    // everything else that adds or removes files reports it here, so that every node
    // sharing the store sees one count.
    /// The org's counted usage; `None` when nothing was counted yet (rebuild it from a
    /// listing with `set_org_usage`).
    async fn org_usage(&self, org: &str) -> Result<Option<crate::limits::OrgUsage>>;
    /// Sets the count from a listing: `replace` overwrites it; otherwise only an org with
    /// no count yet takes it (a node starting while another commits keeps the live count).
    async fn set_org_usage(
        &self,
        org: &str,
        usage: crate::limits::OrgUsage,
        replace: bool,
    ) -> Result<()>;
    /// Files that came (+) or went (-) outside event commits: uploads, deletes, renames
    /// over a file, retention. Never below zero.
    async fn add_org_usage(&self, org: &str, files: i64, bytes: i64) -> Result<()>;
    /// A user is about to remove (delete, or rename away) the file at `/path`: if an event
    /// still pending lists it, the path is recorded as taken so that no repair writes it
    /// again. Called BEFORE the object goes; `pending_files` leaves taken paths out.
    async fn record_taken(&self, org: &str, path: &str) -> Result<()>;
    /// Which of `paths` (`/virtual/path`) are recorded as taken in `org`: a repair that
    /// re-created one of them (it read the pending list before the take) removes it again.
    async fn taken_paths(&self, org: &str, paths: Vec<String>) -> Result<Vec<String>>;

    // Roll-ups (see `crate::rollups`). Lines are staged by `commit_events` from
    // `NewEvent::lines`, in the transaction that records the event.
    /// Partitions with staged lines whose close time is at or before `now` and that no one
    /// holds a live lease on; at most `limit`, earliest close first.
    async fn due_partitions(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<PartitionRef>>;
    /// Takes the lease on `p` for `node` until `until` if no one else holds a live one (a
    /// shared store makes this one atomic conditional update, so only one node closes a
    /// partition). The node is kept with the lease so that `release_node_claims` can hand
    /// it back when that node stops cleanly or restarts.
    async fn claim_partition(
        &self,
        p: &PartitionRef,
        node: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool>;
    /// Every line of `p` (open, and kept from an earlier close) in accept order.
    async fn partition_lines(&self, p: &PartitionRef) -> Result<Vec<StagedRow>>;
    /// After its files are all written: records `p` as closed (events, bytes), marks its
    /// lines up to `through_seq` closed (kept for rebuilds) and drops its lease, in one
    /// transaction.
    async fn close_partition(
        &self,
        p: &PartitionRef,
        through_seq: i64,
        events: u64,
        bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<()>;
    /// Staged lines waiting, and the earliest close time among them (lag).
    async fn rollup_backlog(&self) -> Result<(u64, Option<DateTime<Utc>>)>;

    // Nodes: what several hookbridge nodes on one store share (health, bans, repair,
    // keys). SQLite implements them too, so one node behaves as a service of one.

    /// A cheap round trip to the store, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Hands back the leases held under `node`'s claims, on delivery jobs and on roll-up
    /// partitions (at a clean stop, or at start: its previous run died with them in hand):
    /// they are due again at once, for every node (wakes them), instead of when the leases
    /// expire. Returns how many. SQLite, which one process owns, drops every lease when it
    /// opens the file: 0.
    async fn release_node_claims(&self, node: &str) -> Result<u64>;
    /// Records a ban of `ban.ip`; an existing ban of the address keeps the later end.
    async fn put_ban(&self, ban: &Ban) -> Result<()>;
    /// Bans still running at `now` (expired ones are dropped as a side effect).
    async fn active_bans(&self, now: DateTime<Utc>) -> Result<Vec<Ban>>;

    // Shared secrets: keys every node must serve alike (SSH host key, webhook signing
    // keys, generated tokens). Values are stored as given: `crate::identity` seals them
    // with `store.secrets_key` before they get here.

    /// Stores `value` under `name` unless a value is there; returns the one that won.
    async fn shared_secret_init(&self, name: &str, value: &str) -> Result<SharedSecret>;
    async fn shared_secret_get(&self, name: &str) -> Result<Option<SharedSecret>>;
    /// Replaces the value (a rotation) if it is still at `version`; the version goes up by
    /// one. `None` when another writer got there first (or there is no value): the caller
    /// reads the new value and decides again, so two concurrent rotations lose nothing.
    async fn shared_secret_replace(
        &self,
        name: &str,
        version: i64,
        value: &str,
    ) -> Result<Option<SharedSecret>>;

    // ---- Wake-ups across nodes (issue 12 item 3) ----

    /// Wake-ups from other processes sharing this store: each message means "delivery jobs
    /// were committed or made due elsewhere; look at the outbox now". This process's own
    /// commits are not echoed (they reach its scheduler by the direct hand-off). A store
    /// that one process owns (SQLite) has none: `None`. Called once, by the scheduler; the
    /// signal stops when the receiver is dropped. Polling stays the fallback either way.
    fn job_wakeups(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        None
    }

    // ---- Roll-up rebuilds (issue 14 item 5) ----
    // A closed partition's lines stay in the store (marked closed) for as long as the org
    // keeps its files, so that a replay can rebuild it from the very same lines.
    /// Reopens every closed partition of `hook` that holds a line accepted in
    /// `[from, until)`, whole: its lines are due again at `now` and the closer rebuilds it.
    /// Returns the partitions reopened (a partition still open or being closed is left
    /// to that close).
    async fn reopen_partitions(
        &self,
        org: &str,
        hook: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>>;
    /// Drops the kept lines of closed partitions of `org` accepted before `before`
    /// (retention: their files are past it too). Returns how many.
    async fn prune_rollup_lines(&self, org: &str, before: DateTime<Utc>) -> Result<u64>;
}

/// A source address refused by the SFTP defender until `until`, on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub ip: std::net::IpAddr,
    pub until: DateTime<Utc>,
    pub reason: String,
    /// The node that banned it.
    pub node: String,
}

/// A secret shared by the nodes; `version` goes up at each rotation, so a node can tell
/// that its copy is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSecret {
    pub value: String,
    pub version: i64,
}

/// One roll-up partition of one hook: `partition` is its folder under `/rollups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRef {
    pub org: String,
    pub hook: String,
    pub partition: String,
}

#[derive(Debug, Clone)]
pub struct StagedRow {
    pub seq: i64,
    pub accepted_at: DateTime<Utc>,
    pub envelope: String,
    /// The line was in a partition closed before (a rebuild, or a line that came after
    /// its partition closed): the partition's earlier files were counted in the usage.
    pub closed_before: bool,
}
