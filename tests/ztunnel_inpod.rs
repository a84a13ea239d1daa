//! A stock Istio ztunnel as the data plane (`zmesh agent --data-plane ztunnel`), end to end:
//! two nodes of network namespaces, one zmesh agent and one stock ztunnel per node. The agent
//! hands ztunnel each enrolled pod over ZDS and installs the pod's in-pod capture; traffic
//! between enrolled pods must then be HBONE (checked on the underlay and in ztunnel's own
//! access log), un-enrollment must return the pods to plaintext, and strict mode must refuse
//! plaintext from outside the mesh.
//!
//! Needs root and a ztunnel binary built with its `testing` feature, given in `ZTUNNEL_BIN`
//! (never built or downloaded by this project; README, "A stock ztunnel"). ztunnel runs with
//! its fake CA (`FAKE_CA=true`: both ztunnels sign with the same built-in test root) and a
//! static workload table (`LOCAL_XDS_PATH`, what istiod would send): what is under test here
//! is the capture and the ZDS hand-over, not certificate issuance. Skipped, saying so,
//! without `ZTUNNEL_BIN`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zmesh_testbed::{Cluster, ClusterSpec, Pod};

const WAIT: Duration = Duration::from_secs(30);

fn ztunnel_bin() -> Option<PathBuf> {
    match std::env::var_os("ZTUNNEL_BIN") {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            eprintln!(
                "skipped: set ZTUNNEL_BIN to a stock ztunnel binary (built with --features \
                 testing) to run the ztunnel data-plane tests"
            );
            None
        }
    }
}

