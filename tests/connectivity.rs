//! `zmesh connectivity test --lab`: the whole matrix against a lab of its own, its exit
//! status and its JUnit XML. Needs root.

#[test]
fn the_connectivity_matrix_passes_on_the_lab_and_writes_junit() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("results.xml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["connectivity", "test", "--lab", "--junit"])
        .arg(&junit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("7 of 7 tests passed"), "{stdout}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"7\" failures=\"0\""), "{xml}");
    for name in [
        "pod-to-pod/same-node",
        "pod-to-pod/cross-node",
        "service/cluster-ip",
        "plaintext/permissive",
        "policy/deny",
        "policy/allow",
        "strict",
    ] {
        assert_eq!(
            xml.matches(&format!("name=\"{name}")).count(),
            1,
            "{name} in {xml}"
        );
    }
    assert!(!xml.contains("<failure"), "{xml}");

    // A filter runs only the matching tests.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["connectivity", "test", "--lab", "--test", "pod-to-pod"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("2 of 2 tests passed"), "{stdout}");
}
