//! `zmesh completion` and `zmesh man`: generated from the CLI definition, they cover every
//! subcommand.

use std::process::Command;

fn zmesh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(args)
        .output()
        .unwrap()
}

/// The visible top-level subcommands, as `zmesh --help` lists them.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(zmesh(&["--help"]).stdout).unwrap();
    let list: Vec<String> = help
        .split("Commands:\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    for expected in [
        "agent",
        "ca",
        "certs",
        "check",
        "compat",
        "version",
        "completion",
    ] {
        assert!(list.iter().any(|c| c == expected), "{expected}: {list:?}");
    }
    assert!(!list.iter().any(|c| c == "man"), "man is hidden: {list:?}");
    list
}

#[test]
fn completion_scripts_name_every_subcommand() {
    let commands = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let out = zmesh(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.len() > 1000, "{shell}: {script}");
        for c in &commands {
            assert!(script.contains(c.as_str()), "{shell} script lacks {c}");
        }
        // nested subcommands too
        assert!(script.contains("migrate-mutual-auth"), "{shell}");
        assert!(script.contains("rotate-root"), "{shell}");
    }
    let bash = String::from_utf8(zmesh(&["completion", "bash"]).stdout).unwrap();
    assert!(bash.contains("complete -F _zmesh"), "{bash}");
    let bad = zmesh(&["completion", "tcsh"]);
    assert!(!bad.status.success());
}

#[test]
fn man_pages_for_zmesh_and_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .arg("man")
        .arg("--out-dir")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8(out.stdout).unwrap();
    let mut pages = vec!["zmesh".to_owned()];
    pages.extend(subcommands().iter().map(|c| format!("zmesh-{c}")));
    pages.extend(["zmesh-ca-init", "zmesh-compat-migrate-mutual-auth"].map(str::to_owned));
    for page in &pages {
        let file = out_dir.join(format!("{page}.1"));
        assert!(
            listed.contains(&*file.to_string_lossy()),
            "{page}: {listed}"
        );
        let roff = std::fs::read_to_string(&file).unwrap();
        // A roff man page: its title header (.TH NAME SECTION ...) names the command.
        let th = roff
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{page}: no .TH header:\n{roff}"));
        let mut fields = th.split_whitespace().skip(1);
        assert_eq!(fields.next(), Some(page.as_str()), "{th}");
        assert_eq!(fields.next(), Some("1"), "{th}");
        assert!(roff.contains(".SH NAME"), "{page}");
        assert!(roff.contains(".SH SYNOPSIS"), "{page}");
        // no directive other than roff requests at the start of a line
        assert!(roff.lines().next().is_some_and(|l| l.starts_with('.')));
    }
    assert!(
        !out_dir.join("zmesh-man.1").exists(),
        "the hidden command has no page"
    );
    assert!(!out_dir.join("zmesh-help.1").exists());
}
