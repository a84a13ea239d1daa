//! Build metadata for `zmesh version`: the git commit the binary was built from, when the
//! source is a git checkout with git installed (a source tarball builds without it).
//! `ZMESH_GIT_COMMIT` in the environment overrides it (packagers building outside git).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ZMESH_GIT_COMMIT");
    let commit = std::env::var("ZMESH_GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it points to (a
    // commit). `--git-path` finds both in a linked worktree too.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for path in watched {
        if let Some(file) = git(&["rev-parse", "--git-path", &path]) {
            if std::path::Path::new(&file).exists() {
                println!("cargo:rerun-if-changed={file}");
            }
        }
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    match &commit {
        Some(c) => {
            println!("cargo:rustc-env=ZMESH_GIT_COMMIT={c}");
            println!("cargo:rustc-env=ZMESH_VERSION_LINE={version} (git {c})");
        }
        None => println!("cargo:rustc-env=ZMESH_VERSION_LINE={version}"),
    }
}
