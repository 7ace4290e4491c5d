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

/// Puts this node's id on every log line, whatever task or span it comes from (spans do
/// not follow `tokio::spawn`, so a root span would miss most lines): `node_id=…` first on
/// a human line, a `"node_id"` member first in a JSON object.
struct WithNode<F> {
    inner: F,
    node: String,
    json: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithNode<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if !self.json {
            write!(writer, "node_id={} ", self.node)?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        match line.strip_prefix('{') {
            Some(rest) => {
                let id = serde_json::to_string(&self.node).map_err(|_| std::fmt::Error)?;
                write!(writer, "{{\"node_id\":{id},{rest}")
            }
            None => writer.write_str(&line),
        }
    }
}

pub fn init_tracing(log: &LogConfig, node_id: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let node = node_id.to_owned();
    let ok = match log.format {
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .map_event_format(|inner| WithNode {
                        inner,
                        node,
                        json: true,
                    }),
            )
            .try_init()
            .is_ok(),
        LogFormat::Human => registry
            .with(fmt.map_event_format(|inner| WithNode {
                inner,
                node,
                json: false,
            }))
            .try_init()
            .is_ok(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_node_id_as_a_member() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .json()
            .flatten_event(true)
            .map_event_format(|inner| WithNode {
                inner,
                node: "n\"1".into(),
                json: true,
            })
            .finish();
        tracing::subscriber::with_default(sub, || tracing::info!(k = 3, "hello"));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["node_id"], "n\"1", "{text}");
        assert_eq!(v["message"], "hello", "{text}");
        assert_eq!(v["k"], 3, "{text}");
    }
}
