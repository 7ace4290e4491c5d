//! The embedded SFTP server against real clients: OpenSSH `sftp`/`scp` and paramiko.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::harness::*;

pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(50);

/// An ed25519 (or other) key pair made by ssh-keygen; returns (key path, public key line).
pub(crate) fn keygen(dir: &Path, name: &str, kind: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let mut cmd = std::process::Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", "test", "-f"])
        .arg(&key);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .unwrap_or_else(|_| std::fs::read_to_string(format!("{}.pub", key.display())).unwrap());
    (key, public.trim().to_owned())
}

pub(crate) async fn user(d: &Daemon, org: &str, name: &str, body: Value) {
    let (s, b) = d
        .admin(
            "PUT",
            &format!("/v1/orgs/{org}/sftp-users/{name}"),
            Some(body),
        )
        .await;
    assert!(s == 200 || s == 201, "PUT user: {s} {b}");
}

pub(crate) async fn org(d: &Daemon, org: &str) {
    let (s, b) = d
        .admin("PUT", &format!("/v1/orgs/{org}"), Some(json!({})))
        .await;
    assert!(s == 200 || s == 201, "PUT org: {s} {b}");
}

pub(crate) async fn run(mut cmd: Command) -> Output {
    cmd.kill_on_drop(true).stdin(Stdio::null());
    tokio::time::timeout(CLIENT_TIMEOUT, cmd.output())
        .await
        .expect("client timed out")
        .expect("client runs")
}

pub(crate) fn ssh_opts(cmd: &mut Command, key: &Path) {
    cmd.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-i",
    ])
    .arg(key);
}

