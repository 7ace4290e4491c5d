//! SIGHUP: re-read the config file and apply what can change while running, without
//! dropping SFTP sessions or in-flight requests. A file that does not validate is
//! refused; the old config stays.
//!
//! Applied live: `[[orgs]]` (through the same checks as the admin API), `log.level`,
//! `[limits]`, `http.max_body`, `delivery.retry_delays` and `delivery.disable_after`.
//! Every other key is read once at start (sockets, paths, secrets, server and client
//! internals, the SFTP server, the defender): a change to one of them is named in the
//! log as needing a restart, never silently dropped.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::App;

/// Pushes `section.field` for each listed field that differs between `$old` and `$new`.
macro_rules! changed {
    ($out:expr, $old:expr, $new:expr, $section:literal, [$($f:ident),* $(,)?]) => {
        $(
            if format!("{:?}", $old.$f) != format!("{:?}", $new.$f) {
                $out.push(concat!($section, stringify!($f)));
            }
        )*
    };
}

/// Keys the running process applies on reload.
pub fn live_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    changed!(v, old.http, new.http, "http.", [max_body]);
    changed!(
        v,
        old.delivery,
        new.delivery,
        "delivery.",
        [retry_delays, disable_after]
    );
    changed!(v, old.log, new.log, "log.", [level]);
    changed!(
        v,
        old.limits,
        new.limits,
        "limits.",
        [
            quota_bytes,
            quota_files,
            retention_days,
            retention_removes_undownloaded,
            ingest_rate,
            ingest_burst,
            sweep_interval,
        ]
    );
    changed!(v, old, new, "", [orgs]);
    v
}

/// Keys only a restart can change.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    changed!(v, old, new, "", [data_dir, node_id]);
    changed!(
        v,
        old.http,
        new.http,
        "http.",
        [
            listen,
            request_timeout,
            max_pending_events,
            metrics_listen,
            metrics_token
        ]
    );
    changed!(
        v,
        old.sftp,
        new.sftp,
        "sftp.",
        [
            listen,
            enabled,
            host_key,
            max_sessions,
            max_sessions_per_ip,
            login_grace_time,
            auth_rejection_time,
            max_auth_attempts,
            idle_timeout,
            allow_ssh_rsa_sha1,
            max_upload_bytes,
            max_startups_per_source,
            max_handles_per_session,
            max_channels_per_connection,
            max_handles_per_user,
        ]
    );
    changed!(
        v,
        old.ingress,
        new.ingress,
        "ingress.",
        [jwt_hs256_secret, max_token_lifetime]
    );
    changed!(v, old.admin, new.admin, "admin.", [token]);
    changed!(v, old.store, new.store, "store.", [secrets_key, url]);
    changed!(
        v,
        old.storage,
        new.storage,
        "storage.",
        [kind, bucket, prefix, endpoint, region, allow_http]
    );
    changed!(
        v,
        old.delivery,
        new.delivery,
        "delivery.",
        [
            allow_private_destinations,
            workers,
            per_endpoint_concurrency,
            connect_timeout,
            request_timeout,
            custom_value_timeout,
            jwt_issuer,
            lease_margin,
        ]
    );
    changed!(v, old.log, new.log, "log.", [format]);
    changed!(
        v,
        old.defender,
        new.defender,
        "defender.",
        [
            enabled,
            threshold,
            score_login_failure,
            score_protocol_error,
            observation_window,
            ban_time,
            allow_list,
            max_unauthenticated,
            score_login_timeout,
        ]
    );
    v
}

