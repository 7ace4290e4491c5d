//! Configuration: embedded defaults → TOML file → `HOOKBRIDGE_*` environment,
//! validated once at start with messages that name the offending key.
//!
//! Here: the sections and their defaults; `load` reads the file and the environment,
//! `validate` checks the result.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod load;
mod validate;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A duration written as `"30s"`, `"2m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"30s\" or \"2m\": {e}"
            ))
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where state (SQLite), keys, org folders and temp files live. Default `./data`.
    pub data_dir: PathBuf,
    /// This node's name in logs, `/metrics` and `/readyz` (env `HOOKBRIDGE_NODE_ID`).
    /// Default: the host name. Give each node of a scaled-out service its own.
    pub node_id: String,
    pub http: HttpConfig,
    pub sftp: SftpConfig,
    pub ingress: IngressConfig,
    pub admin: AdminConfig,
    pub delivery: DeliveryConfig,
    pub log: LogConfig,
    /// Bans of source IPs that fail to log in or break the protocol (SFTP).
    pub defender: DefenderConfig,
    /// Defaults for every org's quota, retention and ingest rate; `[[orgs]]` may override.
    pub limits: LimitsConfig,
    /// State store settings.
    pub store: StoreConfig,
    /// Where the org folders live: `local` (default) or an S3-compatible bucket.
    pub storage: crate::storage::StorageConfig,
    /// Orgs, SFTP users and webhooks applied idempotently at start.
    pub orgs: Vec<OrgDecl>,
    /// The file this config was read from; SIGHUP re-reads it.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Base64 of 32 random bytes (`openssl rand -base64 32`): the AES-256-GCM key webhook
    /// secrets are encrypted with at rest (env `HOOKBRIDGE_SECRETS_KEY`). Unset: a key is
    /// generated into `<data_dir>/secrets/webhook_secrets_key`. Required with `url`: it
    /// also seals the keys the nodes share in the store (`crate::identity`).
    pub secrets_key: Option<String>,
    /// `postgres://user:password@host:port/db`: keep the state in PostgreSQL, shared by
    /// every node (env `HOOKBRIDGE_STORE_URL`). Unset: SQLite in `<data_dir>/state.db`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP API. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes. Default 1 MiB.
    pub max_body: usize,
    /// Time allowed for a whole request, including the durable write. Default 30s.
    pub request_timeout: Dur,
    /// Events waiting for a group commit before new posts get 503. Default 10000.
    pub max_pending_events: usize,
    /// A second address serving only `GET /metrics`, without auth (keep it on loopback or
    /// a private network). Unset: `/metrics` is served on `listen` and needs a token.
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token for `/metrics` on `listen`, besides the admin token (env
    /// `HOOKBRIDGE_METRICS_TOKEN`), so a scraper need not hold the admin token.
    pub metrics_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftpConfig {
    /// Address of the SFTP server. Default `127.0.0.1:2222`.
    pub listen: SocketAddr,
    /// Set false to run without the SFTP server. Default true.
    pub enabled: bool,
    /// OpenSSH-format ed25519 host key; made on first start. Default `<data_dir>/ssh_host_ed25519_key`.
    pub host_key: Option<PathBuf>,
    /// Concurrent SSH connections in total. Default 1000.
    pub max_sessions: usize,
    /// Concurrent SSH connections from one source IP. Default 100.
    pub max_sessions_per_ip: usize,
    /// Connections from one source IP that have not authenticated yet (like OpenSSH's
    /// PerSourceMaxStartups), so one source cannot take every `defender.max_unauthenticated`
    /// slot. Default 10.
    pub max_startups_per_source: usize,
    /// A connection must authenticate within this time. Default 30s.
    pub login_grace_time: Dur,
    /// Delay before a failed authentication is answered. Default 1s.
    pub auth_rejection_time: Dur,
    /// Authentication attempts per connection. Default 6.
    pub max_auth_attempts: usize,
    /// Idle connections are closed after this time. Default 1h.
    pub idle_timeout: Dur,
    /// Accept legacy `ssh-rsa` (SHA-1) signatures from old devices. Default false.
    pub allow_ssh_rsa_sha1: bool,
    /// Largest file a user with the `upload` permission may upload, bytes. Default 1 GiB.
    pub max_upload_bytes: u64,
    /// Open files and listings per SFTP channel. Default 64.
    pub max_handles_per_session: usize,
    /// Session channels per SSH connection (OpenSSH's MaxSessions). Default 10.
    pub max_channels_per_connection: usize,
    /// Open files and listings of one user across all its connections. Default 256.
    pub max_handles_per_user: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// HS256 secret the platform signs event JWTs with (env `HOOKBRIDGE_INGRESS_JWT_SECRET`).
    pub jwt_hs256_secret: Option<String>,
    /// Tokens whose `exp` is further ahead than this are refused (401), so a leaked
    /// token cannot be valid for ever. Default 24h.
    pub max_token_lifetime: Dur,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token of the admin API (env `HOOKBRIDGE_ADMIN_TOKEN`); the admin API is off without it.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Allow webhook URLs that resolve to loopback, private or link-local addresses. Default false.
    pub allow_private_destinations: bool,
    /// Wait before each retry; the job is dead after the last one.
    pub retry_delays: Vec<Dur>,
    /// Concurrent deliveries in total. Default 64.
    pub workers: usize,
    /// Concurrent deliveries to one webhook. Default 4.
    pub per_endpoint_concurrency: usize,
    /// TCP/TLS connect timeout. Default 5s.
    pub connect_timeout: Dur,
    /// Whole-request timeout of a delivery. Default 15s.
    pub request_timeout: Dur,
    /// Timeout of a Custom Value Request to the org's system. Default 3s.
    pub custom_value_timeout: Dur,
    /// `iss` claim of delivery JWTs. Default `hookbridge`.
    pub jwt_issuer: String,
    /// A webhook failing without success for this long is disabled. Default 5 days.
    pub disable_after: Dur,
    /// Room a delivery lease leaves beyond two request timeouts (lease = 2 ×
    /// `request_timeout` + this), for the wait for a permit and the group commit of the
    /// outcome. Default 60s. A node that dies holds its jobs this long at most.
    pub lease_margin: Dur,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `hookbridge=debug`. Env `RUST_LOG` wins.
    pub level: String,
    /// `human` or `json`.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgDecl {
    pub name: String,
    #[serde(default)]
    pub sftp_users: Vec<SftpUserDecl>,
    #[serde(default)]
    pub webhooks: Vec<WebhookDecl>,
    #[serde(default)]
    pub custom_value_endpoint: Option<String>,
    /// Overrides of `[limits]` for this org.
    #[serde(default)]
    pub limits: OrgLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefenderConfig {
    /// Default true.
    pub enabled: bool,
    /// Score at which an address is banned. Default 10.
    pub threshold: u32,
    /// Points of a failed password or unknown user. Default 1.
    pub score_login_failure: u32,
    /// Points of a broken handshake or protocol error. Default 2.
    pub score_protocol_error: u32,
    /// Points of a connection still unauthenticated at `sftp.login_grace_time`. Default 2.
    pub score_login_timeout: u32,
    /// Scores older than this are forgotten. Default 10m.
    pub observation_window: Dur,
    /// How long a ban lasts. Default 15m.
    pub ban_time: Dur,
    /// Addresses or CIDR networks never banned (known ETL hosts).
    pub allow_list: Vec<String>,
    /// SSH connections not yet authenticated, in total (like OpenSSH's MaxStartups). Default 64.
    pub max_unauthenticated: usize,
}

impl Default for DefenderConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 10,
            score_login_failure: 1,
            score_protocol_error: 2,
            score_login_timeout: 2,
            observation_window: Dur(Duration::from_secs(600)),
            ban_time: Dur(crate::defender::default_ban_time()),
            allow_list: Vec::new(),
            max_unauthenticated: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of files an org folder may hold before ingest answers 507; 0 = no quota.
    pub quota_bytes: u64,
    /// Files an org folder may hold before ingest answers 507; 0 = no quota.
    pub quota_files: u64,
    /// Files older than this many days are removed; 0 = keep forever.
    pub retention_days: u32,
    /// Whether retention also removes files nobody has downloaded yet. Default true.
    pub retention_removes_undownloaded: bool,
    /// Sustained events per second one org may post; 0 = unlimited.
    pub ingest_rate: f64,
    /// Events an org may post in a burst above `ingest_rate`. Default 100.
    pub ingest_burst: u32,
    /// How often retention runs and folder usage is recounted. Default 1m.
    pub sweep_interval: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            quota_bytes: 0,
            quota_files: 0,
            retention_days: 0,
            retention_removes_undownloaded: true,
            ingest_rate: 0.0,
            ingest_burst: 100,
            sweep_interval: Dur(Duration::from_secs(60)),
        }
    }
}

