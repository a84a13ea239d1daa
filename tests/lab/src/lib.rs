//! A local mesh on one machine: a cluster built from network namespaces (from a directory
//! of Kubernetes manifests), the zmesh CA, and one real `zmesh agent` process per node.
//! `zmesh demo` and the end-to-end tests run on it.
//!
//! The lab plays kubelet and CNI: it builds each pod's network namespace and cgroup, then
//! writes what the API would hold (pod IP) and the node-local facts (netns and cgroup
//! paths, as `zmesh.io/netns` / `zmesh.io/cgroup` annotations) into its copy of the
//! manifests, which the CA and the agents then watch like any manifest directory. With
//! `LabOptions::kubelet_cgroups` it hands out no node-local facts and plays kubelet more
//! closely instead: pod UIDs in the manifests, and per pod a sandbox process in a cgroup
//! named after the UID, so the agents find the namespaces as on a real node.
//!
//! It also plays kube-proxy for clients outside the mesh: each node gets one DNAT rule per
//! Service port (nftables, in the node's namespace; test scaffolding, not zmesh), spreading
//! a ClusterIP's connections over the Service's ready endpoints, as kube-proxy would. The
//! mesh never relies on it: enrolled pods' connections to a ClusterIP reach the proxy first.

pub mod ztunnel;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use zmesh_certs::{CaStore, InitOptions, NodeName, Policy};
use zmesh_identity::TrustDomain;
use zmesh_testbed::{Cluster, ClusterSpec};

use zmesh_agent::admin::{AdminClient, CertInfo};
use zmesh_cluster::manifests::ManifestDir;
use zmesh_cluster::state::{ClusterState, CGROUP_ANNOTATION, NETNS_ANNOTATION};

/// Where labs pin their agents' eBPF state, one directory per run.
const PIN_ROOT: &str = "/sys/fs/bpf/zmesh-lab";

