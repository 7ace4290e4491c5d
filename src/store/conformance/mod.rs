//! The store contract, written once against `Arc<dyn Store>` and run on every backend
//! (the `suite!` macro instantiates each case per backend, as garage's `db/test.rs` does).
//! A backend passes when it behaves as the rest of hookbridge relies on: idempotent
//! ingest, the delivery queue's due/busy rules, attempts and webhook health, the log,
//! replays and the download records.

use std::sync::Arc;

use chrono::{Duration, Utc};

use super::health::AttemptRecord;
use super::*;
use crate::event::EventType;
use crate::secrets::SecretBox;

mod handoff;
mod nodes;
mod queue;
use handoff::*;
use nodes::*;
mod rollups;
use queue::*;
mod wakeups;
use rollups::{
    a_node_releases_only_its_own_partition_leases, rollup_claims_and_closes,
    rollup_reopen_and_prune,
};

type S = Arc<dyn Store>;

/// A store on a fresh database, and what must live as long as it (its folder).
pub(super) struct Backend {
    pub store: S,
    _keep: Box<dyn std::any::Any + Send>,
    /// A database made for this test, dropped after it (PostgreSQL).
    drop_db: Option<(String, String)>,
}

impl Backend {
    async fn done(self) {
        let Backend { store, drop_db, .. } = self;
        drop(store);
        if let Some((admin, db)) = drop_db {
            drop_database(&admin, &db).await;
        }
    }
}

/// Drops a test's database; a failure is said on stderr (the test itself passed).
async fn drop_database(admin: &str, db: &str) {
    let dropped = match tokio_postgres::connect(admin, tokio_postgres::NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = dropped {
        eprintln!("test database {db} left on the server: {e}");
    }
}

fn secrets() -> Arc<SecretBox> {
    // A fixed test key: the cases check that secrets round-trip, not the key handling.
    Arc::new(SecretBox::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap())
}

pub(super) async fn sqlite() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("state.db"), secrets()).unwrap();
    Some(Backend {
        store: Arc::new(store),
        _keep: Box::new(dir),
        drop_db: None,
    })
}

/// A fresh database on the PostgreSQL named by `HOOKBRIDGE_TEST_PG_URL` (an admin URL),
/// or `None` (the case is skipped, said aloud) when it is unset outside CI.
pub(crate) async fn fresh_pg_database() -> Option<(String, String, String)> {
    let Ok(admin) = std::env::var("HOOKBRIDGE_TEST_PG_URL") else {
        assert!(
            !matches!(std::env::var("CI").as_deref(), Ok("true" | "1")),
            "HOOKBRIDGE_TEST_PG_URL is not set: the PostgreSQL store cannot be tested"
        );
        eprintln!("skipped: HOOKBRIDGE_TEST_PG_URL is not set (PostgreSQL half of the store conformance suite)");
        return None;
    };
    let db = format!("hb_{}", ulid::Ulid::new().to_string().to_lowercase());
    let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("connect to HOOKBRIDGE_TEST_PG_URL");
    tokio::spawn(conn);
    c.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let mut cfg: tokio_postgres::Config = admin.parse().unwrap();
    cfg.dbname(&db);
    let url = pg_url(&cfg);
    Some((admin, db, url))
}

/// A `postgres://` URL for `cfg` (host, port, user and database only: the tests use trust).
fn pg_url(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let pw = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "postgres://{user}{pw}@{host}:{port}/{}",
        cfg.get_dbname().unwrap_or("postgres")
    )
}

pub(super) async fn postgres() -> Option<Backend> {
    let (admin, db, url) = fresh_pg_database().await?;
    let store = PostgresStore::open(&url, secrets()).await.unwrap();
    Some(Backend {
        store: Arc::new(store),
        _keep: Box::new(()),
        drop_db: Some((admin, db)),
    })
}

macro_rules! suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(b) = super::$backend().await else { return };
                    super::$case(b.store.clone()).await;
                    b.done().await;
                }
            )*
        }
    };
}