/// Per-org overrides; `None` takes the `[limits]` default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrgLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_removes_undownloaded: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_burst: Option<u32>,
}

/// The limits in force for one org.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EffectiveLimits {
    pub quota_bytes: u64,
    pub quota_files: u64,
    pub retention_days: u32,
    pub retention_removes_undownloaded: bool,
    pub ingest_rate: f64,
    pub ingest_burst: u32,
}

impl LimitsConfig {
    pub fn for_org(&self, o: &OrgLimits) -> EffectiveLimits {
        EffectiveLimits {
            quota_bytes: o.quota_bytes.unwrap_or(self.quota_bytes),
            quota_files: o.quota_files.unwrap_or(self.quota_files),
            retention_days: o.retention_days.unwrap_or(self.retention_days),
            retention_removes_undownloaded: o
                .retention_removes_undownloaded
                .unwrap_or(self.retention_removes_undownloaded),
            ingest_rate: o.ingest_rate.unwrap_or(self.ingest_rate),
            ingest_burst: o.ingest_burst.unwrap_or(self.ingest_burst),
        }
    }
}

impl OrgLimits {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = self.ingest_rate {
            if !r.is_finite() || r < 0.0 {
                return Err("ingest_rate must be a number of events per second, 0 or more".into());
            }
        }
        if self.ingest_burst == Some(0) {
            return Err("ingest_burst must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpUserDecl {
    pub name: String,
    /// An argon2id PHC string from `hookbridge hash-password`.
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub public_keys: Vec<String>,
    #[serde(default)]
    pub upload: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDecl {
    /// Stable id, so that applying the file twice updates instead of duplicating.
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub url: Option<String>,
    /// Event types; empty or `["*"]` means all eight.
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub path_template: Option<String>,
    /// `json` (one file per event, default) or `ndjson.gz` (roll-ups).
    #[serde(default)]
    pub format: Option<String>,
    /// `hour` or `day`, with `format = "ndjson.gz"`.
    #[serde(default)]
    pub rollup: Option<String>,
    /// Grace after a roll-up period before its partition closes. Default `5m`.
    #[serde(default)]
    pub close_after: Option<String>,
    /// Most NDJSON bytes in one roll-up part. Default 128 MiB.
    #[serde(default)]
    pub max_part_bytes: Option<u64>,
}

/// The host name, the default node id; `node` when it cannot be read or is not a valid id.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        "node".to_owned()
    } else {
        name
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            node_id: hostname(),
            http: HttpConfig::default(),
            sftp: SftpConfig::default(),
            ingress: IngressConfig::default(),
            admin: AdminConfig::default(),
            delivery: DeliveryConfig::default(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            defender: DefenderConfig::default(),
            store: StoreConfig::default(),
            storage: Default::default(),
            orgs: Vec::new(),
            source: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid literal"),
            max_body: 1 << 20,
            request_timeout: Dur(Duration::from_secs(30)),
            max_pending_events: 10_000,
            metrics_listen: None,
            metrics_token: None,
        }
    }
}

impl Default for SftpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:2222".parse().expect("valid literal"),
            enabled: true,
            host_key: None,
            max_sessions: 1000,
            max_sessions_per_ip: 100,
            max_startups_per_source: 10,
            login_grace_time: Dur(Duration::from_secs(30)),
            auth_rejection_time: Dur(Duration::from_secs(1)),
            max_auth_attempts: 6,
            idle_timeout: Dur(Duration::from_secs(3600)),
            allow_ssh_rsa_sha1: false,
            max_upload_bytes: 1 << 30,
            max_handles_per_session: 64,
            max_channels_per_connection: 10,
            max_handles_per_user: 256,
        }
    }
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            jwt_hs256_secret: None,
            max_token_lifetime: Dur(Duration::from_secs(24 * 3600)),
        }
    }
}

