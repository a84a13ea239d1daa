//! Issue 14 end to end: a real node whose pods carry no zmesh annotations.
//!
//! Everything a node has is real here except kubelet: a Kubernetes 1.20 API server
//! (tests/support/control_plane.rs), containerd + runc + the CNI bridge chain making the
//! pods (tests/support/node_runtime.rs), the zmesh CA (`zmesh ca init/serve/join`), and the
//! real `zmesh agent` binary in Kubernetes mode as its ServiceAccount (RBAC of
//! examples/kubernetes), in the host network namespace where containerd's bridge and the
//! pods' veths are, with its eBPF attached to the pods' cgroup parent (`kubepods` in the
//! unified hierarchy). The test plays kubelet: it makes the CRI calls with each Pod object's
//! UID and writes the pods' status.
//!
//! The Pod objects have no `zmesh.io/netns` annotation: the agent has to find each pod's
//! network namespace from its UID on the node (a process in cgroup `pod<uid>`).
//!
//! What a capture can show on one node: the proxy lives in the host network namespace, so
//! a pod's leg to its own node's proxy (client pod -> proxy's outbound listener) and the
//! proxy's leg to the destination pod are plain TCP on those pods' veths, as with any
//! per-node proxy; the HBONE leg between the two proxy halves is mutual TLS on 15008 (over
//! the host's loopback, since both ends are this node). The test captures on every
//! interface of the host, restricted to the pods' subnet, and checks exactly that: the
//! client's connection never went to the server directly, the HBONE leg carried TLS and
//! never the payload, and the proxy logged both verified identities. A pod of a
//! non-enrolled namespace is the counter-check: its payload is seen in the clear, directly
//! between the two pods.
//!
//! The second test chains zmesh-cni after the bridge plugin: a new pod's sandbox is held
//! until the agent has its network namespace (from the plugin's ADD) in the redirection
//! maps, so its first connection is already redirected; with the agent stopped, a pod of an
//! enrolled namespace does not start.
//!
//! Needs root, the control plane binaries (`scripts/control-plane.sh`), the node runtime
//! (`scripts/node-runtime.sh`) and the plugin built next to the test (`cargo build -p
//! zmesh-cni`: `cargo test --test node_e2e` builds only this package's binaries).

#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/kube_objects.rs"]
mod kube_objects;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/node_runtime.rs"]
mod node_runtime;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use control_plane::{ControlPlane, Options};
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_objects::{apply_example, from_json, service_account_token, unique};
use node_runtime::{NodeRuntime, NodeRuntimeOptions, Pod, PodSpec, Qos};
use serde_json::json;
use zmesh_testbed::Pcap;

const NODE: &str = "node-a";
const TRUST_DOMAIN: &str = "cluster.local";
/// How long anything the test waits for may take (enrollment, a certificate, a listener).
const DEADLINE: Duration = Duration::from_secs(60);
/// The proxy's ports in the host network namespace (outbound, plaintext, HBONE, metrics,
/// readiness): another agent holding one would share connections with ours.
const PROXY_PORTS: [u16; 5] = [15001, 15006, 15008, 15020, 15021];
/// Pin directories of this test, `<prefix><owner pid>-<random>` under /sys/fs/bpf (bpffs
/// holds no plain files, so the owner is in the name).
const PIN_PREFIX: &str = "zmesh-node-e2e-";

/// The agents of both tests use the proxy's fixed ports in the host network namespace:
/// one at a time.
static HOST_NETNS: Mutex<()> = Mutex::new(());

/// What both tests start: the control plane, the node runtime (with `chain` after the
/// bridge plugin), the project's RBAC, the CA and this node's credential. Fields are
/// dropped in order: the CA, the runtime's pods and containerd, the control plane, and the
/// directory last.
struct Node {
    ca: Ca,
    credentials: PathBuf,
    agent_kubeconfig: PathBuf,
    client: kube::Client,
    runtime: NodeRuntime,
    /// Kept running (the agent, the CA and `client` talk to it).
    plane: ControlPlane,
    work: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Node {
    /// `None` when the control plane binaries are missing and skipping is allowed.
    fn start(chain: impl FnOnce(&Path) -> Vec<serde_json::Value>) -> Option<Self> {
        Self::start_with(Options::default(), chain)
    }

    fn start_with(
        options: Options,
        chain: impl FnOnce(&Path) -> Vec<serde_json::Value>,
    ) -> Option<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let work = tempfile::Builder::new()
            .prefix("zmesh-node-e2e-")
            .tempdir()
            .expect("a temporary directory");
        // Processes the harnesses and this test start die with the thread that started
        // them (PR_SET_PDEATHSIG): everything is started from the test's thread.
        let plane = rt
            .block_on(ControlPlane::start(options))
            .unwrap_or_else(|e| panic!("{e}"))?;
        println!("control plane up in {:?}", plane.startup);
        let runtime = NodeRuntime::start(NodeRuntimeOptions {
            chained_plugins: chain(work.path()),
        })
        .expect("the node runtime");
        println!(
            "node runtime up in {:?} (bridge {}, subnet {})",
            runtime.startup,
            runtime.bridge(),
            runtime.subnet()
        );
        for port in PROXY_PORTS {
            // A plain bind fails if any listener (even SO_REUSEPORT) holds the port.
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| {
                panic!("port {port} is taken in the host network namespace (another agent?): {e}")
            });
        }
        remove_stale_pins();
        let client = rt.block_on(plane.client()).expect("an admin client");
        // The project's RBAC: the agent and the CA run as their own ServiceAccounts.
        rt.block_on(apply_example(&client, "00-namespace.yaml"));
        rt.block_on(apply_example(&client, "10-rbac.yaml"));
        let kubeconfig = |account: &str| {
            let token = rt.block_on(service_account_token(
                &client,
                "zmesh-system",
                account,
                &[],
                None,
            ));
            let path = work.path().join(format!("{account}.kubeconfig"));
            std::fs::write(&path, plane.kubeconfig_yaml(0, &token)).expect("kubeconfig");
            path
        };
        let agent_kubeconfig = kubeconfig("zmesh-agent");
        let ca_kubeconfig = kubeconfig("zmesh-ca");
        let ca = Ca::start(work.path(), &ca_kubeconfig);
        let credentials = ca.join(work.path(), NODE);
        Some(Self {
            ca,
            credentials,
            agent_kubeconfig,
            client,
            runtime,
            plane,
            work,
            rt,
        })
    }

    /// An agent that serves `cni_socket` and installs `plugin` into the runtime's CNI
    /// directories (`--cni-bin-dir`, `--cni-conf-dir`).
    fn agent_installing_cni(
        &self,
        interfaces: Vec<String>,
        cni_socket: &Path,
        plugin: &Path,
    ) -> Agent {
        Agent::start(AgentSetup {
            install_cni: Some((
                self.runtime.cni_bin_dir(),
                self.runtime.cni_conf_dir(),
                plugin.to_owned(),
            )),
            ..self.agent_setup(interfaces, Some(cni_socket))
        })
    }

    fn agent(&self, interfaces: Vec<String>, cni_socket: Option<&Path>) -> Agent {
        Agent::start(self.agent_setup(interfaces, cni_socket))
    }

    fn agent_setup<'a>(
        &'a self,
        interfaces: Vec<String>,
        cni_socket: Option<&'a Path>,
    ) -> AgentSetup<'a> {
        AgentSetup {
            work: self.work.path(),
            kubeconfig: &self.agent_kubeconfig,
            ca_addr: self.ca.addr,
            credentials: &self.credentials,
            proxy_ip: self.runtime.subnet().gateway(),
            cgroup: pods_cgroup(),
            interfaces,
            cni_socket,
            install_cni: None,
            strict: false,
        }
    }
}