/// Every backend runs these cases; `$extra` are the ones only that backend can (leases on
/// a queue shared by several nodes).
macro_rules! with_shared_cases {
    ($backend:ident: $($extra:ident),* $(,)?) => {
        suite!($backend:
            orgs,
            sftp_users,
            webhooks,
            deleting_a_webhook_kills_its_open_jobs,
            reenabling_a_webhook_heals_it,
            custom_value_endpoint,
            ingest_is_idempotent,
            pending_files_until_done,
            deferred_files_stay_pending,
            due_jobs_and_busy,
            a_commit_names_the_jobs_it_inserted,
            attempts_and_health,
            list_deliveries_filters,
            replay_resets_jobs,
            queue_stats_counts_open_jobs,
            downloads,
            deleting_an_org_forgets_its_events,
            usage_quota_and_taken_paths,
            rollup_claims_and_closes,
            rollup_reopen_and_prune,
            ping_answers,
            bans_keep_the_later_end_and_expire,
            shared_secrets_first_writer_wins_and_rotations_count,
            $($extra,)*
        );
    };
}

with_shared_cases!(sqlite:);

with_shared_cases!(postgres:
    jobs_claimed_at_commit_are_held_until_recorded_or_released,
    commit_claims_are_released_with_the_node,
    concurrent_claimers_never_share_a_job,
    an_expired_lease_is_claimable_again,
    a_stale_claim_cannot_record,
    a_node_releases_only_its_own_leases,
    a_node_releases_only_its_own_partition_leases,
);

