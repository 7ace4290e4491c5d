//! hookbridge: platform webhook events in; durable per-org files served over SFTP and
//! signed HTTP webhooks out.
//!
//! [`run`] builds one [`App`] and hands clones of it to the HTTP server, the SFTP server
//! and the delivery workers; on cancel it stops accepting, drains, and returns.

pub mod auth;
pub mod clock;
pub mod config;
pub mod console;
pub mod defender;
pub mod delivery;
pub mod demo;
pub mod event;
pub mod identity;
pub mod ingress;
pub mod limits;
pub mod provision;
pub mod reload;
pub mod retention;
pub mod rollups;
pub mod secrets;
pub mod sftp;
pub mod spool;
pub mod ssrf;
pub mod storage;
pub mod store;
pub mod telemetry;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::spool::Spool;
use crate::store::{SqliteStore, Store};

/// Everything a request handler or worker needs, cheap to clone.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub spool: Spool,
    /// The org folders (local disk or S3): every file operation goes through it.
    pub storage: Arc<dyn storage::Storage>,
    /// Downloads made over SFTP, on their way to the store (for retention).
    pub downloads: retention::DownloadLog,
    pub secrets: Arc<secrets::Secrets>,
    /// Where the host key, the signing key ring and generated tokens are kept: the data
    /// dir on one node, the store (shared by every node) in scale-out.
    pub identity: Arc<identity::Keeper>,
    pub metrics: telemetry::Metrics,
    /// The config as last (re)loaded; `config` is the one the process started with.
    pub live: Arc<std::sync::RwLock<Arc<Config>>>,
    /// What each org folder holds, for quotas.
    /// Per-org ingest token buckets.
    pub rate: Arc<limits::RateLimiter>,
    /// Makes the delivery scheduler poll the outbox (replays). New jobs need no wake-up:
    /// the spool hands them over directly.
    pub delivery_wake: Arc<tokio::sync::Notify>,
    /// Webhook signing keys and the outgoing HTTP clients.
    pub delivery: Arc<delivery::Delivery>,
}

