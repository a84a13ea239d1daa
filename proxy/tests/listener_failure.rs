//! A listener destroyed under the proxy (`ss -K`, as root) is fatal and visible:
//! readiness says which one failed, open tunnels drain, and `Proxy::run` returns the error.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zmesh_proxy::{Direction, Outcome, ProxyError};

const T: Duration = Duration::from_secs(30);

/// Why this test cannot run here, if it cannot.
fn cannot_run() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (ss -K destroys sockets through sock_diag)");
    }
    if Command::new("ss").arg("-V").output().is_err() {
        return Some("needs the ss binary (iproute2)");
    }
    None
}

/// Destroys the TCP socket listening on `addr`.
fn destroy_listener(addr: SocketAddr) {
    let filter = format!("src {} and sport = :{}", addr.ip(), addr.port());
    let out = Command::new("ss")
        .args(["-K", "-t", "-l", &filter])
        .output()
        .expect("running ss");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ss -K failed: {stdout}{stderr}");
    // ss lists what it destroyed; nothing means the kernel cannot (CONFIG_INET_DIAG_DESTROY).
    assert!(
        stdout.contains(&addr.to_string()),
        "ss -K did not destroy {addr}: {stdout}{stderr}"
    );
}

async fn readiness(addr: SocketAddr) -> String {
    tokio::time::timeout(T, http_get(addr, "/healthz/ready"))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_destroyed_listener_fails_readiness_drains_and_ends_run() {
    if let Some(why) = cannot_run() {
        eprintln!("skipped: {why}");
        return;
    }
    let mesh = Mesh::new(93).await;
    // A tunnel open before the failure, to drain afterwards.
    let mut c = mesh.connect().await;
    let (mut s, _) = tokio::time::timeout(T, mesh.server.accept())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(T, exchange(&mut c, &mut s, b"before", b"ok"))
        .await
        .unwrap();
    let ready = readiness(mesh.a.addrs.readiness).await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let outbound = mesh.a.addrs.outbound;
    destroy_listener(outbound);

    // Readiness names the failure (and keeps serving while the tunnel drains).
    let ready = tokio::time::timeout(T, async {
        loop {
            let r = readiness(mesh.a.addrs.readiness).await;
            if !r.starts_with("HTTP/1.1 200") {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("readiness still 200 after the outbound listener was destroyed");
    eprintln!("{ready}");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let named = format!("outbound listener on {outbound} failed: ");
    assert!(ready.contains(&named), "{ready}");
    // The proxy drains: its other listeners close, the open tunnel still works.
    let deadline = tokio::time::Instant::now() + T;
    while TcpStream::connect(mesh.a.addrs.plaintext).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::task::yield_now().await;
    }
    tokio::time::timeout(T, exchange(&mut c, &mut s, b"after", b"still"))
        .await
        .unwrap();

    // Once the tunnel ends, run() returns the failure.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    s.shutdown().await.unwrap();
    c.read_to_end(&mut rest).await.unwrap();
    let Mesh { a, b, .. } = mesh;
    let r = tokio::time::timeout(T, a.task).await.unwrap().unwrap();
    match r {
        Err(ProxyError::ListenerFailed {
            what: "outbound",
            addr,
            source,
        }) => {
            assert_eq!(addr, outbound);
            assert!(source.raw_os_error().is_some(), "{source:?}");
        }
        other => panic!("expected the outbound listener's failure, got {other:?}"),
    }
    assert_eq!(a.metrics.closed_count(Direction::Outbound, Outcome::Ok), 1);
    drop(b);
}
