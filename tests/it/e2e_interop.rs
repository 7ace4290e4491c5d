//! The interop matrix: each real SFTP client lists, downloads (byte-identical) and
//! deletes event files the daemon wrote. OpenSSH `sftp`/`scp` and paramiko basics live in
//! `e2e_sftp`; here are lftp, rclone, curl, asyncssh, and WinSCP/FileZilla habits.
//! A missing client fails the test under `CI=true` and skips it elsewhere
//! (`harness::require`); `scripts/test` installs them all.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::process::Command;

use crate::e2e_sftp::{keygen, org, post, py, run, ssh_opts, user, virt};
use crate::harness::*;

const PW: &str = "interop-pw-123";

/// Whether `cmd` runs at all ([`require`]: a failure under `CI=true`, a skip elsewhere).
fn have(cmd: &str, _test: &str) -> bool {
    require(cmd)
}

/// A daemon with org `acme`, reader `etl` (password `PW`) and a few posted events.
async fn with_events() -> (Daemon, Vec<PathBuf>) {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    user(&d, "acme", "etl", json!({"password": PW})).await;
    for (i, ty) in ["payment", "payment", "deliveryReport"].iter().enumerate() {
        post(&d, "acme", &format!("evt_{i}"), ty).await;
    }
    let files = files_under(&d.org_dir("acme"));
    assert_eq!(files.len(), 3);
    (d, files)
}

/// (virtual path, content) of each file, taken before a client deletes some.
fn snapshot(d: &Daemon, files: &[PathBuf]) -> Vec<(String, Vec<u8>)> {
    files
        .iter()
        .map(|f| (virt(d, "acme", f), std::fs::read(f).unwrap()))
        .collect()
}

