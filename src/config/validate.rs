//! What a valid configuration is: checked once at start (and on reload) with messages
//! that name the offending key.

use std::time::Duration;

use super::{invalid, Config, ConfigError, OrgLimits};
use crate::event::EventType;

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let id_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if self.node_id.is_empty() || self.node_id.len() > 64 || !self.node_id.chars().all(id_ok) {
            return Err(invalid(
                "node_id",
                format!(
                    "{:?}: 1 to 64 of A-Z a-z 0-9 . - _ (it names the node in logs and metrics)",
                    self.node_id
                ),
            ));
        }
        if let Err((key, message)) = self.storage.validate() {
            return Err(invalid(key, message));
        }
        if !(1024..=64 << 20).contains(&self.http.max_body) {
            return Err(invalid(
                "http.max_body",
                "must be between 1024 and 67108864 bytes",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not a tracing filter like \"info\" or \"hookbridge=debug\"",
                    self.log.level
                ),
            ));
        }
        if self.ingress.max_token_lifetime.0 < Duration::from_secs(60) {
            return Err(invalid(
                "ingress.max_token_lifetime",
                "must be at least 60s",
            ));
        }
        if let Some(t) = &self.http.metrics_token {
            if t.len() < 16 {
                return Err(invalid("http.metrics_token", "must be at least 16 bytes"));
            }
        }
        if self.http.metrics_listen.is_some() && self.http.metrics_listen == Some(self.http.listen)
        {
            return Err(invalid(
                "http.metrics_listen",
                "must differ from http.listen",
            ));
        }
        if self.http.max_pending_events == 0 {
            return Err(invalid("http.max_pending_events", "must be at least 1"));
        }
        if let Some(s) = &self.ingress.jwt_hs256_secret {
            if s.len() < 16 {
                return Err(invalid(
                    "ingress.jwt_hs256_secret",
                    "must be at least 16 bytes",
                ));
            }
        }
        if let Some(s) = &self.admin.token {
            if s.len() < 16 {
                return Err(invalid("admin.token", "must be at least 16 bytes"));
            }
        }
        if self.sftp.max_startups_per_source == 0 {
            return Err(invalid(
                "sftp.max_startups_per_source",
                "must be at least 1",
            ));
        }
        if let Some(k) = &self.store.secrets_key {
            crate::secrets::SecretBox::from_base64(k)
                .map_err(|m| invalid("store.secrets_key", m))?;
        }
        if self.store.url.is_some() && self.store.secrets_key.is_none() {
            return Err(invalid(
                "store.secrets_key",
                crate::secrets::SECRETS_KEY_REQUIRED,
            ));
        }
        if self.sftp.max_sessions == 0 || self.sftp.max_sessions_per_ip == 0 {
            return Err(invalid("sftp.max_sessions", "limits must be at least 1"));
        }
        for (key, v) in [
            (
                "sftp.max_handles_per_session",
                self.sftp.max_handles_per_session,
            ),
            (
                "sftp.max_channels_per_connection",
                self.sftp.max_channels_per_connection,
            ),
            ("sftp.max_handles_per_user", self.sftp.max_handles_per_user),
        ] {
            if v == 0 {
                return Err(invalid(key, "limits must be at least 1"));
            }
        }
        if !(1..=20).contains(&self.sftp.max_auth_attempts) {
            return Err(invalid(
                "sftp.max_auth_attempts",
                "must be between 1 and 20",
            ));
        }
        if self.delivery.retry_delays.is_empty() {
            return Err(invalid("delivery.retry_delays", "needs at least one delay"));
        }
        if self.delivery.lease_margin.0 < Duration::from_secs(1) {
            return Err(invalid(
                "delivery.lease_margin",
                "must be at least 1s (the lease must outlast the attempt and the commit of its outcome)",
            ));
        }
        if self.delivery.workers == 0 || self.delivery.per_endpoint_concurrency == 0 {
            return Err(invalid(
                "delivery.workers",
                "concurrency must be at least 1",
            ));
        }
        // The defaults obey the same rules as a per-org override of them.
        OrgLimits {
            ingest_rate: Some(self.limits.ingest_rate),
            ingest_burst: Some(self.limits.ingest_burst),
            ..OrgLimits::default()
        }
        .validate()
        .map_err(|m| invalid("limits", m))?;
        if self.limits.sweep_interval.0 < Duration::from_millis(100) {
            return Err(invalid("limits.sweep_interval", "must be at least 100ms"));
        }
        for (i, n) in self.defender.allow_list.iter().enumerate() {
            crate::defender::Net::parse(n)
                .map_err(|m| invalid(format!("defender.allow_list[{i}]"), m))?;
        }
        if self.defender.threshold == 0 || self.defender.max_unauthenticated == 0 {
            return Err(invalid(
                "defender",
                "threshold and max_unauthenticated must be at least 1",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, org) in self.orgs.iter().enumerate() {
            let key = format!("orgs[{i}]");
            crate::store::validate_name(&org.name)
                .map_err(|m| invalid(format!("{key}.name"), m))?;
            if !seen.insert(org.name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("org {:?} is declared twice", org.name),
                ));
            }
            for (j, u) in org.sftp_users.iter().enumerate() {
                let ukey = format!("{key}.sftp_users[{j}]");
                crate::store::validate_name(&u.name)
                    .map_err(|m| invalid(format!("{ukey}.name"), m))?;
                if let Some(h) = &u.password_hash {
                    crate::auth::check_hash_format(h)
                        .map_err(|m| invalid(format!("{ukey}.password_hash"), m))?;
                }
                for (k, key_text) in u.public_keys.iter().enumerate() {
                    crate::auth::parse_public_key(key_text)
                        .map_err(|m| invalid(format!("{ukey}.public_keys[{k}]"), m))?;
                }
            }
            for (j, w) in org.webhooks.iter().enumerate() {
                let wkey = format!("{key}.webhooks[{j}]");
                crate::store::validate_name(&w.id).map_err(|m| invalid(format!("{wkey}.id"), m))?;
                EventType::parse_filter(&w.events)
                    .map_err(|m| invalid(format!("{wkey}.events"), m))?;
                match w.kind.as_str() {
                    "sftp" => {
                        if let Some(t) = &w.path_template {
                            crate::store::validate_path_template(t, &org.name)
                                .map_err(|m| invalid(format!("{wkey}.path_template"), m))?;
                        }
                    }
                    "http" => {
                        let u = w.url.as_deref().ok_or_else(|| {
                            invalid(format!("{wkey}.url"), "required for kind \"http\"")
                        })?;
                        crate::store::validate_url(u)
                            .map_err(|m| invalid(format!("{wkey}.url"), m))?;
                    }
                    other => {
                        return Err(invalid(
                            format!("{wkey}.kind"),
                            format!("{other:?}: allowed: \"sftp\", \"http\""),
                        ))
                    }
                }
            }
            org.limits
                .validate()
                .map_err(|m| invalid(format!("{key}.limits"), m))?;
            if let Some(u) = &org.custom_value_endpoint {
                crate::store::validate_url(u)
                    .map_err(|m| invalid(format!("{key}.custom_value_endpoint"), m))?;
            }
        }
        Ok(())
    }
}