#[test]
fn pods_without_annotations_are_discovered_and_talk_mtls() {
    let _one_agent = HOST_NETNS.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let Some(node) = Node::start(|_| vec![]) else {
        return; // skipping was allowed and said so
    };
    let (rt, client, runtime, work) = (&node.rt, &node.client, &node.runtime, &node.work);

    // The workloads: two pods of an enrolled namespace, two of a plain one.
    let mesh = unique("mesh");
    let plain = unique("plain");
    rt.block_on(create_namespace(
        client,
        &mesh,
        &[("io.cilium/mtls-enabled", "true")],
    ));
    rt.block_on(create_namespace(client, &plain, &[]));
    let echo: &[&str] = &["nc", "-ll", "-p", "8080", "-e", "cat"];
    let idle: &[&str] = &["sleep", "3600"];
    let node_ip = node_ip();
    let pods_started = Instant::now();
    let server = run_pod(rt, client, runtime, &mesh, "server", echo, node_ip);
    let client_pod = run_pod(rt, client, runtime, &mesh, "client", idle, node_ip);
    let plain_server = run_pod(rt, client, runtime, &plain, "server", echo, node_ip);
    let plain_client = run_pod(rt, client, runtime, &plain, "client", idle, node_ip);
    println!(
        "4 pods running and reported Running in {:?}",
        pods_started.elapsed()
    );

    // Where the agent attaches: the pods' cgroup parent in the unified hierarchy (what
    // kubelet's cgroupfs driver makes), and the pods' bridge, which the CNI bridge plugin
    // creates with the first pod: hence the agent starts after the pods (it then finds
    // them already running, as after an agent restart on a busy node).
    let cgroup = pods_cgroup();
    for pod in [&server, &client_pod, &plain_server, &plain_client] {
        let unified = unified_cgroup_of(pod.sandbox_pid);
        assert!(
            unified.starts_with(&format!("/kubepods/besteffort/pod{}/", pod.spec.uid)),
            "{}/{}: pause is in cgroup {unified}, not under {}",
            pod.spec.namespace,
            pod.spec.name,
            cgroup.display()
        );
    }
    assert!(
        Path::new("/sys/class/net").join(runtime.bridge()).exists(),
        "the CNI bridge {} does not exist after the first pod",
        runtime.bridge()
    );
    let agent_started = Instant::now();
    let mut agent = node.agent(vec![runtime.bridge()], None);
    agent.wait_certificates(&[workload_id(&mesh, "server"), workload_id(&mesh, "client")]);
    println!(
        "agent ready (admin API up, certificates of both enrolled workloads) {:?} after its start",
        agent_started.elapsed()
    );
    for pod in [&server, &client_pod] {
        let cookie = netns_cookie(&pod.netns);
        agent.wait_enrolled(pod, cookie);
        println!(
            "{}/{} enrolled with its network namespace (cookie {cookie}) {:?} after the agent \
             started",
            pod.spec.namespace,
            pod.spec.name,
            agent_started.elapsed()
        );
    }

    // Enrolled pod to enrolled pod: through the node's proxy, HBONE in mutual TLS.
    let gateway = runtime.subnet().gateway();
    let filter = format!("net {}", runtime.subnet());
    let capture = Capture::start(work.path(), &filter);
    let payload = secret("mesh");
    let echoed = echo_from(&client_pod, server.ip, &payload);
    let pcap = capture.stop(gateway);
    assert_eq!(echoed, payload);
    let streams = ordered_streams(&pcap);
    let hbone: Vec<_> = streams
        .iter()
        .filter(|((_, sport, _, dport), _)| *sport == 15008 || *dport == 15008)
        .collect();
    assert!(
        hbone.iter().any(|((_, _, _, dport), _)| *dport == 15008),
        "no HBONE connection to 15008 was captured: {:?}",
        streams.keys().collect::<Vec<_>>()
    );
    for ((src, sport, dst, dport), bytes) in &hbone {
        assert!(
            !contains(bytes, payload.as_bytes()),
            "the payload crossed {src}:{sport} -> {dst}:{dport} in the clear"
        );
        let types = tls_records(bytes)
            .unwrap_or_else(|e| panic!("{src}:{sport} -> {dst}:{dport} is not TLS: {e}"));
        assert_eq!(
            types.first(),
            Some(&TLS_HANDSHAKE),
            "{src}:{sport} -> {dst}:{dport} does not open with a TLS handshake: {types:?}"
        );
        assert!(
            types.contains(&TLS_APPLICATION_DATA),
            "{src}:{sport} -> {dst}:{dport} carried no encrypted data: {types:?}"
        );
    }
    let direct = |ip: Ipv4Addr| {
        pcap.packets().iter().any(|p| {
            matches!((p.ipv4, &p.tcp), (Some(h), Some(t))
                if h.src == client_pod.ip && h.dst == ip && t.dst_port == 8080)
        })
    };
    assert!(
        !direct(server.ip),
        "the client's connection went to the server pod directly, not through the proxy"
    );
    assert!(
        pcap.packets().iter().any(|p| matches!((p.ipv4, &p.tcp),
            (Some(h), Some(t)) if h.src == client_pod.ip && h.dst == gateway && t.dst_port == 15001)),
        "the client's connection was not redirected to the proxy's outbound listener"
    );
    let access = zmesh_lab::access_lines(&agent.log());
    let client_id = workload_id(&mesh, "client");
    let server_id = workload_id(&mesh, "server");
    assert!(
        access.iter().any(|l| l.direction == "inbound"
            && l.src_identity == client_id
            && l.dst_identity == server_id),
        "the proxy's inbound side logged no tunnel from {client_id} to {server_id}: {access:#?}"
    );
    println!(
        "mesh: echoed through HBONE; {} TLS stream(s) on 15008, payload never in them",
        hbone.len()
    );

    // The counter-check: the plain namespace's pods talk directly, payload in the clear.
    let capture = Capture::start(work.path(), &filter);
    let payload = secret("plain");
    let echoed = echo_from(&plain_client, plain_server.ip, &payload);
    let pcap = capture.stop(gateway);
    assert_eq!(echoed, payload);
    assert!(
        pcap.contains(payload.as_bytes()),
        "the plain pods' payload is not in the capture: the capture would prove nothing"
    );
    assert!(
        pcap.packets().iter().any(|p| matches!((p.ipv4, &p.tcp),
            (Some(h), Some(t)) if h.src == plain_client.ip && h.dst == plain_server.ip && t.dst_port == 8080)),
        "the plain client did not reach the plain server directly"
    );
    assert!(
        !pcap.tcp_ports().contains_key(&15008),
        "plain traffic went through HBONE"
    );
    println!("plain: echoed directly, payload visible in the capture (the check can fail)");
    println!("total {:?}", started.elapsed());
}