/// Names every field of every section, so that a key added to the config without being
/// sorted into `live_changes` or `restart_only_changes` above fails to compile here.
#[allow(dead_code)]
fn every_key_is_sorted(c: &Config) {
    use crate::config::*;
    let Config {
        data_dir: _,
        node_id: _,
        http,
        sftp,
        ingress,
        admin,
        delivery,
        log,
        defender,
        limits,
        store,
        storage,
        orgs: _,
        source: _,
    } = c;
    let StoreConfig {
        secrets_key: _,
        url: _,
    } = store;
    let crate::storage::StorageConfig {
        kind: _,
        bucket: _,
        prefix: _,
        endpoint: _,
        region: _,
        allow_http: _,
    } = storage;
    let HttpConfig {
        listen: _,
        max_body: _,
        request_timeout: _,
        max_pending_events: _,
        metrics_listen: _,
        metrics_token: _,
    } = http;
    let SftpConfig {
        listen: _,
        enabled: _,
        host_key: _,
        max_sessions: _,
        max_sessions_per_ip: _,
        login_grace_time: _,
        auth_rejection_time: _,
        max_auth_attempts: _,
        idle_timeout: _,
        allow_ssh_rsa_sha1: _,
        max_upload_bytes: _,
        max_startups_per_source: _,
        max_handles_per_session: _,
        max_channels_per_connection: _,
        max_handles_per_user: _,
    } = sftp;
    let IngressConfig {
        jwt_hs256_secret: _,
        max_token_lifetime: _,
    } = ingress;
    let AdminConfig { token: _ } = admin;
    let DeliveryConfig {
        allow_private_destinations: _,
        retry_delays: _,
        workers: _,
        per_endpoint_concurrency: _,
        connect_timeout: _,
        request_timeout: _,
        custom_value_timeout: _,
        jwt_issuer: _,
        disable_after: _,
        lease_margin: _,
    } = delivery;
    let LogConfig {
        level: _,
        format: _,
    } = log;
    let DefenderConfig {
        enabled: _,
        threshold: _,
        score_login_failure: _,
        score_protocol_error: _,
        observation_window: _,
        ban_time: _,
        allow_list: _,
        max_unauthenticated: _,
        score_login_timeout: _,
    } = defender;
    let LimitsConfig {
        quota_bytes: _,
        quota_files: _,
        retention_days: _,
        retention_removes_undownloaded: _,
        ingest_rate: _,
        ingest_burst: _,
        sweep_interval: _,
    } = limits;
}

/// What a reload did: the keys applied, and the changed keys that wait for a restart.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub applied: Vec<&'static str>,
    pub need_restart: Vec<&'static str>,
}

pub async fn reload(app: &App) -> Result<Reloaded, String> {
    let Some(path) = app.config.source.clone() else {
        return Err("hookbridge was started without --config; nothing to re-read".into());
    };
    let mut new = tokio::task::spawn_blocking(move || Config::load(Some(&path)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let old = app.current();
    let done = Reloaded {
        applied: live_changes(&old, &new),
        need_restart: restart_only_changes(&app.config, &new),
    };
    // The SSRF guard of running clients keeps its start-up setting: check declared
    // webhooks against that one, not against a value that is not in force yet.
    new.delivery.allow_private_destinations = app.config.delivery.allow_private_destinations;
    crate::provision::apply_declared(&app.store, &*app.storage, &new).await?;
    crate::telemetry::set_level(&new.log.level);
    app.set_current(Arc::new(new));
    Ok(done)
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
                    Ok(done) => {
                        metrics::counter!("hookbridge_config_reloads_total", "outcome" => "ok").increment(1);
                        if done.need_restart.is_empty() {
                            tracing::info!(applied = ?done.applied, "SIGHUP: configuration reloaded");
                        } else {
                            tracing::warn!(applied = ?done.applied, need_restart = ?done.need_restart,
                                "SIGHUP: configuration reloaded, except these changed keys, which keep their start-up values until a restart");
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_changed_key_is_either_live_or_named_for_restart() {
        let old = Config::default();
        let mut new = Config::default();
        new.http.max_body = 2048;
        new.sftp.max_sessions = 3;
        new.defender.threshold = 3;
        new.delivery.workers = 1;
        new.delivery.disable_after = crate::config::Dur(std::time::Duration::from_secs(1));
        assert_eq!(
            live_changes(&old, &new),
            vec!["http.max_body", "delivery.disable_after"]
        );
        assert_eq!(
            restart_only_changes(&old, &new),
            vec![
                "sftp.max_sessions",
                "delivery.workers",
                "defender.threshold"
            ]
        );
    }
}
