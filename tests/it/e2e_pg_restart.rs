//! PostgreSQL restarted under load: while it is down ingest answers 503 with Retry-After
//! and acknowledges nothing; after, it recovers by itself, and every acknowledged event
//! is there exactly once. The test runs its own PostgreSQL cluster (initdb + pg_ctl on a
//! free port), since stopping the shared one would break other tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{free_port, require_that, wait_for, Burst, Daemon, Opts};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn pg(&self, args: &[&str]) {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")]);
            c
        } else {
            Command::new(format!("{PG_BIN}/pg_ctl"))
        };
        let out = cmd.args(args).output().expect("run pg_ctl");
        assert!(out.status.success(), "pg_ctl {args:?}: {out:?}");
    }
    fn start(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log");
        self.pg(&[
            "-D",
            path(&self.data()),
            "-l",
            path(&log),
            "-w",
            "-o",
            &opts,
            "start",
        ]);
    }
    fn stop(&self) {
        self.pg(&["-D", path(&self.data()), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(format!("{PG_BIN}/pg_ctl"))
            .args(["-D", path(&self.data()), "-m", "immediate", "stop"])
            .output();
        if is_root() {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
                .args(["-D", path(&self.data()), "-m", "immediate", "stop"])
                .output();
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn cluster() -> Option<Cluster> {
    if !require_that(
        "PostgreSQL 15 server binaries (/usr/lib/postgresql/15/bin)",
        Path::new(PG_BIN).join("initdb").exists(),
    ) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut init = if is_root() {
        Command::new("chown")
            .args(["postgres", path(dir.path())])
            .status()
            .unwrap();
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &format!("{PG_BIN}/initdb")]);
        c
    } else {
        Command::new(format!("{PG_BIN}/initdb"))
    };
    let out = init
        .args([
            "-D",
            path(&dir.path().join("data")),
            "-U",
            "postgres",
            "-A",
            "trust",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {out:?}");
    let c = Cluster {
        dir,
        port: free_port(),
    };
    c.start();
    Some(c)
}

#[tokio::test]
async fn postgres_restarted_under_load_answers_503_then_recovers_losing_nothing() {
    let Some(pg) = cluster() else { return };
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let d = Daemon::start_opts(Opts {
        store_url: Some(url),
        ..Default::default()
    })
    .await;
    d.org_with_sftp_hook("acme").await;

    // Load, then PostgreSQL goes away: each poster stops at its first answer other than 202.
    let burst = Burst::start(&d, "acme", 8, "pg");
    wait_for("acknowledged events", Duration::from_secs(30), || {
        let n = burst.count();
        async move { (n >= 100).then_some(()) }
    })
    .await;
    pg.stop();
    let mut acked = burst.finish().await;

    // Down: 503 with Retry-After, never 500, nothing acknowledged.
    let r = d
        .post_event(
            "acme",
            &json!({"id": "evt_down", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert!(r.headers().contains_key("retry-after"));

    // Back: it recovers without a restart of hookbridge.
    pg.start();
    let mut i = 0;
    let after: Value = wait_for("ingest to recover", Duration::from_secs(30), || {
        i += 1;
        let body = json!({"id": format!("evt_after_{i}"), "type": "payment", "data": {}});
        let d = &d;
        async move {
            let r = d.post_event("acme", &body).await;
            match r.status().as_u16() {
                202 => Some(r.json().await.unwrap()),
                503 => None,
                s => panic!(
                    "answered {s} while PostgreSQL came back: {:?}",
                    r.text().await
                ),
            }
        }
    })
    .await;
    acked.push(after);

    // Every acknowledged event is known exactly once: its file is there, and a repost is
    // answered 200 with the same result.
    let files = d.org_files("acme").await;
    for ack in &acked {
        let path = ack["files"][0].as_str().unwrap();
        let v: Value = serde_json::from_slice(&files[path]).unwrap();
        assert_eq!(v["id"], ack["id"]);
        let again = json!({"id": ack["id"], "type": "payment", "data": {}});
        let r = d.post_event("acme", &again).await;
        assert_eq!(r.status(), 200, "a repost of {} is known", ack["id"]);
        let v: Value = r.json().await.unwrap();
        assert_eq!(&v, ack);
    }
    let down_file = files.keys().any(|p| p.contains("evt_down"));
    assert!(!down_file, "the event refused with 503 left no file");

    // The session that listens for other nodes' jobs (NOTIFY) died with the server; the
    // node said so and listens again, without a restart.
    wait_for(
        "the job listener to reconnect",
        Duration::from_secs(30),
        || async {
            let log = d.log();
            (log.contains("listening again for new delivery jobs")
                && d.metrics()
                    .await
                    .contains("hookbridge_store_listener_connected 1"))
            .then_some(log)
        },
    )
    .await;
    assert!(
        d.log().contains("listens for new delivery jobs")
            || d.log().contains("cannot listen for new delivery jobs"),
        "the lost listener was not logged: {}",
        d.log()
    );
}