/// Every file downloaded under `local` (by its virtual path) is byte-identical.
fn assert_same(want: &[(String, Vec<u8>)], local: &Path) {
    for (v, content) in want {
        let got = local.join(v.trim_start_matches('/'));
        let bytes = std::fs::read(&got).unwrap_or_else(|e| panic!("{}: {e}", got.display()));
        assert!(&bytes == content, "{} differs", got.display());
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn lftp_lists_mirrors_and_deletes() {
    if !have("lftp", "lftp_lists_mirrors_and_deletes") {
        return;
    }
    let (d, files) = with_events().await;
    let want = snapshot(&d, &files);
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("mirror");
    let gone = virt(&d, "acme", &files[0]);
    // Its own ssh with throwaway known_hosts, so the test leaves ~/.ssh alone.
    let script = format!(
        "set sftp:auto-confirm yes; set net:max-retries 1; set net:timeout 10; \
         set sftp:connect-program 'ssh -a -x -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'; \
         open sftp://etl:{PW}@127.0.0.1:{port}; find /; mirror / {dir}; rm {gone}",
        port = d.sftp_port,
        dir = mirror.display(),
    );
    let mut cmd = Command::new("lftp");
    cmd.arg("-c").arg(script).env("HOME", tmp.path());
    let out = run(cmd).await;
    let out_text = text(&out);
    assert!(out.status.success(), "lftp: {out_text}");
    for f in &files {
        assert!(out_text.contains(&virt(&d, "acme", f)), "{out_text}");
    }
    assert_same(&want, &mirror);
    assert!(!files[0].exists(), "lftp rm");
    assert!(files[1].exists() && files[2].exists());
}

/// rclone with an on-the-fly remote `hb:` from the environment.
fn rclone(d: &Daemon, home: &Path, args: &[&str]) -> Command {
    let obscured = std::process::Command::new("rclone")
        .args(["obscure", PW])
        .output()
        .unwrap();
    let mut cmd = Command::new("rclone");
    cmd.args(args)
        .env("RCLONE_CONFIG", home.join("rclone.conf"))
        .env("HOME", home)
        .env("RCLONE_CONFIG_HB_TYPE", "sftp")
        .env("RCLONE_CONFIG_HB_HOST", "127.0.0.1")
        .env("RCLONE_CONFIG_HB_PORT", d.sftp_port.to_string())
        .env("RCLONE_CONFIG_HB_USER", "etl")
        .env(
            "RCLONE_CONFIG_HB_PASS",
            String::from_utf8_lossy(&obscured.stdout).trim(),
        )
        .env("RCLONE_CONTIMEOUT", "10s")
        .env("RCLONE_RETRIES", "1")
        .env("RCLONE_LOW_LEVEL_RETRIES", "1");
    cmd
}

#[tokio::test]
async fn rclone_lsjson_copy_delete_and_refused_hashes() {
    if !have("rclone", "rclone_lsjson_copy_delete_and_refused_hashes") {
        return;
    }
    let (d, files) = with_events().await;
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();

    let out = run(rclone(&d, home, &["lsjson", "-R", "--files-only", "hb:/"])).await;
    assert!(out.status.success(), "lsjson: {}", text(&out));
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut paths: Vec<String> = listed
        .iter()
        .map(|e| format!("/{}", e["Path"].as_str().unwrap()))
        .collect();
    paths.sort();
    let mut want: Vec<String> = files.iter().map(|f| virt(&d, "acme", f)).collect();
    want.sort();
    assert_eq!(paths, want);
    for e in &listed {
        let f = d.org_dir("acme").join(e["Path"].as_str().unwrap());
        assert_eq!(e["Size"], json!(std::fs::metadata(&f).unwrap().len()));
    }

    let copy = home.join("copy");
    let out = run(rclone(
        &d,
        home,
        &[
            "copy",
            "--sftp-disable-hashcheck",
            "hb:/",
            copy.to_str().unwrap(),
        ],
    ))
    .await;
    assert!(out.status.success(), "copy: {}", text(&out));
    assert_same(&snapshot(&d, &files), &copy);

    // Without the flag rclone execs md5sum/sha1sum over SSH: refused, and the copy
    // still goes through on the same connection.
    let copy2 = home.join("copy2");
    let out = run(rclone(
        &d,
        home,
        &["copy", "-v", "hb:/", copy2.to_str().unwrap()],
    ))
    .await;
    assert!(out.status.success(), "copy with hash probe: {}", text(&out));
    assert_same(&snapshot(&d, &files), &copy2);
    let out = run(rclone(&d, home, &["md5sum", "hb:/"])).await;
    let t = text(&out);
    assert!(
        t.contains("hash unsupported") || t.contains("not supported"),
        "md5sum: {t}"
    );
    assert!(d.log().contains("exec refused"), "exec probes reached us");

    let gone = virt(&d, "acme", &files[0]);
    let out = run(rclone(&d, home, &["deletefile", &format!("hb:{gone}")])).await;
    assert!(out.status.success(), "deletefile: {}", text(&out));
    assert!(!files[0].exists());
    let dir = virt(&d, "acme", files[1].parent().unwrap());
    let out = run(rclone(&d, home, &["delete", &format!("hb:{dir}")])).await;
    assert!(out.status.success(), "delete: {}", text(&out));
    // files[0] is the deliveryReport; files[1] and [2] share the payment folder.
    assert!(!files[1].exists() && !files[2].exists());
    assert!(
        !d.log().contains("panicked"),
        "the daemon panicked:\n{}",
        d.log()
    );
}

fn curl(d: &Daemon, path: &str) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--insecure", "--max-time", "30", "-u"])
        .arg(format!("etl:{PW}"))
        .arg(format!("sftp://127.0.0.1:{}{path}", d.sftp_port));
    cmd
}

#[tokio::test]
async fn curl_lists_downloads_and_removes() {
    let has_sftp = std::process::Command::new("curl")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(" sftp"))
        .unwrap_or(false);
    if !require_that("curl with sftp:// (libssh2)", has_sftp) {
        return;
    }
    let (d, files) = with_events().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = virt(&d, "acme", files[0].parent().unwrap());
    let out = run(curl(&d, &format!("{dir}/"))).await;
    assert!(out.status.success(), "curl list: {}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for f in files.iter().filter(|f| f.parent() == files[0].parent()) {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with('-') && l.ends_with(name)),
            "{listing}"
        );
    }
    for (i, f) in files.iter().enumerate() {
        let local = tmp.path().join(format!("f{i}"));
        let mut cmd = curl(&d, &virt(&d, "acme", f));
        cmd.arg("-o").arg(&local);
        let out = run(cmd).await;
        assert!(out.status.success(), "curl get: {}", text(&out));
        assert_eq!(std::fs::read(&local).unwrap(), std::fs::read(f).unwrap());
    }
    let mut cmd = curl(&d, "/");
    cmd.arg("-Q")
        .arg(format!("rm {}", virt(&d, "acme", &files[0])));
    let out = run(cmd).await;
    assert!(out.status.success(), "curl rm: {}", text(&out));
    assert!(!files[0].exists() && files[1].exists());
    // A missing file is an error for curl, not a hang or a dropped daemon.
    let out = run(curl(&d, "/no/such/file.json")).await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn asyncssh_lists_downloads_and_deletes() {
    let (d, files) = with_events().await;
    let tmp = tempfile::tempdir().unwrap();
    let dl = tmp.path().join("dl");
    let script = r#"
import asyncio, asyncssh, json, sys
async def main():
    async with asyncssh.connect('127.0.0.1', int(sys.argv[1]), username='etl', password=sys.argv[2],
                                known_hosts=None) as c:
        async with c.start_sftp_client() as s:
            home = await s.realpath('.')
            tops = sorted(await s.listdir('/'))
            await s.mget('/*', sys.argv[3], recurse=True, preserve=True)
            await s.remove(sys.argv[4])
            gone = not await s.exists(sys.argv[4])
            print(json.dumps({"home": home, "tops": tops, "gone": gone}))
asyncio.run(main())
"#;
    let gone = virt(&d, "acme", &files[0]);
    std::fs::create_dir(&dl).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(script)
        .args([&d.sftp_port.to_string(), PW, dl.to_str().unwrap(), &gone]);
    let out = run(cmd).await;
    assert!(out.status.success(), "asyncssh: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // Whether `.` and `..` are listed is the server's choice; the folders must be there.
    let tops: Vec<&str> = v["tops"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .filter(|t| *t != "." && *t != "..")
        .collect();
    assert_eq!(tops, ["deliveryReport", "payment"]);
    assert_eq!(v["home"], "/");
    assert_eq!(v["gone"], true);
    // The files downloaded before the delete are all there.
    for f in files.iter().skip(1) {
        let got = dl.join(virt(&d, "acme", f).trim_start_matches('/'));
        assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(f).unwrap());
    }
    assert!(!files[0].exists());
}

#[tokio::test]
async fn openssh_scp_recursive_download() {
    let (d, files) = with_events().await;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "id", "ed25519");
    user(
        &d,
        "acme",
        "etl",
        json!({"password": PW, "public_keys": [public]}),
    )
    .await;
    let mut cmd = Command::new("scp");
    ssh_opts(&mut cmd, &key);
    cmd.args(["-r", "-P", &d.sftp_port.to_string()])
        .arg("etl@127.0.0.1:/payment")
        .arg(tmp.path().join("payment"));
    let out = run(cmd).await;
    assert!(out.status.success(), "scp -r: {}", text(&out));
    let payments: Vec<_> = files
        .iter()
        .filter(|f| virt(&d, "acme", f).starts_with("/payment/"))
        .cloned()
        .collect();
    assert_eq!(payments.len(), 2);
    assert_same(&snapshot(&d, &payments), tmp.path());
}

