//! What SFTP users may do, and the status codes they get (as OpenSSH's sftp-server):
//! read-only users, uploads that never replace a file, and caps on open handles.

use serde_json::json;

use crate::e2e_sftp::{org, post, py, user};
use crate::harness::*;

/// paramiko: `code(f)` runs `f` and gives the SFTP status code it got (0: ok), as sent:
/// paramiko's own exceptions merge several codes.
const CODE: &str = r#"
import paramiko.sftp_client as sc
class Code(Exception): pass
def conv(self, msg):
    c = msg.get_int()
    if c == 1: raise EOFError()
    if c != 0: raise Code(c)
sc.SFTPClient._convert_status = conv
def code(f):
    try:
        f(); return 0
    except Code as e:
        return e.args[0]
def raw_code(s, t, *args):
    return code(lambda: s._request(t, *args))
"#;

#[tokio::test]
async fn status_codes_match_openssh() {
    let d = Daemon::start().await;
    org(&d, "acme").await;
    user(
        &d,
        "acme",
        "w",
        json!({"password": "pw-123456", "upload": true}),
    )
    .await;
    let root = d.org_dir("acme");
    std::fs::create_dir_all(root.join("full")).unwrap();
    std::fs::write(root.join("full/a.json"), "{}").unwrap();
    std::fs::write(root.join("file.json"), "{}").unwrap();
    std::fs::write(root.join("other.json"), "{}").unwrap();
    let script = format!(
        "{CODE}
from paramiko.sftp import CMD_OPENDIR, CMD_CLOSE
t, s = connect('w', 'pw-123456')
r = {{}}
r['opendir_file'] = raw_code(s, CMD_OPENDIR, '/file.json')
r['opendir_missing'] = raw_code(s, CMD_OPENDIR, '/nope')
r['stat_missing'] = code(lambda: s.stat('/nope'))
r['open_missing'] = code(lambda: s.open('/nope', 'r'))
r['rmdir_full'] = code(lambda: s.rmdir('/full'))
r['rmdir_file'] = code(lambda: s.rmdir('/file.json'))
r['rename_onto_existing'] = code(lambda: s.rename('/file.json', '/other.json'))
r['remove_dir'] = code(lambda: s.remove('/full'))
r['mkdir_existing'] = code(lambda: s.mkdir('/full'))
r['close_bad_handle'] = raw_code(s, CMD_CLOSE, b'nope')
print(json.dumps(r))
"
    );
    let (ok, out) = py(&d, &script, &[]).await;
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({
            "opendir_file": 2, "opendir_missing": 2, "stat_missing": 2, "open_missing": 2,
            "rmdir_full": 4, "rmdir_file": 2, "rename_onto_existing": 4, "remove_dir": 4,
            "mkdir_existing": 4, "close_bad_handle": 2
        }),
        "{out}"
    );
    assert!(root.join("file.json").exists() && root.join("other.json").exists());
}

