//! Logs (tracing, human or JSON) and Prometheus metrics; systemd watchdog pings.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Renders `/metrics`; `None` when another recorder is installed (e.g. in unit tests).
#[derive(Clone, Default)]
pub struct Metrics(Option<Arc<PrometheusHandle>>);

impl Metrics {
    pub fn install() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
            .expect("static buckets are valid");
        match builder.install_recorder() {
            Ok(h) => Metrics(Some(Arc::new(h))),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                Metrics(None)
            }
        }
    }

    pub fn render(&self) -> String {
        self.0.as_ref().map(|h| h.render()).unwrap_or_default()
    }
}

type ReloadHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

static FILTER: std::sync::OnceLock<ReloadHandle> = std::sync::OnceLock::new();

pub fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let ok = match log.format {
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true))
            .try_init()
            .is_ok(),
        LogFormat::Human => registry.with(fmt).try_init().is_ok(),
    };
    if ok {
        let _ = FILTER.set(handle);
    }
}

/// Applies a new log filter (SIGHUP); `RUST_LOG`, when set, keeps precedence.
pub fn set_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    match (FILTER.get(), EnvFilter::try_new(level)) {
        (Some(h), Ok(f)) => {
            let _ = h.reload(f);
        }
        (_, Err(e)) => tracing::warn!(level, error = %e, "log level not changed: invalid filter"),
        (None, _) => {}
    }
}

/// Pings systemd's watchdog at half its interval, when one is set.
pub fn spawn_watchdog(
    tasks: &mut tokio::task::JoinSet<(&'static str, Result<(), String>)>,
    cancel: CancellationToken,
) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return ("watchdog", Ok(())),
                _ = tick.tick() => { let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]); }
            }
        }
    });
}
