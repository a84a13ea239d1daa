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

/// An agent that authenticates to the CA with its ServiceAccount token has no node
/// credential: check looks at the token and the CA's roots, and fails on neither.
#[test]
fn check_in_token_mode_does_not_want_a_node_credential() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = dir.path().join("token");
    std::fs::write(
        &token,
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"aud":["zmesh-ca"],"exp":{exp}}}"#))
        ),
    )
    .unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = ca
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let bundle = dir.path().join("roots.pem");
    std::fs::write(&bundle, root.pem()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["check", "--admin-socket"])
        .arg(dir.path().join("agent.sock"))
        .arg("--credentials")
        .arg(dir.path().join("no-credentials"))
        .arg("--ca-token-file")
        .arg(&token)
        .arg("--ca-bundle")
        .arg(&bundle)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("[PASS] CA credential (ServiceAccount token): ")
            && stdout.contains("audience zmesh-ca"),
        "{stdout}"
    );
    assert!(!stdout.contains("node credential"), "{stdout}");
    // The agent is not running here: that fails, with the manifests' namespace and a link.
    assert!(
        stdout.contains("kubectl -n zmesh-system get pods")
            && stdout.contains("README.md#kubernetes"),
        "{stdout}"
    );
    assert_eq!(output.status.code(), Some(1));
}