/// With zmesh-cni chained after the bridge plugin (as the README's conflist), a new pod of
/// an enrolled namespace is held at its sandbox's creation until the agent has its network
/// namespace in the redirection maps: its workload's very first connection, made by its
/// container as it starts, is already redirected. With the agent stopped, such a pod does
/// not start (fail closed) while a pod of a plain namespace does.
#[test]
fn pods_started_through_zmesh_cni_are_enrolled_before_their_first_connection() {
    let _one_agent = HOST_NETNS.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let plugin = cni_plugin_binary();
    // Only the bridge chain: the agent installs zmesh-cni itself (binary and conflist
    // entry), as on a node.
    let Some(node) = Node::start(|_| vec![]) else {
        return; // skipping was allowed and said so
    };
    let (rt, client, runtime, work) = (&node.rt, &node.client, &node.runtime, &node.work);
    // With the plugin failing closed no pod starts before the agent, and the agent needs
    // the pods' bridge to attach to: the bridge is made here (the bridge plugin takes an
    // existing bridge over, as on a node whose bridge outlived its pods).
    output(Command::new("ip").args(["link", "add", &runtime.bridge(), "type", "bridge"]));
    output(Command::new("ip").args(["link", "set", &runtime.bridge(), "up"]));
    let socket = work.path().join("cni.sock");
    let agent_started = Instant::now();
    let mut agent = node.agent_installing_cni(vec![runtime.bridge()], &socket, &plugin);
    agent.wait_certificates(&[]);
    println!("agent ready {:?} after its start", agent_started.elapsed());
    // The agent put the plugin into the runtime's CNI directories, last in the chain.
    let conflist = wait_for_value("the agent to install zmesh-cni in the conflist", || {
        let dir = std::fs::read_dir(runtime.cni_conf_dir()).ok()?;
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "conflist"))
            .find_map(|e| {
                let config: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                let last = config["plugins"].as_array()?.last()?.clone();
                (last["type"] == "zmesh-cni").then_some(config)
            })
    });
    let entry = conflist["plugins"]
        .as_array()
        .and_then(|p| p.last())
        .cloned();
    assert_eq!(
        entry
            .as_ref()
            .map(|e| (&e["agent_socket"], &e["failure_policy"])),
        Some((&json!(socket), &json!("closed"))),
        "{conflist:#}"
    );
    assert!(
        runtime.cni_bin_dir().join("zmesh-cni").is_file(),
        "the agent copies the plugin binary"
    );

    let mesh = unique("mesh");
    let plain = unique("plain");
    rt.block_on(create_namespace(
        client,
        &mesh,
        &[("io.cilium/mtls-enabled", "true")],
    ));
    rt.block_on(create_namespace(client, &plain, &[]));
    // The state file names the enrolled namespace before the agent is stopped below.
    wait_for(
        "the agent to list the enrolled namespace in its state file",
        || {
            std::fs::read_to_string(work.path().join("enrolled-namespaces.json"))
                .is_ok_and(|text| text.contains(&format!("\"{mesh}\"")))
        },
    );
    let node_ip = node_ip();
    let echo: &[&str] = &["nc", "-ll", "-p", "8080", "-e", "cat"];
    let server = run_pod(rt, client, runtime, &mesh, "server", echo, node_ip);
    agent.wait_enrolled_by(&server, netns_cookie(&server.netns), "registry");

    // The client connects as soon as its container starts, until it gets its echo; the
    // capture runs from before its sandbox exists.
    let gateway = runtime.subnet().gateway();
    let capture = Capture::start(work.path(), &format!("net {}", runtime.subnet()));
    let payload = secret("cni");
    let script = format!(
        "until echo {payload} | nc -w 5 {} 8080 > /tmp/echo && [ -s /tmp/echo ]; do \
         sleep 0.1; done; sleep 3600",
        server.ip
    );
    let command: &[&str] = &["sh", "-c", &script];
    let uid = create_pod_object(rt, client, &mesh, "client", command);
    let pod_started = Instant::now();
    let client_pod = start_pod(runtime, &mesh, "client", &uid, command)
        .unwrap_or_else(|e| panic!("the client pod: {e}"));
    let startup = pod_started.elapsed();
    // No polling: the plugin answered ADD only once the agent had the pod's network
    // namespace in the maps, so the agent logged it before the container was created.
    let cookie = netns_cookie(&client_pod.netns);
    agent.assert_enrolled_by(&client_pod, cookie, "registry");
    println!(
        "{mesh}/client started in {startup:?} (RunPodSandbox held by zmesh-cni until the agent \
         enrolled its network namespace, cookie {cookie}, from the plugin's ADD)"
    );
    // kubelet reports the pod's IP only after it started, and the API server tells the
    // agent later still: the agent names the connection's source by the IP the plugin's ADD
    // carried (from the CNI result), so the echo comes back before any status is reported.
    let echoed = wait_for_value("the client's echo", || {
        let out = client_pod.exec(&["cat", "/tmp/echo"]).ok()?;
        (out.code == 0 && !out.stdout.trim().is_empty()).then(|| out.stdout.trim().to_owned())
    });
    report_running(rt, client, &client_pod, node_ip);
    println!(
        "{mesh}/client got its echo {:?} after it started",
        pod_started.elapsed()
    );
    let pcap = capture.stop(gateway);
    assert_eq!(echoed, payload);
    assert!(
        !pcap.packets().iter().any(|p| matches!((p.ipv4, &p.tcp),
            (Some(h), Some(t)) if h.src == client_pod.ip && h.dst == server.ip && t.dst_port == 8080)),
        "a connection of the new pod went to the server directly, not through the proxy"
    );
    let streams = ordered_streams(&pcap);
    let mut hbone = 0;
    for ((src, sport, dst, dport), bytes) in &streams {
        if *sport != 15008 && *dport != 15008 {
            continue;
        }
        hbone += 1;
        assert!(
            !contains(bytes, payload.as_bytes()),
            "the payload crossed {src}:{sport} -> {dst}:{dport} in the clear"
        );
        tls_records(bytes)
            .unwrap_or_else(|e| panic!("{src}:{sport} -> {dst}:{dport} is not TLS: {e}"));
    }
    assert!(hbone > 0, "no HBONE stream was captured");
    let access = zmesh_lab::access_lines(&agent.log());
    let refused = access
        .iter()
        .filter(|l| l.direction == "outbound" && l.result.contains("unknown_source"))
        .count();
    assert!(
        access.iter().any(|l| l.direction == "inbound"
            && l.src_identity == workload_id(&mesh, "client")
            && l.result == "ok"),
        "no mTLS tunnel from the new client pod: {access:#?}"
    );
    assert_eq!(
        refused, 0,
        "connections of the new pod refused as unknown_source: {access:#?}"
    );
    println!("{mesh}/client: every connection redirected, echoed through HBONE, none refused");

    // The agent stops: the plugin cannot ask it and the state file lists the namespace.
    agent.stop();
    let uid = create_pod_object(rt, client, &mesh, "late", echo);
    let refused = match start_pod(runtime, &mesh, "late", &uid, echo) {
        Ok(_) => panic!("{mesh}/late started without the agent"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("not started without mTLS"),
        "{mesh}/late failed for another reason: {refused}"
    );
    println!("with the agent stopped, {mesh}/late does not start: {refused}");
    let plain_pod = run_pod(rt, client, runtime, &plain, "server", echo, node_ip);
    println!(
        "with the agent stopped, {plain}/server starts ({:?})",
        plain_pod.startup
    );
    println!("total {:?}", started.elapsed());
}