impl App {
    /// The current config: reflects SIGHUP reloads (limits, log level, declared orgs).
    pub fn current(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_current(&self, config: Arc<Config>) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    pub fn delivery_wakeup(&self) {
        self.delivery_wake.notify_one();
    }
}

/// Listeners bound by the caller, so tests and systemd socket setups choose the ports.
pub struct Listeners {
    pub http: TcpListener,
    pub sftp: Option<TcpListener>,
    /// `http.metrics_listen`: only `/metrics`, without auth.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let http = TcpListener::bind(config.http.listen).await?;
        let sftp = if config.sftp.enabled {
            Some(TcpListener::bind(config.sftp.listen).await?)
        } else {
            None
        };
        let metrics = match config.http.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self {
            http,
            sftp,
            metrics,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("state store: {0}")]
    Store(#[from] store::StoreError),
    #[error("keys and secrets: {0}")]
    Secrets(String),
    #[error("applying orgs from the config file: {0}")]
    Declared(String),
    #[error("org storage ({what}): {source}")]
    Storage {
        what: String,
        source: storage::StorageError,
    },
    #[error("recovering event files: {0}")]
    Recover(#[from] spool::SpoolError),
    #[error("server failed: {0}")]
    Server(String),
}

/// What [`build_state`] opens.
pub type State = (
    Arc<dyn Store>,
    Arc<dyn storage::Storage>,
    secrets::Secrets,
    identity::Keeper,
);

/// Opens the state, the org storage and the keys, and applies the orgs declared in the config.
pub async fn build_state(config: &Config) -> Result<State, StartError> {
    let dd = &config.data_dir;
    let dd_err = |source| StartError::DataDir {
        path: dd.clone(),
        source,
    };
    // Owner-only, whatever the umask: the folder holds secrets, password hashes and every
    // event. SQLite gives `-wal` and `-shm` the mode of the database file.
    secrets::private_dir(dd).map_err(dd_err)?;
    let db = dd.join("state.db");
    secrets::private_file(&db).map_err(dd_err)?;
    for side in ["state.db-wal", "state.db-shm"] {
        let p = dd.join(side);
        if p.exists() {
            secrets::private_file(&p).map_err(dd_err)?;
        }
    }
    let storage = open_storage(config).await?;
    let sealer = Arc::new(secrets::SecretBox::load_or_create(config).map_err(StartError::Secrets)?);
    let store: Arc<dyn Store> = match &config.store.url {
        Some(url) => Arc::new(store::PostgresStore::open(url, sealer.clone()).await?),
        None => Arc::new(SqliteStore::open(&db, sealer.clone())?),
    };
    let keeper = identity::Keeper::open(config, &store, sealer)
        .await
        .map_err(|e| StartError::Secrets(e.to_string()))?;
    let secrets = secrets::Secrets::load(config, &keeper)
        .await
        .map_err(StartError::Secrets)?;
    provision::apply_declared(&store, &*storage, config)
        .await
        .map_err(StartError::Declared)?;
    Ok((store, storage, secrets, keeper))
}

/// Opens the org storage and proves it usable (a probe written, read back, removed), so a
/// wrong bucket or key stops the start with a message rather than failing every post.
pub async fn open_storage(config: &Config) -> Result<Arc<dyn storage::Storage>, StartError> {
    let err = |what: &str| {
        let what = what.to_owned();
        move |source| StartError::Storage { what, source }
    };
    let s = storage::open(&config.storage, &config.data_dir)
        .await
        .map_err(err("opening"))?;
    s.check().await.map_err(err(&s.describe()))?;
    tracing::info!(storage = %s.describe(), "org storage ready");
    Ok(s)
}

/// What the hook of [`run_with_hook`] may fail with.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Serves on `listeners` until `cancel`, then drains and returns (see the module doc).
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: telemetry::Metrics,
    cancel: CancellationToken,
) -> Result<(), StartError> {
    run_with_hook(config, listeners, metrics, cancel, |_| {
        Box::pin(async { Ok(()) })
    })
    .await
}

/// [`run`], with `hook` run once the App is built and before serving starts (e.g. the
/// demo setup).
pub async fn run_with_hook(
    config: Config,
    listeners: Listeners,
    metrics: telemetry::Metrics,
    cancel: CancellationToken,
    hook: impl FnOnce(
        App,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), HookError>> + Send>,
    >,
) -> Result<(), StartError> {
    let config = Arc::new(config);
    metrics::gauge!("hookbridge_node_info", "node_id" => config.node_id.clone()).set(1.0);
    tracing::info!(node_id = %config.node_id, "starting");
    let (store, storage, secrets, keeper) = build_state(&config).await?;
    let delivery = delivery::Delivery::new(&config, &keeper)
        .await
        .map_err(StartError::Secrets)?;
    let recovered = spool::recover(&store, &storage).await?;
    if recovered > 0 {
        tracing::warn!(
            events = recovered,
            "finished writing files of events interrupted by the last stop"
        );
    }

    // Orgs with no usage count yet (first start on this store) are counted from a listing,
    // after the repair above so that its files count too.
    retention::count_uncounted(&*store, &*storage).await;

    // Before anything of this run can claim: the release must not free a lease in use.
    delivery::hand_back_node_leases(&*store, &config.node_id, delivery::HandBack::PreviousRun)
        .await;

    let spool_cancel = CancellationToken::new();
    let (announcer, announced) = delivery::handoff(&config);
    let (spool, spool_task) = Spool::start(
        store.clone(),
        storage.clone(),
        config.http.max_pending_events,
        announcer,
        spool_cancel.clone(),
    );
    let (downloads, downloads_rx) = retention::DownloadLog::new();
    let app = App {
        config: config.clone(),
        store,
        spool,
        storage,
        downloads,
        secrets: Arc::new(secrets),
        identity: Arc::new(keeper),
        metrics,
        live: Arc::new(std::sync::RwLock::new(config.clone())),
        rate: Arc::new(limits::RateLimiter::default()),
        delivery_wake: Arc::new(tokio::sync::Notify::new()),
        delivery: Arc::new(delivery),
    };

    if let Err(e) = hook(app.clone()).await {
        // Nothing is served yet: stop the committer before returning.
        spool_cancel.cancel();
        let _ = spool_task.await;
        return Err(StartError::Server(format!("start-up: {e}")));
    }

    let http_addr = listeners.http.local_addr().ok();
    tracing::info!(addr = ?http_addr, data_dir = %config.data_dir.display(), "HTTP API listening");
    let mut tasks = tokio::task::JoinSet::new();
    {
        let app = app.clone();
        let cancel = cancel.clone();
        let listener = listeners.http;
        tasks.spawn(async move {
            (
                "http",
                ingress::serve(app, listener, cancel)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    }
    {
        let app = app.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move { ("sweeper", retention::run(app, cancel).await) });
    }
    {
        let app = app.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move { ("rollups", rollups::closer::run(app, cancel).await) });
    }
    {
        let store = app.store.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            (
                "downloads",
                retention::record_downloads(store, downloads_rx, cancel).await,
            )
        });
    }
    {
        let app = app.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move { ("reload", reload::run(app, cancel).await) });
    }
    if let Some(listener) = listeners.metrics {
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening (no auth: keep this address private)");
        let router = ingress::metrics_router(app.clone());
        let cancel = cancel.clone();
        tasks.spawn(async move {
            (
                "metrics",
                ingress::serve_router(router, listener, cancel)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    }
    if let Some(listener) = listeners.sftp {
        let app = app.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            (
                "sftp",
                sftp::serve(app, listener, cancel)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    }
    {
        let app = app.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move { ("delivery", delivery::run(app, announced, cancel).await) });
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    telemetry::spawn_watchdog(&mut tasks, cancel.clone());

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(()))) => tracing::info!(task = name, "stopped"),
            Ok((name, Err(e))) => {
                tracing::error!(task = name, error = %e, "failed; shutting down");
                result = Err(StartError::Server(format!("{name}: {e}")));
                cancel.cancel();
            }
            Err(e) => {
                tracing::error!(error = %e, "task panicked; shutting down");
                result = Err(StartError::Server(e.to_string()));
                cancel.cancel();
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // The HTTP server has drained: let the committer answer what is queued, then stop.
    spool_cancel.cancel();
    let _ = spool_task.await;
    // Every task has ended: other nodes may take at once what this run claimed and left.
    delivery::hand_back_node_leases(&*app.store, &config.node_id, delivery::HandBack::ThisRun)
        .await;
    if result.is_ok() {
        tracing::info!("stopped cleanly");
    }
    result
}
