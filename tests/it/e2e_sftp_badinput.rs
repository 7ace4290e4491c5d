//! Raw, malformed SFTP packets on an authenticated channel, and a client killed in the
//! middle of a download: each gets a STATUS error or a closed channel, never a panic or
//! a stuck task, and the next login works.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::e2e_sftp::{big_file, org, py, user, CLIENT_TIMEOUT};
use crate::harness::*;

const PW: &str = "raw-packets-pw";

/// Sends each case's bytes on a fresh `sftp` subsystem channel and reports what came
/// back: a list of `version`, `status:<code>`, `data:<len>`, `closed` or `timeout`.
/// After every case a normal client logs in and lists `/`.
const RAW: &str = r#"
import struct, socket
PW = sys.argv[1]
def pkt(ty, body=b''): return struct.pack('>IB', len(body) + 1, ty) + body
def s(b): return struct.pack('>I', len(b)) + b
def recv_exact(ch, n):
    b = b''
    while len(b) < n:
        d = ch.recv(n - len(b))
        if not d: return None
        b += d
    return b
def recv(ch):
    try:
        h = recv_exact(ch, 4)
        if h is None: return 'closed'
        b = recv_exact(ch, struct.unpack('>I', h)[0])
        if b is None: return 'closed'
    except socket.timeout:
        return 'timeout'
    if b[0] == 2: return 'version'
    if b[0] == 101: return 'status:%d' % struct.unpack('>I', b[5:9])[0]
    if b[0] == 102: return 'handle:' + b[9:9 + struct.unpack('>I', b[5:9])[0]].decode()
    if b[0] == 103: return 'data:%d' % struct.unpack('>I', b[5:9])[0]
    return 'type:%d' % b[0]
INIT = pkt(1, struct.pack('>I', 3))
OPEN = pkt(3, struct.pack('>I', 1) + s(b'/f.json') + struct.pack('>II', 1, 0))
def read(handle, n): return pkt(5, struct.pack('>I', 2) + s(handle) + struct.pack('>QI', 0, n))
cases = [
    ('oversized_length', [INIT, struct.pack('>I', 0x7fffffff) + b'\x05\x00\x00\x00\x01'], False),
    ('zero_length', [INIT, struct.pack('>I', 0)], False),
    ('truncated_then_eof', [INIT, struct.pack('>I', 100) + b'\x05\x00\x00'], True),
    ('unknown_type', [INIT, pkt(77, struct.pack('>I', 9))], False),
    ('read_bad_handle', [INIT, pkt(5, struct.pack('>I', 10) + s(b'nope') + struct.pack('>QI', 0, 100))], False),
    ('close_bad_handle', [INIT, pkt(4, struct.pack('>I', 11) + s(b'nope'))], False),
    ('huge_read_len', [INIT, OPEN, 'READ'], False),
    ('garbage_after_init', [INIT, b'\x00\x00\x00\x05\xff\xff\xff\xff\xff'], False),
    ('truncated_body', [INIT, b'\x00\x00\x00\x03\x05\x01\x02'], False),
    ('string_longer_than_packet', [INIT, pkt(16, struct.pack('>I', 13) + struct.pack('>I', 0xffffffff) + b'abc')], False),
    ('second_init', [INIT, INIT], False),
    ('request_before_init', [pkt(16, struct.pack('>I', 12) + s(b'.'))], False),
]
res = {}
for name, parts, eof in cases:
    t = paramiko.Transport((H, P)); t.connect(username='etl', password=PW)
    ch = t.open_session(); ch.invoke_subsystem('sftp'); ch.settimeout(5)
    got = []
    for part in parts:
        if part == 'READ':
            handle = got[-1].split(':', 1)[1].encode()
            ch.sendall(read(handle, 0xffffffff))
        else:
            ch.sendall(part)
        if part is INIT or part is OPEN:
            got.append(recv(ch))
    if eof: ch.shutdown_write()
    last = recv(ch)
    got.append(last)
    if last.startswith('status') or last.startswith('data'):
        # The channel is still usable after an error answer.
        ch.sendall(pkt(16, struct.pack('>I', 99) + s(b'.')))
        got.append('alive' if recv(ch) == 'type:104' else 'dead')
    t.close()
    t2, c2 = connect('etl', PW)
    got.append('relogin:%d' % len(c2.listdir('/')))
    t2.close()
    res[name] = got
print(json.dumps(res))
"#;

