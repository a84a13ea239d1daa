//! `zmesh version`: the client's version, and the agent's as its admin API reports it (or
//! why it is not known).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

fn version(socket: &Path, output: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["version", "-o", output, "--agent-socket"])
        .arg(socket)
        .output()
        .unwrap()
}

/// Answers one HTTP request on `socket` with `status` and `body`.
fn one_answer(
    socket: &Path,
    status: &'static str,
    body: &'static str,
) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).unwrap();
        String::from_utf8_lossy(&request).into_owned()
    })
}

#[test]
fn client_version_with_the_crate_version_and_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let out = version(&dir.path().join("none.sock"), "json");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
    // Built from a git checkout: build.rs found the commit (a source tarball has none).
    if !Path::new(env!("CARGO_MANIFEST_DIR")).join(".git").exists() {
        return;
    }
    let commit = v["client"]["git_commit"].as_str().unwrap();
    assert!(
        commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    // --version says the same
    let long = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .arg("--version")
        .output()
        .unwrap();
    let long = String::from_utf8(long.stdout).unwrap();
    assert!(long.contains(commit), "{long}");
}

#[test]
fn an_agent_that_cannot_be_reached_is_said_to_be_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let out = version(&socket, "human");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("client: zmesh "), "{text}");
    assert!(
        text.contains("agent:  unreachable (cannot reach the agent at"),
        "{text}"
    );
    assert_eq!(text.matches("os error 2").count(), 1, "{text}");

    let out = version(&socket, "yaml");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("state: unreachable"), "{text}");
    assert!(
        !text.contains("\nagent:\n  version"),
        "no version is made up: {text}"
    );
}

#[test]
fn the_agents_version_endpoint_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let server = one_answer(
        &socket,
        "200 OK",
        r#"{"version":"9.8.7","git_commit":"deadbeef"}"#,
    );
    let out = version(&socket, "json");
    assert!(out.status.success(), "{out:?}");
    let request = server.join().unwrap();
    assert!(request.starts_with("GET /version HTTP/1.1"), "{request}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["agent"]["state"], "reported");
    assert_eq!(v["agent"]["version"], "9.8.7");
    assert_eq!(v["agent"]["git_commit"], "deadbeef");
}

#[test]
fn an_agent_without_a_version_endpoint_does_not_report_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let server = one_answer(&socket, "404 Not Found", r#"{"error":"not found"}"#);
    let out = version(&socket, "human");
    server.join().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("agent:  not reported ("), "{text}");
}