/// The whole node for real, kubelet included: kube-scheduler binds the pods, kubelet runs
/// them on containerd through zmesh-cni (installed by the agent), and `zmesh connectivity
/// test` runs its matrix against this one-node cluster through the API server, as an
/// operator would. The tests that need a second node or strict mode are skipped, saying
/// why. With the agent stopped, the echo pods cannot start (zmesh-cni fails closed) and the
/// command fails with the pod's events.
#[test]
fn connectivity_test_passes_on_a_cluster_with_a_real_kubelet() {
    let _one_agent = HOST_NETNS.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let plugin = cni_plugin_binary();
    let options = Options {
        controller_manager: true,
        scheduler: true,
    };
    let Some(node) = Node::start_with(options, |_| vec![]) else {
        return; // skipping was allowed and said so
    };
    let (rt, client, runtime, work) = (&node.rt, &node.client, &node.runtime, &node.work);
    rt.block_on(kube_objects::install_policy_crd(client));
    // The bridge first (the agent attaches to it; the plugin fails closed without the
    // agent), and the pods' cgroup parent under kubelet's cgroup root.
    output(Command::new("ip").args(["link", "add", &runtime.bridge(), "type", "bridge"]));
    output(Command::new("ip").args(["link", "set", &runtime.bridge(), "up"]));
    let cgroup_root = kubelet::cgroup_root(runtime).expect("kubelet's cgroup root");
    let pods_cgroup =
        cgroup2_root().join(format!("{}/kubepods", cgroup_root.trim_start_matches('/')));
    std::fs::create_dir_all(&pods_cgroup).expect("the pods' cgroup");
    let socket = work.path().join("cni.sock");
    let agent_setup = |strict| AgentSetup {
        cgroup: pods_cgroup.clone(),
        install_cni: Some((
            runtime.cni_bin_dir(),
            runtime.cni_conf_dir(),
            plugin.clone(),
        )),
        strict,
        // The bridge and the pods' host-side veths as the CNI bridge plugin names them,
        // followed as they come: plaintext between pods on the bridge is switched past
        // the node's stack, and only their ports see it.
        ..node.agent_setup(vec![runtime.bridge(), "veth*".into()], Some(&socket))
    };
    let mut agent = Agent::start(agent_setup(false));
    agent.wait_certificates(&[]);
    let kubelet_started = Instant::now();
    let kubelet = rt
        .block_on(kubelet::Kubelet::start(
            &node.plane,
            runtime,
            NODE,
            node_ip(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "kubelet: node {NODE} Ready in {:?}",
        kubelet_started.elapsed()
    );

    let junit = work.path().join("connectivity.xml");
    let connectivity = |extra: &[&str]| {
        let out = zmesh()
            .args(["connectivity", "test", "--image"])
            .arg(node_runtime::workload_image())
            .args(extra)
            .env("KUBECONFIG", node.plane.admin_kubeconfig())
            .stdin(Stdio::null())
            .output()
            .expect("zmesh connectivity test");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run_started = Instant::now();
    let (code, stdout, stderr) =
        connectivity(&["--junit", junit.to_str().expect("utf-8"), "--keep"]);
    agent.check_alive();
    println!(
        "zmesh connectivity test ({:?}):\n{stdout}{stderr}",
        run_started.elapsed()
    );
    assert_eq!(
        code,
        Some(0),
        "{stdout}{stderr}\nagent:\n{}",
        tail(&agent.log(), 40)
    );
    for test in [
        "pod-to-pod/same-node",
        "service/cluster-ip",
        "plaintext/permissive",
        "policy/deny",
        "policy/allow",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("pass") && l.contains(test)),
            "{test} did not pass:\n{stdout}"
        );
    }
    for (test, why) in [
        ("pod-to-pod/cross-node", "one node runs a ready agent"),
        ("strict", "runs in permissive mode"),
    ] {
        assert!(
            stdout.contains(&format!("[skip] {test}")) && stdout.contains(why),
            "{test} not skipped with its reason:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("5 of 5 tests passed, 2 skipped"),
        "{stdout}"
    );
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file");
    assert!(
        xml.contains("tests=\"7\" failures=\"0\" skipped=\"2\""),
        "{xml}"
    );
    // --keep leaves the test namespaces (and the agent has told the CNI plugin that
    // zmesh-test enrolls pods).
    assert!(stdout.contains("Keeping zmesh-test and zmesh-test-plain (--keep)"));
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let test_namespace = || {
        rt.block_on(namespaces.get_opt("zmesh-test"))
            .expect("get namespace")
    };
    assert!(test_namespace().is_some_and(|ns| ns.metadata.deletion_timestamp.is_none()));

    // Strict mode: the agent restarted with --mode strict; once its Lease says so, the
    // command runs the strict test (plaintext from the plain pod, on the same bridge,
    // refused and counted as a strict drop; mTLS still echoes).
    drop(agent);
    let mut agent = Agent::start(agent_setup(true));
    agent.wait_certificates(&[]);
    wait_for_reported_mode(rt, client, "strict");
    let (code, stdout, stderr) = connectivity(&["--test", "strict", "--keep"]);
    println!("in strict mode:\n{stdout}{stderr}");
    assert_eq!(
        code,
        Some(0),
        "{stdout}{stderr}\nagent:\n{}",
        tail(&agent.log(), 40)
    );
    assert!(
        stdout.contains("[pass] strict") && stdout.contains("1 of 1 tests passed"),
        "{stdout}"
    );

    // Without the agent: its Lease goes stale only after 30 s, so the command still
    // finds it, replaces the kept namespaces, deploys, and the enrolled echo pods never
    // start (the CNI plugin fails closed for an enrolled namespace).
    agent.stop();
    let (code, stdout, stderr) = connectivity(&["--test", "same-node", "--timeout", "15s"]);
    println!("with the agent stopped:\n{stdout}{stderr}");
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("pod zmesh-test/echo-a is not running after 15s"),
        "{stderr}"
    );
    assert!(stderr.contains("not started without mTLS"), "{stderr}");
    // Without --keep the command removes what it deployed, also after a failure.
    assert!(test_namespace().is_none_or(|ns| ns.metadata.deletion_timestamp.is_some()));
    drop(kubelet);
    println!("total {:?}", started.elapsed());
}

/// Waits until the agent of [`NODE`] reports `mode` and ready in its Lease (what `zmesh
/// connectivity test` reads).
fn wait_for_reported_mode(rt: &tokio::runtime::Runtime, client: &kube::Client, mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let agents = rt
            .block_on(zmesh_cluster::agent_status::list(
                client.clone(),
                "zmesh-system",
            ))
            .expect("the agents' Leases");
        let reported = agents
            .iter()
            .find(|a| a.node == NODE)
            .and_then(|a| a.status.as_ref());
        if reported.is_some_and(|s| s.ready && s.mode == mode) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not report mode {mode} within 60 s: {reported:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The zmesh-cni binary cargo built next to this test's binary (another package's binary
/// is not built by `cargo test --test node_e2e`: `cargo build -p zmesh-cni` builds it).
fn cni_plugin_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("zmesh-cni"))
        .expect("the test runs from target/<profile>/deps");
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the CNI plugin first: cargo build -p zmesh-cni",
                path.display()
            )
        });
    // A stale plugin would test old code: any source newer than the binary fails.
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni/src");
    for entry in std::fs::read_dir(&sources).expect("cni/src").flatten() {
        let changed = entry.metadata().and_then(|m| m.modified()).expect("mtime");
        assert!(
            changed <= built,
            "{} is older than {}: rebuild it with cargo build -p zmesh-cni",
            path.display(),
            entry.path().display()
        );
    }
    path
}