#[tokio::test]
async fn malformed_packets_get_an_error_or_a_closed_channel() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": PW})).await;
    std::fs::create_dir_all(d.org_dir("acme")).unwrap();
    std::fs::write(d.org_dir("acme").join("f.json"), vec![b'x'; 600 * 1024]).unwrap();
    let (ok, out) = py(&d, RAW, &[PW]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).expect(&out);
    let relogin = "relogin:1";
    assert_eq!(
        v,
        json!({
            "oversized_length": ["version", "closed", relogin],
            "zero_length": ["version", "closed", relogin],
            "truncated_then_eof": ["version", "closed", relogin],
            "unknown_type": ["version", "status:8", "alive", relogin],
            "read_bad_handle": ["version", "status:4", "alive", relogin],
            "close_bad_handle": ["version", "status:2", "alive", relogin],
            // A READ asking for 4 GiB gets at most what limits@openssh.com advertises.
            "huge_read_len": ["version", "handle:1", format!("data:{}", 255 * 1024), "alive", relogin],
            "garbage_after_init": ["version", "status:8", "alive", relogin],
            "truncated_body": ["version", "status:5", "alive", relogin],
            "string_longer_than_packet": ["version", "status:5", "alive", relogin],
            "second_init": ["version", "closed", "closed", relogin],
            "request_before_init": ["closed", relogin],
        }),
        "{out}"
    );
    assert_healthy(&d).await;
}

/// `/healthz` answers, no session is left behind, and the daemon never panicked.
async fn assert_healthy(d: &Daemon) {
    let r = d.client.get(d.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_for(
        "every SFTP session to end",
        Duration::from_secs(20),
        || async {
            let m = d
                .client
                .get(d.url("/metrics"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            m.lines()
                .any(|l| l == "hookbridge_sftp_sessions 0")
                .then_some(())
        },
    )
    .await;
    let log = d.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

#[tokio::test]
async fn client_killed_mid_download() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": PW})).await;
    std::fs::create_dir_all(d.org_dir("acme")).unwrap();
    big_file(&d.org_dir("acme").join("big.bin"), 64 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let script = format!(
        "import sys, paramiko\nt = paramiko.Transport(('127.0.0.1', {port}))\n\
         t.connect(username='etl', password='{PW}')\ns = paramiko.SFTPClient.from_transport(t)\n\
         said = [False]\ndef cb(done, total):\n    if done > (4 << 20) and not said[0]:\n        \
         said[0] = True; print('halfway', flush=True)\n\
         s.get('/big.bin', sys.argv[1], callback=cb)\nprint('finished', flush=True)\n",
        port = d.sftp_port
    );
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(script)
        .arg(tmp.path().join("big.bin"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(CLIENT_TIMEOUT, lines.next_line())
        .await
        .expect("download started")
        .unwrap();
    assert_eq!(first.as_deref(), Some("halfway"));
    child.start_kill().unwrap(); // SIGKILL: no SSH goodbye, no EOF, just a dead socket.
    let _ = child.wait().await;
    let got = std::fs::metadata(tmp.path().join("big.bin")).map_or(0, |m| m.len());
    assert!(got < 64 << 20, "the download was not cut: {got} bytes");

    let (ok, out) = py(
        &d,
        "t, s = connect('etl', sys.argv[1])\nprint(s.stat('/big.bin').st_size)\n",
        &[PW],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), (64u64 << 20).to_string());
    assert_healthy(&d).await;
    // The cut download is still audited, with the bytes served so far.
    wait_for("the cut download's audit line", CLIENT_TIMEOUT, || async {
        d.log()
            .lines()
            .any(|l| l.contains("sftp download") && l.contains("big.bin"))
            .then_some(())
    })
    .await;
}

/// A client that asks for far more than its window and dies without reading: the
/// replies can never be sent, and the channel's tasks must still end (audit written,
/// file closed, shutdown not held up).
#[tokio::test]
async fn client_dead_while_replies_wait_for_window() {
    let mut d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": PW})).await;
    std::fs::create_dir_all(d.org_dir("acme")).unwrap();
    big_file(&d.org_dir("acme").join("big.bin"), 16 << 20);
    let script = r#"
import struct
def pkt(ty, body=b''): return struct.pack('>IB', len(body) + 1, ty) + body
def s(b): return struct.pack('>I', len(b)) + b
t = paramiko.Transport((H, P)); t.connect(username='etl', password=sys.argv[1])
ch = t.open_session(); ch.invoke_subsystem('sftp'); ch.settimeout(10)
ch.sendall(pkt(1, struct.pack('>I', 3)))
ch.sendall(pkt(3, struct.pack('>I', 1) + s(b'/big.bin') + struct.pack('>II', 1, 0)))
# Read up to the HANDLE reply (type 102, id 1), then ask for 16 MiB and never read again.
buf = b''
while b'\x66\x00\x00\x00\x01' not in buf:
    buf += ch.recv(65536)
for i in range(256):
    ch.sendall(pkt(5, struct.pack('>I', 100 + i) + s(b'1') + struct.pack('>QI', i * 65536, 65536)))
time.sleep(1)
print('dying', flush=True)
os._exit(0)
"#;
    let (_, out) = py(&d, script, &[PW]).await;
    assert!(out.contains("dying"), "{out}");
    assert_healthy(&d).await;
    wait_for(
        "the dead client's download to be released",
        Duration::from_secs(20),
        || async {
            d.log()
                .lines()
                .any(|l| l.contains("sftp download") && l.contains("big.bin"))
                .then_some(())
        },
    )
    .await;
    // Nothing holds the draining shutdown up.
    let code = tokio::task::spawn_blocking(move || d.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}
