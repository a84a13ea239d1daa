//! The README's main command: `zmesh demo` checks every claim it prints and exits non-zero
//! if one fails. Needs root.

#[test]
fn the_demo_runs_and_every_claim_holds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .arg("demo")
        .arg("--manifests")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("[FAILED]"), "{stdout}");
    for claim in [
        "the cross-node payload never appears in clear on the underlay",
        "same-node traffic shop/cart -> shop/web also went through the proxy with mTLS",
        "plaintext DROPPED (plaintext_strict)",
        "Done: every claim above was checked.",
    ] {
        assert!(stdout.contains(claim), "missing {claim:?} in:\n{stdout}");
    }
}
