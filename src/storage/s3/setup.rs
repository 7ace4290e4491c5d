//! Building the S3 client from `[storage]` and a key pair.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, RetryConfig};

use super::super::{StorageConfig, StorageError, StorageResult};
use super::S3Storage;

/// An access key pair; `None` parts fall back to what the builder finds (instance roles).
#[derive(Clone, Default)]
pub struct Credentials {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}

impl Credentials {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Self {
        Self {
            access_key_id: std::env::var("AWS_ACCESS_KEY_ID").ok(),
            secret_access_key: std::env::var("AWS_SECRET_ACCESS_KEY").ok(),
            session_token: std::env::var("AWS_SESSION_TOKEN").ok(),
        }
    }
}

impl S3Storage {
    /// With credentials from the environment.
    pub fn new(cfg: &StorageConfig) -> StorageResult<Self> {
        Self::with_credentials(cfg, Credentials::from_env())
    }

    pub fn with_credentials(cfg: &StorageConfig, creds: Credentials) -> StorageResult<Self> {
        let bucket =
            cfg.bucket
                .clone()
                .filter(|b| !b.is_empty())
                .ok_or(StorageError::InvalidPath(
                    "storage.bucket is required for s3",
                ))?;
        let region = cfg.region.clone().unwrap_or_else(|| "us-east-1".into());
        // Short retries: a store that is down must turn into a prompt 503, not a minute of waiting.
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let options = ClientOptions::new()
            .with_allow_http(cfg.allow_http)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(60));
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&region)
            .with_retry(retry)
            .with_client_options(options);
        if let Some(k) = creds.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = creds.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        if let Some(t) = creds.session_token {
            b = b.with_token(t);
        }
        let endpoint = cfg.endpoint.clone().unwrap_or_default();
        if !endpoint.is_empty() {
            b = b.with_endpoint(&endpoint);
        }
        let store = b
            .build()
            .map_err(|e| StorageError::Backend(format!("S3 configuration: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            bucket,
            prefix: cfg.clean_prefix(),
            endpoint: if endpoint.is_empty() {
                "AWS".into()
            } else {
                endpoint
            },
        })
    }
}
