//! SIGHUP: re-read the config file and apply what can change while running — declared
//! orgs, users and hooks, the log level, and `[limits]` — without dropping SFTP sessions
//! or in-flight requests. A file that does not validate is refused; the old config stays.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::App;

/// Settings that only a restart can change (sockets, paths, server internals).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.data_dir != new.data_dir {
        v.push("data_dir");
    }
    if old.http.listen != new.http.listen {
        v.push("http.listen");
    }
    if old.sftp.listen != new.sftp.listen || old.sftp.enabled != new.sftp.enabled {
        v.push("sftp.listen/enabled");
    }
    if old.ingress.jwt_hs256_secret != new.ingress.jwt_hs256_secret {
        v.push("ingress.jwt_hs256_secret");
    }
    if old.admin.token != new.admin.token {
        v.push("admin.token");
    }
    v
}

pub async fn reload(app: &App) -> Result<(), String> {
    let Some(path) = app.config.source.clone() else {
        return Err("hookbridge was started without --config; nothing to re-read".into());
    };
    let new = tokio::task::spawn_blocking(move || Config::load(Some(&path)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let old = app.current();
    let ignored = restart_only_changes(&old, &new);
    if !ignored.is_empty() {
        tracing::warn!(keys = ?ignored, "these settings changed in the file but need a restart");
    }
    crate::provision::apply_declared(&app.store, &new).await?;
    crate::telemetry::set_level(&new.log.level);
    app.set_current(Arc::new(new));
    Ok(())
}

pub async fn run(app: App, cancel: CancellationToken) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = hup.recv() => {
                match reload(&app).await {
                    Ok(()) => {
                        metrics::counter!("hookbridge_config_reloads_total", "outcome" => "ok").increment(1);
                        tracing::info!("SIGHUP: configuration reloaded");
                    }
                    Err(e) => {
                        metrics::counter!("hookbridge_config_reloads_total", "outcome" => "refused").increment(1);
                        tracing::error!(error = %e, "SIGHUP: new configuration refused; the old one stays in force");
                    }
                }
            }
        }
    }
}