/// Polls `check` every 50 ms until it holds, for at most [`DEADLINE`].
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    wait_for_value(what, || check().then_some(()));
}

/// Polls `probe` every 50 ms until it returns a value, for at most [`DEADLINE`].
fn wait_for_value<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes objects, as the project's manifests and kubelet make them.

fn secret(label: &str) -> String {
    format!("zmesh-node-e2e-{label}-{:016x}", rand::random::<u64>())
}

fn workload_id(namespace: &str, account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}")
}

/// A namespace with `labels`, and the ServiceAccounts its pods run as (no controller
/// manager runs to make `default`).
async fn create_namespace(client: &kube::Client, name: &str, labels: &[(&str, &str)]) {
    kube_objects::create_namespace(client, name, labels, &["server", "client", "late"]).await;
}

/// Plays the scheduler and kubelet for one pod: the Pod object, its sandbox and container,
/// then the status kubelet reports (see [`create_pod_object`], [`start_pod`]).
fn run_pod(
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    runtime: &NodeRuntime,
    namespace: &str,
    name: &str,
    command: &[&str],
    node_ip: Ipv4Addr,
) -> Pod {
    let uid = create_pod_object(rt, client, namespace, name, command);
    let pod = start_pod(runtime, namespace, name, &uid, command)
        .unwrap_or_else(|e| panic!("running {namespace}/{name} in containerd: {e}"));
    report_running(rt, client, &pod, node_ip);
    pod
}

