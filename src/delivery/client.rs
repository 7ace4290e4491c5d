//! The outgoing HTTP client: hyper-util's pooled HTTP/1.1 client over rustls (system roots)
//! with SSRF-guarded DNS, no redirects, no proxies, connect and total timeouts, and
//! response bodies read only up to a cap.
//!
//! Why not reqwest: its per-request layers (redirect policy re-parsing the URL although
//! redirects are off, the retry layer, header map copies, the response URL parsed again)
//! cost about 8% of the daemon's CPU per delivery in a native profile of the drain, and we
//! use none of them. hyper-util has no redirects and no proxies at all, so the two rules
//! below hold by construction.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::DeliveryConfig;

/// Bytes of a response body read at most; the rest is dropped with the connection.
pub const BODY_CAP: usize = 64 * 1024;
/// Bytes of a response body kept in the attempt log.
pub const EXCERPT_CAP: usize = 1024;
/// How long an idle pooled connection is kept (reqwest's default, which this replaced).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Why an exchange did not produce an HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("DNS lookup of {host} failed: {message}")]
    Dns { host: String, message: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Other(String),
}

/// Errors of our resolver, found again in the client's error chain to name the cause.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("DNS lookup of {host} failed: {message}")]
    Dns { host: String, message: String },
    #[error(
        "destination {host} resolves only to private, loopback or link-local addresses ({addrs})"
    )]
    Forbidden { host: String, addrs: String },
}

/// Resolves with the system resolver, then drops every address the SSRF guard forbids.
/// Runs at every new connection, so a name that later rebinds to 127.0.0.1 is still refused.
/// (An IP-literal host never reaches a resolver: [`check_destination`] checks those.)
#[derive(Clone)]
struct GuardedResolver {
    allow_private: bool,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, ResolveError>> + Send>>;

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts the URL's port in.
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| ResolveError::Dns {
                    host: host.clone(),
                    message: e.to_string(),
                })?
                .collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || !crate::ssrf::is_forbidden(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(if found.is_empty() {
                    ResolveError::Dns {
                        host,
                        message: "no addresses".into(),
                    }
                } else {
                    let addrs = found
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    ResolveError::Forbidden { host, addrs }
                });
            }
            Ok(allowed.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// One client for all deliveries, so connections to a busy endpoint are reused.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

/// Builds the client: rustls with the system's root certificates (ca-certificates), the
/// guarded resolver on every new connection, `connect_timeout`, and at most
/// 2 × `per_endpoint_concurrency` idle connections kept per destination.
pub fn build(cfg: &DeliveryConfig) -> Result<Client, String> {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver {
        allow_private: cfg.allow_private_destinations,
    });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout.0));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config()?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(cfg.per_endpoint_concurrency.max(1) * 2)
        .build(https);
    Ok(Client { http })
}

/// rustls (aws-lc-rs) trusting the system's root certificates, loaded once at start.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "cannot build the delivery HTTP client: no system root certificates found (install ca-certificates){}",
            if errors.is_empty() { String::new() } else { format!(": {}", errors.join("; ")) }
        ));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot build the delivery HTTP client: TLS: {e}"))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The headers every request starts with (the user agent); the caller adds its own.
pub fn base_headers() -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("hookbridge/", env!("CARGO_PKG_VERSION"))),
    );
    h
}

/// The result of one HTTP exchange, successful or not.
#[derive(Debug)]
pub struct Exchange {
    pub status: Option<u16>,
    pub latency: Duration,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
    pub error: Option<SendError>,
}

impl Exchange {
    pub(super) fn failed(started: Instant, e: SendError) -> Self {
        Exchange {
            status: None,
            latency: started.elapsed(),
            retry_after: None,
            body: Vec::new(),
            error: Some(e),
        }
    }

    /// The first [`EXCERPT_CAP`] bytes of the body, as text.
    pub fn excerpt(&self) -> Option<String> {
        if self.body.is_empty() {
            return None;
        }
        let cut = &self.body[..self.body.len().min(EXCERPT_CAP)];
        Some(String::from_utf8_lossy(cut).into_owned())
    }

    /// One line for logs and the attempt log: the error, or the status.
    pub fn describe(&self) -> String {
        match (&self.error, self.status) {
            (Some(e), _) => e.to_string(),
            (None, Some(s)) => format!("HTTP {s}"),
            (None, None) => "no answer".into(),
        }
    }
}

/// Bound of the parsed-URL cache; past it the cache starts over.
const URL_CACHE_MAX: usize = 4096;

