//! `[storage]`: where the org folders live.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// `<data_dir>/orgs` on the local file system.
    #[default]
    Local,
    /// An S3-compatible bucket.
    S3,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `local` (default) or `s3`.
    pub kind: StorageKind,
    /// S3 bucket (required for `s3`).
    pub bucket: Option<String>,
    /// Key prefix under which every org has its folder: `<prefix>/<org>/<path>`.
    pub prefix: String,
    /// S3 endpoint URL, e.g. `http://127.0.0.1:8333`; absent: AWS.
    pub endpoint: Option<String>,
    /// S3 region (default `us-east-1`).
    pub region: Option<String>,
    /// Allow a plain-http endpoint (test rigs, a store on loopback).
    pub allow_http: bool,
}

impl StorageConfig {
    /// Checks the keys once at start; the message names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.kind == StorageKind::Local {
            return Ok(());
        }
        let bucket = self.bucket.as_deref().unwrap_or_default();
        if bucket.is_empty() {
            return Err((
                "storage.bucket".into(),
                "required when kind = \"s3\"".into(),
            ));
        }
        if let Some(e) = &self.endpoint {
            let url = url::Url::parse(e)
                .map_err(|err| ("storage.endpoint".to_owned(), err.to_string()))?;
            if url.scheme() == "http" && !self.allow_http {
                return Err((
                    "storage.endpoint".into(),
                    "is plain http: set storage.allow_http = true to allow it".into(),
                ));
            }
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(("storage.endpoint".into(), "must be http(s)://".into()));
            }
        }
        if self
            .prefix
            .split('/')
            .any(|s| s == "." || s == ".." || s.chars().any(char::is_control))
        {
            return Err((
                "storage.prefix".into(),
                "must be plain names separated by `/`".into(),
            ));
        }
        Ok(())
    }

    /// `prefix` without leading or trailing slashes, empty segments dropped.
    pub fn clean_prefix(&self) -> String {
        self.prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("/")
    }
}
