//! The reference in `docs/` stays true: every config key the binary accepts is documented,
//! and nothing points outside the repository.

use std::path::Path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The keys of one config table, as the binary itself names them: a config with an unknown
/// key in `table` is refused with serde's "expected one of `a`, `b`, …".
fn keys_of(dir: &Path, table: &str) -> Vec<String> {
    let path = dir.join("probe.toml");
    std::fs::write(&path, format!("{table}\nno_such_key_zz = 1\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{table}: unknown key accepted");
    let list = text
        .split_once("expected one of ")
        .or_else(|| text.split_once("expected "))
        .unwrap_or_else(|| panic!("{table}: no list of keys in {text}"))
        .1;
    let list = list.lines().next().unwrap_or_default();
    // serde says "`a`, `b`, `c`" for three or more keys and "`a` or `b`" for two.
    list.split(", ")
        .flat_map(|k| k.split(" or "))
        .map(|k| k.trim().trim_matches('`').to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

#[test]
fn config_reference_lists_every_key() {
    let doc = std::fs::read_to_string(repo().join("docs/config.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let org = "[[orgs]]\nname = \"a\"";
    let tables = [
        ("", String::new()),
        ("http.", "[http]".into()),
        ("sftp.", "[sftp]".into()),
        ("ingress.", "[ingress]".into()),
        ("admin.", "[admin]".into()),
        ("store.", "[store]".into()),
        ("delivery.", "[delivery]".into()),
        ("log.", "[log]".into()),
        ("defender.", "[defender]".into()),
        ("limits.", "[limits]".into()),
        ("storage.", "[storage]".into()),
        ("orgs.", org.to_owned()),
        (
            "orgs.sftp_users.",
            format!("{org}\n[[orgs.sftp_users]]\nname = \"u\""),
        ),
        (
            "orgs.webhooks.",
            format!("{org}\n[[orgs.webhooks]]\nid = \"w\"\nkind = \"sftp\""),
        ),
        ("orgs.limits.", format!("{org}\n[orgs.limits]")),
    ];
    let mut missing = Vec::new();
    for (prefix, table) in &tables {
        let keys = keys_of(dir.path(), table);
        assert!(!keys.is_empty(), "{table:?}: {keys:?}");
        for k in keys {
            let full = format!("`{prefix}{k}`");
            if !doc.contains(&full) {
                missing.push(full);
            }
        }
    }
    assert!(missing.is_empty(), "docs/config.md lacks {missing:?}");
}

#[test]
fn docs_stay_inside_the_repository() {
    for f in ["README.md", "docs/contract.md", "docs/config.md"] {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        assert!(!text.contains("../shared"), "{f} points outside the repo");
        // Every relative link of the page leads to a file of the repo.
        let base = repo().join(f);
        let base = base.parent().unwrap();
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap_or_default();
            let target = target.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            assert!(base.join(target).exists(), "{f}: broken link {target}");
        }
    }
}