/// The Pod object as the scheduler leaves it: on [`NODE`], running as the ServiceAccount
/// named like the pod, no annotations. Returns its UID.
fn create_pod_object(
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    command: &[&str],
) -> String {
    let api = Api::<KubePod>::namespaced(client.clone(), namespace);
    let object: KubePod = from_json(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": name,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "workload",
                "image": node_runtime::workload_image(),
                "command": command,
            }],
        },
    }));
    let created = rt
        .block_on(api.create(&PostParams::default(), &object))
        .unwrap_or_else(|e| panic!("pod {namespace}/{name}: {e}"));
    assert!(
        created
            .metadata
            .annotations
            .as_ref()
            .is_none_or(|a| a.keys().all(|k| !k.starts_with("zmesh.io/"))),
        "the Pod object must carry no zmesh annotation"
    );
    created.metadata.uid.expect("the API server's UID")
}

/// kubelet's CRI calls for the pod with UID `uid` (RunPodSandbox, CreateContainer,
/// StartContainer).
fn start_pod(
    runtime: &NodeRuntime,
    namespace: &str,
    name: &str,
    uid: &str,
    command: &[&str],
) -> Result<Pod, node_runtime::NodeRuntimeError> {
    let mut spec = PodSpec::new(namespace, name, Qos::BestEffort, command);
    spec.uid = uid.to_owned();
    spec.labels.insert("app".into(), name.into());
    runtime.run_pod(spec)
}

/// What kubelet reports once the pod runs: Running, its IP, Ready.
fn report_running(
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    pod: &Pod,
    node_ip: Ipv4Addr,
) {
    let (namespace, name) = (&pod.spec.namespace, &pod.spec.name);
    let ip = pod.ip.to_string();
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": node_ip.to_string(),
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "PodScheduled", "status": "True"},
        ],
    }});
    rt.block_on(
        Api::<KubePod>::namespaced(client.clone(), namespace).patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        ),
    )
    .unwrap_or_else(|e| panic!("status of {namespace}/{name}: {e}"));
}

/// This machine's address on its default route (the pods' hostIP). Connecting a UDP
/// socket sends nothing.
fn node_ip() -> Ipv4Addr {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("a UDP socket");
    socket
        .connect((Ipv4Addr::new(192, 0, 2, 1), 9))
        .expect("a default route");
    match socket.local_addr().expect("its address").ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("an IPv6 default route ({other})"),
    }
}

// ---------------------------------------------------------------------------------------
// The node: cgroups, network namespaces, the CA and the agent.

/// The cgroup v2 mount (on this machine's hybrid hierarchy /sys/fs/cgroup/unified).
fn cgroup2_root() -> PathBuf {
    zmesh_testbed::cgroup2_mount().expect("a cgroup2 mount (cgroup v2 or hybrid)")
}

/// `<cgroup2>/kubepods`: every pod's cgroup is below it, nothing else of the machine is.
/// runc makes it with the first pod; made here as kubelet does before any pod (it stays,
/// shared by every runtime on the machine, as on a node).
fn pods_cgroup() -> PathBuf {
    let path = cgroup2_root().join("kubepods");
    std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// A process's cgroup in the unified hierarchy (the `0::` line).
fn unified_cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/PID/cgroup");
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| format!("{}/", p.trim_end_matches('/')))
        .unwrap_or_else(|| panic!("no unified cgroup for {pid}:\n{text}"))
}

/// The cookie the kernel gives the network namespace at `path` (what the agent puts in
/// the enrollment map), read from a socket made inside it on a thread of its own.
fn netns_cookie(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the pod's network namespace");
                zmesh_redirect::current_netns_cookie().expect("SO_NETNS_COOKIE")
            })
            .join()
            .expect("the netns thread")
    })
}

fn zmesh() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zmesh"));
    command.env_remove("KUBERNETES_SERVICE_HOST");
    command
}