/// A reader may list, read, delete and rename its files, and nothing else; what is not
/// applied is refused, never answered OK.
#[tokio::test]
async fn read_only_users_change_nothing_but_their_files() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    user(&d, "acme", "r", json!({"password": "pw-123456"})).await;
    post(&d, "acme", "evt_1", "payment").await;
    post(&d, "acme", "evt_2", "payment").await;
    let files = files_under(&d.org_dir("acme"));
    let root = d.org_dir("acme");
    let virt = |p: &std::path::Path| format!("/{}", p.strip_prefix(&root).unwrap().display());
    let (a, b) = (virt(&files[0]), virt(&files[1]));
    let day = a.rsplit_once('/').unwrap().0.to_owned();
    let before: Vec<_> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap())
        .collect();
    let script = format!(
        "{CODE}
a, b, day = sys.argv[1], sys.argv[2], sys.argv[3]
t, s = connect('r', 'pw-123456')
r = {{}}
r['listdir'] = len(s.listdir(day))
r['read'] = len(s.open(a).read())
r['mkdir'] = code(lambda: s.mkdir(day + '/new'))
r['rmdir'] = code(lambda: s.rmdir(day))
r['utime'] = code(lambda: s.utime(a, (1000000000, 1000000000)))
r['chmod'] = code(lambda: s.chmod(a, 0o600))
r['truncate'] = code(lambda: s.truncate(a, 0))
r['chown'] = code(lambda: s.chown(a, 12345, 12345))
f = s.open(a, 'r')
r['fchmod'] = code(lambda: f.chmod(0o600))
r['ftruncate'] = code(lambda: f.truncate(0))
r['futime'] = code(lambda: f.utime((1000000000, 1000000000)))
f.close()
r['open_write'] = code(lambda: s.open(a, 'r+'))
r['create'] = code(lambda: s.open(day + '/x.json', 'w'))
r['rename_dir'] = code(lambda: s.rename(day, '/moved'))
r['rename_file'] = code(lambda: s.rename(a, a + '.done'))
r['remove'] = code(lambda: s.remove(b))
print(json.dumps(r))
"
    );
    let (ok, out) = py(&d, &script, &[&a, &b, &day]).await;
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let size = before[0].len();
    assert_eq!(
        v,
        json!({
            "listdir": 2, "read": size,
            "mkdir": 3, "rmdir": 3, "utime": 3, "chmod": 3, "truncate": 3, "chown": 3,
            "fchmod": 3, "ftruncate": 3, "futime": 3, "open_write": 3, "create": 3,
            "rename_dir": 3, "rename_file": 0, "remove": 0
        }),
        "{out}"
    );
    let moved = files[0].with_file_name(format!(
        "{}.done",
        files[0].file_name().unwrap().to_string_lossy()
    ));
    let m = std::fs::metadata(&moved).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (m.len(), m.mode(), m.mtime()),
        (before[0].len(), before[0].mode(), before[0].mtime())
    );
    assert!(!files[1].exists());
}

