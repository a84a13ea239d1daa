//! `zmesh check` against a node without an agent: it must fail clearly and say what to do.

use std::process::Command;

#[test]
fn check_without_an_agent_fails_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let output = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["check", "--admin-socket"])
        .arg(&socket)
        .arg("--credentials")
        .arg(dir.path().join("no-credentials"))
        .arg("--bpf-pin-dir")
        .arg(dir.path().join("no-pins"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "must exit non-zero:\n{stdout}");
    assert!(
        stdout.contains(&format!(
            "[FAIL] agent admin API: cannot reach the agent at {}",
            socket.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("hint: is the agent running on this node?"),
        "{stdout}"
    );
    assert!(stdout.contains("[FAIL] node credential"), "{stdout}");
    // the kernel is probed feature by feature (the tests run as root, on kernels zmesh
    // supports): all present, and tc ingress attaches one way or the other
    assert!(
        stdout.contains("[PASS] kernel eBPF features: ") && stdout.contains(" present (Linux 5.14"),
        "{stdout}"
    );
    assert!(stdout.contains("[PASS] tc ingress attach: "), "{stdout}");

    // The same as JSON, for scripts.
    let output = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["check", "--output", "json", "--admin-socket"])
        .arg(&socket)
        .arg("--credentials")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let checks: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let admin = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent admin API")
        .unwrap();
    assert_eq!(admin["status"], "fail");
    assert!(admin["hint"].as_str().unwrap().contains("agent running"));
}
