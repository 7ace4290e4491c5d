//! Starts the real `hookbridge` binary on free ports with a temp data dir, and talks to it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use crate::pg::{
    fresh_pg_database, pg_and_s3_or_skip, pg_database_or_skip, two_nodes_on_pg_and_s3, PgDatabase,
};

pub const INGRESS_SECRET: &str = "test-ingress-secret-0123456789";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// `store.secrets_key` of every daemon on PostgreSQL (scale-out requires one; nodes on one
/// database must share it).
pub const PG_SECRETS_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const DEFAULT_DELIVERY: &str =
    "allow_private_destinations = true\nretry_delays = [\"200ms\", \"400ms\", \"800ms\"]";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    // A deadline only catches a hang; on a loaded 2-core machine the states tests wait for
    // can take many seconds, so no wait gives up sooner than this. Tests that assert timing
    // measure it themselves.
    let timeout = timeout.max(Duration::from_secs(30));
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether a prerequisite of a test is there. When it is missing the test must not pass
/// silently: under `CI=true` (`.ci/run`) this panics, so the run fails; elsewhere it prints a
/// `SKIPPED:` line and returns false, and the caller returns. `scripts/test` installs every
/// client the tests need.
pub fn require_that(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "missing test prerequisite under CI=true: {what}");
    eprintln!("SKIPPED: missing {what} (scripts/test installs the clients)");
    false
}

/// [`require_that`] for a command: present when `cmd --version` runs.
pub fn require(cmd: &str) -> bool {
    let runs = Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    require_that(&format!("`{cmd}`"), runs)
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub sftp_port: u16,
    pub extra_config: String,
    /// Data dir somewhere else than the temp dir (e.g. a small tmpfs).
    pub data_dir_override: Option<PathBuf>,
    /// TOML lines added to the generated `[sftp]` table (e.g. `max_sessions = 2`).
    pub sftp_extra: String,
    /// Lines of the `[delivery]` table.
    pub delivery_config: String,
    /// Lines added to the generated `[http]` table (e.g. `metrics_listen = …`).
    pub http_extra: String,
    /// Top-level keys of the generated config (before its first table).
    pub top_config: String,
    /// The S3 server and key prefix of the org folders, when not on local disk.
    pub s3: Option<(crate::seaweed::S3Server, String)>,
    /// The daemon's own PostgreSQL database (`HOOKBRIDGE_TEST_STORE=postgres`), else SQLite.
    pub store_url: Option<String>,
    /// The database this daemon keeps alive (dropped after the process is killed).
    _pg: Option<std::sync::Arc<PgDatabase>>,
    /// Environment variables of the daemon process (e.g. `HOOKBRIDGE_TEST_CLOCK`).
    pub env: Vec<(String, String)>,
    /// No `admin.token` / `ingress.jwt_hs256_secret` in the config: the daemon generates them.
    pub generated_secrets: bool,
    child: Option<Child>,
    pub client: reqwest::Client,
}

/// What a test may change in the generated config.
pub struct Opts<'a> {
    /// TOML appended to the config (e.g. `[[orgs]]` or `[limits]` tables).
    pub extra: &'a str,
    /// Lines added to the `[sftp]` table.
    pub sftp_extra: &'a str,
    /// Lines of the `[delivery]` table.
    pub delivery: &'a str,
    /// Data dir somewhere else than the temp dir (e.g. a small tmpfs).
    pub data_dir: Option<PathBuf>,
    /// Lines added to the `[http]` table.
    pub http_extra: &'a str,
    /// Org folders on this S3 server (under a prefix of the daemon's own) instead of
    /// the local data dir. `HOOKBRIDGE_TEST_STORAGE=s3` sets it for every daemon.
    pub s3: Option<crate::seaweed::S3Server>,
    /// The state in this PostgreSQL database instead of SQLite (one the test made itself:
    /// a fresh one goes in `pg`).
    pub store_url: Option<String>,
    /// The state in this fresh database ([`fresh_pg_database`]), which the daemon keeps
    /// alive: the last daemon (or test) holding it drops it.
    pub pg: Option<std::sync::Arc<PgDatabase>>,
    /// Environment variables of the daemon process.
    pub env: Vec<(String, String)>,
    /// The key prefix on `s3`; several daemons given the same one share their org folders
    /// (the nodes of one service). Unset: a prefix of the daemon's own.
    pub s3_prefix: Option<String>,
    /// Top-level TOML keys written before any table (e.g. `node_id = "a"`).
    pub top: &'a str,
    /// Leave `admin.token` and `ingress.jwt_hs256_secret` unset (the daemon generates
    /// them; [`ADMIN_TOKEN`] and [`INGRESS_SECRET`] do not apply then).
    pub generated_secrets: bool,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            extra: "",
            sftp_extra: "",
            delivery: DEFAULT_DELIVERY,
            data_dir: None,
            http_extra: "",
            s3: None,
            store_url: None,
            pg: None,
            env: Vec::new(),
            s3_prefix: None,
            top: "",
            generated_secrets: false,
        }
    }
}

