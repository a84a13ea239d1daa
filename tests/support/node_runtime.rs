//! A real node's container runtime for tests: containerd, runc and the CNI plugins that
//! `scripts/node-runtime.sh` prepares once per machine (Debian bookworm's, extracted into
//! `/var/cache/zmesh/node-runtime-<key>/` with two local OCI images), driven through the CRI
//! API exactly as kubelet drives it. There is no kubelet: the test makes its calls
//! (RunPodSandbox with kubelet's metadata, labels and cgroup parent, then CreateContainer
//! and StartContainer), so the real runtime makes the pods' network namespaces (through the
//! CNI chain), cgroups and processes.
//!
//! Each [`NodeRuntime`] is private: its own containerd (configuration, root, state, socket,
//! runc root and CNI directories under `/tmp/zmesh-node-<id>/`), its own bridge `zmn<id>`
//! and /24 subnet. The CNI configuration is a bridge + host-local conflist whose chain can
//! take more plugins ([`NodeRuntimeOptions::chained_plugins`]), and the CNI bin dir holds
//! links to the Debian plugins, so a test can add its own plugin binary next to them.
//!
//! Cleanup, when dropped (also when the test panics: then containerd's log tail is printed
//! first): every pod is stopped and removed through CRI, containerd is killed, and then what
//! a crash could leave is removed whatever happened: processes naming the directory
//! (containerd, its shims, which outlive it), containers left in the runc root, pod network
//! namespaces, mounts under the directory, the pods' cgroups, the bridge, CNI result
//! caches, the directory. A run killed with SIGKILL leaves all that behind: the next
//! [`NodeRuntime::start`] cleans up after every run whose owner process is gone.
//!
//! Needs root. A missing runtime cache fails with the command that prepares it.
//!
//! containerd gets SIGKILL when the thread that started it ends (`PR_SET_PDEATHSIG`, which
//! is per thread): start the runtime on the thread that runs the test.
//!
//! The API is blocking (CRI calls run on a private tokio runtime), so it works the same from
//! plain and async tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zmesh_cri::tonic;
use zmesh_cri::v1;
use zmesh_cri::RuntimeServiceClient;

/// The cache key `scripts/node-runtime.sh` prepares (keep the two in step).
pub const RUNTIME_KEY: &str = "1.6.20-1";
/// Overrides the cache root (default /var/cache/zmesh), as for the script.
pub const CACHE_ENV: &str = "ZMESH_NODE_RUNTIME_CACHE";
/// The image of the pods' workload container: busybox-static (sh, nc, wget, sleep, ip...).
pub fn workload_image() -> String {
    format!("zmesh.test/workload:{RUNTIME_KEY}")
}
/// The sandbox image (a static `pause`).
pub fn pause_image() -> String {
    format!("zmesh.test/pause:{RUNTIME_KEY}")
}
/// The CNI version of the conflist.
pub const CNI_VERSION: &str = "1.0.0";
/// The containerd namespace of the CRI plugin (what kubelet's pods live in).
const NAMESPACE: &str = "k8s.io";
const DIR_PREFIX: &str = "zmesh-node-";
/// In each runtime's directory: the test process that owns it.
const OWNER_FILE: &str = "owner.pid";
/// In each runtime's directory: what a crashed run's successor must clean up (pod cgroups
/// and network namespaces), appended before each is made.
const RECORD_FILE: &str = "record";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const FILES: [&str; 9] = [
    "bin/containerd",
    "bin/containerd-shim-runc-v2",
    "bin/ctr",
    "bin/runc",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "images/pause.tar",
    "images/workload.tar",
];

