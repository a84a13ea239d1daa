//! Shared by the end-to-end tests: a lab on the demo's manifests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::time::Instant;

use zmesh_lab::{Lab, LabOptions, ReservedPod};
use zmesh_proxy::flows::FlowEvent;

pub fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo")
}

pub async fn lab(strict_nodes: &[&str]) -> Lab {
    lab_from(manifests(), strict_nodes, vec![]).await
}

pub async fn lab_from(
    manifests: PathBuf,
    strict_nodes: &[&str],
    reserved_pods: Vec<ReservedPod>,
) -> Lab {
    Lab::start(options(manifests, strict_nodes, reserved_pods))
        .await
        .expect("the lab starts")
}

/// A lab on the demo's manifests whose agents run with `env` (e.g. a forced tc attach mode).
pub async fn lab_with_env(strict_nodes: &[&str], env: &[(&str, &str)]) -> Lab {
    let mut options = options(manifests(), strict_nodes, vec![]);
    options.agent_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Lab::start(options).await.expect("the lab starts")
}

pub fn options(
    manifests: PathBuf,
    strict_nodes: &[&str],
    reserved_pods: Vec<ReservedPod>,
) -> LabOptions {
    LabOptions {
        strict_nodes: strict_nodes.iter().map(|s| s.to_string()).collect(),
        reserved_pods,
        ..LabOptions::new(manifests, PathBuf::from(env!("CARGO_BIN_EXE_zmesh")))
    }
}

pub fn addr(lab: &Lab, ns: &str, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(lab.cluster().pod(ns, pod).expect("pod").ip().into(), port)
}

/// A payload unique to this run, so captures of other runs cannot match it.
pub fn secret(label: &str) -> Vec<u8> {
    format!("zmesh-e2e-{label}-{:016x}", rand::random::<u64>()).into_bytes()
}

/// The certificates `node`'s agent holds, from its admin API.
pub async fn certs(lab: &Lab, node: &str) -> Vec<zmesh_agent::admin::CertInfo> {
    zmesh_agent::admin::AdminClient::new(lab.admin_socket(node))
        .get_json("/certs")
        .await
        .unwrap()
}

/// Waits until `node`'s agent holds (or no longer holds) a certificate for `id`.
pub async fn wait_for_cert(lab: &Lab, node: &str, id: &str, present: bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let has = certs(lab, node)
            .await
            .iter()
            .any(|c| c.workload == id && c.not_after.is_some());
        if has == present {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{node}: certificate for {id} present={has}, wanted {present}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A long-lived `nc` connection from a pod, for line-by-line echo round trips. The process
/// lives in the pod's cgroup, so the lab's teardown kills it whatever happens.
pub struct LongLivedClient {
    pub child: std::process::Child,
    pub stdin: std::process::ChildStdin,
    pub stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl LongLivedClient {
    pub fn open(lab: &Lab, ns: &str, pod: &str, addr: SocketAddr) -> Self {
        let mut nc = lab.cluster().pod(ns, pod).unwrap().command("nc").unwrap();
        nc.args([&addr.ip().to_string(), &addr.port().to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = nc.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one line and checks that it comes back.
    pub fn roundtrip(&mut self, line: &str) {
        use std::io::{BufRead, Write};
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        self.stdin.flush().unwrap();
        let mut echoed = String::new();
        self.stdout.read_line(&mut echoed).unwrap();
        assert_eq!(echoed.trim_end(), line);
    }
}

/// How a round trip on a [`LongLivedClient`] went, when it may fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Roundtrip {
    Echoed,
    /// The connection ended (reset or closed): `nc` exited, its output ended.
    Ended,
    /// Neither an answer nor an end within the time given: the connection hangs.
    Hung,
}

impl LongLivedClient {
    /// Sends one line and reports whether it came back, the connection ended, or nothing
    /// happened within `timeout`.
    pub fn try_roundtrip(&mut self, line: &str, timeout: Duration) -> Roundtrip {
        use std::io::{BufRead, Write};
        use std::os::fd::AsFd;
        if self
            .stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .is_err()
        {
            return Roundtrip::Ended;
        }
        if self.stdout.buffer().is_empty() {
            let fd = self.stdout.get_ref().as_fd();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, ms) {
                Ok(0) => return Roundtrip::Hung,
                Ok(_) => {}
                Err(e) => panic!("poll: {e}"),
            }
        }
        let mut echoed = String::new();
        match self.stdout.read_line(&mut echoed) {
            Ok(0) | Err(_) => Roundtrip::Ended,
            Ok(_) if echoed.trim_end() == line => Roundtrip::Echoed,
            Ok(_) => panic!("sent {line:?}, got {echoed:?}"),
        }
    }
}

/// Starts an echo server in `ns/pod` on `port` and returns its address (the server stops
/// when the returned handle is dropped).
pub fn serve_echo(
    lab: &Lab,
    ns: &str,
    pod: &str,
    port: u16,
) -> (SocketAddr, zmesh_testbed::Server) {
    let server = lab
        .cluster()
        .pod(ns, pod)
        .expect("pod")
        .serve_echo(port)
        .expect("echo server");
    (addr(lab, ns, pod, port), server)
}

/// `zmesh observe --output json` against a node's agent, with extra filter flags.
pub fn observe(lab: &Lab, node: &str, filters: &[&str]) -> Vec<FlowEvent> {
    let socket = lab.admin_socket(node);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args([
            "observe",
            "--output",
            "json",
            "--since",
            "10m",
            // What these tests check is how flows ended.
            "--phase",
            "close",
            "--admin-socket",
        ])
        .arg(&socket)
        .args(filters)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "observe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad flow line {l:?}: {e}")))
        .collect()
}

/// Polls `observe` until `pred` holds for the returned flows (flows are published when
/// connections end, a moment after the client sees the end).
pub fn wait_flows(
    lab: &Lab,
    node: &str,
    filters: &[&str],
    pred: impl Fn(&[FlowEvent]) -> bool,
) -> Vec<FlowEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = observe(lab, node, filters);
        if pred(&flows) {
            return flows;
        }
        assert!(Instant::now() < deadline, "flows never matched: {flows:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