/// Checks an IP-literal URL, which never reaches the resolver.
pub fn check_destination(url: &str, allow_private: bool) -> Result<url::Url, SendError> {
    let parsed = parsed_url(url)?;
    crate::ssrf::check_literal(&parsed.0, allow_private).map_err(SendError::Forbidden)?;
    Ok(parsed.0.clone())
}

/// [`check_destination`], answering the request URI the client takes.
pub fn destination_uri(url: &str, allow_private: bool) -> Result<Uri, SendError> {
    let parsed = parsed_url(url)?;
    crate::ssrf::check_literal(&parsed.0, allow_private).map_err(SendError::Forbidden)?;
    Ok(parsed.1.clone())
}

/// The request URI of a URL (checked by [`check_destination`]).
pub fn uri_of(url: &url::Url) -> Result<Uri, SendError> {
    url.as_str()
        .parse()
        .map_err(|e| SendError::Forbidden(format!("url {}: {e}", url.as_str())))
}

/// `validate_url` and the request URI, remembered per URL string: parsing is a pure
/// function of the string and cost ~6k instructions per delivery, a clone of the parsed
/// `Uri` (shared bytes) a fraction of that. Only valid URLs are kept; the SSRF check above
/// runs on every call.
fn parsed_url(url: &str) -> Result<Arc<(url::Url, Uri)>, SendError> {
    type Cache = Mutex<HashMap<String, Arc<(url::Url, Uri)>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let lock = || match cache.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    };
    if let Some(u) = lock().get(url) {
        return Ok(u.clone());
    }
    let parsed = crate::store::validate_url(url).map_err(SendError::Forbidden)?;
    let uri = uri_of(&parsed)?;
    let entry = Arc::new((parsed, uri));
    let mut c = lock();
    if c.len() >= URL_CACHE_MAX {
        c.clear();
    }
    c.insert(url.to_owned(), entry.clone());
    Ok(entry)
}

impl Client {
    /// Sends one request, reads at most [`BODY_CAP`] bytes of the answer, all within
    /// `timeout`; never fails: errors are data. A timeout after the status arrived keeps
    /// the status and says the answer was not complete.
    pub async fn exchange(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Exchange {
        let started = Instant::now();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let mut status = None;
        let mut retry_after = None;
        let mut body = Vec::new();
        let run = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| classify(&e, timeout))?;
            status = Some(resp.status().as_u16());
            retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut b = resp.into_body();
            while body.len() < BODY_CAP {
                match b.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(chunk) = frame.into_data() {
                            let room = BODY_CAP - body.len();
                            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                        }
                    }
                    // The status already arrived: a body cut short does not change what
                    // it said.
                    Some(Err(_)) | None => break,
                }
            }
            Ok::<(), SendError>(())
        };
        let error = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(SendError::Timeout(timeout)),
        };
        Exchange {
            status,
            latency: started.elapsed(),
            retry_after,
            body,
            error,
        }
    }
}

/// Names the cause of a failed request: our resolver's verdict, TLS, timeout or connect.
fn classify(e: &hyper_util::client::legacy::Error, timeout: Duration) -> SendError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut chain = Vec::new();
    let mut timed_out = false;
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<ResolveError>() {
            return match r {
                ResolveError::Dns { host, message } => SendError::Dns {
                    host: host.clone(),
                    message: message.clone(),
                },
                ResolveError::Forbidden { .. } => SendError::Forbidden(r.to_string()),
            };
        }
        timed_out |= s
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        chain.push(s.to_string());
        src = s.source();
    }
    let text = chain.join(": ");
    let lower = text.to_ascii_lowercase();
    if timed_out || lower.contains("timed out") {
        SendError::Timeout(timeout)
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("rustls")
    {
        SendError::Tls(chain.last().cloned().unwrap_or(text))
    } else if e.is_connect() {
        SendError::Connect(chain.last().cloned().unwrap_or(text))
    } else {
        SendError::Other(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_urls_are_still_checked_every_time() {
        let u = "http://127.0.0.1:9/cached-url-test";
        // Allowed once (private destinations on), cached, then refused with them off.
        assert_eq!(check_destination(u, true).unwrap().as_str(), u);
        assert!(matches!(
            check_destination(u, false),
            Err(SendError::Forbidden(_))
        ));
        assert!(matches!(
            destination_uri(u, false),
            Err(SendError::Forbidden(_))
        ));
        assert_eq!(destination_uri(u, true).unwrap().to_string(), u);
        assert_eq!(check_destination(u, true).unwrap().as_str(), u);
        // Invalid URLs are refused, and again on a second call (never cached).
        for _ in 0..2 {
            assert!(matches!(
                check_destination("ftp://x/y", true),
                Err(SendError::Forbidden(_))
            ));
        }
    }
}
