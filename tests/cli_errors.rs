//! The CLI's error messages: each cause once, and hints that say the right fix.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn an_os_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["enroll", "shop", "--manifests"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!("error: cannot read {}: ", missing.display())),
        "{stderr}"
    );
    assert_eq!(stderr.matches("(os error 2)").count(), 1, "{stderr}");
}

#[test]
fn ca_init_on_an_open_directory_says_chmod_700() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("ca");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["ca", "init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("run `chmod 700 {}`", state.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("chmod 600"), "{stderr}");
    // nothing was created in it
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}