/// Runs a command to completion; its standard output, or a panic with its error.
fn output(command: &mut Command) -> String {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a long-running process logging to `log`, killed with SIGKILL if the test's
/// thread dies (PR_SET_PDEATHSIG).
fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let stderr = file.try_clone().expect("the log file");
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        .env("ZMESH_LOG", "info");
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
fn terminate(child: &mut Child, grace: Duration) {
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

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `zmesh ca serve` on a fresh CA, placing workloads from the API server's pods as the
/// CA's ServiceAccount.
struct Ca {
    child: Child,
    addr: SocketAddrV4,
    state_dir: PathBuf,
    bundle: PathBuf,
    log: PathBuf,
}

impl Ca {
    fn start(work: &Path, kubeconfig: &Path) -> Self {
        let state_dir = work.join("ca");
        output(zmesh().args(["ca", "init", "--state-dir"]).arg(&state_dir));
        let bundle = work.join("ca-roots.pem");
        let roots = output(
            zmesh()
                .args(["ca", "bundle", "--state-dir"])
                .arg(&state_dir),
        );
        std::fs::write(&bundle, roots).expect("the CA bundle");
        // A free port: bound, released, and given to the CA (nothing else on this machine
        // picks ports in this range between the two).
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let log = work.join("ca.log");
        let mut command = zmesh();
        command
            .args(["ca", "serve", "--kubernetes", "--state-dir"])
            .arg(&state_dir)
            .args(["--listen", &addr.to_string(), "--san", "127.0.0.1"])
            .env("KUBECONFIG", kubeconfig);
        let mut ca = Self {
            child: spawn_logged(command, &log),
            addr,
            state_dir,
            bundle,
            log,
        };
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200))
            .is_err()
        {
            if let Ok(Some(status)) = ca.child.try_wait() {
                panic!("the CA exited ({status}):\n{}", ca.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the CA does not listen on {addr}:\n{}",
                ca.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ca
    }

    fn log_text(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
    }

    /// `zmesh ca join` of `node` with a one-time token; the credentials' directory.
    fn join(&self, work: &Path, node: &str) -> PathBuf {
        let token = output(
            zmesh()
                .args(["ca", "token", "create", "--node", node, "--state-dir"])
                .arg(&self.state_dir),
        );
        let out = work.join(format!("{node}-credentials"));
        output(
            zmesh()
                .args(["ca", "join", "--node", node, "--ca", &self.addr.to_string()])
                .arg("--out")
                .arg(&out)
                .arg("--ca-bundle")
                .arg(&self.bundle)
                .env("ZMESH_JOIN_TOKEN", token.trim()),
        );
        out
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- CA log:\n{}", self.log_text());
        }
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

struct AgentSetup<'a> {
    work: &'a Path,
    kubeconfig: &'a Path,
    ca_addr: SocketAddrV4,
    credentials: &'a Path,
    proxy_ip: Ipv4Addr,
    cgroup: PathBuf,
    interfaces: Vec<String>,
    /// Where to serve the CNI plugin (`None`: not served).
    cni_socket: Option<&'a Path>,
    /// (bin dir, conf dir, plugin binary) for the agent to install zmesh-cni into.
    install_cni: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `--mode strict` (default permissive).
    strict: bool,
}

/// The real `zmesh agent` of [`NODE`] in the host network namespace. Dropping it stops it
/// and removes its eBPF programs, pins, policy rule and route (`zmesh uninstall`).
struct Agent {
    child: Child,
    log: PathBuf,
    admin_socket: PathBuf,
    pins: PathBuf,
}

impl Agent {
    fn start(setup: AgentSetup) -> Self {
        let pins = PathBuf::from("/sys/fs/bpf").join(format!(
            "{PIN_PREFIX}{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let log = setup.work.join("agent.log");
        let admin_socket = setup.work.join("agent.sock");
        let mut command = zmesh();
        command
            .args(["agent", "--kubernetes", "--node", NODE])
            // In a DaemonSet its ServiceAccount's namespace; the kubeconfig here names none.
            .args(["--status-namespace", "zmesh-system"])
            .args(["--ca", &setup.ca_addr.to_string()])
            .arg("--credentials")
            .arg(setup.credentials)
            .args(["--proxy-ip", &setup.proxy_ip.to_string()])
            .arg("--redirect-cgroup")
            .arg(&setup.cgroup)
            .arg("--bpf-pin-dir")
            .arg(&pins)
            .arg("--admin-socket")
            .arg(&admin_socket)
            // Private: the machine's /var/run/zmesh is a real node's (the CNI plugin reads it).
            .arg("--cni-state-file")
            .arg(setup.work.join("enrolled-namespaces.json"))
            .arg("--cni-socket")
            .arg(setup.cni_socket.unwrap_or(Path::new("none")))
            .env("KUBECONFIG", setup.kubeconfig);
        if let Some((bin_dir, conf_dir, plugin)) = &setup.install_cni {
            command
                .arg("--cni-bin-dir")
                .arg(bin_dir)
                .arg("--cni-conf-dir")
                .arg(conf_dir)
                .arg("--cni-plugin-binary")
                .arg(plugin)
                .args(["--cni-failure-policy", "closed"]);
        }
        if setup.strict {
            command.args(["--mode", "strict"]);
        }
        // Explicit interfaces: without them the agent would attach to every interface of
        // the host network namespace, the machine's uplink included.
        for interface in &setup.interfaces {
            command.args(["--ingress-interface", interface]);
        }
        Self {
            child: spawn_logged(command, &log),
            log,
            admin_socket,
            pins,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the agent (SIGTERM: it drains and exits); its eBPF programs stay pinned, as
    /// across an upgrade, until the agent is dropped.
    fn stop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the agent exited ({status}):\n{}",
                zmesh_lab::error_line(&self.log())
            );
        }
    }

    /// Waits until the admin API lists a valid certificate for every one of `ids`.
    fn wait_certificates(&mut self, ids: &[String]) {
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let client = zmesh_agent::admin::AdminClient::new(self.admin_socket.clone());
        loop {
            self.check_alive();
            let last = match runtime
                .block_on(client.get_json::<Vec<zmesh_agent::admin::CertInfo>>("/certs"))
            {
                Ok(certs) => {
                    let now = zmesh_agent::admin::epoch_seconds(std::time::SystemTime::now());
                    if ids.iter().all(|id| {
                        certs
                            .iter()
                            .any(|c| &c.workload == id && c.not_after.is_some_and(|t| t > now))
                    }) {
                        return;
                    }
                    format!(
                        "{:?}",
                        certs.iter().map(|c| &c.workload).collect::<Vec<_>>()
                    )
                }
                Err(e) => e.to_string(),
            };
            assert!(
                started.elapsed() < DEADLINE,
                "the agent holds no certificates for {ids:?} (last: {last}); its log:\n{}",
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent logs that it enrolled `pod` in redirection with the network
    /// namespace whose cookie is `cookie` (the one the test reads from containerd's netns
    /// path) after finding it by scanning /proc for the pod's cgroup: proof that it found
    /// the pod's namespace from its UID alone.
    fn wait_enrolled(&mut self, pod: &Pod, cookie: u64) {
        self.wait_enrolled_by(pod, cookie, "proc");
    }

    /// As [`Agent::wait_enrolled`], with the namespace found `how` (`proc`: a scan of
    /// /proc; `registry`: the CNI plugin's ADD).
    fn wait_enrolled_by(&mut self, pod: &Pod, cookie: u64, how: &str) {
        let started = Instant::now();
        loop {
            self.check_alive();
            let missing = self.enrollment_missing(pod, cookie, how);
            let Some(missing) = missing else {
                return;
            };
            assert!(
                started.elapsed() < DEADLINE,
                "{missing} within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent has logged `pod`'s enrollment (see [`Agent::wait_enrolled_by`]) already.
    fn assert_enrolled_by(&mut self, pod: &Pod, cookie: u64, how: &str) {
        if let Some(missing) = self.enrollment_missing(pod, cookie, how) {
            panic!("{missing}");
        }
    }

    /// `None` if the log shows the enrollment, else what is missing (with the log).
    fn enrollment_missing(&self, pod: &Pod, cookie: u64, how: &str) -> Option<String> {
        let key = format!("pod={}/{}", pod.spec.namespace, pod.spec.name);
        let log = self.log();
        let found = format!("how={how} cookie={cookie}");
        let discovered = log.lines().any(|l| {
            l.contains("found the pod's network namespace")
                && l.contains(&key)
                && l.contains(&found)
        });
        let wanted = format!("cookie=Some({cookie})");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("enrolling in redirection") && l.contains(&key))
            .collect();
        if discovered && lines.iter().any(|l| l.contains(&wanted)) {
            return None;
        }
        Some(format!(
            "the agent did not enroll {}/{} with its network namespace (cookie {cookie}, found \
             by {how}; `cookie=None`: it did not find the namespace from the pod's UID); its \
             enrollment lines for the pod: {lines:#?}; its log:\n{}",
            pod.spec.namespace,
            pod.spec.name,
            tail(&log, 40)
        ))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}):\n{}",
                self.log.display(),
                tail(&self.log(), 60)
            );
        }
        terminate(&mut self.child, Duration::from_secs(10));
        uninstall(&self.pins);
    }
}

/// `zmesh uninstall` of a pin directory, then the directory (if anything is left).
fn uninstall(pins: &Path) {
    if !pins.exists() {
        return;
    }
    let out = zmesh()
        .arg("uninstall")
        .arg("--bpf-pin-dir")
        .arg(pins)
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "zmesh uninstall --bpf-pin-dir {}: {}",
            pins.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("zmesh uninstall: {e}"),
    }
    if let Err(e) = std::fs::remove_dir_all(pins) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("removing {}: {e}", pins.display());
        }
    }
}

/// Uninstalls what runs killed before their cleanup left pinned (their programs would
/// still be attached to the pods' cgroup): pin directories whose owner process is gone.
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(PIN_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(owner), None).is_ok();
        if !alive {
            eprintln!("removing the pins of a killed run: {name}");
            uninstall(&entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Traffic and captures.

/// Sends `payload` from `pod` to the echo server at `server`:8080 with busybox `nc` and
/// returns what came back. The server may not listen yet: retried until the deadline.
fn echo_from(pod: &Pod, server: Ipv4Addr, payload: &str) -> String {
    let script = format!("echo {payload} | nc -w 5 {server} 8080");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = pod
            .exec(&["sh", "-c", &script])
            .unwrap_or_else(|e| panic!("exec in {}: {e}", pod.spec.name));
        if out.code == 0 && !out.stdout.trim().is_empty() {
            return out.stdout.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no echo from {server}:8080 to {}/{}: {out:?}",
            pod.spec.namespace,
            pod.spec.name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const TLS_HANDSHAKE: u8 = 0x16;
const TLS_APPLICATION_DATA: u8 = 0x17;

/// Each TCP direction's payload in sequence order (segments deduplicated by sequence
/// number: `-i any` sees a loopback packet twice, and capture order across interfaces is
/// not always send order).
fn ordered_streams(pcap: &Pcap) -> BTreeMap<zmesh_testbed::TcpFlow, Vec<u8>> {
    let mut segments: BTreeMap<zmesh_testbed::TcpFlow, BTreeMap<i32, &[u8]>> = BTreeMap::new();
    let mut first_seq: BTreeMap<zmesh_testbed::TcpFlow, u32> = BTreeMap::new();
    for p in pcap.packets() {
        let (Some(ip), Some(tcp)) = (&p.ipv4, &p.tcp) else {
            continue;
        };
        if tcp.payload.is_empty() {
            continue;
        }
        let flow = (ip.src, tcp.src_port, ip.dst, tcp.dst_port);
        let base = *first_seq.entry(flow).or_insert(tcp.seq);
        // Relative to the first segment seen, signed: immune to the sequence space
        // wrapping, and a segment captured after a later one (the capture on every
        // interface reorders loopback) still sorts before it.
        let offset = tcp.seq.wrapping_sub(base) as i32;
        segments
            .entry(flow)
            .or_default()
            .entry(offset)
            .or_insert(&tcp.payload);
    }
    segments
        .into_iter()
        .map(|(flow, parts)| (flow, parts.into_values().flatten().copied().collect()))
        .collect()
}

/// The content types of the TLS records a byte stream consists of, or why it is not a
/// sequence of TLS records (the last one may be cut off by the end of the capture).
fn tls_records(mut bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut types = Vec::new();
    while bytes.len() >= 5 {
        let (kind, version, length) = (
            bytes[0],
            u16::from_be_bytes([bytes[1], bytes[2]]),
            usize::from(u16::from_be_bytes([bytes[3], bytes[4]])),
        );
        if !(0x14..=0x17).contains(&kind) || !(0x0301..=0x0303).contains(&version) {
            return Err(format!(
                "record {} has type {kind:#04x}, version {version:#06x}",
                types.len()
            ));
        }
        types.push(kind);
        bytes = bytes.get(5 + length..).unwrap_or_default();
    }
    Ok(types)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// tcpdump on every interface of the host network namespace (the pods' veths, the bridge,
/// loopback where the node's proxy talks HBONE to itself), with a filter.
struct Capture {
    child: Option<Child>,
    path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Capture {
    /// Returns once tcpdump says it is listening (its socket is bound and filtered).
    fn start(dir: &Path, filter: &str) -> Self {
        let path = dir.join(format!("capture-{:08x}.pcap", rand::random::<u32>()));
        let mut child = Command::new("tcpdump")
            // A large buffer: loopback segments are up to 64 KiB, and a busy machine must
            // not make the kernel drop the handshake.
            .args([
                "-i",
                "any",
                "-n",
                "-s",
                "0",
                "-B",
                "65536",
                "-U",
                "--immediate-mode",
            ])
            .args(["-Z", "root", "-w"])
            .arg(&path)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(pipe) = child.stderr.take() {
            let stderr = stderr.clone();
            // Drains stderr for tcpdump's whole life, so that it never blocks on the pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let listening = line.contains("listening on");
                    let mut all = stderr.lock().unwrap_or_else(PoisonError::into_inner);
                    all.push_str(&line);
                    all.push('\n');
                    if listening {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let capture = Self {
            child: Some(child),
            path,
            stderr,
        };
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            panic!("tcpdump did not start capturing: {}", capture.stderr_text());
        }
        capture
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops once everything sent before is in the file: a marker datagram to
    /// `marker_to`:9 (inside the filter) is sent until tcpdump has written it.
    fn stop(mut self, marker_to: Ipv4Addr) -> Pcap {
        let marker = secret("flush");
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("a UDP socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = socket.send_to(marker.as_bytes(), (marker_to, 9));
            let data = std::fs::read(&self.path).unwrap_or_default();
            if contains(&data, marker.as_bytes()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tcpdump did not write the flush marker: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut child = self.child.take().expect("tcpdump runs until stopped");
        // SIGINT: tcpdump flushes and closes the file.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpdump did not exit after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "tcpdump: {status}: {}",
            self.stderr_text()
        );
        Pcap::from_file(&self.path).expect("a readable capture")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
