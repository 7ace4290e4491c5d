//! Build facts for `hookbridge --version`: the git commit and the enabled cargo features.
//!
//! The commit comes from `HOOKBRIDGE_GIT_COMMIT` when set (a build from a source tarball
//! can pass it), else from `git rev-parse`, else it is "unknown" (no git, or not a checkout).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HOOKBRIDGE_GIT_COMMIT");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());

    let commit = std::env::var("HOOKBRIDGE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            watch_git_head(&manifest_dir);
            git(&manifest_dir, &["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=HOOKBRIDGE_GIT_COMMIT={commit}");

    // Cargo sets CARGO_FEATURE_<NAME> for each enabled feature (upper case, '-' as '_').
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|f| f.to_lowercase().replace('_', "-"))
        })
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(",")
    };
    println!("cargo:rustc-env=HOOKBRIDGE_FEATURES={features}");
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=HOOKBRIDGE_PROFILE={profile}");
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// Re-run when HEAD moves: HEAD itself (a checkout, a detached commit), the branch it
/// names (a commit on it) and packed-refs. Works in linked worktrees too, where HEAD is in
/// the worktree's git dir and the refs are in the common dir.
fn watch_git_head(dir: &Path) {
    let (Some(git_dir), Some(common_dir)) = (
        git(dir, &["rev-parse", "--git-dir"]),
        git(dir, &["rev-parse", "--git-common-dir"]),
    ) else {
        return;
    };
    let git_dir = dir.join(git_dir);
    let common_dir = dir.join(common_dir);
    let mut watched = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common_dir.join(branch));
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
