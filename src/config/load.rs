//! Where the configuration comes from: embedded defaults, then the TOML file, then the
//! `HOOKBRIDGE_*` environment (which wins, so secrets need not be in the file).

use std::path::Path;

use super::{invalid, Config, ConfigError, LogFormat};

impl Config {
    /// Reads `path` (or embedded defaults when `None`), applies env overrides, validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: p.to_owned(),
                    message,
                })?
            }
        };
        cfg.source = path.map(Path::to_path_buf);
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("HOOKBRIDGE_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("HOOKBRIDGE_NODE_ID") {
            self.node_id = v;
        }
        if let Some(v) = get("HOOKBRIDGE_INGRESS_JWT_SECRET") {
            self.ingress.jwt_hs256_secret = Some(v);
        }
        if let Some(v) = get("HOOKBRIDGE_SECRETS_KEY") {
            self.store.secrets_key = Some(v);
        }
        if let Some(v) = get("HOOKBRIDGE_STORE_URL") {
            self.store.url = Some(v);
        }
        if let Some(v) = get("HOOKBRIDGE_ADMIN_TOKEN") {
            self.admin.token = Some(v);
        }
        if let Some(v) = get("HOOKBRIDGE_METRICS_TOKEN") {
            self.http.metrics_token = Some(v);
        }
        if let Some(v) = get("HOOKBRIDGE_HTTP_LISTEN") {
            self.http.listen = v
                .parse()
                .map_err(|e| invalid("HOOKBRIDGE_HTTP_LISTEN", format!("{v:?}: {e}")))?;
        }
        if let Some(v) = get("HOOKBRIDGE_SFTP_LISTEN") {
            self.sftp.listen = v
                .parse()
                .map_err(|e| invalid("HOOKBRIDGE_SFTP_LISTEN", format!("{v:?}: {e}")))?;
        }
        if let Some(v) = get("HOOKBRIDGE_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "json" => LogFormat::Json,
                "human" => LogFormat::Human,
                _ => return Err(invalid("HOOKBRIDGE_LOG_FORMAT", "allowed: human, json")),
            };
        }
        Ok(())
    }
}