pub const DEFAULT_RETRY_DELAYS: [&str; 11] = [
    "5s", "30s", "2m", "10m", "30m", "1h", "3h", "6h", "12h", "24h", "24h",
];

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            allow_private_destinations: false,
            retry_delays: DEFAULT_RETRY_DELAYS
                .iter()
                .map(|s| Dur(humantime::parse_duration(s).expect("valid literal")))
                .collect(),
            workers: 64,
            per_endpoint_concurrency: 4,
            connect_timeout: Dur(Duration::from_secs(5)),
            request_timeout: Dur(Duration::from_secs(15)),
            custom_value_timeout: Dur(Duration::from_secs(3)),
            jwt_issuer: "hookbridge".into(),
            disable_after: Dur(Duration::from_secs(5 * 24 * 3600)),
            lease_margin: Dur(Duration::from_secs(60)),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

impl Config {
    pub fn host_key_path(&self) -> PathBuf {
        self.sftp
            .host_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ssh_host_ed25519_key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[http]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let e = Config::parse("[delivery]\nretry_delays = [\"5 parsecs\"]\n").unwrap_err();
        assert!(e.contains("duration"), "{e}");
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().delivery.retry_delays.len(), 11);
    }

    #[test]
    fn bad_event_type_in_org_is_named() {
        let cfg = Config::parse(
            "[[orgs]]\nname = \"acme\"\n[[orgs.webhooks]]\nid = \"files\"\nkind = \"sftp\"\nevents = [\"nope\"]\n",
        )
        .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("orgs[0].webhooks[0].events"), "{e}");
    }
}