/// `sftp -b` with `batch`; returns (success, stdout + stderr).
pub(crate) async fn sftp_batch(
    d: &Daemon,
    user: &str,
    key: &Path,
    batch: &str,
    cwd: &Path,
) -> (bool, String) {
    let file = cwd.join(format!("batch-{}", free_port()));
    std::fs::write(&file, batch).unwrap();
    let mut cmd = Command::new("sftp");
    ssh_opts(&mut cmd, key);
    cmd.arg("-P")
        .arg(d.sftp_port.to_string())
        .arg("-b")
        .arg(&file);
    cmd.arg(format!("{user}@127.0.0.1")).current_dir(cwd);
    let out = run(cmd).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a paramiko script; `H`, `P` are host and port, `sys.argv[1:]` the args.
pub(crate) async fn py(d: &Daemon, script: &str, args: &[&str]) -> (bool, String) {
    let prelude = format!(
        "import sys, os, json, hashlib, time, stat, paramiko\nH, P = '127.0.0.1', {}\n\
         def connect(u, pw=None, key=None):\n    t = paramiko.Transport((H, P))\n    \
         t.connect(username=u, password=pw, pkey=key)\n    return t, paramiko.SFTPClient.from_transport(t)\n",
        d.sftp_port
    );
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(format!("{prelude}{script}")).args(args);
    let out = run(cmd).await;
    // paramiko logs refused connections on stderr: results are read from stdout alone.
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

pub(crate) fn sha256_file(p: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A file of pseudo-random bytes (incompressible, so nothing shortcuts the transfer).
pub(crate) fn big_file(path: &Path, size: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

pub(crate) async fn post(d: &Daemon, org: &str, id: &str, ty: &str) {
    let r = d
        .post_event(org, &json!({"id": id, "type": ty, "data": {"n": id}}))
        .await;
    assert_eq!(r.status(), 202, "post event");
}

/// Virtual path of a file under the org folder.
pub(crate) fn virt(d: &Daemon, org: &str, p: &Path) -> String {
    format!("/{}", p.strip_prefix(d.org_dir(org)).unwrap().display())
}

#[tokio::test]
async fn openssh_sftp_and_scp_basics() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(&d, "acme", "etl", json!({"public_keys": [public]})).await;
    for i in 0..3 {
        post(&d, "acme", &format!("evt_{i}"), "payment").await;
    }
    post(&d, "acme", "evt_dr", "deliveryReport").await;
    // Read through the storage seam: the same assertions on local disk and on S3.
    let files = d.org_files("acme").await;
    assert_eq!(files.len(), 4);
    let names: Vec<&String> = files.keys().collect();

    // List and download everything, byte-identical.
    let dl = tmp.path().join("dl");
    std::fs::create_dir(&dl).unwrap();
    let (ok, out) = sftp_batch(
        &d,
        "etl",
        &key,
        "ls -l /\npwd\nget -r /payment\nget -r deliveryReport\n",
        &dl,
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("payment") && out.contains("deliveryReport"),
        "{out}"
    );
    assert!(out.contains("Remote working directory: /"), "{out}");
    for (name, body) in &files {
        let local = dl.join(name.trim_start_matches('/'));
        assert_eq!(&std::fs::read(&local).unwrap(), body, "{}", local.display());
    }

    // scp (SFTP protocol underneath on OpenSSH >= 9).
    let mut cmd = Command::new("scp");
    ssh_opts(&mut cmd, &key);
    cmd.arg("-P").arg(d.sftp_port.to_string());
    cmd.arg(format!("etl@127.0.0.1:{}", names[0]))
        .arg(tmp.path().join("scp.json"));
    let out = run(cmd).await;
    assert!(out.status.success(), "scp: {out:?}");
    assert_eq!(
        &std::fs::read(tmp.path().join("scp.json")).unwrap(),
        &files[names[0]]
    );

    // rename (fails onto an existing file), posix-rename (replaces), delete. A reader
    // makes no folders: /done is the operator's.
    let org = hookbridge::storage::OrgName::new("acme").unwrap();
    d.storage()
        .mkdir(
            &org,
            &hookbridge::storage::StoragePath::parse("/done").unwrap(),
        )
        .await
        .unwrap();
    // Sorted by name, the deliveryReport file comes first: it stays.
    let (a, b, c) = (names[1], names[2], names[3]);
    let batch = format!(
        "rename -l {a} /done/a.json\n-rename -l {b} /done/a.json\n\
         rename {b} /done/a.json\nrm {c}\nls /done\n"
    );
    let (ok, out) = sftp_batch(&d, "etl", &key, &batch, tmp.path()).await;
    assert!(ok, "{out}");
    let after = d.org_files("acme").await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        [names[0], &"/done/a.json".to_string()],
        "renamed, replaced and deleted"
    );
    assert_eq!(after["/done/a.json"], files[b]);
    // The store's count followed: two files, their bytes.
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    let bytes: usize = after.values().map(|v| v.len()).sum();
    assert_eq!(
        (u["files"].as_u64(), u["bytes"].as_u64()),
        (Some(2), Some(bytes as u64)),
        "{u}"
    );
    let log = d.log();
    assert!(
        log.contains("sftp login") && log.contains("sftp delete") && log.contains("sftp download"),
        "audit lines missing"
    );

    // A reader cannot upload.
    std::fs::write(tmp.path().join("up.txt"), "x").unwrap();
    let (ok, out) = sftp_batch(&d, "etl", &key, "put up.txt /up.txt\n", tmp.path()).await;
    assert!(!ok, "{out}");
    assert!(!d.org_files("acme").await.contains_key("/up.txt"));
}

#[tokio::test]
async fn uploads_need_the_permission_and_appear_whole() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(
        &d,
        "acme",
        "writer",
        json!({"public_keys": [public], "upload": true}),
    )
    .await;
    big_file(&tmp.path().join("up.bin"), 3 << 20);
    let (ok, out) = sftp_batch(
        &d,
        "writer",
        &key,
        "put up.bin /up.bin\nls -l /\n",
        tmp.path(),
    )
    .await;
    assert!(ok, "{out}");
    let files = d.org_files("acme").await;
    assert_eq!(
        files["/up.bin"],
        std::fs::read(tmp.path().join("up.bin")).unwrap()
    );
    // The upload counts in the org's usage as it is published.
    let (_, u) = d.admin("GET", "/v1/orgs/acme/usage", None).await;
    assert_eq!(
        (u["files"].as_u64(), u["bytes"].as_u64()),
        (Some(1), Some(3 << 20)),
        "{u}"
    );
}

#[tokio::test]
async fn paramiko_password_listdir_stat_get_remove() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "bob", json!({"password": "correct horse"})).await;
    // Written through the storage seam, so that this runs on local disk and on S3.
    let org = hookbridge::storage::OrgName::new("acme").unwrap();
    let many: Vec<hookbridge::storage::EventFile> = (0..1000)
        .map(|i| hookbridge::storage::EventFile {
            org: org.clone(),
            path: hookbridge::storage::StoragePath::parse(&format!("/many/f{i:04}.json")).unwrap(),
            body: format!("{{\"i\":{i}}}").into(),
        })
        .collect();
    for r in d.storage().write_events(&many).await {
        r.unwrap();
    }
    let script = r#"