/// Uploads never replace a file that is there (an event hookbridge wrote); an upload
/// client's own SETSTAT of the mtime (paramiko, rclone, WinSCP) still works.
#[tokio::test]
async fn uploads_never_replace_an_event() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    user(
        &d,
        "acme",
        "w",
        json!({"password": "pw-123456", "upload": true}),
    )
    .await;
    post(&d, "acme", "evt_1", "payment").await;
    let files = files_under(&d.org_dir("acme"));
    let root = d.org_dir("acme");
    let a = format!("/{}", files[0].strip_prefix(&root).unwrap().display());
    let original = std::fs::read(&files[0]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("up.json");
    std::fs::write(&local, b"{\"forged\":true}").unwrap();
    let script = format!(
        "{CODE}
a, local = sys.argv[1], sys.argv[2]
t, s = connect('w', 'pw-123456')
r = {{}}
r['overwrite'] = code(lambda: s.open(a, 'w'))
r['append'] = code(lambda: s.open(a, 'a'))
r['in_place'] = code(lambda: s.open(a, 'r+'))
r['truncate'] = code(lambda: s.truncate(a, 0))
r['chmod'] = code(lambda: s.chmod(a, 0o777))
r['put'] = code(lambda: s.put(local, '/up.json'))
r['utime_own'] = code(lambda: s.utime('/up.json', (1000000000, 1000000000)))
r['chmod_own'] = code(lambda: s.chmod('/up.json', 0o664))
r['mode_own'] = s.stat('/up.json').st_mode & 0o7777
r['mtime_own'] = s.stat('/up.json').st_mtime
r['put_again'] = code(lambda: s.put(local, '/up.json'))
r['posix_rename_over'] = code(lambda: s.posix_rename('/up.json', a))
r['rename_over'] = code(lambda: s.rename('/up.json', a))
r['mkdir'] = code(lambda: s.mkdir('/mine'))
r['rmdir'] = code(lambda: s.rmdir('/mine'))
print(json.dumps(r))
"
    );
    let (ok, out) = py(&d, &script, &[&a, local.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({
            "overwrite": 3, "append": 3, "in_place": 3, "truncate": 3, "chmod": 3,
            "put": 0, "utime_own": 0, "chmod_own": 0, "mode_own": 0o664, "mtime_own": 1000000000, "put_again": 3,
            "posix_rename_over": 3, "rename_over": 4, "mkdir": 0, "rmdir": 0
        }),
        "{out}"
    );
    assert_eq!(std::fs::read(&files[0]).unwrap(), original);
    assert_eq!(
        std::fs::read(root.join("up.json")).unwrap(),
        b"{\"forged\":true}"
    );
}

/// The descriptor-exhaustion attack, bounded: one user opens connections × channels ×
/// handles. It meets the caps with a clear SSH_FX_FAILURE, while another org still
/// posts events and logs in.
#[tokio::test]
async fn one_user_cannot_exhaust_handles() {
    let d = Daemon::start().await;
    d.org_with_sftp_hook("acme").await;
    d.org_with_sftp_hook("globex").await;
    user(&d, "acme", "r", json!({"password": "pw-123456"})).await;
    user(&d, "globex", "g", json!({"password": "pw-123456"})).await;
    post(&d, "acme", "evt_1", "payment").await;
    post(&d, "globex", "evt_1", "payment").await;
    let root = d.org_dir("acme");
    let file = files_under(&root).remove(0);
    let a = format!("/{}", file.strip_prefix(&root).unwrap().display());
    // 4 connections x 10 channels x up to 70 opens: 2,800 tries against the defaults
    // (64 per channel, 10 channels per connection, 256 per user).
    let script = format!(
        "{CODE}
a = sys.argv[1]
res = {{'opened': 0, 'codes': {{}}, 'msgs': [], 'per_channel_max': 0, 'channels': 0, 'refused_channels': 0}}
keep = []
for c in range(4):
    t = paramiko.Transport((H, P)); t.connect(username='r', password='pw-123456'); keep.append(t)
    for ch in range(11):
        try:
            s = paramiko.SFTPClient.from_transport(t)
        except Exception:
            res['refused_channels'] += 1; continue
        res['channels'] += 1; keep.append(s); n = 0
        for i in range(70):
            try:
                keep.append(s.open(a)); n += 1; res['opened'] += 1
            except Code as e:
                k = str(e.args[0]); res['codes'][k] = res['codes'].get(k, 0) + 1
            except IOError as e:
                res['msgs'].append(str(e))
        res['per_channel_max'] = max(res['per_channel_max'], n)
print(json.dumps(res))
sys.stdout.flush()
time.sleep(float(sys.argv[2]))
"
    );
    // Keeps its handles open while globex is served.
    let mut attack = tokio::process::Command::new(python());
    attack
        .arg("-c")
        .arg(format!(
            "import sys, os, json, time, paramiko\nH, P = '127.0.0.1', {}\n{script}",
            d.sftp_port
        ))
        .args([&a, "20"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = attack.spawn().unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
        .await
        .expect("attack finished")
        .unwrap()
        .expect("attack printed its result");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["opened"], 256, "{v}");
    assert_eq!(v["per_channel_max"], 64, "{v}");
    assert_eq!(v["channels"], 40, "{v}");
    assert_eq!(v["refused_channels"], 4, "{v}");
    assert_eq!(v["codes"], json!({"4": 40 * 70 - 256}), "{v}");
    assert!(v["msgs"].as_array().unwrap().is_empty(), "{v}");
    // While acme's handles stay open: globex ingest and login still work.
    let r = d
        .post_event(
            "globex",
            &json!({"id": "evt_2", "type": "payment", "data": {}}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let (ok, out) = py(
        &d,
        "t, s = connect('g', 'pw-123456')\nprint(len(s.listdir('/')))",
        &[],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        d.log().contains("SFTP handle refused"),
        "an operator sees why"
    );
    let _ = child.kill().await;
}
