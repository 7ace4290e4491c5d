//! Before login: one source cannot take every unauthenticated slot, clean probes are not
//! punished, bans apply to open connections, and parallel password guesses neither blow up
//! memory nor escape the ban.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::e2e_sftp::{keygen, org, py, user};
use crate::harness::*;

/// Connects from `src` and reads what the server says first: its SSH banner line when the
/// connection was admitted, nothing (EOF) when it was refused.
pub(crate) async fn banner_from(src: &str, port: u16) -> (TcpStream, bool) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("the server neither greets nor closes")
        .unwrap_or(0);
    let admitted = buf[..n].starts_with(b"SSH-2.0-hookbridge");
    (s, admitted)
}

/// Waits until the daemon has finished with every connection (its session gauge is 0), so
/// whatever those connections scored has been scored.
async fn wait_idle(d: &Daemon) {
    wait_for(
        "every SSH connection to end",
        Duration::from_secs(60),
        || async {
            let m = d.metrics().await;
            m.lines()
                .any(|l| l == "hookbridge_sftp_sessions 0")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn one_source_holding_idle_connections_does_not_lock_out_another() {
    let d = Daemon::start_with("[defender]\nmax_unauthenticated = 16\n").await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
    // 127.0.0.1 tries to hold every unauthenticated slot with idle connections.
    let mut held = Vec::new();
    let mut admitted = 0;
    for _ in 0..16 {
        let (s, ok) = banner_from("127.0.0.1", d.sftp_port).await;
        admitted += usize::from(ok);
        held.push(s);
    }
    assert_eq!(admitted, 10, "sftp.max_startups_per_source (10) admitted");
    // A login from another source address still gets in.
    let script = r#"
import socket
s = socket.socket(); s.bind(('127.0.0.2', 0)); s.connect((H, P))
t = paramiko.Transport(s); t.connect(username='etl', password='right password')
print(json.dumps(paramiko.SFTPClient.from_transport(t).listdir('/')))
"#;
    let (ok, out) = py(&d, script, &[]).await;
    assert!(
        ok,
        "login from 127.0.0.2 while 127.0.0.1 holds its share: {out}"
    );
    assert!(d
        .log()
        .contains("too many unauthenticated SFTP connections from this address"));
    drop(held);
}

#[tokio::test]
async fn idle_connections_at_the_login_grace_time_are_scored() {
    let d = Daemon::start_with_sftp("login_grace_time = \"1s\"", "").await;
    // 5 idle connections × 2 points reach the threshold of 10.
    let mut held = Vec::new();
    for _ in 0..5 {
        let (s, ok) = banner_from("127.0.0.1", d.sftp_port).await;
        assert!(ok);
        held.push(s);
    }
    wait_for(
        "the idle source to be banned",
        Duration::from_secs(60),
        || async {
            d.metrics()
                .await
                .contains("hookbridge_defender_bans_total 1")
                .then_some(())
        },
    )
    .await;
    let (_, admitted) = banner_from("127.0.0.1", d.sftp_port).await;
    assert!(!admitted, "a banned source got a banner");
    assert!(d.log().contains("login grace time"));
}

#[tokio::test]
async fn clean_probes_do_not_ban_but_bad_passwords_do() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
    // Health checks and banner reads: connect, read the banner, close. 20 of them used to
    // score 40 points, four times the threshold.
    for _ in 0..20 {
        let (s, ok) = banner_from("127.0.0.1", d.sftp_port).await;
        assert!(ok, "probe refused: {}", d.log());
        drop(s);
    }
    wait_idle(&d).await;
    assert!(
        !d.metrics().await.contains("hookbridge_defender_bans_total"),
        "clean probes got the address banned"
    );
    let script = r#"
import socket
res = []
for pw in sys.argv[1:]:
    try:
        t, s = connect('etl', pw); s.listdir('/'); t.close(); res.append('ok')
    except paramiko.AuthenticationException:
        res.append('denied')
    except (paramiko.SSHException, EOFError, socket.error):
        res.append('refused')
print(json.dumps(res))
"#;
    let mut args = vec!["right password"];
    args.extend(["wrong"; 10]);
    args.push("right password");
    let (_, out) = py(&d, script, &args).await;
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).expect(&out);
    let mut want = vec![json!("ok")];
    want.extend(std::iter::repeat_n(json!("denied"), 10));
    want.push(json!("refused"));
    assert_eq!(v, Value::Array(want), "{out}");
}

#[tokio::test]
async fn a_ban_imposed_mid_connection_refuses_the_next_publickey_attempt() {
    let d = Daemon::start_with("[defender]\nthreshold = 3\n").await;
    org(&d, "acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "ed", "ed25519");
    user(&d, "acme", "etl", json!({"public_keys": [public]})).await;
    let script = r#"
import socket
key = paramiko.Ed25519Key.from_private_key_file(sys.argv[1])
t = paramiko.Transport((H, P)); t.start_client()
for i in range(3):
    try:
        connect('nobody', 'wrong')
    except paramiko.AuthenticationException:
        pass
try:
    t.auth_publickey('etl', key); print('accepted')
except (paramiko.AuthenticationException, paramiko.SSHException, EOFError, socket.error):
    print('refused')
"#;
    let (ok, out) = py(&d, script, &[key.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    assert!(d
        .metrics()
        .await
        .contains("hookbridge_defender_bans_total 1"));
    assert_eq!(out.lines().last(), Some("refused"), "{out}");
}

/// Peak resident memory of the daemon, KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test]
async fn parallel_password_guesses_are_bounded_in_memory_and_banned() {
    // Let all 32 connections in at once, so only the hashing bound limits memory.
    let d = Daemon::start_opts(Opts {
        sftp_extra: "max_startups_per_source = 64",
        ..Opts::default()
    })
    .await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
    let before = vm_hwm_kib(d.pid());
    let script = r#"
import threading, socket
start = threading.Barrier(32)
res = []
def guess(i):
    t = paramiko.Transport((H, P)); t.start_client()
    start.wait()
    try:
        t.auth_password('etl', 'wrong %d' % i); res.append('ok')
    except paramiko.AuthenticationException:
        res.append('denied')
    except (paramiko.SSHException, EOFError, socket.error):
        res.append('dropped')
threads = [threading.Thread(target=guess, args=(i,)) for i in range(32)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(sorted(set(res))))
"#;
    let (ok, out) = py(&d, script, &[]).await;
    assert!(ok, "{out}");
    assert!(!out.contains("\"ok\""), "{out}");
    let after = vm_hwm_kib(d.pid());
    // argon2id (m = 19,456 KiB) holds ~19 MiB per verification. At most one per core runs at
    // once; allow two more of slack for allocator retention and the 32 sessions themselves.
    // Unbounded, 32 parallel guesses peak near 32 × 19 MiB.
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let bound = (cores + 2) * 20 * 1024;
    eprintln!(
        "VmHWM {before} KiB -> {after} KiB (+{} KiB, bound {bound} KiB)",
        after - before
    );
    assert!(
        after - before < bound,
        "peak memory grew by {} KiB (bound {bound} KiB)",
        after - before
    );
    assert!(d
        .metrics()
        .await
        .contains("hookbridge_defender_bans_total 1"));
}