#[derive(Debug, thiserror::Error)]
pub enum NodeRuntimeError {
    #[error(
        "the node runtime is missing in {dir} ({missing}): prepare it with \
         `sudo bash scripts/node-runtime.sh` (once per machine, a few seconds)"
    )]
    Missing { dir: String, missing: String },
    #[error("the node runtime needs root (it runs containerd, makes network namespaces, cgroups and a bridge)")]
    NotRoot,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("containerd exited before it was ready ({status}); log {log}:\n{tail}")]
    Exited {
        status: String,
        log: String,
        tail: String,
    },
    #[error("containerd was not ready after {timeout:?}: {last}; log {log}:\n{tail}")]
    NotReady {
        timeout: Duration,
        last: String,
        log: String,
        tail: String,
    },
    #[error("connecting to containerd's CRI socket: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("CRI {call}: {status}")]
    Cri { call: String, status: tonic::Status },
    #[error("CRI {call}: no answer within {CALL_TIMEOUT:?}")]
    Timeout { call: String },
    #[error("CRI {call}: unexpected answer: {detail}")]
    Answer { call: String, detail: String },
    #[error("no free /24 for the pod subnet in 10.240.0.0/13")]
    NoSubnet,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeRuntimeError {
    let what = what.into();
    move |source| NodeRuntimeError::Io { what, source }
}

/// Where `scripts/node-runtime.sh` puts the runtime.
pub fn cache_dir() -> PathBuf {
    let root = std::env::var_os(CACHE_ENV).unwrap_or_else(|| "/var/cache/zmesh".into());
    PathBuf::from(root).join(format!("node-runtime-{RUNTIME_KEY}"))
}

/// The runtime's cache directory, or why it cannot be used.
pub fn runtime_files() -> Result<PathBuf, NodeRuntimeError> {
    let dir = cache_dir();
    let missing: Vec<&str> = FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).exists())
        .collect();
    if missing.is_empty() {
        Ok(dir)
    } else {
        Err(NodeRuntimeError::Missing {
            dir: dir.display().to_string(),
            missing: missing.join(", "),
        })
    }
}

/// A pod's QoS class: where kubelet's cgroupfs driver puts its cgroup, and the resources
/// kubelet gives its containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    BestEffort,
    Burstable,
    Guaranteed,
}

impl Qos {
    /// The cgroup parent kubelet sends in RunPodSandbox (cgroupfs driver).
    pub fn cgroup_parent(self, uid: &str) -> String {
        match self {
            Qos::BestEffort => format!("/kubepods/besteffort/pod{uid}"),
            Qos::Burstable => format!("/kubepods/burstable/pod{uid}"),
            Qos::Guaranteed => format!("/kubepods/pod{uid}"),
        }
    }

    /// A container's resources as kubelet computes them for this class, for a container
    /// that requests (Burstable) or requests and is limited to (Guaranteed) 100m CPU and
    /// 64 MiB. Negative OOM scores are clamped by `restrict_oom_score_adj`.
    fn resources(self) -> v1::LinuxContainerResources {
        const PERIOD: i64 = 100_000;
        let mut resources = v1::LinuxContainerResources {
            cpu_period: PERIOD,
            ..Default::default()
        };
        match self {
            Qos::BestEffort => {
                resources.cpu_shares = 2;
                resources.oom_score_adj = 1000;
            }
            Qos::Burstable => {
                resources.cpu_shares = 102;
                // 1000 - 1000 * request / capacity: 999 for a small request.
                resources.oom_score_adj = 999;
            }
            Qos::Guaranteed => {
                resources.cpu_shares = 102;
                resources.cpu_quota = PERIOD / 10;
                resources.memory_limit_in_bytes = 64 << 20;
                resources.oom_score_adj = -997;
            }
        }
        resources
    }
}

/// What [`NodeRuntime::run_pod`] makes: one pod with one workload container.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// The pod's `metadata.uid`.
    pub uid: String,
    pub qos: Qos,
    /// The workload container's command (in the busybox workload image).
    pub command: Vec<String>,
    /// Pod labels, added to kubelet's `io.kubernetes.pod.*` ones on the sandbox.
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    /// A pod with a fresh random UID and no labels.
    pub fn new(namespace: &str, name: &str, qos: Qos, command: &[&str]) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: random_uid(),
            qos,
            command: command.iter().map(|s| s.to_string()).collect(),
            labels: BTreeMap::new(),
        }
    }
}

/// A UUID v4 as Kubernetes writes pod UIDs.
pub fn random_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Options of [`NodeRuntime::start`].
#[derive(Debug, Clone, Default)]
pub struct NodeRuntimeOptions {
    /// Plugins appended to the CNI chain after bridge (e.g. a `zmesh-cni` entry; put its
    /// binary in [`NodeRuntime::cni_bin_dir`] first).
    pub chained_plugins: Vec<serde_json::Value>,
}

