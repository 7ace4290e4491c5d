//! The CLI's packaging surface: `--version` facts, shell completions and man pages.
//! (The installed package itself is checked by `tests/package/run`.)

use std::path::Path;
use std::process::{Command, Output};

fn hookbridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Whether `tool` is on PATH ([`require_that`](crate::harness::require_that): a failure under
/// `CI=true`, a skip elsewhere).
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    crate::harness::require_that(&format!("`{tool}`"), found)
}

#[test]
fn version_reports_the_git_commit_and_the_build_features() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let long = stdout(&hookbridge(&["--version"]));
    let field = |name: &str| {
        long.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} line in {long:?}"))
    };
    assert!(
        long.starts_with(&format!("hookbridge {}\n", env!("CARGO_PKG_VERSION"))),
        "{long:?}"
    );

    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(manifest)
        .output();
    match git {
        Ok(out) if out.status.success() => {
            let head = String::from_utf8(out.stdout).unwrap();
            assert_eq!(field("commit:"), head.trim());
        }
        // Built outside a git checkout: build.rs says so instead of guessing.
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("git is needed to check the commit under CI")
        }
        _ => assert_eq!(field("commit:"), "unknown"),
    }

    // The listed features are exactly those the manifest can enable ("none" without any).
    let cargo_toml: toml::Table =
        toml::from_str(&std::fs::read_to_string(manifest.join("Cargo.toml")).unwrap()).unwrap();
    let declared = cargo_toml.get("features").and_then(|f| f.as_table());
    let features = field("features:");
    match declared {
        None => assert_eq!(features, "none"),
        Some(declared) => {
            for f in features.split(',').filter(|f| *f != "none") {
                assert!(
                    declared.contains_key(f) || declared.contains_key(&f.replace('-', "_")),
                    "feature {f} is not in Cargo.toml"
                );
            }
        }
    }
    assert!(["debug", "release"].contains(&field("profile:").as_str()));

    // -V stays one line, for scripts that parse it.
    let short = stdout(&hookbridge(&["-V"]));
    assert_eq!(short, format!("hookbridge {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn completions_register_with_bash_and_zsh() {
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("hookbridge.bash");
    std::fs::write(&bash, stdout(&hookbridge(&["completions", "bash"]))).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(". {} && complete -p hookbridge", bash.display()))
        .output()
        .unwrap();
    let registered = stdout(&out);
    assert!(
        registered.contains("-F _hookbridge hookbridge"),
        "{registered}"
    );

    let zsh = stdout(&hookbridge(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef hookbridge\n"), "{zsh}");
    for sub in [
        "serve",
        "check-config",
        "hash-password",
        "token",
        "admin-token",
        "completions",
    ] {
        assert!(zsh.contains(sub), "zsh completion lacks {sub}");
    }
    assert!(!zsh.contains("generate-man"), "hidden subcommand offered");

    let out = hookbridge(&["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"));
}

#[test]
fn man_pages_are_generated_for_every_subcommand_and_render() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man");
    stdout(&hookbridge(&["generate-man", man.to_str().unwrap()]));
    let mut pages: Vec<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "hookbridge-admin-token.1",
            "hookbridge-check-config.1",
            "hookbridge-completions.1",
            "hookbridge-hash-password.1",
            "hookbridge-serve.1",
            "hookbridge-token.1",
            "hookbridge.1",
        ]
    );
    let top = std::fs::read_to_string(man.join("hookbridge.1")).unwrap();
    assert!(top.contains(".TH hookbridge 1"), "{top}");
    assert!(top.contains(".SH FILES"));
    // Every page the SUBCOMMANDS section points to exists (no hookbridge-help(1)).
    let referenced: Vec<String> = top
        .lines()
        .filter_map(|l| l.strip_suffix("(1)"))
        .map(|name| format!("{}.1", name.replace("\\-", "-")))
        .collect();
    assert_eq!(referenced.len(), 6, "{referenced:?}");
    for file in referenced {
        assert!(man.join(&file).exists(), "{file} is referenced but missing");
    }

    if have("man") {
        let out = Command::new("man")
            .arg("-l")
            .arg(man.join("hookbridge.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = stdout(&out);
        for want in [
            "NAME",
            "SUBCOMMANDS",
            "hookbridge-serve(1)",
            "/etc/hookbridge/hookbridge.toml",
            "/var/lib/hookbridge",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.trim().is_empty(), "man warns: {stderr}");
    }
}