/// WinSCP and FileZilla habits, emulated with paramiko: SETSTAT after an upload,
/// `ls -l` longnames parsed field by field, REALPATH of odd paths.
#[tokio::test]
async fn winscp_and_filezilla_habits() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(&d, "acme", "win", json!({"password": PW, "upload": true})).await;
    std::fs::create_dir_all(d.org_dir("acme").join("payment/2024-01-02")).unwrap();
    std::fs::write(
        d.org_dir("acme").join("payment/2024-01-02/e.json"),
        "{\"id\":1}",
    )
    .unwrap();
    let script = r#"
import re
t, s = connect('win', sys.argv[1])
res = {}
# Upload, then set times and mode the way WinSCP ("preserve timestamp") and FileZilla do.
with s.open('/up.json', 'wb') as f:
    f.write(b'{"up":1}')
s.utime('/up.json', (1500000000, 1600000000))
s.chmod('/up.json', 0o644)
st = s.stat('/up.json')
res['mtime'] = st.st_mtime
res['size'] = st.st_size
with s.open('/up.json', 'rb') as f:
    f.chmod(0o600)                     # FSETSTAT
    f.utime((1500000000, 1600000001))
res['fmtime'] = s.stat('/up.json').st_mtime
# ls -l longnames: kind, 9 permission chars, links, owner, group, size, date, name.
pat = re.compile(r'^([d-])([r-][w-][xsS-]){3}\s+\d+\s+\S+\s+\S+\s+(\d+)\s+\w{3}\s+\d{1,2}\s+(\d\d:\d\d|\d{4})\s+(\S+)$')
bad = []
kinds = {}
for d in ['/', '/payment', '/payment/2024-01-02']:
    for a in s.listdir_attr(d):
        m = pat.match(a.longname)
        if not m or m.group(5) != a.filename or int(m.group(3)) != a.st_size:
            bad.append(a.longname)
        else:
            kinds[a.filename] = m.group(1)