/// An IPv4 /24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet(pub Ipv4Addr);

impl Subnet {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..3] == self.0.octets()[..3]
    }

    /// The bridge's address (host-local gives the gateway the first one).
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.0.octets();
        Ipv4Addr::new(a, b, c, 1)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/24", self.0)
    }
}

/// The CRI client and the runtime its calls run on, shared by the runtime and its pods.
struct Cri {
    runtime: Option<tokio::runtime::Runtime>,
    client: RuntimeServiceClient<tonic::transport::Channel>,
}

impl Cri {
    fn connect(socket: &Path) -> Result<Self, NodeRuntimeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("node-runtime-cri")
            .enable_all()
            .build()
            .map_err(io("starting the CRI client's runtime"))?;
        let channel = run_on(&runtime, "connect", {
            let socket = socket.to_owned();
            async move { zmesh_cri::connect(&socket).await.map_err(Into::into) }
        })?;
        Ok(Self {
            runtime: Some(runtime),
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// Runs one call to completion (blocking the caller, whatever runtime it is on).
    fn call<T, F, Fut>(&self, call: &str, f: F) -> Result<T, NodeRuntimeError>
    where
        T: Send + 'static,
        F: FnOnce(RuntimeServiceClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .expect("the CRI runtime lives until Cri is dropped");
        let name = call.to_owned();
        let fut = f(self.client.clone());
        run_on(runtime, call, async move {
            fut.await
                .map(tonic::Response::into_inner)
                .map_err(|status| NodeRuntimeError::Cri { call: name, status })
        })
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    call: &str,
    fut: impl Future<Output = Result<T, NodeRuntimeError>> + Send + 'static,
) -> Result<T, NodeRuntimeError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, fut).await);
    });
    match rx.recv() {
        Ok(Ok(result)) => result,
        Ok(Err(_)) | Err(_) => Err(NodeRuntimeError::Timeout {
            call: call.to_owned(),
        }),
    }
}

/// A private containerd with the CRI plugin on; see the module docs.
pub struct NodeRuntime {
    dir: PathBuf,
    id: String,
    cache: PathBuf,
    containerd: Option<Child>,
    cri: Option<Arc<Cri>>,
    subnet: Subnet,
    /// From spawning containerd to its CRI plugin reporting ready, images imported.
    pub startup: Duration,
}

