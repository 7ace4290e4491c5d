//! One error type for the HTTP API, rendered as RFC 9457 `application/problem+json`.
//! 4xx say what was wrong; 5xx are logged with context and tell the client nothing internal.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::spool::SpoolError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// Extra members of the problem object (RFC 9457 extensions).
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            retry_after: None,
            extensions: Default::default(),
        }
    }
    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.extensions.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or_default(),
        );
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }
    pub fn unavailable(detail: impl Into<String>, retry_after: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, detail).retry_after(retry_after)
    }
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the server log has the details",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let mut body = json!({
            "type": "about:blank",
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(obj) = body.as_object_mut() {
            for (k, v) in self.extensions {
                obj.entry(k).or_insert(v);
            }
        }
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Problem::not_found("not found"),
            StoreError::Conflict(m) => Problem::conflict(m),
            StoreError::DiskFull => {
                Problem::unavailable("the disk holding hookbridge's state is full", 30)
            }
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "state store unavailable; request refused with 503");
                Problem::unavailable("the state store cannot be reached; retry later", 5)
            }
            e @ (StoreError::Db(_) | StoreError::SchemaTooNew { .. }) => {
                Problem::internal("state store failed", e)
            }
        }
    }
}

impl From<SpoolError> for Problem {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::DiskFull => {
                metrics::counter!("hookbridge_ingest_disk_full_total").increment(1);
                Problem::unavailable(
                    "the disk holding event files is full; nothing was written, retry later",
                    30,
                )
            }
            SpoolError::Overloaded => {
                Problem::unavailable("too many events waiting to be written; retry shortly", 1)
            }
            SpoolError::ShuttingDown => {
                Problem::unavailable("hookbridge is shutting down; retry shortly", 5)
            }
            SpoolError::StoreUnavailable(why) => {
                tracing::warn!(error = %why, "state store unavailable; events refused with 503");
                metrics::counter!("hookbridge_ingest_store_unavailable_total").increment(1);
                Problem::unavailable(
                    "the state store cannot be reached; nothing was acknowledged, retry later",
                    5,
                )
            }
            SpoolError::Unavailable(why) => {
                tracing::warn!(error = %why, "org storage unavailable; events refused with 503");
                metrics::counter!("hookbridge_ingest_storage_unavailable_total").increment(1);
                Problem::unavailable(
                    "the storage holding event files cannot be reached; nothing was acknowledged, retry later",
                    5,
                )
            }
            other => Problem::internal("event commit failed", other),
        }
    }
}

pub type ApiResult<T> = Result<T, Problem>;