#[tokio::test]
async fn postgres_refuses_a_newer_schema() {
    let Some((admin, db, url)) = fresh_pg_database().await else {
        return;
    };
    let b = postgres_at(&url).await;
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ahead = super::postgres::known_migrations() + 1;
    c.execute("UPDATE schema_version SET version = $1", &[&ahead])
        .await
        .unwrap();
    drop(c);
    match PostgresStore::open(&url, secrets()).await {
        Err(StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (ahead, ahead - 1))
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
    drop(b);
    drop_database(&admin, &db).await;
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path, secrets()).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    c.pragma_update(None, "user_version", v + 1).unwrap();
    drop(c);
    match SqliteStore::open(&path, secrets()) {
        Err(StoreError::SchemaTooNew { found, known }) => assert_eq!((found, known), (v + 1, v)),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

async fn postgres_at(url: &str) -> PostgresStore {
    PostgresStore::open(url, secrets())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Usage counters, quota charged in the commit, taken paths (`usage_cases`).
async fn usage_quota_and_taken_paths(s: S) {
    super::usage_cases::run(&*s).await;
}

// ---------- helpers ----------

pub(super) async fn org(s: &S, name: &str) {
    s.put_org(name, name).await.unwrap();
}

pub(super) fn http_hook(org: &str, id: &str) -> Webhook {
    Webhook {
        id: id.into(),
        org: org.into(),
        kind: WebhookKind::Http,
        url: Some("https://example.test/hook".into()),
        events: vec![EventType::InboundMessage],
        path_template: None,
        secret: Some("whsec_test".into()),
        enabled: true,
        disabled_reason: None,
        created_at: Utc::now(),
        failing_since: None,
        format: crate::rollups::Format::Json,
        rollup: None,
    }
}

pub(super) fn event(org: &str, id: &str, files: &[&str], deliveries: &[(&str, &str)]) -> NewEvent {
    NewEvent {
        org: org.into(),
        id: id.into(),
        envelope_json: format!(r#"{{"id":"{id}"}}"#),
        files: files.iter().map(|f| f.to_string()).collect(),
        deliveries: deliveries
            .iter()
            .map(|(d, w)| (d.to_string(), w.to_string()))
            .collect(),
        quota: None,
        ..Default::default()
    }
}

/// An org with one http webhook `wh` and `n` committed events, each with one job `d{i}`.
pub(super) async fn with_jobs(s: &S, n: usize) {
    org(s, "acme").await;
    s.put_webhook(&http_hook("acme", "wh")).await.unwrap();
    let batch = (0..n)
        .map(|i| event("acme", &format!("e{i}"), &[], &[(&format!("d{i}"), "wh")]))
        .collect();
    s.commit_events(batch, vec![]).await.unwrap();
}

pub(super) fn ids(jobs: &[DeliveryJob]) -> Vec<String> {
    let mut v: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    v.sort();
    v
}

pub(super) async fn due(s: &S) -> Vec<DeliveryJob> {
    s.due_jobs(Utc::now(), 100, Busy::default()).await.unwrap()
}

pub(super) fn attempt(result: AttemptResult) -> Attempt {
    Attempt {
        at: Utc::now(),
        result,
        latency_ms: 5,
        error: match result {
            AttemptResult::Delivered { .. } => None,
            _ => Some("boom".into()),
        },
        response_excerpt: None,
    }
}

pub(super) async fn record(
    s: &S,
    job: &DeliveryJob,
    result: AttemptResult,
    outcome: AttemptOutcome,
) {
    let rec = AttemptRecord::new(job.clone(), attempt(result), outcome);
    s.record_attempts(vec![rec].into()).await.unwrap();
}

pub(super) async fn delivery(s: &S, id: &str) -> Delivery {
    s.list_deliveries("acme", "wh", None, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("delivery {id} not listed"))
}

// ---------- cases ----------

async fn orgs(s: S) {
    let (o, created) = s.put_org("acme", "Acme").await.unwrap();
    assert!(created);
    assert_eq!((o.id.as_str(), o.name.as_str()), ("acme", "Acme"));
    let (o, created) = s.put_org("acme", "Acme Inc").await.unwrap();
    assert!(!created, "a second put updates");
    assert_eq!(o.name, "Acme Inc");
    org(&s, "beta").await;
    let names: Vec<_> = s
        .list_orgs()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(names, ["acme", "beta"]);
    assert!(s.get_org("nope").await.unwrap().is_none());

    let limits = crate::config::OrgLimits {
        quota_files: Some(10),
        ..Default::default()
    };
    assert!(s.set_org_limits("acme", &limits).await.unwrap());
    assert!(!s.set_org_limits("nope", &limits).await.unwrap());
    let got = s.get_org("acme").await.unwrap().unwrap();
    assert_eq!(got.limits.quota_files, Some(10));

    assert!(s.delete_org("beta").await.unwrap());
    assert!(!s.delete_org("beta").await.unwrap());
    assert!(s.get_org("beta").await.unwrap().is_none());
}

async fn sftp_users(s: S) {
    org(&s, "acme").await;
    org(&s, "beta").await;
    let mut u = SftpUser {
        org: "acme".into(),
        name: "alice".into(),
        password_hash: Some("$argon2id$x".into()),
        has_password: true,
        public_keys: vec!["ssh-ed25519 AAAA".into()],
        upload: false,
    };
    assert!(s.put_sftp_user(&u).await.unwrap(), "created");
    u.upload = true;
    u.password_hash = None;
    assert!(!s.put_sftp_user(&u).await.unwrap(), "updated");
    let got = s.get_sftp_user("alice").await.unwrap().unwrap();
    assert!(got.upload && !got.has_password && got.password_hash.is_none());
    assert_eq!(got.public_keys, ["ssh-ed25519 AAAA"]);

    let mut other = u.clone();
    other.org = "beta".into();
    assert!(matches!(
        s.put_sftp_user(&other).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.list_sftp_users("acme").await.unwrap().len(), 1);
    assert!(s.list_sftp_users("beta").await.unwrap().is_empty());
    assert!(!s.delete_sftp_user("beta", "alice").await.unwrap());
    assert!(s.delete_sftp_user("acme", "alice").await.unwrap());
    assert!(s.get_sftp_user("alice").await.unwrap().is_none());
}

async fn webhooks(s: S) {
    org(&s, "acme").await;
    org(&s, "beta").await;
    let mut h = http_hook("acme", "wh");
    s.put_webhook(&h).await.unwrap();
    let got = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert_eq!(
        got.secret.as_deref(),
        Some("whsec_test"),
        "secret round-trips"
    );
    assert_eq!(got.kind, WebhookKind::Http);
    assert_eq!(got.events, [EventType::InboundMessage]);
    assert!(s.get_webhook("beta", "wh").await.unwrap().is_none());

    h.url = Some("https://example.test/other".into());
    s.put_webhook(&h).await.unwrap();
    let got = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert_eq!(got.url.as_deref(), Some("https://example.test/other"));

    let mut stolen = h.clone();
    stolen.org = "beta".into();
    assert!(matches!(
        s.put_webhook(&stolen).await,
        Err(StoreError::Conflict(_))
    ));

    let mut sftp = http_hook("acme", "files");
    sftp.kind = WebhookKind::Sftp;
    sftp.url = None;
    sftp.secret = None;
    sftp.path_template = Some("/x/{id}.json".into());
    s.put_webhook(&sftp).await.unwrap();
    let list = s.list_webhooks("acme").await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(s.delete_webhook("acme", "files").await.unwrap());
    assert!(!s.delete_webhook("acme", "files").await.unwrap());
    assert_eq!(s.list_webhooks("acme").await.unwrap().len(), 1);
}

async fn deleting_a_webhook_kills_its_open_jobs(s: S) {
    with_jobs(&s, 2).await;
    let jobs = due(&s).await;
    let d0 = jobs.iter().find(|j| j.id == "d0").unwrap();
    record(
        &s,
        d0,
        AttemptResult::Delivered { status: 200 },
        AttemptOutcome::Delivered,
    )
    .await;
    assert!(s.delete_webhook("acme", "wh").await.unwrap());
    assert!(
        due(&s).await.is_empty(),
        "no job of a deleted webhook is due"
    );
    assert_eq!(s.queue_stats().await.unwrap().0, 0);
    let d1 = delivery(&s, "d1").await;
    assert_eq!(d1.status, DELETED_WEBHOOK_JOB_STATE);
    assert_eq!(d1.last_error.as_deref(), Some(DELETED_WEBHOOK_ERROR));
    assert_eq!(delivery(&s, "d0").await.status, DeliveryStatus::Delivered);
}

async fn reenabling_a_webhook_heals_it(s: S) {
    with_jobs(&s, 1).await;
    let job = due(&s).await.remove(0);
    let retry = AttemptOutcome::Retry {
        at: Utc::now() + Duration::hours(1),
    };
    record(&s, &job, AttemptResult::HttpError { status: 500 }, retry).await;
    let mut h = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert!(h.failing_since.is_some());
    // An update that keeps it enabled keeps its health.
    h.url = Some("https://example.test/v2".into());
    s.put_webhook(&h).await.unwrap();
    assert!(s
        .get_webhook("acme", "wh")
        .await
        .unwrap()
        .unwrap()
        .failing_since
        .is_some());
    h.enabled = false;
    h.disabled_reason = Some("by hand".into());
    s.put_webhook(&h).await.unwrap();
    assert!(s
        .get_webhook("acme", "wh")
        .await
        .unwrap()
        .unwrap()
        .failing_since
        .is_some());
    h.enabled = true;
    h.disabled_reason = None;
    s.put_webhook(&h).await.unwrap();
    let h = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert!(
        h.enabled && h.failing_since.is_none(),
        "re-enabling starts afresh"
    );
}

async fn custom_value_endpoint(s: S) {
    org(&s, "acme").await;
    assert!(s.get_custom_value_endpoint("acme").await.unwrap().is_none());
    s.put_custom_value_endpoint("acme", "https://a.test/v")
        .await
        .unwrap();
    s.put_custom_value_endpoint("acme", "https://b.test/v")
        .await
        .unwrap();
    assert_eq!(
        s.get_custom_value_endpoint("acme")
            .await
            .unwrap()
            .as_deref(),
        Some("https://b.test/v")
    );
}