t, s = connect('bob', 'correct horse')
names = s.listdir('/many')
st = s.stat('/many/f0007.json')
s.get('/many/f0007.json', sys.argv[1])
s.remove('/many/f0008.json')
try:
    s.stat('/many/f0008.json'); gone = False
except IOError:
    gone = True
print(json.dumps({"n": len(names), "uniq": len(set(names)), "size": st.st_size, "isreg": stat.S_ISREG(st.st_mode), "gone": gone}))
"#;
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("f7");
    let (ok, out) = py(&d, script, &[local.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({"n": 1000, "uniq": 1000, "size": 7, "isreg": true, "gone": true})
    );
    assert_eq!(std::fs::read_to_string(local).unwrap(), "{\"i\":7}");
    let left = d.org_files("acme").await;
    assert_eq!(left.len(), 999);
    assert!(!left.contains_key("/many/f0008.json"));
}

#[tokio::test]
async fn large_download_with_openssh_and_paramiko() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(
        &d,
        "acme",
        "etl",
        json!({"public_keys": [public], "password": "big files please"}),
    )
    .await;
    std::fs::create_dir_all(d.org_dir("acme")).unwrap();
    let src = d.org_dir("acme").join("big.bin");
    big_file(&src, 256 << 20);
    let want = sha256_file(&src);

    let (ok, out) = sftp_batch(
        &d,
        "etl",
        &key,
        "get /big.bin big-openssh.bin\n",
        tmp.path(),
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(sha256_file(&tmp.path().join("big-openssh.bin")), want);
    std::fs::remove_file(tmp.path().join("big-openssh.bin")).unwrap();

    let script = r#"
t, s = connect('etl', 'big files please')
s.get('/big.bin', sys.argv[1])
print('done')
"#;
    let local = tmp.path().join("big-paramiko.bin");
    let (ok, out) = py(&d, script, &[local.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    assert_eq!(sha256_file(&local), want);
    assert!(
        d.log().contains("bytes=268435456"),
        "download audit with bytes"
    );
}

#[tokio::test]
async fn the_jail_holds() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    org(&d, "beta").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key_a, pub_a) = keygen(tmp.path(), "a", "ed25519");
    let (key_b, pub_b) = keygen(tmp.path(), "b", "ed25519");
    user(&d, "acme", "alice", json!({"public_keys": [pub_a]})).await;
    user(&d, "beta", "bert", json!({"public_keys": [pub_b]})).await;
    let a = d.org_dir("acme");
    let b = d.org_dir("beta");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(a.join("mine.json"), "{}").unwrap();
    std::fs::write(b.join("secret-of-beta.json"), "{\"beta\":true}").unwrap();
    let outside = tmp.path().join("host-secret");
    std::fs::write(&outside, "host secret").unwrap();
    std::os::unix::fs::symlink(&outside, a.join("planted")).unwrap();
    std::os::unix::fs::symlink(&b, a.join("to-beta")).unwrap();
    std::os::unix::fs::symlink("/etc", a.join("etc")).unwrap();

    let dl = tmp.path().join("dl");
    std::fs::create_dir(&dl).unwrap();
    // `cd ..` at the root stays at the root, as with a chrooted OpenSSH.
    let (ok, out) = sftp_batch(&d, "alice", &key_a, "cd ..\npwd\n", &dl).await;
    assert!(ok && out.contains("Remote working directory: /\n"), "{out}");
    for cmd in [
        "get /../../etc/passwd",
        "get ../etc/passwd",
        "get /planted",
        "get /etc/passwd",
        "ls /to-beta",
        "get /to-beta/secret-of-beta.json",
        "ls /beta",
        "get /beta/secret-of-beta.json",
        "ls ../beta",
    ] {
        let (ok, out) = sftp_batch(&d, "alice", &key_a, &format!("{cmd}\n"), &dl).await;
        assert!(!ok, "{cmd} succeeded: {out}");
        // The echoed command names the file; a listing or content would show more.
        let leaked = out.lines().filter(|l| !l.starts_with("sftp>")).any(|l| {
            l.contains("root:")
                || l.contains("secret-of-beta.json ")
                || l.ends_with("secret-of-beta.json") && !l.contains("not found")
        });
        assert!(!leaked, "{cmd} leaked: {out}");
    }
    assert_eq!(
        std::fs::read_dir(&dl)
            .unwrap()
            .filter(|e| !e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("batch-"))
            .count(),
        0
    );
    // Listings hide the planted links; org B only sees its own files.
    let (ok, out) = sftp_batch(&d, "alice", &key_a, "ls -la /\n", &dl).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("mine.json") && !out.contains("planted") && !out.contains("to-beta"),
        "{out}"
    );
    let (ok, out) = sftp_batch(&d, "bert", &key_b, "ls -la /\n", &dl).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("secret-of-beta") && !out.contains("mine.json"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host secret");
}