impl Daemon {
    pub async fn start() -> Daemon {
        Self::start_with("").await
    }

    /// `extra` is TOML appended to the generated config (e.g. `[[orgs]]` tables).
    pub async fn start_with(extra: &str) -> Daemon {
        Self::start_opts(Opts {
            extra,
            ..Opts::default()
        })
        .await
    }

    /// Like `start_with`, with `sftp_extra` added to the `[sftp]` table.
    pub async fn start_with_sftp(sftp_extra: &str, extra: &str) -> Daemon {
        Self::start_opts(Opts {
            sftp_extra,
            extra,
            ..Opts::default()
        })
        .await
    }

    /// `delivery` replaces the lines of the `[delivery]` table (see [`DEFAULT_DELIVERY`]).
    pub async fn start_with_delivery(delivery: &str) -> Daemon {
        Self::start_opts(Opts {
            delivery,
            ..Opts::default()
        })
        .await
    }

    pub async fn start_opts(o: Opts<'_>) -> Daemon {
        let (extra, sftp_extra, delivery, data_dir) =
            (o.extra, o.sftp_extra, o.delivery, o.data_dir);
        let http_extra = o.http_extra.to_owned();
        let s3 = match o.s3 {
            Some(s) => Some(s),
            None if std::env::var("HOOKBRIDGE_TEST_STORAGE").is_ok_and(|v| v == "s3") => Some(
                crate::seaweed::server()
                    .await
                    .expect("HOOKBRIDGE_TEST_STORAGE=s3 needs SeaweedFS"),
            ),
            None => None,
        }
        .map(|s| {
            let prefix = o
                .s3_prefix
                .clone()
                .unwrap_or_else(|| crate::seaweed::unique_prefix("daemon"));
            (s, prefix)
        });
        let pg = match (
            o.pg,
            &o.store_url,
            std::env::var("HOOKBRIDGE_TEST_STORE").as_deref(),
        ) {
            (Some(db), _, _) => Some(db),
            (None, None, Ok("postgres")) => Some(fresh_pg_database().await),
            _ => None,
        };
        let store_url = o.store_url.or_else(|| pg.as_ref().map(|db| db.url.clone()));
        let dir = tempfile::Builder::new()
            .prefix("hookbridge-it-")
            .tempdir()
            .unwrap();
        let mut d = Daemon {
            dir,
            http_port: free_port(),
            sftp_port: free_port(),
            extra_config: extra.to_owned(),
            data_dir_override: data_dir,
            sftp_extra: sftp_extra.to_owned(),
            delivery_config: delivery.to_owned(),
            http_extra,
            top_config: o.top.to_owned(),
            s3,
            store_url,
            _pg: pg,
            env: o.env,
            generated_secrets: o.generated_secrets,
            child: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        d.spawn_first().await;
        d
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir_override
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("hookbridge.toml")
    }

    /// The org folders as the daemon sees them, on whichever backend it runs, for tests to
    /// check what is there without going through the daemon.
    pub fn storage(&self) -> std::sync::Arc<dyn hookbridge::storage::Storage> {
        match &self.s3 {
            Some((s, prefix)) => std::sync::Arc::new(s.storage(prefix)),
            None => std::sync::Arc::new(
                hookbridge::storage::local::LocalStorage::open(
                    &self.data_dir().join("orgs"),
                    &self.dir.path().join("probe-tmp"),
                )
                .unwrap(),
            ),
        }
    }

    /// Every file of `org` (`/virtual/path` → bytes), read through [`Daemon::storage`]:
    /// what a test asserts with it holds on either backend.
    pub async fn org_files(&self, org: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let s = self.storage();
        let org = hookbridge::storage::OrgName::new(org).unwrap();
        let mut out = std::collections::BTreeMap::new();
        for f in s.walk(&org).await.unwrap() {
            let body = hookbridge::storage::read_small(&*s, &org, &f.path, 16 << 20)
                .await
                .unwrap();
            out.insert(f.path.virtual_path(), body.to_vec());
        }
        out
    }

    pub fn org_dir(&self, org: &str) -> PathBuf {
        self.data_dir().join("orgs").join(org)
    }

    pub fn write_config(&self) {
        let cfg = format!(
            r#"data_dir = "{data}"
{top}
[http]
listen = "127.0.0.1:{http}"
{http_extra}
[sftp]
listen = "127.0.0.1:{sftp}"
auth_rejection_time = "100ms"
{sftp_extra}
{secrets}
[delivery]
{delivery}
[log]
level = "info,hookbridge=debug"
{storage}
{extra}
"#,
            storage = self
                .s3
                .as_ref()
                .map(|(s, prefix)| s.toml(prefix))
                .unwrap_or_default(),
            secrets = if self.generated_secrets {
                String::new()
            } else {
                format!("[ingress]\njwt_hs256_secret = \"{INGRESS_SECRET}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"")
            },
            data = self.data_dir().display(),
            top = self.top_config,
            http = self.http_port,
            sftp = self.sftp_port,
            extra = self.extra_config,
            sftp_extra = self.sftp_extra,
            delivery = self.delivery_config,
            http_extra = self.http_extra,
        );
        std::fs::write(self.config_path(), cfg).unwrap();
    }

    /// The first start: the ports were only free when picked, so another process may have
    /// taken one since; then pick new ones and start again.
    async fn spawn_first(&mut self) {
        for _ in 0..5 {
            match self.try_spawn().await {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") => {
                    let _ = std::fs::remove_file(self.dir.path().join("daemon.log"));
                    self.http_port = free_port();
                    self.sftp_port = free_port();
                }
                Err(log) => panic!("{log}"),
            }
        }
        panic!("hookbridge found its ports taken 5 times in a row");
    }

    pub async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("{log}");
        }
    }

    /// Starts the daemon and waits until it is healthy; `Err` with its log if it exited.
    async fn try_spawn(&mut self) -> Result<(), String> {
        self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hookbridge"));
        match &self.store_url {
            Some(url) => cmd
                .env("HOOKBRIDGE_STORE_URL", url)
                .env("HOOKBRIDGE_SECRETS_KEY", PG_SECRETS_KEY),
            None => cmd
                .env_remove("HOOKBRIDGE_STORE_URL")
                .env_remove("HOOKBRIDGE_SECRETS_KEY"),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("AWS_ACCESS_KEY_ID", crate::seaweed::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", crate::seaweed::SECRET_KEY)
            .spawn()
            .expect("start hookbridge");
        self.child = Some(child);
        let url = self.url("/healthz");
        let client = self.client.clone();
        let log_path = self.dir.path().join("daemon.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "hookbridge exited with {status}: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "hookbridge did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("hookbridge did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("daemon running").id();
        unsafe { libc::kill(pid as i32, sig) };
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http_port, path)
    }

    pub fn token(&self, org: &str) -> String {
        token_with(
            INGRESS_SECRET,
            json!({"org": org, "exp": chrono::Utc::now().timestamp() + 600}),
        )
    }

    pub async fn post_event(&self, org: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/orgs/{org}/events")))
            .bearer_auth(self.token(org))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// An admin request; returns status and parsed JSON body (Null when empty).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .client
            .request(m, self.url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// An SFTP user with a password in `org` (which must exist).
    pub async fn sftp_user(&self, org: &str, name: &str, password: &str) {
        let path = format!("/v1/orgs/{org}/sftp-users/{name}");
        let (s, b) = self
            .admin("PUT", &path, Some(json!({ "password": password })))
            .await;
        assert!(s == 201 || s == 200, "PUT SFTP user: {s} {b}");
    }

    /// Org + sftp hook for all types; returns nothing, panics on failure.
    pub async fn org_with_sftp_hook(&self, org: &str) {
        let (s, _) = self
            .admin("PUT", &format!("/v1/orgs/{org}"), Some(json!({})))
            .await;
        assert!(s == 201 || s == 200, "PUT org: {s}");
        let (s, b) = self
            .admin(
                "POST",
                &format!("/v1/orgs/{org}/webhooks"),
                Some(json!({"kind": "sftp", "events": ["*"]})),
            )
            .await;
        assert_eq!(s, 201, "create sftp hook: {b}");
    }
}

impl Drop for Daemon {
    /// Kills the process; its database (`pg`) goes after, with the fields.
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Every regular file under `dir`, recursively, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A Python interpreter with paramiko/asyncssh (the venv made by scripts/test), if any.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Posters that keep posting `payment` events to `org` until a post fails (e.g. the daemon
/// was killed); every acknowledgement (202 body) is kept.
pub struct Burst {
    pub acked: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Burst {
    pub fn start(d: &Daemon, org: &str, writers: usize, prefix: &str) -> Burst {
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let url = d.url(&format!("/v1/orgs/{org}/events"));
        let token = d.token(org);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let (acked, token, url, prefix) =
                (acked.clone(), token.clone(), url.clone(), prefix.to_owned());
            tasks.spawn(async move {
                let client = reqwest::Client::new();
                for i in 0.. {
                    let body = json!({"id": format!("evt_{prefix}{w}_{i}"), "type": "payment", "data": {"w": w, "i": i}});
                    match client.post(&url).bearer_auth(&token).json(&body).send().await {
                        Ok(r) if r.status() == 202 => {
                            let v: Value = r.json().await.unwrap();
                            acked.lock().unwrap().push(v);
                        }
                        _ => break,
                    }
                }
            });
        }
        Burst { acked, tasks }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for the posters to stop (after the daemon died) and returns what was acked.
    pub async fn finish(mut self) -> Vec<Value> {
        while self.tasks.join_next().await.is_some() {}
        self.acked.lock().unwrap().clone()
    }
}

/// The eight event types of the platform, for tests that post one of each.
pub const TYPES: [&str; 8] = [
    "inboundMessage",
    "messageSend",
    "deliveryReport",
    "payment",
    "setStatus",
    "conversationClosed",
    "moveToQueue",
    "conversationAssignment",
];
