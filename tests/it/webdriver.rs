//! A small W3C WebDriver client over `chromedriver` (Debian's `chromium-driver`) driving
//! a real headless Chromium: enough to click through the console like a person.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::harness::{free_port, require, require_that, wait_for};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, or `None` (a `SKIPPED:` line;
    /// a panic under `CI=true`) when either is missing.
    pub async fn start() -> Option<Browser> {
        if !require("chromedriver") {
            return None;
        }
        let bin = chromium();
        if !require_that("`chromium` (Debian package)", bin.is_some()) {
            return None;
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let http = reqwest::Client::new();
        let status = format!("http://127.0.0.1:{port}/status");
        wait_for("chromedriver ready", Duration::from_secs(30), || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                let v: Value = http.get(&status).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": bin.unwrap(), "args": args},
        }}});
        let resp: Value = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .unwrap();
        let id = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"))
            .to_owned();
        Some(Browser {
            driver,
            base: format!("http://127.0.0.1:{port}/session/{id}"),
            http,
            _profile: profile,
        })
    }

    async fn try_cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"]["error"].is_string() {
            return Err(v["value"].clone());
        }
        Ok(v["value"].clone())
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    /// The rendered text of the page, or `None` while it is between documents (a refresh).
    async fn try_body(&self) -> Option<String> {
        let v = self
            .try_cmd(
                reqwest::Method::POST,
                "/execute/sync",
                Some(json!({"script": "return document.body ? document.body.innerText : null;", "args": []})),
            )
            .await
            .ok()?;
        v.as_str().map(str::to_owned)
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css:?}: {v}"))
            .to_owned()
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` in the page (for what a person could do by hand, e.g. tampering).
    pub async fn script(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until the body text contains `needle`, reloading `reload` (if given) between
    /// looks: for states reached by background work (deliveries).
    pub async fn wait_text(&self, needle: &str, reload: Option<&str>) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Some(u) = reload {
                self.goto(u).await;
            }
            if let Some(b) = self.try_body().await {
                if b.contains(needle) {
                    return b;
                }
                last = Some(b);
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for page text {needle:?} at {}; the page says:\n{}\nsource: {}",
                    self.url().await,
                    last.unwrap_or_default(),
                    self.cmd(reqwest::Method::GET, "/source", None).await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn cookie(&self, name: &str) -> Option<String> {
        let v = self.cmd(reqwest::Method::GET, "/cookie", None).await;
        v.as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["value"].as_str())
            .map(str::to_owned)
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Saves a PNG of the viewport as `dir/name.png`.
    pub async fn screenshot(&self, dir: &Path, name: &str) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium through the driver, then the driver itself.
        let url = self.base.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let _ = reqwest::Client::new().delete(url).send().await;
                });
            }
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