#[tokio::test]
async fn refused_logins_and_other_key_types() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (ed, ed_pub) = keygen(tmp.path(), "ed", "ed25519");
    let (ec, ec_pub) = keygen(tmp.path(), "ec", "ecdsa");
    let (rsa, rsa_pub) = keygen(tmp.path(), "rsa", "rsa");
    let (stranger, _) = keygen(tmp.path(), "stranger", "ed25519");
    user(
        &d,
        "acme",
        "etl",
        json!({"public_keys": [ed_pub, ec_pub, rsa_pub], "password": "right password"}),
    )
    .await;
    for key in [&ed, &ec, &rsa] {
        let (ok, out) = sftp_batch(&d, "etl", key, "ls /\n", tmp.path()).await;
        assert!(ok, "{}: {out}", key.display());
    }
    let (ok, _) = sftp_batch(&d, "etl", &stranger, "ls /\n", tmp.path()).await;
    assert!(!ok, "unregistered key accepted");
    let (ok, _) = sftp_batch(&d, "nobody", &ed, "ls /\n", tmp.path()).await;
    assert!(!ok, "unknown user accepted");
    let script = r#"
res = {}
for u, pw in [('etl', 'wrong password'), ('nobody', 'right password'), ('etl', 'right password')]:
    try:
        t, s = connect(u, pw); s.listdir('/'); t.close(); res[u + ':' + pw] = True
    except paramiko.AuthenticationException:
        res[u + ':' + pw] = False
print(json.dumps(res))
"#;
    let (ok, out) = py(&d, script, &[]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({"etl:wrong password": false, "nobody:right password": false, "etl:right password": true})
    );
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("hookbridge_sftp_auth_failures_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn session_limit_refuses_extra_connections_cleanly() {
    let d = Daemon::start_with_sftp("max_sessions = 2", "").await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
    let script = r#"
c1 = connect('etl', 'right password'); c1[1].listdir('/')
c2 = connect('etl', 'right password'); c2[1].listdir('/')
try:
    c3 = connect('etl', 'right password'); third = True
except Exception as e:
    third = False
c1[0].close()
deadline = time.time() + 20
fourth = False
while time.time() < deadline and not fourth:
    try:
        c4 = connect('etl', 'right password'); c4[1].listdir('/'); fourth = True
    except Exception:
        time.sleep(0.05)
c2[1].listdir('/')
print(json.dumps({"third": third, "fourth": fourth}))
"#;
    let (ok, out) = py(&d, script, &[]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).expect(&out);
    assert_eq!(v, json!({"third": false, "fourth": true}));
    assert!(d.log().contains("session limit reached"));
}

#[tokio::test]
async fn an_event_posted_while_connected_shows_up_whole() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
    let script = r#"
t, s = connect('etl', 'right password')
def walk(p):
    out = []
    for a in s.listdir_attr(p):
        q = p.rstrip('/') + '/' + a.filename
        out += walk(q) if stat.S_ISDIR(a.st_mode) else [q]
    return out
print('before', len(walk('/')), flush=True)
sys.stdin.readline()
deadline = time.time() + 20
while time.time() < deadline:
    files = walk('/')
    if files:
        with s.open(files[0]) as f:
            body = json.loads(f.read())
        print('after', body['id'], flush=True)
        break
    time.sleep(0.02)
"#;
    let mut cmd = Command::new(python());
    let prelude = format!(
        "import sys, os, json, time, stat, paramiko\nH, P = '127.0.0.1', {}\n\
         def connect(u, pw):\n    t = paramiko.Transport((H, P))\n    t.connect(username=u, password=pw)\n    \
         return t, paramiko.SFTPClient.from_transport(t)\n",
        d.sftp_port
    );
    cmd.arg("-c").arg(format!("{prelude}{script}"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(CLIENT_TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("before 0"));
    post(&d, "acme", "evt_live", "payment").await;
    stdin.write_all(b"go\n").await.unwrap();
    let second = tokio::time::timeout(CLIENT_TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.as_deref(), Some("after evt_live"));
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, child.wait()).await;
}