/// The node that hosts the CA (no pods, no agent).
pub const CONTROL_NODE: &str = "zmesh-control";
const CA_PORT: u16 = 15012;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("manifests in {dir}: {reason}")]
    Manifests { dir: PathBuf, reason: String },
    #[error("test cluster: {0}")]
    Cluster(#[from] zmesh_testbed::Error),
    #[error("CA: {0}")]
    Ca(String),
    #[error("{what}: {reason}")]
    Process { what: String, reason: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("the agent of {node} exited ({status}) before it was ready: {error}")]
    AgentExited {
        node: String,
        status: std::process::ExitStatus,
        /// The agent's error line, from its log.
        error: String,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to run the lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Directory of Namespace and Pod manifests; pods name their node in `spec.nodeName`.
    pub manifests: PathBuf,
    /// The `zmesh` binary to run the CA and agents with.
    pub zmesh_bin: PathBuf,
    /// Lifetime of workload certificates.
    pub cert_lifetime: Duration,
    /// Nodes whose agent starts in strict mode.
    pub strict_nodes: Vec<String>,
    /// Pods whose sandbox (netns, cgroup, veth) exists from the start but whose manifest
    /// is not there yet: a test adds it later, as a pod being scheduled.
    pub reserved_pods: Vec<ReservedPod>,
    /// Environment variables for every agent (e.g. `ZMESH_TC_ATTACH=netlink`).
    pub agent_env: Vec<(String, String)>,
    /// Play kubelet instead of handing out node-local facts: pods get a `metadata.uid` and
    /// no `zmesh.io/netns` / `zmesh.io/cgroup` annotations, and each gets a sandbox process
    /// (as a pod's pause container) in its network namespace and in a cgroup named as
    /// kubelet's cgroupfs driver names it (`kubepods/besteffort/pod<uid>/sandbox`, below
    /// the pod's testbed cgroup), so agents must find namespaces through /proc. Reserved
    /// pods' sandboxes start only with [`Lab::start_sandbox`].
    pub kubelet_cgroups: bool,
    /// Dual-stack pods: each gets an IPv6 address too (`status.podIPs`), and agents steer
    /// IPv6 (`--proxy-ip6`, the node's fd00:201:N::1).
    pub dual_stack: bool,
    /// More arguments for `zmesh ca serve` (e.g. `--bearer-tokens FILE`).
    pub ca_args: Vec<String>,
    /// Run each node's proxy in a data path process of its own (`zmesh-datapath`, started
    /// with the node's first agent, kept across agent restarts) instead of inside the agent.
    pub datapath_process: bool,
}

impl LabOptions {
    /// A lab of `manifests` run with `zmesh_bin`: one-hour certificates, every node
    /// permissive, IPv4 only, agents with the proxy inside, nothing reserved or extra.
    pub fn new(manifests: PathBuf, zmesh_bin: PathBuf) -> Self {
        Self {
            manifests,
            zmesh_bin,
            cert_lifetime: Duration::from_secs(3600),
            strict_nodes: vec![],
            reserved_pods: vec![],
            agent_env: vec![],
            kubelet_cgroups: false,
            dual_stack: false,
            ca_args: vec![],
            datapath_process: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReservedPod {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

/// A running local mesh. Dropping it stops every process and removes everything it made.
pub struct Lab {
    options: LabOptions,
    /// Declared before `cluster` so that processes stop before namespaces go away.
    agents: BTreeMap<String, Child>,
    /// With `datapath_process`: each node's data path process.
    datapaths: BTreeMap<String, Child>,
    /// Replaced agents, draining their open connections.
    retired: Vec<Child>,
    ca: Option<Child>,
    cluster: Option<Cluster>,
    work: tempfile::TempDir,
    pin_root: PathBuf,
    trust_domain: TrustDomain,
    /// Source manifest file name -> its text, to re-render with pod runtime facts.
    sources: BTreeMap<String, String>,
    /// With `kubelet_cgroups`: the sandbox process of each pod that has one, by
    /// (namespace, name).
    sandboxes: BTreeMap<(String, String), Child>,
}

impl Lab {
    pub async fn start(options: LabOptions) -> Result<Lab, LabError> {
        let (state, sources) = read_manifests(&options.manifests)?;
        let mut nodes: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
        for pod in state.pods() {
            let Some(node) = &pod.node else { continue };
            nodes.entry(node.clone()).or_default().push((
                pod.name.clone(),
                pod.namespace.clone(),
                pod.service_account.clone(),
            ));
        }
        for pod in &options.reserved_pods {
            nodes.entry(pod.node.clone()).or_default().push((
                pod.name.clone(),
                pod.namespace.clone(),
                pod.service_account.clone(),
            ));
        }
        if nodes.is_empty() {
            return Err(LabError::Manifests {
                dir: options.manifests.clone(),
                reason: "no pod is scheduled on a node (spec.nodeName)".into(),
            });
        }
        let mut spec = ClusterSpec::new();
        for (node, pods) in &nodes {
            spec = spec.node(node, |mut n| {
                for (name, namespace, sa) in pods {
                    n = n.pod(name, namespace, sa);
                }
                n
            });
        }
        spec = spec.node(CONTROL_NODE, |n| n);
        if options.dual_stack {
            spec = spec.dual_stack();
        }
        let cluster = Cluster::build(&spec)?;
        // Building the cluster cleaned up the namespaces of crashed runs; their pins remain.
        remove_stale_pins(Path::new(PIN_ROOT));
        let work = tempfile::Builder::new()
            .prefix("zmesh-lab-")
            .tempdir()
            .map_err(io(Path::new("/tmp")))?;
        let pin_root = PathBuf::from(PIN_ROOT).join(cluster.run_id());
        let mut lab = Lab {
            options,
            agents: BTreeMap::new(),
            datapaths: BTreeMap::new(),
            retired: Vec::new(),
            ca: None,
            cluster: Some(cluster),
            work,
            pin_root,
            trust_domain: TrustDomain::default(),
            sources,
            sandboxes: BTreeMap::new(),
        };
        if lab.options.kubelet_cgroups {
            for pod in state.pods().filter(|p| p.node.is_some()) {
                lab.start_sandbox(&pod.namespace, &pod.name)?;
            }
        }
        lab.render_manifests()?;
        lab.start_ca().await?;
        let node_names: Vec<String> = nodes.keys().cloned().collect();
        for node in &node_names {
            lab.join(node)?;
        }
        for node in &node_names {
            let strict = lab.options.strict_nodes.contains(node);
            lab.start_agent(node, strict)?;
        }
        for node in &node_names {
            lab.wait_ready(node, Duration::from_secs(60)).await?;
        }
        Ok(lab)
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("the cluster lives as long as the lab")
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The lab's manifest directory, watched by the CA and the agents.
    pub fn manifests_dir(&self) -> PathBuf {
        self.work.path().join("manifests")
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.work.path().join("nodes").join(node)
    }

    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.sock")
    }

    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.log")
    }

    /// The process id of `node`'s data path process (with `datapath_process`), e.g. to
    /// read its CPU time and memory.
    pub fn datapath_pid(&self, node: &str) -> Option<u32> {
        self.datapaths.get(node).map(Child::id)
    }

    /// The process id of `node`'s running agent.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents.get(node).map(Child::id)
    }

    /// The log of `node`'s data path process (with `datapath_process`).
    pub fn datapath_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.node_dir(node).join("datapath.log")).unwrap_or_default()
    }

    fn datapath_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("datapath.sock")
    }

    /// Starts `node`'s data path process unless it runs.
    fn ensure_datapath(&mut self, node: &str) -> Result<(), LabError> {
        if let Some(child) = self.datapaths.get_mut(node) {
            if child.try_wait().ok().flatten().is_none() {
                return Ok(());
            }
        }
        let cluster_node = self.cluster().node(node).expect("node of the spec");
        // The proxy-only binary next to zmesh, as the chart runs it; `zmesh datapath` (the
        // same process from the whole CLI) where it was not built.
        let datapath_bin = self.options.zmesh_bin.with_file_name("zmesh-datapath");
        let mut command = if datapath_bin.is_file() {
            cluster_node.command(&datapath_bin)?
        } else {
            let mut command = cluster_node.command(&self.options.zmesh_bin)?;
            command.arg("datapath");
            command
        };
        command.arg("--socket").arg(self.datapath_socket(node));
        let log = self.node_dir(node).join("datapath.log");
        let child = spawn_logged(command, &log, "the data path")?;
        self.datapaths.insert(node.to_owned(), child);
        Ok(())
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.agent_log_path(node)).unwrap_or_default()
    }

    /// The agent's list of enrolled namespaces for the CNI plugin (`--cni-state-file`).
    /// Where the node's agent serves the CNI plugin (`--cni-socket`).
    pub fn cni_socket_path(&self, node: &str) -> PathBuf {
        self.cni_state_path(node).with_file_name("cni.sock")
    }

    pub fn cni_state_path(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("enrolled-namespaces.json")
    }

    /// Where the agent of `node` pins its eBPF maps and links.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.pin_root.join(node)
    }

    pub fn ca_state_dir(&self) -> PathBuf {
        self.work.path().join("ca")
    }

    pub fn ca_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.control_ip()), CA_PORT)
    }

    fn control_ip(&self) -> Ipv4Addr {
        self.cluster()
            .node(CONTROL_NODE)
            .map(|n| n.underlay_ip())
            .expect("the control node exists")
    }

    /// Writes the manifests (see `write_manifests`) and follows their Services with the
    /// nodes' DNAT rules.
    fn render_manifests(&self) -> Result<(), LabError> {
        self.write_manifests()?;
        self.route_services()
    }

    /// Plays kube-proxy: in every node, a DNAT rule per Service port to its ready endpoints
    /// (or a reset when it has none), replaced atomically on every change.
    fn route_services(&self) -> Result<(), LabError> {
        let (state, _errors) = ManifestDir::new(self.manifests_dir()).rescan();
        let state = state.unwrap_or_default();
        let rules = service_rules(&state);
        let path = self.work.path().join("services.nft");
        std::fs::write(&path, rules).map_err(io(&path))?;
        for node in self.cluster().nodes() {
            if node.name() == CONTROL_NODE {
                continue;
            }
            let output = node
                .command("nft")?
                .arg("-f")
                .arg(&path)
                .output()
                .map_err(|e| LabError::Process {
                    what: format!("nft in {}", node.name()),
                    reason: e.to_string(),
                })?;
            if !output.status.success() {
                return Err(LabError::Process {
                    what: format!("nft in {}", node.name()),
                    reason: String::from_utf8_lossy(&output.stderr).into_owned(),
                });
            }
        }
        Ok(())
    }

    /// Writes the manifests with each pod's IP, netns and cgroup filled in (as a CNI would).
    fn write_manifests(&self) -> Result<(), LabError> {
        let dir = self.manifests_dir();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for (name, text) in &self.sources {
            let rendered = self.render(text);
            let path = dir.join(name);
            // Write then rename, so watchers never read a half-written file.
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, rendered).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    fn render(&self, text: &str) -> String {
        let mut documents = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let Ok(mut value) = serde_yaml_ng::Value::deserialize(document) else {
                // Not ours to fix: the agents must see (and report) the file as written.
                return text.to_owned();
            };
            if value.is_null() {
                continue;
            }
            if value.get("kind").and_then(|k| k.as_str()) == Some("Pod") {
                self.fill_pod(&mut value);
            }
            documents.push(serde_yaml_ng::to_string(&value).unwrap_or_default());
        }
        documents.join("---\n")
    }

    fn fill_pod(&self, pod: &mut serde_yaml_ng::Value) {
        use serde_yaml_ng::Value;
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let Some(testbed_pod) = self.cluster().pod(&namespace, &name) else {
            return; // not scheduled: stays without IP, as in Kubernetes
        };
        let ip = testbed_pod.ip().to_string();
        let Some(map) = pod.as_mapping_mut() else {
            return;
        };
        let status = map
            .entry(Value::from("status"))
            .or_insert_with(|| Value::Mapping(Default::default()));
        status["podIP"] = Value::from(ip.clone());
        if let Some(ip6) = testbed_pod.ip6() {
            let entry = |ip: String| {
                let mut m = serde_yaml_ng::Mapping::new();
                m.insert(Value::from("ip"), Value::from(ip));
                Value::Mapping(m)
            };
            status["podIPs"] = Value::Sequence(vec![entry(ip.clone()), entry(ip6.to_string())]);
        }
        status["phase"] = Value::from("Running");
        let metadata = map
            .entry(Value::from("metadata"))
            .or_insert_with(|| Value::Mapping(Default::default()));
        if metadata.get("annotations").is_none_or(|a| a.is_null()) {
            metadata["annotations"] = Value::Mapping(Default::default());
        }
        if self.options.kubelet_cgroups {
            // Only what the API has: the node-local facts are for the agent to find.
            if metadata.get("uid").is_none_or(|u| u.is_null()) {
                metadata["uid"] = Value::from(self.pod_uid(&namespace, &name));
            }
            return;
        }
        metadata["annotations"][NETNS_ANNOTATION] =
            Value::from(testbed_pod.netns().path().display().to_string());
        metadata["annotations"][CGROUP_ANNOTATION] =
            Value::from(testbed_pod.cgroup_path().display().to_string());
    }

    /// The UID the lab gives pod `namespace/name` (unless its manifest has one): a UUID
    /// derived from the run and the pod, so it is stable across re-renders and differs
    /// between runs and pods.
    pub fn pod_uid(&self, namespace: &str, name: &str) -> String {
        use std::hash::{Hash, Hasher};
        let half = |salt: u8| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (salt, self.cluster().run_id(), namespace, name).hash(&mut hasher);
            hasher.finish()
        };
        let hex = format!("{:016x}{:016x}", half(1), half(2));
        format!(
            "{}-{}-4{}-8{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        )
    }

    /// Starts the sandbox process of pod `namespace/name` (see
    /// [`LabOptions::kubelet_cgroups`]), as the container runtime starts a pod's pause
    /// container: from then on its network namespace can be found through /proc.
    pub fn start_sandbox(&mut self, namespace: &str, name: &str) -> Result<(), LabError> {
        let key = (namespace.to_owned(), name.to_owned());
        if self.sandboxes.contains_key(&key) {
            return Ok(());
        }
        let uid = self.pod_uid(namespace, name);
        let pod = self
            .cluster()
            .pod(namespace, name)
            .ok_or_else(|| LabError::Process {
                what: format!("the sandbox of {namespace}/{name}"),
                reason: "no such pod in the lab".into(),
            })?;
        let mut command = pod.command_in_cgroup(
            "sleep",
            Path::new(&format!("kubepods/besteffort/pod{uid}/sandbox")),
        )?;
        command
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| LabError::Process {
            what: format!("the sandbox of {namespace}/{name}"),
            reason: e.to_string(),
        })?;
        self.sandboxes.insert(key, child);
        Ok(())
    }

    async fn start_ca(&mut self) -> Result<(), LabError> {
        let state_dir = self.ca_state_dir();
        CaStore::init(
            &state_dir,
            &InitOptions {
                trust_domain: self.trust_domain.clone(),
                policy: Policy::default(),
            },
        )
        .map_err(|e| LabError::Ca(e.to_string()))?;
        self.serve_ca().await
    }

    /// Starts `zmesh ca serve` on the CA's state and waits until it listens.
    async fn serve_ca(&mut self) -> Result<(), LabError> {
        let state_dir = self.ca_state_dir();
        let addr = self.ca_addr();
        let log = self.work.path().join("ca.log");
        let manifests = self.manifests_dir();
        let control = self
            .cluster
            .as_ref()
            .and_then(|c| c.node(CONTROL_NODE))
            .expect("the control node exists");
        let mut command = control.command(&self.options.zmesh_bin)?;
        command
            .args(["ca", "serve", "--state-dir"])
            .arg(&state_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--san")
            .arg(addr.ip().to_string())
            .arg("--manifests")
            .arg(manifests)
            .args(&self.options.ca_args);
        self.ca = Some(spawn_logged(command, &log, "the CA")?);
        // Ready once it accepts TCP on its port (checked from the control node).
        let ca_ip = addr;
        wait_until(Duration::from_secs(30), "the CA to listen", || {
            control
                .run(move || {
                    std::net::TcpStream::connect_timeout(&ca_ip, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false)
        })
        .await
    }

    fn join(&self, node: &str) -> Result<(), LabError> {
        let store = CaStore::open(&self.ca_state_dir()).map_err(|e| LabError::Ca(e.to_string()))?;
        let name = NodeName::new(node).map_err(|e| LabError::Ca(e.to_string()))?;
        let token = store
            .create_join_token(&name, Duration::from_secs(600))
            .map_err(|e| LabError::Ca(e.to_string()))?;
        let bundle = store
            .load()
            .map_err(|e| LabError::Ca(e.to_string()))?
            .bundle_pem()
            .to_owned();
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let bundle_path = dir.join("ca-roots.pem");
        std::fs::write(&bundle_path, bundle).map_err(io(&bundle_path))?;
        let cluster_node = self.cluster().node(node).expect("node of the spec");
        let mut command = cluster_node.command(&self.options.zmesh_bin)?;
        command
            .args(["ca", "join", "--ca"])
            .arg(self.ca_addr().to_string())
            .args(["--node", node, "--out"])
            .arg(dir.join("credentials"))
            .arg("--ca-bundle")
            .arg(&bundle_path)
            .env("ZMESH_JOIN_TOKEN", token);
        let output = command.output().map_err(|e| LabError::Process {
            what: format!("join of {node}"),
            reason: e.to_string(),
        })?;
        if !output.status.success() {
            return Err(LabError::Process {
                what: format!("join of {node}"),
                reason: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// Starts (or restarts, see [`Lab::stop_agent`]) the agent of `node`.
    pub fn start_agent(&mut self, node: &str, strict: bool) -> Result<(), LabError> {
        let cluster_node = self.cluster().node(node).expect("node of the spec");
        let dir = self.node_dir(node);
        let mut command = cluster_node.command(&self.options.zmesh_bin)?;
        command
            .args(["agent", "--node", node, "--manifests"])
            .arg(self.manifests_dir())
            .arg("--ca")
            .arg(self.ca_addr().to_string())
            .arg("--credentials")
            .arg(dir.join("credentials"))
            .arg("--proxy-ip")
            .arg(cluster_node.pod_gateway_ip().to_string())
            .args(
                cluster_node
                    .pod_gateway_ip6()
                    .map(|ip6| ["--proxy-ip6".to_string(), ip6.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(["--mode", if strict { "strict" } else { "permissive" }])
            .arg("--admin-socket")
            .arg(self.admin_socket(node))
            .arg("--cert-lifetime")
            .arg(format!("{}s", self.options.cert_lifetime.as_secs()))
            .arg("--redirect-cgroup")
            .arg(cluster_node.pods_cgroup_path())
            .arg("--bpf-pin-dir")
            .arg(self.pin_dir(node))
            // Node-local, like the real one, instead of the host's /var/run/zmesh that
            // every lab (and the machine) would share.
            .arg("--cni-state-file")
            .arg(self.cni_state_path(node))
            .arg("--cni-socket")
            .arg(self.cni_socket_path(node))
            .envs(self.options.agent_env.iter().map(|(k, v)| (k, v)));
        if self.options.datapath_process {
            command
                .arg("--datapath-socket")
                .arg(self.datapath_socket(node));
            self.ensure_datapath(node)?;
        }
        let child = spawn_logged(command, &self.agent_log_path(node), "the agent")?;
        self.agents.insert(node.to_owned(), child);
        Ok(())
    }

    /// Replaces the agent of `node` as an upgrade does: the new agent starts (taking over
    /// the pinned eBPF state and, through SO_REUSEPORT, the listeners), then the old one gets
    /// SIGTERM and drains its open connections in the background.
    pub async fn restart_agent(&mut self, node: &str, strict: bool) -> Result<(), LabError> {
        let old = self.agents.remove(node);
        // So that readiness is read from the new agent, not the old one's socket.
        let _ = std::fs::remove_file(self.admin_socket(node));
        self.start_agent(node, strict)?;
        self.wait_ready(node, Duration::from_secs(60)).await?;
        if let Some(old) = old {
            let pid = nix::unistd::Pid::from_raw(old.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            self.retired.push(old);
        }
        Ok(())
    }

    /// Stops the CA (to see how the agents cope without it).
    pub fn stop_ca(&mut self) {
        if let Some(ca) = self.ca.take() {
            terminate(ca, Duration::from_secs(5));
        }
    }

    /// Starts the CA again after [`Lab::stop_ca`], on the same state (keys, nodes).
    pub async fn resume_ca(&mut self) -> Result<(), LabError> {
        if self.ca.is_some() {
            return Ok(());
        }
        self.serve_ca().await
    }

    /// Kills the agent of `node` with SIGKILL (a crash, an OOM kill: no drain, no
    /// clean-up) and waits for it to be gone. Its pinned eBPF state stays behind.
    pub fn kill_agent(&mut self, node: &str) -> Result<(), LabError> {
        let mut child = self.agents.remove(node).ok_or_else(|| LabError::Process {
            what: format!("the agent of {node}"),
            reason: "not running".into(),
        })?;
        child.kill().map_err(|e| LabError::Process {
            what: format!("killing the agent of {node}"),
            reason: e.to_string(),
        })?;
        child.wait().map_err(|e| LabError::Process {
            what: format!("the agent of {node}"),
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// Stops the agent of `node` with SIGTERM (graceful drain) and waits for it.
    /// Redirection stays installed, as across an agent upgrade.
    pub fn stop_agent(&mut self, node: &str) -> Result<(), LabError> {
        if let Some(child) = self.agents.remove(node) {
            terminate(child, Duration::from_secs(10));
        }
        Ok(())
    }

    /// Waits for the agent of `node` to exit on its own (nobody signals it) and returns
    /// its exit status; the agent is then gone from the lab (start it again to replace it).
    pub async fn wait_agent_exit(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.agents.get_mut(node).ok_or_else(|| LabError::Process {
                what: format!("the agent of {node}"),
                reason: "not running".into(),
            })?;
            if let Some(status) = child.try_wait().map_err(|e| LabError::Process {
                what: format!("the agent of {node}"),
                reason: e.to_string(),
            })? {
                self.agents.remove(node);
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!(
                        "the agent of {node} to exit; its log:\n{}",
                        tail(&self.agent_log(node), 30)
                    ),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the agent of `node` serves its admin API and holds a valid certificate
    /// for every enrolled workload of the node. An agent of the lab that exits meanwhile
    /// ends the wait at once with its error line.
    pub async fn wait_ready(&mut self, node: &str, timeout: Duration) -> Result<(), LabError> {
        let (state, _) = read_manifests(&self.manifests_dir())?;
        let expected: Vec<String> = state
            .enrolled_on(node)
            .map(|p| {
                format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    self.trust_domain, p.namespace, p.service_account
                )
            })
            .collect();
        let client = AdminClient::new(self.admin_socket(node));
        let deadline = Instant::now() + timeout;
        loop {
            self.check_agents_alive()?;
            if let Ok(certs) = client.get_json::<Vec<CertInfo>>("/certs").await {
                let now = zmesh_agent::admin::epoch_seconds(std::time::SystemTime::now());
                let ready = expected.iter().all(|id| {
                    certs
                        .iter()
                        .any(|c| &c.workload == id && c.not_after.is_some_and(|t| t > now))
                });
                if ready {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!(
                        "the agent of {node} to hold certificates for {expected:?}; its log:\n{}",
                        tail(&self.agent_log(node), 30)
                    ),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An agent that exited is an error naming it, with the error line from its log.
    fn check_agents_alive(&mut self) -> Result<(), LabError> {
        let mut exited = None;
        for (node, child) in &mut self.agents {
            let status = child.try_wait().map_err(|e| LabError::Process {
                what: format!("the agent of {node}"),
                reason: e.to_string(),
            })?;
            if let Some(status) = status {
                exited = Some((node.clone(), status));
                break;
            }
        }
        let Some((node, status)) = exited else {
            return Ok(());
        };
        self.agents.remove(&node);
        Err(LabError::AgentExited {
            error: error_line(&self.agent_log(&node)),
            node,
            status,
        })
    }

    /// Edits the lab's manifests (e.g. a namespace label), as `kubectl label` would.
    pub fn edit_manifest(
        &mut self,
        file: &str,
        edit: impl FnOnce(&mut String),
    ) -> Result<(), LabError> {
        let text = self.sources.entry(file.to_owned()).or_default();
        edit(text);
        self.render_manifests()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let agents = std::mem::take(&mut self.agents).into_values();
        for child in agents.chain(std::mem::take(&mut self.retired)) {
            terminate(child, Duration::from_secs(5));
        }
        for child in std::mem::take(&mut self.datapaths).into_values() {
            terminate(child, Duration::from_secs(5));
        }
        if let Some(ca) = self.ca.take() {
            terminate(ca, Duration::from_secs(5));
        }
        for (_, mut sandbox) in std::mem::take(&mut self.sandboxes) {
            let _ = sandbox.kill();
            let _ = sandbox.wait();
        }
        if let Some(cluster) = &self.cluster {
            for node in cluster.nodes() {
                let pins = self.pin_root.join(node.name());
                if pins.exists() {
                    let result = node.run(move || zmesh_redirect::Redirector::uninstall(&pins));
                    if let Ok(Err(e)) | Err(e) = result
                        .map_err(|e| e.to_string())
                        .map(|r| r.map_err(|e| e.to_string()))
                    {
                        eprintln!(
                            "lab cleanup: uninstalling redirection of {}: {e}",
                            node.name()
                        );
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&self.pin_root);
        if let Some(parent) = self.pin_root.parent() {
            let _ = std::fs::remove_dir(parent); // only if no other lab uses it
        }
        // The cluster's own Drop removes namespaces, links and cgroups.
        self.cluster.take();
    }
}

/// Reads Namespace and Pod manifests; any bad file is an error here (the lab's input is
/// ours to get right).
/// The nftables ruleset that stands in for kube-proxy (IPv4 ClusterIPs; the lab is IPv4).
fn service_rules(state: &ClusterState) -> String {
    let mut rules = String::new();
    for service in state.services() {
        let endpoints = state.service_endpoints(service);
        for vip in service.cluster_ips.iter().filter(|ip| ip.is_ipv4()) {
            for port in &service.ports {
                let targets: Vec<String> = endpoints
                    .iter()
                    .filter(|e| e.ip.is_ipv4())
                    .filter_map(|e| e.ports.get(&port.port).map(|t| format!("{} . {t}", e.ip)))
                    .collect();
                let action = if targets.is_empty() {
                    "reject with tcp reset".to_owned()
                } else {
                    let map: Vec<String> = targets
                        .iter()
                        .enumerate()
                        .map(|(i, t)| format!("{i} : {t}"))
                        .collect();
                    format!(
                        "dnat ip to numgen random mod {} map {{ {} }}",
                        targets.len(),
                        map.join(", ")
                    )
                };
                rules.push_str(&format!(
                    "    ip daddr {vip} tcp dport {} {action}\n",
                    port.port
                ));
            }
        }
    }
    // Declaring then deleting the table makes the replacement atomic and idempotent.
    format!(
        "table ip zmesh_lab_services {{}}\ndelete table ip zmesh_lab_services\n\
         table ip zmesh_lab_services {{\n  chain prerouting {{\n    \
         type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n}}\n"
    )
}

fn read_manifests(dir: &Path) -> Result<(ClusterState, BTreeMap<String, String>), LabError> {
    let mut manifests = ManifestDir::new(dir);
    let (state, errors) = manifests.rescan();
    if let Some(e) = errors.first() {
        return Err(LabError::Manifests {
            dir: dir.to_owned(),
            reason: e.to_string(),
        });
    }
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            sources.insert(name, text);
        }
    }
    Ok((state.unwrap_or_default(), sources))
}

fn spawn_logged(mut command: Command, log: &Path, what: &str) -> Result<Child, LabError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(log))?;
    let stderr = file.try_clone().map_err(io(log))?;
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        .env(
            "ZMESH_LOG",
            std::env::var("ZMESH_LAB_LOG").unwrap_or_else(|_| "info".into()),
        );
    command.spawn().map_err(|e| LabError::Process {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
fn terminate(mut child: Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            return Err(LabError::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// What an agent that exited said about why: the `error: ...` line the binary prints on
/// its way out (with the last lines of a long error, such as a verifier log), else its
/// last ERROR-level log line, else the end of its log.
pub fn error_line(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if let Some(at) = lines.iter().rposition(|l| l.starts_with("error: ")) {
        let rest = &lines[at + 1..];
        return match rest.len() {
            0 => lines[at].to_owned(),
            n if n <= 6 => format!("{}\n{}", lines[at], rest.join("\n")),
            n => format!(
                "{}\n  ... ({} more lines)\n{}",
                lines[at],
                n - 5,
                rest[n - 5..].join("\n")
            ),
        };
    }
    if let Some(line) = lines.iter().rev().find(|l| l.contains(" ERROR ")) {
        return (*line).to_owned();
    }
    format!("no error line in its log, which ends:\n{}", tail(log, 10))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What an unmodified client (`nc`) in a pod saw.
#[derive(Debug, Clone)]
pub struct ClientRun {
    pub success: bool,
    pub output: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Lab {
    /// Runs `nc` inside the pod (its netns and cgroup, so eBPF sees a pod process): sends
    /// `payload`, half-closes, and collects what comes back.
    pub fn pod_client(
        &self,
        namespace: &str,
        pod: &str,
        addr: SocketAddr,
        payload: &[u8],
    ) -> Result<ClientRun, LabError> {
        use std::io::Write;
        let testbed_pod = self
            .cluster()
            .pod(namespace, pod)
            .ok_or_else(|| LabError::Process {
                what: format!("client in {namespace}/{pod}"),
                reason: "no such pod".into(),
            })?;
        let mut command = testbed_pod.command("nc")?;
        command
            .args(["-N", "-w", "5"])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().map_err(|e| LabError::Process {
            what: "nc (install netcat-openbsd: run scripts/setup.sh)".into(),
            reason: e.to_string(),
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A refused connection closes the pipe early; that shows in the exit status.
            let _ = stdin.write_all(payload);
        }
        let output = child.wait_with_output().map_err(|e| LabError::Process {
            what: "nc".into(),
            reason: e.to_string(),
        })?;
        Ok(ClientRun {
            success: output.status.success(),
            output: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }
}

/// One access-log line of an agent's proxy, parsed from its log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessLine {
    pub direction: String,
    pub src_workload: String,
    pub src_identity: String,
    pub dst_workload: String,
    pub dst_identity: String,
    pub dst_addr: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub result: String,
}

/// The access-log lines in an agent's log (tracing's `key=value` format).
pub fn access_lines(log: &str) -> Vec<AccessLine> {
    log.lines()
        .filter(|l| l.contains("connection complete"))
        .map(|line| {
            let field = |key: &str| -> String {
                let pattern = format!(" {key}=");
                line.find(&pattern)
                    .map(|i| {
                        let rest = &line[i + pattern.len()..];
                        let rest = rest.trim_start_matches('"');
                        rest.split(['"', ' ']).next().unwrap_or("").to_owned()
                    })
                    .unwrap_or_default()
            };
            AccessLine {
                direction: field("direction"),
                src_workload: field("src.workload"),
                src_identity: field("src.identity"),
                dst_workload: field("dst.workload"),
                dst_identity: field("dst.identity"),
                dst_addr: field("dst.addr"),
                bytes_sent: field("bytes_sent").parse().unwrap_or(0),
                bytes_received: field("bytes_received").parse().unwrap_or(0),
                result: field("result"),
            }
        })
        .collect()
}

/// Removes pin directories of runs that no longer exist (a lab that crashed before its
/// cleanup): unpinning the links detaches their programs. Live runs are never touched.
fn remove_stale_pins(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let run = entry.file_name().to_string_lossy().into_owned();
        if !zmesh_testbed::run_is_recorded(&run) {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                eprintln!(
                    "lab: cannot remove stale pins {}: {e}",
                    entry.path().display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn error_line_is_the_binarys_last_words_with_the_end_of_a_long_error() {
        let log = "2026 INFO zmesh_agent: starting\n2026 ERROR zmesh_agent: a map update failed\n\
                   error: eBPF redirection: the kernel lacks TCX links (Linux 6.6 has it)\n";
        assert_eq!(
            error_line(log),
            "error: eBPF redirection: the kernel lacks TCX links (Linux 6.6 has it)"
        );
        let verifier: String = (0..40).map(|i| format!("{i}: (bf) r1 = r6\n")).collect();
        let log = format!("INFO starting\nerror: loading failed: verifier output:\n{verifier}");
        let line = error_line(&log);
        assert!(
            line.starts_with("error: loading failed: verifier output:\n  ... (35 more lines)\n35:"),
            "{line}"
        );
        assert!(line.ends_with("39: (bf) r1 = r6"), "{line}");
        let log = "INFO a\n2026 ERROR zmesh_agent: proxy stopped\nINFO b\n";
        assert_eq!(error_line(log), "2026 ERROR zmesh_agent: proxy stopped");
        assert!(error_line("INFO a\nINFO b\n").starts_with("no error line in its log"));
    }
}