impl NodeRuntime {
    /// Starts containerd, imports the images and waits until the CRI plugin reports the
    /// runtime and the network ready.
    pub fn start(options: NodeRuntimeOptions) -> Result<Self, NodeRuntimeError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NodeRuntimeError::NotRoot);
        }
        let cache = runtime_files()?;
        remove_stale_runs();
        let started = Instant::now();
        let (id, dir) = create_run_dir()?;
        // From here on, Drop cleans up whatever was made.
        let mut node = Self {
            subnet: Subnet(Ipv4Addr::UNSPECIFIED),
            dir,
            id,
            cache,
            containerd: None,
            cri: None,
            startup: Duration::ZERO,
        };
        node.subnet = free_subnet()?;
        node.write_config(&options)?;
        node.spawn_containerd()?;
        node.wait_ready()?;
        node.import_images()?;
        node.startup = started.elapsed();
        Ok(node)
    }

    /// The runtime's private directory (containerd's log is `containerd.log` there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's unique id (in its directory's and bridge's names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records a cgroup (a path in every hierarchy) to remove with the run, also after a
    /// test killed before dropping the runtime.
    pub fn record_cgroup(&self, path: &str) -> Result<(), NodeRuntimeError> {
        record(&self.dir, &format!("cgroup {path}"))
    }

    /// containerd's CRI socket (what kubelet's `--container-runtime-endpoint` names).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The CNI plugin directory (links to Debian's plugins; add more before making pods).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    /// The CNI configuration directory (holds the one conflist, `10-zmesh-node.conflist`).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    /// The CNI network's name (also the key of libcni's result cache).
    pub fn network_name(&self) -> String {
        format!("{DIR_PREFIX}{}", self.id)
    }

    /// The pods' bridge.
    pub fn bridge(&self) -> String {
        bridge_name(&self.id)
    }

    /// The pods' subnet (the bridge has its first address).
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    fn cri(&self) -> &Arc<Cri> {
        self.cri
            .as_ref()
            .expect("the CRI client exists once start() returned")
    }

    fn write_config(&self, options: &NodeRuntimeOptions) -> Result<(), NodeRuntimeError> {
        let d = &self.dir;
        for sub in ["cni/bin", "cni/net.d", "cni/data", "pods"] {
            std::fs::create_dir_all(d.join(sub)).map_err(io(format!("creating {sub}")))?;
        }
        let plugins = self.cache.join("cni");
        for entry in std::fs::read_dir(&plugins).map_err(io("listing the CNI plugins"))? {
            let entry = entry.map_err(io("listing the CNI plugins"))?;
            std::os::unix::fs::symlink(entry.path(), d.join("cni/bin").join(entry.file_name()))
                .map_err(io("linking a CNI plugin"))?;
        }
        let mut chain = vec![serde_json::json!({
            "type": "bridge",
            "bridge": self.bridge(),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": d.join("cni/data"),
            },
        })];
        chain.extend(options.chained_plugins.iter().cloned());
        let conflist = serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": self.network_name(),
            "plugins": chain,
        });
        write(
            &d.join("cni/net.d/10-zmesh-node.conflist"),
            &format!("{conflist:#}"),
        )?;
        let bin = self.cache.join("bin");
        let p = |sub: &str| d.join(sub).display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# Not built into Debian's containerd or not usable here: keep the log free of their errors.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # No CAP_SYS_RESOURCE here: runc cannot lower the sandbox's OOM score below ours.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Exec and attach streams: any free port, so that runtimes can run side by side.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        # PID 1 is not systemd: kubelet's cgroupfs driver.
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
            root = p("root"),
            state = p("state"),
            socket = self.socket().display(),
            opt = p("opt"),
            pause = pause_image(),
            runc = bin.join("runc").display(),
            runc_root = p("runc"),
            cni_bin = p("cni/bin"),
            cni_conf = p("cni/net.d"),
        );
        write(&d.join("config.toml"), &config)
    }

    fn spawn_containerd(&mut self) -> Result<(), NodeRuntimeError> {
        let log = self.dir.join("containerd.log");
        let out = File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("opening containerd.log"))?;
        let bin = self.cache.join("bin");
        // The shims are found on PATH.
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let mut command = Command::new(bin.join("containerd"));
        command
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_the_test(&mut command);
        self.containerd = Some(command.spawn().map_err(io("starting containerd"))?);
        Ok(())
    }

    fn containerd_exited(&mut self) -> Option<NodeRuntimeError> {
        let child = self.containerd.as_mut()?;
        match child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(NodeRuntimeError::Exited {
                status: status.to_string(),
                log: self.dir.join("containerd.log").display().to_string(),
                tail: log_tail(&self.dir.join("containerd.log"), 40),
            }),
            Err(e) => Some(io("waiting for containerd")(e)),
        }
    }

    /// Ready: the socket answers and CRI's Status has RuntimeReady and NetworkReady (the
    /// CNI configuration loaded).
    fn wait_ready(&mut self) -> Result<(), NodeRuntimeError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no socket yet");
        loop {
            if let Some(e) = self.containerd_exited() {
                return Err(e);
            }
            if self.cri.is_none() && self.socket().exists() {
                match Cri::connect(&self.socket()) {
                    Ok(cri) => self.cri = Some(Arc::new(cri)),
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(cri) = &self.cri {
                match cri.call("Status", |mut c| async move {
                    c.status(v1::StatusRequest { verbose: false }).await
                }) {
                    Ok(status) => {
                        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
                        let ready = |t: &str| conditions.iter().any(|c| c.r#type == t && c.status);
                        if ready("RuntimeReady") && ready("NetworkReady") {
                            return Ok(());
                        }
                        last = format!("conditions {conditions:?}");
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() > deadline {
                return Err(NodeRuntimeError::NotReady {
                    timeout: READY_TIMEOUT,
                    last,
                    log: self.dir.join("containerd.log").display().to_string(),
                    tail: log_tail(&self.dir.join("containerd.log"), 40),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Imports the local images into CRI's namespace (nothing can be pulled here).
    fn import_images(&self) -> Result<(), NodeRuntimeError> {
        for image in ["pause", "workload"] {
            let tarball = self.cache.join("images").join(format!("{image}.tar"));
            run(Command::new(self.cache.join("bin/ctr"))
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", NAMESPACE, "images", "import"])
                .args(["--snapshotter", "overlayfs"])
                .arg(&tarball))?;
        }
        Ok(())
    }

    /// Makes a pod as kubelet does: RunPodSandbox, then CreateContainer and StartContainer
    /// for its workload container. Returns once the container runs.
    pub fn run_pod(&self, spec: PodSpec) -> Result<Pod, NodeRuntimeError> {
        let started = Instant::now();
        let cgroup_parent = spec.qos.cgroup_parent(&spec.uid);
        // Before the runtime makes it: a crash from here on leaves a cgroup to remove.
        record(&self.dir, &format!("cgroup {cgroup_parent}"))?;
        let log_dir = self
            .dir
            .join("pods")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid));
        let namespaces = Some(v1::NamespaceOption {
            network: v1::NamespaceMode::Pod as i32,
            pid: v1::NamespaceMode::Container as i32,
            ipc: v1::NamespaceMode::Pod as i32,
            ..Default::default()
        });
        let mut labels: std::collections::HashMap<String, String> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert("io.kubernetes.pod.name".into(), spec.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), spec.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), spec.uid.clone());
        let sandbox_config = v1::PodSandboxConfig {
            metadata: Some(v1::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            hostname: spec.name.clone(),
            log_directory: log_dir.display().to_string(),
            labels,
            annotations: [("kubernetes.io/config.source".into(), "api".into())].into(),
            linux: Some(v1::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.clone(),
                security_context: Some(v1::LinuxSandboxSecurityContext {
                    namespace_options: namespaces.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cri = self.cri().clone();
        let request = v1::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        };
        let sandbox_id = cri
            .call("RunPodSandbox", |mut c| async move {
                c.run_pod_sandbox(request).await
            })?
            .pod_sandbox_id;
        // From here on, dropping the pod removes the sandbox.
        let mut pod = Pod {
            cri,
            spec,
            sandbox_id,
            container_id: String::new(),
            cgroup_parent,
            netns: PathBuf::new(),
            ip: Ipv4Addr::UNSPECIFIED,
            sandbox_pid: 0,
            removed: false,
            startup: Duration::ZERO,
        };
        let status = pod.sandbox_status()?;
        pod.netns = status
            .netns
            .clone()
            .ok_or_else(|| NodeRuntimeError::Answer {
                call: "PodSandboxStatus".into(),
                detail: "no network namespace path in the verbose info".into(),
            })?;
        record(&self.dir, &format!("netns {}", pod.netns.display()))?;
        pod.ip = status.ip.ok_or_else(|| NodeRuntimeError::Answer {
            call: "PodSandboxStatus".into(),
            detail: "no pod IP".into(),
        })?;
        pod.sandbox_pid = status.pid;

        let mut container_labels = std::collections::HashMap::new();
        container_labels.insert("io.kubernetes.container.name".into(), "workload".into());
        for key in [
            "io.kubernetes.pod.name",
            "io.kubernetes.pod.namespace",
            "io.kubernetes.pod.uid",
        ] {
            if let Some(value) = sandbox_config.labels.get(key) {
                container_labels.insert(key.to_owned(), value.clone());
            }
        }
        let container_config = v1::ContainerConfig {
            metadata: Some(v1::ContainerMetadata {
                name: "workload".into(),
                attempt: 0,
            }),
            image: Some(v1::ImageSpec {
                image: workload_image(),
                ..Default::default()
            }),
            command: pod.spec.command.clone(),
            labels: container_labels,
            log_path: "workload/0.log".into(),
            linux: Some(v1::LinuxContainerConfig {
                resources: Some(pod.spec.qos.resources()),
                security_context: Some(v1::LinuxContainerSecurityContext {
                    namespace_options: namespaces,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let request = v1::CreateContainerRequest {
            pod_sandbox_id: pod.sandbox_id.clone(),
            config: Some(container_config),
            sandbox_config: Some(sandbox_config),
        };
        pod.container_id = pod
            .cri
            .call("CreateContainer", |mut c| async move {
                c.create_container(request).await
            })?
            .container_id;
        let container_id = pod.container_id.clone();
        pod.cri.call("StartContainer", |mut c| async move {
            c.start_container(v1::StartContainerRequest { container_id })
                .await
        })?;
        pod.startup = started.elapsed();
        Ok(pod)
    }

    /// The sandboxes the runtime holds.
    pub fn sandboxes(&self) -> Result<Vec<v1::PodSandbox>, NodeRuntimeError> {
        Ok(self
            .cri()
            .call("ListPodSandbox", |mut c| async move {
                c.list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
                    .await
            })?
            .items)
    }

    /// Stops and removes every sandbox (and so every container) through CRI.
    fn remove_all_pods(&self) -> Result<(), NodeRuntimeError> {
        for sandbox in self.sandboxes()? {
            remove_sandbox(self.cri(), &sandbox.id)?;
        }
        Ok(())
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        let log = self.dir.join("containerd.log");
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}:\n{}",
                log.display(),
                log_tail(&log, 30)
            );
        }
        if self.cri.is_some() {
            if let Err(e) = self.remove_all_pods() {
                eprintln!("node runtime {}: removing the pods: {e}", self.id);
            }
        }
        // Pods still held by the test find the client closed.
        self.cri = None;
        if let Some(mut child) = self.containerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        clean_run(&self.dir, &self.id);
    }
}

/// A running pod (sandbox + workload container). Dropping it stops and removes it.
pub struct Pod {
    cri: Arc<Cri>,
    pub spec: PodSpec,
    pub sandbox_id: String,
    pub container_id: String,
    /// The cgroup parent the sandbox was made with (`/kubepods/.../pod<uid>`).
    pub cgroup_parent: String,
    /// The pod's network namespace (`/var/run/netns/cni-<uuid>`), from the verbose status.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    /// The sandbox's (pause) process.
    pub sandbox_pid: u32,
    /// From RunPodSandbox to the workload container started.
    pub startup: Duration,
    removed: bool,
}

/// What [`Pod::sandbox_status`] reads.
#[derive(Debug, Clone)]
pub struct SandboxStatus {
    pub ready: bool,
    pub ip: Option<Ipv4Addr>,
    pub netns: Option<PathBuf>,
    pub pid: u32,
}

/// The result of [`Pod::exec`].
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Pod {
    /// PodSandboxStatus (verbose): state, IP, network namespace and pause PID.
    pub fn sandbox_status(&self) -> Result<SandboxStatus, NodeRuntimeError> {
        let request = v1::PodSandboxStatusRequest {
            pod_sandbox_id: self.sandbox_id.clone(),
            verbose: true,
        };
        let answer = self.cri.call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(request).await
        })?;
        let status = answer.status.unwrap_or_default();
        // containerd's verbose info: {"pid": .., "runtimeSpec": {"linux": {"namespaces": [..]}}}.
        let info: serde_json::Value = answer
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        Ok(SandboxStatus {
            ready: status.state == v1::PodSandboxState::SandboxReady as i32,
            ip: status.network.and_then(|n| n.ip.parse().ok()),
            netns,
            pid: info["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        })
    }

    /// ContainerStatus of the workload container: (running, its init process's PID).
    pub fn workload_status(&self) -> Result<(bool, u32), NodeRuntimeError> {
        let request = v1::ContainerStatusRequest {
            container_id: self.container_id.clone(),
            verbose: true,
        };
        let answer = self.cri.call("ContainerStatus", |mut c| async move {
            c.container_status(request).await
        })?;
        let running = answer
            .status
            .is_some_and(|s| s.state == v1::ContainerState::ContainerRunning as i32);
        let info: serde_json::Value = answer
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        let pid = info["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        Ok((running, pid))
    }

    /// Runs `cmd` in the workload container (ExecSync, 60 s timeout).
    pub fn exec(&self, cmd: &[&str]) -> Result<ExecOutput, NodeRuntimeError> {
        let request = v1::ExecSyncRequest {
            container_id: self.container_id.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        let answer = self.cri.call(
            "ExecSync",
            |mut c| async move { c.exec_sync(request).await },
        )?;
        Ok(ExecOutput {
            code: answer.exit_code,
            stdout: String::from_utf8_lossy(&answer.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&answer.stderr).into_owned(),
        })
    }

    /// StopPodSandbox + RemovePodSandbox (CNI DEL, network namespace and containers gone),
    /// then the pod's cgroup, which kubelet removes on a real node.
    pub fn stop(mut self) -> Result<(), NodeRuntimeError> {
        self.remove()
    }

    fn remove(&mut self) -> Result<(), NodeRuntimeError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        remove_sandbox(&self.cri, &self.sandbox_id)?;
        remove_pod_cgroups(&self.cgroup_parent);
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // After the runtime is gone the call fails at once; the runtime's cleanup did it.
        let _ = self.remove();
    }
}

fn remove_sandbox(cri: &Cri, id: &str) -> Result<(), NodeRuntimeError> {
    let pod_sandbox_id = id.to_owned();
    cri.call("StopPodSandbox", |mut c| async move {
        c.stop_pod_sandbox(v1::StopPodSandboxRequest { pod_sandbox_id })
            .await
    })?;
    let pod_sandbox_id = id.to_owned();
    cri.call("RemovePodSandbox", |mut c| async move {
        c.remove_pod_sandbox(v1::RemovePodSandboxRequest { pod_sandbox_id })
            .await
    })?;
    Ok(())
}

fn bridge_name(id: &str) -> String {
    // At most 15 bytes (IFNAMSIZ).
    format!("zmn{id}")
}

fn create_run_dir() -> Result<(String, PathBuf), NodeRuntimeError> {
    loop {
        let id = format!("{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{id}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                write(&dir.join(OWNER_FILE), &std::process::id().to_string())?;
                return Ok((id, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("creating {}", dir.display()))(e)),
        }
    }
}

fn record(dir: &Path, line: &str) -> Result<(), NodeRuntimeError> {
    use std::io::Write;
    let path = dir.join(RECORD_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(io(format!("writing {}", path.display())))
}

/// A /24 in 10.240.0.0/13 that no route of this host overlaps (another runtime's bridge
/// has a route once its first pod is up; picking at random makes a clash before that
/// unlikely).
fn free_subnet() -> Result<Subnet, NodeRuntimeError> {
    let routes =
        std::fs::read_to_string("/proc/net/route").map_err(io("reading /proc/net/route"))?;
    // (destination, mask) in host order; the file has them in network byte order as hex.
    let taken: Vec<(u32, u32)> = routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parse = |s: &str| {
                u32::from_str_radix(s, 16)
                    .ok()
                    .map(|v| u32::from_be(v.to_le()))
            };
            Some((parse(f.get(1)?)?, parse(f.get(7)?)?))
        })
        .filter(|&(_, mask)| mask != 0)
        .collect();
    for _ in 0..64 {
        let n: u32 = rand::random::<u32>() % (8 * 256);
        let candidate = u32::from(Ipv4Addr::new(10, 240, 0, 0)) + (n << 8);
        let clash = taken.iter().any(|&(dest, mask)| {
            let common = mask & 0xffff_ff00;
            dest & common == candidate & common
        });
        if !clash {
            return Ok(Subnet(Ipv4Addr::from(candidate)));
        }
    }
    Err(NodeRuntimeError::NoSubnet)
}

/// Cleans up after runs whose owner process is gone (killed before dropping its runtime).
fn remove_stale_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .map(str::to_owned)
        else {
            continue;
        };
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok());
        let stale = match owner {
            Some(pid) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            // No owner file: a run that died while creating its directory, or one creating
            // it right now (give it a minute).
            None => std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60)),
        };
        if stale {
            clean_run(&path, &id);
        }
    }
}

/// Removes everything a run may have left, whether it ended cleanly or not. Each step is
/// best effort: one that fails must not keep the others from running.
fn clean_run(dir: &Path, id: &str) {
    let dir_text = dir.display().to_string();
    // containerd and its shims (shims outlive containerd; each names the run's socket).
    let killed = kill_processes_naming(&dir_text);
    // Containers whose shim died with them still run: runc kills and deletes them.
    let runc_root = dir.join("runc").join(NAMESPACE);
    if let Ok(containers) = std::fs::read_dir(&runc_root) {
        for container in containers.flatten() {
            let _ = Command::new(cache_dir().join("bin/runc"))
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force"])
                .arg(container.file_name())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    // The shims' sockets (in /run/containerd/s/, outside the directory).
    for socket in killed.sockets {
        let _ = std::fs::remove_file(socket);
    }
    let record = std::fs::read_to_string(dir.join(RECORD_FILE)).unwrap_or_default();
    for line in record.lines() {
        if let Some(netns) = line.strip_prefix("netns ") {
            let _ = nix::mount::umount2(netns, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(netns);
        }
    }
    unmount_under(dir);
    for line in record.lines() {
        if let Some(parent) = line.strip_prefix("cgroup ") {
            remove_pod_cgroups(parent);
        }
    }
    let _ = Command::new("ip")
        .args(["link", "del", &bridge_name(id)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // libcni's result cache, keyed by network name.
    let prefix = format!("{DIR_PREFIX}{id}-");
    if let Ok(results) = std::fs::read_dir("/var/lib/cni/results") {
        for entry in results.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("node runtime {id}: removing {}: {e}", dir.display());
        }
    }
}

#[derive(Default)]
struct Killed {
    /// Unix sockets the killed processes had bound outside the directory.
    sockets: Vec<PathBuf>,
}

/// SIGKILLs every process with an argument inside `dir` and waits until they are gone.
fn kill_processes_naming(dir: &str) -> Killed {
    let mut killed = Killed::default();
    let mut pids = Vec::new();
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmdline.split(|&b| b == 0).any(|arg| {
            let arg = String::from_utf8_lossy(arg);
            arg == dir || arg.starts_with(&format!("{dir}/"))
        });
        if names_dir {
            killed.sockets.extend(unix_sockets_of(pid, dir));
            pids.push(pid);
        }
    }
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Not our children (or reaped by our Child): wait for /proc to drop them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|pid| is_running(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

fn is_running(pid: u32) -> bool {
    // A zombie has exited (its parent reaps it); only live processes hold the directory.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

/// Paths of the unix sockets `pid` has bound outside `dir` (a shim's in /run/containerd/s).
fn unix_sockets_of(pid: u32, dir: &str) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (f.get(6)?, f.get(7)?);
            (inodes.iter().any(|i| i == inode)
                && path.starts_with("/run/containerd/")
                && !path.starts_with(dir))
            .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Unmounts everything mounted under `dir` (rootfs overlays, /dev/shm of sandboxes),
/// deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(zmesh_testbed::unescape_mount_path)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes a pod's cgroup (`/kubepods/<qos>/pod<uid>` and any child left) in every cgroup
/// hierarchy. kubelet does this on a real node; the runtime removes only its containers'.
/// The shared `/kubepods/...` parents stay, as on a node.
fn remove_pod_cgroups(parent: &str) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !(f[2] == "cgroup" || f[2] == "cgroup2") {
            continue;
        }
        let path = Path::new(&zmesh_testbed::unescape_mount_path(f[1]))
            .join(parent.trim_start_matches('/'));
        remove_dir_tree(&path);
    }
}

/// rmdir of a cgroup and its children, deepest first (cgroup directories hold only the
/// kernel's files, which rmdir takes with them).
fn remove_dir_tree(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dir_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

fn run(command: &mut Command) -> Result<String, NodeRuntimeError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {command:?}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NodeRuntimeError::Command {
            command: format!("{command:?}"),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn write(path: &Path, text: &str) -> Result<(), NodeRuntimeError> {
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// The last `n` lines of a log file (for error messages).
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The process `command` starts is killed when the test process dies, even by SIGKILL:
/// nothing it runs outlives a crashed test.
pub fn die_with_the_test(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}