#[tokio::test]
async fn admin_changes_apply_at_next_login() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "first password"})).await;
    let login = r#"
try:
    t, s = connect(sys.argv[1], sys.argv[2]); s.listdir('/'); print('ok')
except paramiko.AuthenticationException:
    print('refused')
"#;
    let check = |pw: &'static str| {
        let d = &d;
        async move {
            let (ok, out) = py(d, login, &["etl", pw]).await;
            assert!(ok, "{out}");
            out.lines().last().unwrap().to_owned()
        }
    };
    assert_eq!(check("first password").await, "ok");
    user(&d, "acme", "etl", json!({"password": "second password"})).await;
    assert_eq!(check("first password").await, "refused");
    assert_eq!(check("second password").await, "ok");
    let (s, _) = d
        .admin("DELETE", "/v1/orgs/acme/sftp-users/etl", None)
        .await;
    assert!(s == 204 || s == 200, "delete: {s}");
    assert_eq!(check("second password").await, "refused");
}

#[tokio::test]
async fn shutdown_disconnects_sftp_clients_and_exits_cleanly() {
    let mut d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
    let script =
        "t, s = connect('etl', 'right password')\ns.listdir('/')\nprint('ready', flush=True)\n\
                  while t.is_active():\n    time.sleep(0.02)\nprint('disconnected', flush=True)\n";
    let prelude = format!(
        "import sys, time, paramiko\nH, P = '127.0.0.1', {}\n\
         def connect(u, pw):\n    t = paramiko.Transport((H, P))\n    t.connect(username=u, password=pw)\n    \
         return t, paramiko.SFTPClient.from_transport(t)\n",
        d.sftp_port
    );
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(format!("{prelude}{script}"));
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(CLIENT_TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));
    let code = tokio::task::spawn_blocking(move || {
        let code = d.terminate();
        (d, code)
    })
    .await
    .unwrap()
    .1;
    assert_eq!(code, Some(0));
    let second = tokio::time::timeout(CLIENT_TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.as_deref(), Some("disconnected"));
}

#[tokio::test]
async fn repeated_failed_logins_ban_the_address_until_the_ban_ends() {
    let d = Daemon::start_with("[defender]\nthreshold = 3\nban_time = \"3s\"\n").await;
    org(&d, "acme").await;
    user(&d, "acme", "etl", json!({"password": "right password"})).await;
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
    let (_, out) = py(
        &d,
        script,
        &["wrong 1", "wrong 2", "wrong 3", "right password"],
    )
    .await;
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v, json!(["denied", "denied", "denied", "refused"]), "{out}");
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("hookbridge_defender_bans_total 1"),
        "{metrics}"
    );
    assert!(d.log().contains("address banned"));
    // The ban ends by itself.
    wait_for(
        "the ban to end",
        std::time::Duration::from_secs(15),
        || async {
            let (_, out) = py(&d, script, &["right password"]).await;
            out.contains("\"ok\"").then_some(())
        },
    )
    .await;
    assert!(d.log().contains("ban expired"));
}

#[tokio::test]
async fn uploads_over_the_size_cap_fail_and_leave_nothing() {
    let d = Daemon::start_with_sftp("max_upload_bytes = 1048576", "").await;
    org(&d, "acme").await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(
        &d,
        "acme",
        "writer",
        json!({"public_keys": [public], "upload": true}),
    )
    .await;
    big_file(&tmp.path().join("big.bin"), 2 << 20);
    big_file(&tmp.path().join("small.bin"), 100 << 10);
    let (ok, out) = sftp_batch(&d, "writer", &key, "put big.bin /big.bin\n", tmp.path()).await;
    assert!(!ok, "an upload over the cap must fail: {out}");
    assert!(
        !d.org_dir("acme").join("big.bin").exists(),
        "no partial upload is published"
    );
    assert!(
        std::fs::read_dir(d.data_dir().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "the partial upload is removed"
    );
    let (ok, out) = sftp_batch(&d, "writer", &key, "put small.bin /small.bin\n", tmp.path()).await;
    assert!(ok, "{out}");
    assert_eq!(
        sha256_file(&d.org_dir("acme").join("small.bin")),
        sha256_file(&tmp.path().join("small.bin"))
    );
}
