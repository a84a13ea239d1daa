//! A real kubelet for tests: Kubernetes 1.20.2's, built by `scripts/control-plane.sh` from
//! Debian's source package next to the API server, running pods on a [`NodeRuntime`]'s
//! containerd through CRI, registered with a [`ControlPlane`] as a node.
//!
//! What the kubelet would change on the machine is kept to the test:
//! - its pods' cgroups go under a cgroup root of its own (`/zmesh-kubelet-<id>`, created in
//!   every hierarchy and removed afterwards), never the machine's `/kubepods`;
//! - it runs in a mount namespace of its own in which the kernel settings it insists on
//!   (`vm.overcommit_memory=1`, `kernel.panic=10`, `kernel.panic_on_oops=1`, ...) read as
//!   it wants them: it would otherwise write them on the machine. Mounts it makes stay in
//!   that namespace, so pods get no secret or ConfigMap volumes (the tests' pods use none);
//! - no iptables chains (`--make-iptables-util-chains=false`), no read-only port, its
//!   server and health ports picked free.
//!
//! Its directory is inside the runtime's, so a test killed before dropping it is cleaned
//! up with the runtime's leftovers (the kubelet process names that directory). Dropping it
//! kills the kubelet; the runtime's drop then removes the pods it made.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control_plane::ControlPlane;
use crate::node_runtime::{die_with_the_test, pause_image, NodeRuntime};

/// The kernel settings kubelet's container manager checks (`setupKernelTunables`), with
/// the values it wants: shown to it inside its mount namespace only.
const KERNEL_TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];
const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Kubelet {
    child: Child,
    node: String,
    dir: PathBuf,
    log: PathBuf,
    cgroup_root: String,
}

impl Kubelet {
    /// Starts a kubelet registering as `node` with address `node_ip`, and waits until the
    /// node is Ready in the API server.
    pub async fn start(
        plane: &ControlPlane,
        runtime: &NodeRuntime,
        node: &str,
        node_ip: std::net::Ipv4Addr,
    ) -> Result<Self, String> {
        let dir = runtime.dir().join("kubelet");
        std::fs::create_dir_all(dir.join("sysctl"))
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cgroup_root = cgroup_root(runtime)?;
        let mut binds = String::new();
        for (key, value) in KERNEL_TUNABLES {
            let file = dir.join("sysctl").join(key.replace('/', "."));
            std::fs::write(&file, format!("{value}\n"))
                .map_err(|e| format!("writing {}: {e}", file.display()))?;
            binds.push_str(&format!(
                "mount --bind {} /proc/sys/{key} && ",
                file.display()
            ));
        }
        let port = |what| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("a free port for {what}: {e}"))
        };
        let args = [
            format!("--kubeconfig={}", plane.admin_kubeconfig().display()),
            format!("--hostname-override={node}"),
            format!("--node-ip={node_ip}"),
            format!("--root-dir={}", dir.join("root").display()),
            format!("--cert-dir={}", dir.join("pki").display()),
            format!(
                "--volume-plugin-dir={}",
                dir.join("volume-plugins").display()
            ),
            "--container-runtime=remote".into(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                runtime.socket().display()
            ),
            format!("--pod-infra-container-image={}", pause_image()),
            "--cgroup-driver=cgroupfs".into(),
            format!("--cgroup-root={cgroup_root}"),
            "--fail-swap-on=false".into(),
            format!("--port={}", port("the kubelet server")?),
            "--read-only-port=0".into(),
            format!("--healthz-port={}", port("kubelet's healthz")?),
            "--healthz-bind-address=127.0.0.1".into(),
            "--make-iptables-util-chains=false".into(),
            // Nothing can be pulled: images are imported into the runtime.
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--eviction-hard=".into(),
            "--resolv-conf=".into(),
            "--v=1".into(),
        ];
        let log = dir.join("kubelet.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("kubelet.log: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("kubelet.log: {e}"))?;
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{binds}exec \"$0\" \"$@\""))
            .arg(plane.bin().join("kubelet"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_the_test(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("starting kubelet: {e}"))?;
        let mut kubelet = Self {
            child,
            node: node.to_owned(),
            dir,
            log,
            cgroup_root,
        };
        kubelet.wait_ready(plane).await?;
        Ok(kubelet)
    }

    /// Where kubelet puts the pods' cgroups (`<root>/kubepods`), relative to a hierarchy.
    pub fn pods_cgroup(&self) -> String {
        format!("{}/kubepods", self.cgroup_root)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "kubelet exited ({status}); {}:\n{}",
                self.log.display(),
                self.log_tail(40)
            )),
            _ => None,
        }
    }

    async fn wait_ready(&mut self, plane: &ControlPlane) -> Result<(), String> {
        use k8s_openapi::api::core::v1::Node;
        let client = plane.client().await.map_err(|e| e.to_string())?;
        let nodes: kube::Api<Node> = kube::Api::all(client);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(e) = self.exited() {
                return Err(e);
            }
            let last = match nodes.get_opt(&self.node).await {
                Ok(Some(node)) => {
                    let ready = node
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .into_iter()
                        .find(|c| c.type_ == "Ready");
                    match ready {
                        Some(c) if c.status == "True" => return Ok(()),
                        Some(c) => format!("Ready={}: {}", c.status, c.message.unwrap_or_default()),
                        None => "no Ready condition yet".into(),
                    }
                }
                Ok(None) => "not registered yet".into(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "node {} not Ready after {READY_TIMEOUT:?}: {last}; kubelet log:\n{}",
                    self.node,
                    self.log_tail(40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}:\n{}",
                self.log.display(),
                self.log_tail(30)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The pods' cgroups go with the runtime's pods (its drop); the root is recorded.
    }
}

/// The cgroup root of the kubelet on `runtime` (`/zmesh-kubelet-<id>`), created in every
/// hierarchy and recorded for removal with the runtime. Idempotent.
pub fn cgroup_root(runtime: &NodeRuntime) -> Result<String, String> {
    let root = format!("/zmesh-kubelet-{}", runtime.id());
    runtime.record_cgroup(&root).map_err(|e| e.to_string())?;
    create_cgroup_everywhere(&root)?;
    Ok(root)
}

/// Creates `path` in every cgroup hierarchy (kubelet refuses a cgroup root that does not
/// exist).
fn create_cgroup_everywhere(path: &str) -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !(f[2] == "cgroup" || f[2] == "cgroup2") {
            continue;
        }
        let dir = Path::new(f[1]).join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    Ok(())
}