/// Kills its processes on drop (also when the test panics).
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn kill(&mut self, name: &str) {
        if let Some(i) = self.0.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.0.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    io.cilium/mtls-enabled: \"true\"\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n";

struct Mesh {
    cluster: Cluster,
    dir: tempfile::TempDir,
    procs: Procs,
    zmesh: PathBuf,
    ztunnel: PathBuf,
}

impl Mesh {
    fn start(ztunnel: PathBuf) -> Mesh {
        let spec = ClusterSpec::new()
            .node("node1", |n| {
                n.pod("web", "shop", "web")
                    .pod("cart", "shop", "cart")
                    .pod("batch", "legacy", "batch")
            })
            .node("node2", |n| n.pod("frontend", "shop", "frontend"));
        let cluster = Cluster::build(&spec).expect("cluster");
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("namespaces.yaml"), NAMESPACES).unwrap();
        std::fs::write(
            manifests.join("pods.yaml"),
            zmesh_lab::ztunnel::annotated_pods(&cluster),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("xds.yaml"),
            zmesh_lab::ztunnel::local_xds(&cluster, "shop"),
        )
        .unwrap();
        let mut mesh = Mesh {
            cluster,
            dir,
            procs: Procs(Vec::new()),
            zmesh: PathBuf::from(env!("CARGO_BIN_EXE_zmesh")),
            ztunnel,
        };
        for node in ["node1", "node2"] {
            std::fs::create_dir(mesh.dir.path().join(node)).unwrap();
            mesh.start_agent(node, "permissive");
            mesh.start_ztunnel(node);
        }
        mesh
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    fn start_agent(&mut self, node: &str, mode: &str) {
        let dir = self.node_dir(node);
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut cmd = self
            .cluster
            .node(node)
            .unwrap()
            .command(&self.zmesh)
            .unwrap();
        cmd.args([
            "agent",
            "--node",
            node,
            "--data-plane",
            "ztunnel",
            "--mode",
            mode,
        ])
        .arg("--manifests")
        .arg(self.manifests())
        .arg("--zds-socket")
        .arg(dir.join("ztunnel.sock"))
        .arg("--admin-socket")
        .arg(dir.join("agent.sock"))
        .args(["--cni-socket", "none", "--cni-state-file", "none"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
        let child = cmd.spawn().expect("zmesh agent starts");
        self.procs.0.push((format!("agent-{node}"), child));
    }

    fn start_ztunnel(&mut self, node: &str) {
        let dir = self.node_dir(node);
        let log = std::fs::File::create(dir.join("ztunnel.log")).unwrap();
        let mut cmd = self
            .cluster
            .node(node)
            .unwrap()
            .command(&self.ztunnel)
            .unwrap();
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("INPOD_UDS", dir.join("ztunnel.sock"))
            .env("LOCAL_XDS_PATH", self.dir.path().join("xds.yaml"))
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("NODE_NAME", node)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("ztunnel starts");
        self.procs.0.push((format!("ztunnel-{node}"), child));
    }

    fn log(&self, node: &str, what: &str) -> String {
        std::fs::read_to_string(self.node_dir(node).join(format!("{what}.log"))).unwrap_or_default()
    }

    fn pod(&self, ns: &str, name: &str) -> &Pod {
        self.cluster.pod(ns, name).unwrap()
    }

    /// `nc` from a pod: the payload echoed back, or None.
    fn echo(
        &self,
        from: (&str, &str),
        to: (&str, &str),
        port: u16,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        let addr = std::net::SocketAddr::new(self.pod(to.0, to.1).ip().into(), port);
        self.pod(from.0, from.1)
            .echo(addr, payload)
            .ok()
            .filter(|got| got == payload)
    }

    /// Retries an exchange until it echoes intact (the hand-over and ztunnel's in-pod
    /// listeners take a moment after start), or fails with both logs.
    fn eventually_echo(
        &self,
        from: (&str, &str),
        to: (&str, &str),
        port: u16,
        label: &str,
    ) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        loop {
            let payload = secret(label);
            if self.echo(from, to, port, &payload).is_some() {
                return payload;
            }
            assert!(
                Instant::now() < deadline,
                "{from:?} -> {to:?} never worked\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for node in ["node1", "node2"] {
            for what in ["agent", "ztunnel"] {
                let log = self.log(node, what);
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                let _ = writeln!(out, "--- {node} {what}:\n{}", tail.join("\n"));
            }
        }
        out
    }
}

fn secret(label: &str) -> Vec<u8> {
    format!("zmesh-ztunnel-{label}-{:016x}", rand::random::<u64>()).into_bytes()
}

fn captured(pod: &Pod) -> bool {
    let file = std::fs::File::open(pod.netns().path()).unwrap();
    zmesh_agent::inpod::is_installed(std::os::fd::AsFd::as_fd(&file)).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// ztunnel's access log names a connection between the two identities.
fn ztunnel_logged(log: &str, src_sa: &str, dst_sa: &str) -> bool {
    let src = format!("spiffe://cluster.local/ns/shop/sa/{src_sa}");
    let dst = format!("spiffe://cluster.local/ns/shop/sa/{dst_sa}");
    log.lines().any(|l| l.contains(&src) && l.contains(&dst))
}

fn set_enrolled(mesh: &Mesh, enrolled: bool) {
    let text = if enrolled {
        NAMESPACES.to_string()
    } else {
        NAMESPACES.replace("io.cilium/mtls-enabled: \"true\"", "team: shop")
    };
    let tmp = mesh.manifests().join(".namespaces.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, mesh.manifests().join("namespaces.yaml")).unwrap();
}

#[test]
fn stock_ztunnel_carries_enrolled_pods_as_hbone_and_unenrolled_as_plaintext() {
    let Some(ztunnel) = ztunnel_bin() else { return };
    let mut mesh = Mesh::start(ztunnel);
    let _web = mesh.pod("shop", "web").serve_echo(8080).unwrap();
    for (ns, name) in [("shop", "web"), ("shop", "cart"), ("shop", "frontend")] {
        wait_until(&format!("the capture in {ns}/{name}"), || {
            captured(mesh.pod(ns, name))
        });
    }
    assert!(
        !captured(mesh.pod("legacy", "batch")),
        "not enrolled: no capture"
    );
    // `zmesh status` over both agents: ready (each has its ztunnel connected), the
    // enrolled pods handed over, certificates held by ztunnel.
    wait_until("both agents report ready with their pods", || {
        let out = Command::new(&mesh.zmesh)
            .args(["status", "-o", "json"])
            .arg("--admin-socket")
            .arg(mesh.node_dir("node1").join("agent.sock"))
            .arg("--admin-socket")
            .arg(mesh.node_dir("node2").join("agent.sock"))
            .output()
            .unwrap();
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let agents = status["agents"].as_array().cloned().unwrap_or_default();
        let pods: Vec<u64> = agents
            .iter()
            .filter(|a| {
                a["status"]["ready"] == true
                    && a["status"]["data_plane"] == "ztunnel"
                    && a["status"]["problems"]
                        .as_array()
                        .is_some_and(Vec::is_empty)
            })
            .filter_map(|a| a["status"]["enrolled_pods"].as_u64())
            .collect();
        out.status.success() && pods == [2, 1]
    });

    // Cross-node and same-node between enrolled pods: HBONE, by ztunnel.
    let capture = mesh.cluster.start_capture().unwrap();
    let cross = mesh.eventually_echo(("shop", "frontend"), ("shop", "web"), 8080, "cross");
    let same = mesh.eventually_echo(("shop", "cart"), ("shop", "web"), 8080, "same");
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(&cross), "cross-node payload seen in clear");
    assert!(!pcap.contains(&same));
    let streams = pcap.tcp_streams();
    let hbone: Vec<_> = streams
        .iter()
        .filter(|(f, d)| f.3 == 15008 && !d.is_empty())
        .collect();
    assert!(
        !hbone.is_empty(),
        "no HBONE on the underlay\n{}",
        mesh.logs()
    );
    assert!(
        hbone.iter().all(|(_, d)| d.starts_with(&[0x16, 0x03])),
        "HBONE starts with TLS"
    );
    assert!(
        !streams.keys().any(|f| f.3 == 8080),
        "an enrolled pod reached port 8080 across nodes in plaintext"
    );
    let deadline = Instant::now() + WAIT;
    while !(ztunnel_logged(&mesh.log("node1", "ztunnel"), "frontend", "web")
        && ztunnel_logged(&mesh.log("node1", "ztunnel"), "cart", "web"))
    {
        assert!(
            Instant::now() < deadline,
            "ztunnel's access log does not name both identities:\n{}",
            mesh.log("node1", "ztunnel")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Un-enrolled: the capture goes, traffic is plaintext again (visible on the underlay).
    set_enrolled(&mesh, false);
    for (ns, name) in [("shop", "web"), ("shop", "cart"), ("shop", "frontend")] {
        wait_until(&format!("{ns}/{name}'s capture removed"), || {
            !captured(mesh.pod(ns, name))
        });
    }
    let capture = mesh.cluster.start_capture().unwrap();
    let plain = mesh.eventually_echo(("shop", "frontend"), ("shop", "web"), 8080, "plain");
    let pcap = capture.stop().unwrap();
    assert!(
        pcap.contains(&plain),
        "un-enrolled traffic is plaintext again"
    );
    assert!(pcap.tcp_syn_ports().contains(&8080));

    // Strict mode (node1's agent restarted with --mode strict, the namespace enrolled again):
    // plaintext from the non-enrolled pod is refused, the mesh keeps working.
    mesh.procs.kill("agent-node1");
    set_enrolled(&mesh, true);
    mesh.start_agent("node1", "strict");
    wait_until("node1's strict capture", || {
        let out = Command::new("ip")
            .args(["netns", "exec", mesh.pod("shop", "web").netns().name()])
            .args(["nft", "list", "table", "inet", "zmesh_inpod"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("reject with tcp reset")
    });
    let refused = secret("refused");
    assert_eq!(
        mesh.echo(("legacy", "batch"), ("shop", "web"), 8080, &refused),
        None
    );
    mesh.eventually_echo(("shop", "frontend"), ("shop", "web"), 8080, "strict-mesh");
    mesh.eventually_echo(("shop", "cart"), ("shop", "web"), 8080, "strict-same");
}