res['bad'] = bad
res['kinds'] = kinds
res['real'] = {p: s.normalize(p) for p in ['.', '..', '/..', '//a//b/..', '', '/payment/./2024-01-02/..']}
print(json.dumps(res))
"#;
    let (ok, out) = py(&d, script, &[PW]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["mtime"], 1600000000);
    assert_eq!(v["fmtime"], 1600000001);
    assert_eq!(v["size"], 8);
    assert_eq!(v["bad"], json!([]), "unparsable longnames");
    assert_eq!(
        v["kinds"],
        json!({"payment": "d", "up.json": "-", "2024-01-02": "d", "e.json": "-"})
    );
    assert_eq!(
        v["real"],
        json!({".": "/", "..": "/", "/..": "/", "//a//b/..": "/a", "": "/", "/payment/./2024-01-02/..": "/payment"})
    );
    assert_eq!(
        std::fs::read(d.org_dir("acme").join("up.json")).unwrap(),
        b"{\"up\":1}"
    );
}

/// `SHA256:…` of the daemon's host key, for PuTTY's `-hostkey` (its `-batch` refuses
/// unknown keys).
fn host_key_sha256(d: &Daemon) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(d.data_dir().join("ssh_host_ed25519_key"))
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no fingerprint in {line:?}"))
        .to_owned()
}

/// A PuTTY tool (`pscp`/`psftp`) with password, host key and port set.
fn putty(d: &Daemon, tool: &str, home: &Path) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["-batch", "-P"])
        .arg(d.sftp_port.to_string())
        .args(["-pw", PW, "-hostkey"])
        .arg(host_key_sha256(d))
        .env("HOME", home);
    cmd
}

/// PuTTY's pscp takes each reply of a download as the next block of the file: replies
/// out of request order made it stop after one file with "Lost connection".
#[tokio::test]
async fn pscp_downloads_a_whole_tree() {
    if !have("pscp", "pscp_downloads_a_whole_tree") {
        return;
    }
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    user(&d, "acme", "etl", json!({"password": PW})).await;
    for i in 0..48 {
        let ty = if i % 2 == 0 {
            "payment"
        } else {
            "deliveryReport"
        };
        post(&d, "acme", &format!("evt_{i}"), ty).await;
    }
    let files = files_under(&d.org_dir("acme"));
    assert_eq!(files.len(), 48);
    let want = snapshot(&d, &files);
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut cmd = putty(&d, "pscp", tmp.path());
    // `/*`: pscp refuses `/` itself as a source (its name would be empty), OpenSSH or not.
    cmd.args(["-r", "etl@127.0.0.1:/*"]).arg(&out_dir);
    let out = run(cmd).await;
    assert!(out.status.success(), "pscp: {}", text(&out));
    // pscp -r of `/*` puts the tree under the target folder as it is.
    assert_same(&want, &out_dir);
    assert_eq!(files_under(&out_dir).len(), 48);
}

#[tokio::test]
async fn psftp_batch_lists_gets_puts_renames_and_removes() {
    if !have("psftp", "psftp_batch_lists_gets_puts_renames_and_removes") {
        return;
    }
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    user(&d, "acme", "etl", json!({"password": PW, "upload": true})).await;
    post(&d, "acme", "evt_1", "payment").await;
    let files = files_under(&d.org_dir("acme"));
    let event = virt(&d, "acme", &files[0]);
    let (dir, name) = event.rsplit_once('/').unwrap();
    let content = std::fs::read(&files[0]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("mine.json"), b"{\"up\":1}").unwrap();
    let batch = tmp.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "ls /\ncd {dir}\nls\nget {name} got.json\nput mine.json up.json\n\
             rename up.json up2.json\nrm up2.json\nmkdir newdir\nrmdir newdir\n\
             rm {name}\nquit\n"
        ),
    )
    .unwrap();
    let mut cmd = putty(&d, "psftp", tmp.path());
    cmd.arg("-b")
        .arg(&batch)
        .arg("etl@127.0.0.1")
        .current_dir(tmp.path());
    let out = run(cmd).await;
    let said = text(&out);
    assert!(out.status.success(), "psftp: {said}");
    assert!(said.contains(name), "ls shows the event: {said}");
    assert_eq!(
        std::fs::read(tmp.path().join("got.json")).unwrap_or_else(|e| panic!("{e}: {said}")),
        content
    );
    let org = d.org_dir("acme");
    let day = org.join(dir.trim_start_matches('/'));
    assert!(!day.join("up.json").exists() && !day.join("up2.json").exists());
    assert!(!day.join("newdir").exists());
    assert!(!files[0].exists(), "rm of the event");
    assert!(
        said.contains("up.json") && said.contains("up2.json"),
        "psftp echoes each step: {said}"
    );
}
