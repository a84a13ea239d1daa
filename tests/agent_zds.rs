//! `zmesh agent --data-plane ztunnel`: the agent's ZDS reconciler, fed by a manifest
//! directory, against a ZDS client playing ztunnel (SOCK_SEQPACKET, hello, ack per
//! request, network namespaces as SCM_RIGHTS). Needs root: it creates network namespaces
//! with `ip netns add` under unique names and always deletes them.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use nix::sys::socket::{
    self as sock, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use tokio::io::Interest;
use tokio::net::UnixStream;
use zmesh_agent::zds::{PodHandoverError, ZdsReconciler};
use zmesh_cluster::agent_status::AgentStatus;
use zmesh_cluster::manifests::watch_dir;
use zmesh_cluster::state::{ClusterState, NamespaceInfo, PodInfo, CILIUM_MTLS_LABEL};
use zmesh_compat::zds::ZdsServer;
use zmesh_dataplane::Mode;
use zmesh_identity::TrustDomain;

const WAIT: Duration = Duration::from_secs(20);
const NODE: &str = "node1";

// ------------------------------------------------------------ network namespaces

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new(label: &str) -> Netns {
        let name = format!("zmesh-zds-{label}-{:08x}", rand::random::<u32>());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip(8) runs");
        assert!(
            out.status.success(),
            "ip netns add {name} (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// (device, inode): the namespace's identity.
    fn id(&self) -> (u64, u64) {
        let meta = std::fs::metadata(self.path()).unwrap();
        (meta.dev(), meta.ino())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Whether the agent's in-pod capture (for ztunnel) is in the namespace.
fn captured(ns: &Netns) -> bool {
    let file = std::fs::File::open(ns.path()).unwrap();
    zmesh_agent::inpod::is_installed(std::os::fd::AsFd::as_fd(&file)).unwrap()
}

/// The capture's policy rules in the namespace (IPv4), to catch duplicates.
fn capture_rules(ns: &Netns) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ip", "rule", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("fwmark 0x111/0xfff lookup 100"))
        .count()
}

/// Waits until the capture is (or is not) in the namespace: it follows the ZDS exchange.
/// The whole capture: the agent writes the nftables table before the policy route, so the
/// table alone can be seen while the route is still being added.
async fn wait_captured(ns: &Netns, want: bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while captured(ns) != want || (capture_rules(ns) > 0) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{}: capture present={}, wanted {want}",
            ns.name,
            !want
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fd_id(fd: &OwnedFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd).unwrap();
    (st.st_dev, st.st_ino)
}

// ------------------------------------------------------------ ZDS messages (istio.workload.zds)

mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ZdsHello {
        #[prost(int32, tag = "1")]
        pub version: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub service_account: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AddWorkload {
        #[prost(string, tag = "1")]
        pub uid: String,
        #[prost(message, optional, tag = "2")]
        pub workload_info: Option<WorkloadInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DelWorkload {
        #[prost(string, tag = "2")]
        pub uid: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SnapshotSent {}

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(AddWorkload),
        #[prost(message, tag = "2")]
        Del(DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(SnapshotSent),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadRequest {
        #[prost(oneof = "Payload", tags = "1, 2, 3")]
        pub payload: Option<Payload>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ack {
        #[prost(string, tag = "1")]
        pub error: String,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum ResponsePayload {
        #[prost(message, tag = "1")]
        Ack(Ack),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadResponse {
        #[prost(oneof = "ResponsePayload", tags = "1")]
        pub payload: Option<ResponsePayload>,
    }
}

// ------------------------------------------------------------ ztunnel's side

async fn send_packet(stream: &UnixStream, data: &[u8]) -> io::Result<()> {
    let raw = stream.as_raw_fd();
    stream
        .async_io(Interest::WRITABLE, || {
            sock::sendmsg::<()>(
                raw,
                &[IoSlice::new(data)],
                &[],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        })
        .await
        .map(|_| ())
}

/// One packet and its fds; `None` when the server closed the connection.
async fn recv_packet(stream: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let raw = stream.as_raw_fd();
    let mut buf = vec![0u8; 1024];
    let (len, fds) = stream
        .async_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg =
                sock::recvmsg::<()>(raw, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: SCM_RIGHTS fds were just installed for us; nothing else owns them.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            Ok((msg.bytes, fds))
        })
        .await?;
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

#[derive(Debug)]
enum Request {
    Add {
        uid: String,
        info: pb::WorkloadInfo,
        netns: (u64, u64),
    },
    Del(String),
    SnapshotSent,
}

struct Ztunnel {
    stream: UnixStream,
}

impl Ztunnel {
    async fn connect(path: &Path) -> Ztunnel {
        let fd = sock::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        sock::connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).unwrap();
        let stream = UnixStream::from_std(std).unwrap();
        send_packet(&stream, &pb::ZdsHello { version: 1 }.encode_to_vec())
            .await
            .unwrap();
        Ztunnel { stream }
    }

    /// The next request (acked), with the identity of the netns an add carried.
    async fn next(&self) -> Request {
        let (data, mut fds) = tokio::time::timeout(WAIT, recv_packet(&self.stream))
            .await
            .expect("a request from the agent")
            .unwrap()
            .expect("the agent closed the connection");
        let req = pb::WorkloadRequest::decode(data.as_slice()).unwrap();
        let request = match req.payload.expect("request without payload") {
            pb::Payload::Add(add) => {
                assert_eq!(fds.len(), 1, "an add carries exactly one fd");
                Request::Add {
                    uid: add.uid,
                    info: add.workload_info.expect("add without workload info"),
                    netns: fd_id(&fds.pop().unwrap()),
                }
            }
            pb::Payload::Del(del) => {
                assert!(fds.is_empty(), "a del carries no fd");
                Request::Del(del.uid)
            }
            pb::Payload::SnapshotSent(_) => {
                assert!(fds.is_empty());
                Request::SnapshotSent
            }
        };
        let ack = pb::WorkloadResponse {
            payload: Some(pb::ResponsePayload::Ack(pb::Ack::default())),
        };
        send_packet(&self.stream, &ack.encode_to_vec())
            .await
            .unwrap();
        request
    }

    async fn expect_add(&self) -> (String, pb::WorkloadInfo, (u64, u64)) {
        match self.next().await {
            Request::Add { uid, info, netns } => (uid, info, netns),
            other => panic!("expected an add, got {other:?}"),
        }
    }

    async fn expect_del(&self) -> String {
        match self.next().await {
            Request::Del(uid) => uid,
            other => panic!("expected a del, got {other:?}"),
        }
    }

    async fn expect_snapshot_sent(&self) {
        match self.next().await {
            Request::SnapshotSent => {}
            other => panic!("expected the end of the snapshot, got {other:?}"),
        }
    }
}

// ------------------------------------------------------------ manifests

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {io.cilium/mtls-enabled: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"#;

fn pod_yaml(ns: &str, name: &str, node: &str, sa: &str, netns: Option<&Netns>) -> String {
    // Every pod its own IP: the manifests refuse a pod whose IP another pod has.
    static NEXT_IP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ip = NEXT_IP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let annotations = match netns {
        Some(n) => format!(
            "\n  annotations: {{zmesh.io/netns: {}}}",
            n.path().display()
        ),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}{annotations}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: app}}]\n\
         status:\n  podIP: 10.9.{}.{}\n",
        ip / 250,
        ip % 250 + 1
    )
}

/// Writes `text` so the directory watcher sees a change even within one mtime tick.
fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(later)
        .unwrap();
}

fn info(name: &str, ns: &str, sa: &str) -> pb::WorkloadInfo {
    pb::WorkloadInfo {
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

// ------------------------------------------------------------ tests

#[tokio::test]
async fn enrolled_pods_reach_ztunnel_with_their_netns_and_leave_again() {
    let web_ns = Netns::new("web");
    let api_ns = Netns::new("api");
    let web_ns2 = Netns::new("web2");
    let other_ns = Netns::new("other");
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "namespaces.yaml", NAMESPACES);
    // Never handed over (else they would be the first adds below): another node's pod, and
    // a pod of a namespace that is not enrolled.
    write(
        &manifests,
        "elsewhere.yaml",
        &pod_yaml("shop", "remote", "node2", "remote-sa", Some(&other_ns)),
    );
    write(
        &manifests,
        "plain.yaml",
        &pod_yaml("plain", "legacy", NODE, "legacy-sa", Some(&other_ns)),
    );

    let server = ZdsServer::bind(dir.path().join("zds.sock")).unwrap();
    let ztunnel = Ztunnel::connect(server.path()).await;
    ztunnel.expect_snapshot_sent().await; // nothing enrolled yet
    let mut connected = server.handle().connected();
    tokio::time::timeout(WAIT, connected.wait_for(|c| *c))
        .await
        .unwrap()
        .unwrap();

    let (cluster, _errors) = watch_dir(manifests.clone(), Duration::from_millis(20));
    let td = TrustDomain::default();
    let follow = tokio::spawn(
        ZdsReconciler::new(server.handle(), td, NODE, Mode::Permissive).follow(cluster),
    );

    // A pod appears: add with its netns and identity.
    write(
        &manifests,
        "web.yaml",
        &pod_yaml("shop", "web", NODE, "web-sa", Some(&web_ns)),
    );
    let (uid, got, netns) = ztunnel.expect_add().await;
    assert_eq!(uid, "shop/web");
    assert_eq!(got, info("web", "shop", "web-sa"));
    assert_eq!(
        netns,
        web_ns.id(),
        "the fd is the pod's own network namespace"
    );
    // ...and the agent installed the pod's capture there, for ztunnel's in-pod listeners.
    wait_captured(&web_ns, true).await;
    assert_eq!(capture_rules(&web_ns), 1);

    write(
        &manifests,
        "api.yaml",
        &pod_yaml("shop", "api", NODE, "api-sa", Some(&api_ns)),
    );
    let (uid, got, netns) = ztunnel.expect_add().await;
    assert_eq!(
        (uid.as_str(), got, netns),
        ("shop/api", info("api", "shop", "api-sa"), api_ns.id())
    );

    wait_captured(&api_ns, true).await;

    // The pod leaves: its capture goes (first), then del.
    std::fs::remove_file(manifests.join("api.yaml")).unwrap();
    assert_eq!(ztunnel.expect_del().await, "shop/api");
    assert!(!captured(&api_ns), "capture removed before the del");
    assert_eq!(capture_rules(&api_ns), 0);

    // The pod is recreated under the same name (new netns): del of the old, add of the new.
    write(
        &manifests,
        "web.yaml",
        &pod_yaml("shop", "web", NODE, "web-sa", Some(&web_ns2)),
    );
    assert_eq!(ztunnel.expect_del().await, "shop/web");
    let (uid, _, netns) = ztunnel.expect_add().await;
    assert_eq!((uid.as_str(), netns), ("shop/web", web_ns2.id()));
    assert!(!captured(&web_ns), "the old namespace lost its capture");
    wait_captured(&web_ns2, true).await;

    // The namespace opts out of the mesh: every pod of it is taken away.
    write(
        &manifests,
        "namespaces.yaml",
        &NAMESPACES.replace("io.cilium/mtls-enabled: \"true\"", "team: shop"),
    );
    assert_eq!(ztunnel.expect_del().await, "shop/web");
    assert!(!captured(&web_ns2), "un-enrolled: plaintext again");
    assert!(
        !captured(&other_ns),
        "a pod that is not enrolled is never captured"
    );

    // A restarted ztunnel gets the snapshot of what is enrolled now: nothing... until the
    // namespace is enrolled again; then it gets the pod live.
    drop(ztunnel);
    let ztunnel = Ztunnel::connect(server.path()).await;
    ztunnel.expect_snapshot_sent().await;
    write(&manifests, "namespaces.yaml", NAMESPACES);
    let (uid, _, netns) = ztunnel.expect_add().await;
    assert_eq!((uid.as_str(), netns), ("shop/web", web_ns2.id()));

    // And a third ztunnel gets it in its snapshot, with the same namespace.
    drop(ztunnel);
    let ztunnel = Ztunnel::connect(server.path()).await;
    let (uid, got, netns) = ztunnel.expect_add().await;
    assert_eq!(
        (uid.as_str(), got, netns),
        ("shop/web", info("web", "shop", "web-sa"), web_ns2.id())
    );
    ztunnel.expect_snapshot_sent().await;
    follow.abort();
}

fn enrolled_state(pods: Vec<PodInfo>) -> ClusterState {
    ClusterState::new(
        [NamespaceInfo {
            name: "shop".into(),
            labels: [(CILIUM_MTLS_LABEL.to_string(), "true".to_string())].into(),
        }],
        pods,
    )
}

fn pod(name: &str, netns: Option<PathBuf>) -> PodInfo {
    PodInfo {
        namespace: "shop".into(),
        name: name.into(),
        workload_name: name.into(),
        uid: None,
        node: Some(NODE.into()),
        ips: vec![],
        service_account: format!("{name}-sa"),
        host_network: false,
        labels: Default::default(),
        netns_path: netns,
        cgroup_path: None,
        ready: true,
        ports: Default::default(),
    }
}

#[tokio::test]
async fn pods_without_a_usable_netns_are_reported_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::bind(dir.path().join("zds.sock")).unwrap();
    let mut reconciler = ZdsReconciler::new(
        server.handle(),
        TrustDomain::default(),
        NODE,
        Mode::Permissive,
    );
    let not_a_netns = dir.path().join("regular-file");
    std::fs::write(&not_a_netns, b"").unwrap();
    let state = enrolled_state(vec![
        pod("no-path", None),
        pod("missing", Some(dir.path().join("gone"))),
        pod("file", Some(not_a_netns)),
    ]);
    let problems = reconciler.apply(&state).await;
    let by_pod: HashMap<String, &PodHandoverError> = problems
        .iter()
        .map(|p| {
            let pod = match p {
                PodHandoverError::NoNetnsPath { pod }
                | PodHandoverError::OpenNetns { pod, .. }
                | PodHandoverError::Zds { pod, .. }
                | PodHandoverError::Capture { pod, .. } => pod.clone(),
            };
            (pod, p)
        })
        .collect();
    assert_eq!(by_pod.len(), 3, "{problems:?}");
    assert!(matches!(
        by_pod["shop/no-path"],
        PodHandoverError::NoNetnsPath { .. }
    ));
    assert!(matches!(
        by_pod["shop/missing"],
        PodHandoverError::OpenNetns { .. }
    ));
    assert!(
        matches!(by_pod["shop/file"], PodHandoverError::Zds { .. }),
        "a file that is not a netns is refused: {}",
        by_pod["shop/file"]
    );
    assert_eq!(server.handle().status().await.workloads, 0);
    // The status report counts them as enrolled but waiting, each with its reason.
    let report = reconciler.reports().borrow().clone();
    assert_eq!(report.enrolled, 3);
    assert_eq!(report.failed.len(), 3, "{report:?}");
    assert!(report.failed.iter().any(|f| f.contains("shop/no-path")));

    // Once the namespace exists the pod is handed over on the next reconcile, and ztunnel
    // (connecting later) finds it in the snapshot.
    let netns = Netns::new("late");
    let state = enrolled_state(vec![pod("missing", Some(netns.path()))]);
    assert!(reconciler.apply(&state).await.is_empty());
    assert_eq!(server.handle().status().await.workloads, 1);
    assert_eq!(
        *reconciler.reports().borrow(),
        zmesh_agent::zds::HandoverReport {
            enrolled: 1,
            failed: vec![]
        }
    );
    let ztunnel = Ztunnel::connect(server.path()).await;
    let (uid, got, ns) = ztunnel.expect_add().await;
    assert_eq!(
        (uid.as_str(), got, ns),
        (
            "shop/missing",
            info("missing", "shop", "missing-sa"),
            netns.id()
        )
    );
    ztunnel.expect_snapshot_sent().await;
}

/// What an agent restart must do to captures: a running pod's stays as it is (replaced in
/// place, never duplicated), a pod un-enrolled while no agent ran loses its capture, a pod
/// whose namespace is gone leaves nothing; strict mode refuses instead of redirecting.
#[tokio::test]
async fn agent_restarts_neither_duplicate_nor_leave_captures() {
    let dir = tempfile::tempdir().unwrap();
    let running = Netns::new("running");
    let unenrolled = Netns::new("unenrolled");
    let server = ZdsServer::bind(dir.path().join("zds.sock")).unwrap();
    let mut first = ZdsReconciler::new(
        server.handle(),
        TrustDomain::default(),
        NODE,
        Mode::Permissive,
    );
    let both = enrolled_state(vec![
        pod("running", Some(running.path())),
        pod("leaving", Some(unenrolled.path())),
    ]);
    let problems = first.apply(&both).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert!(captured(&running) && captured(&unenrolled));
    drop(first);

    // While no agent runs, `leaving` moves to a namespace that is not enrolled.
    let mut moved = pod("leaving", Some(unenrolled.path()));
    moved.namespace = "legacy".into();
    let state = ClusterState::new(
        [NamespaceInfo {
            name: "shop".into(),
            labels: [(CILIUM_MTLS_LABEL.to_string(), "true".to_string())].into(),
        }],
        vec![pod("running", Some(running.path())), moved],
    );
    let mut second = ZdsReconciler::new(
        server.handle(),
        TrustDomain::default(),
        NODE,
        Mode::Permissive,
    );
    let problems = second.apply(&state).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert!(captured(&running));
    assert_eq!(capture_rules(&running), 1, "not duplicated by the restart");
    assert!(
        !captured(&unenrolled),
        "the un-enrolled pod's capture is removed"
    );
    assert_eq!(capture_rules(&unenrolled), 0);
    drop(second);

    // Strict mode: the table refuses plaintext instead of redirecting it to 15006.
    let mut strict =
        ZdsReconciler::new(server.handle(), TrustDomain::default(), NODE, Mode::Strict);
    let problems = strict.apply(&state).await;
    assert!(problems.is_empty(), "{problems:?}");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &running.name,
            "nft",
            "list",
            "table",
            "inet",
            "zmesh_inpod",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("reject with tcp reset"), "{table}");
    assert!(!table.contains("redirect to :15006"), "{table}");
    assert_eq!(capture_rules(&running), 1);
}

/// `zmesh uninstall` on a ztunnel-mode node (no eBPF installed) takes every in-pod capture
/// out and says where it found them.
#[test]
fn uninstall_removes_in_pod_captures() {
    let pod = Netns::new("uninstall");
    let file = std::fs::File::open(pod.path()).unwrap();
    zmesh_agent::inpod::install(std::os::fd::AsFd::as_fd(&file), Mode::Permissive).unwrap();
    assert!(captured(&pod));
    // Pointed at a directory holding only this test's namespace: by default it clears
    // every namespace of the machine, other tests' too.
    let only = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(pod.path(), only.path().join(&pod.name)).unwrap();
    let no_procs = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args([
            "uninstall",
            "--bpf-pin-dir",
            "/sys/fs/bpf/zmesh-test-not-installed",
        ])
        .arg("--netns-dir")
        .arg(only.path())
        .arg("--host-proc")
        .arg(no_procs.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&pod.name),
        "names where it removed one: {stdout}"
    );
    assert!(!captured(&pod));
    assert_eq!(capture_rules(&pod), 0);
}

/// Kills the agent process on drop (also when the test panics).
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) for a path to appear, checking whether the agent died meanwhile.
async fn wait_for_path(agent: &mut Agent, path: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !path.exists() {
        if let Some(status) = agent.0.try_wait().unwrap() {
            panic!(
                "the agent exited with {status} before creating {}",
                path.display()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not create {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn zmesh_agent_with_ztunnel_data_plane_serves_zds_and_explains_certificates() {
    let netns = Netns::new("bin");
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "namespaces.yaml", NAMESPACES);
    write(
        &manifests,
        "web.yaml",
        &pod_yaml("shop", "web", NODE, "web-sa", Some(&netns)),
    );
    let zds_socket = dir.path().join("ztunnel.sock");
    let admin_socket = dir.path().join("agent.sock");
    // No --ca and no --proxy-ip: ztunnel deals with the CA and the traffic.
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_zmesh"))
            .arg("agent")
            .args(["--node", NODE, "--data-plane", "ztunnel"])
            .arg("--manifests")
            .arg(&manifests)
            .arg("--zds-socket")
            .arg(&zds_socket)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .spawn()
            .unwrap(),
    );
    wait_for_path(&mut agent, &zds_socket).await;
    let mode = std::fs::metadata(&zds_socket).unwrap().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the ZDS socket hands out pod namespaces: owner only"
    );

    // Until a ztunnel connects, the agent reports itself not ready, and why.
    wait_for_path(&mut agent, &admin_socket).await;
    let admin = zmesh_agent::admin::AdminClient::new(&admin_socket);
    let status: AgentStatus = admin.get_json("/status").await.unwrap();
    assert_eq!(
        (
            status.data_plane.as_str(),
            status.ready,
            status.mode.as_str()
        ),
        ("ztunnel", false, "permissive")
    );
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains("no ztunnel is connected")),
        "{:?}",
        status.problems
    );

    let ztunnel = Ztunnel::connect(&zds_socket).await;
    // The pod arrives either in the snapshot or right after it, depending on whether the
    // agent had read the manifests when ztunnel connected.
    let first = ztunnel.next().await;
    let (uid, got, ns) = match first {
        Request::Add { uid, info, netns } => {
            ztunnel.expect_snapshot_sent().await;
            (uid, info, netns)
        }
        Request::SnapshotSent => ztunnel.expect_add().await,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        (uid.as_str(), got, ns),
        ("shop/web", info("web", "shop", "web-sa"), netns.id())
    );

    // Connected, with the pod handed over: ready, one enrolled pod, nothing wrong.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status: AgentStatus = admin.get_json("/status").await.unwrap();
        if status.ready && status.enrolled_pods == 1 {
            assert_eq!(status.pods_waiting, 0);
            assert!(status.problems.is_empty(), "{:?}", status.problems);
            assert_eq!(status.certificates.total, 0, "ztunnel holds them");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready with the pod: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The admin API says whose certificates these are.
    let certs: Vec<zmesh_agent::admin::CertInfo> = admin.get_json("/certs").await.unwrap();
    assert!(certs.is_empty(), "this agent holds no workload certificate");
    match admin
        .lines(http::Method::POST, "/certs/rotate?all=true")
        .await
    {
        Err(zmesh_agent::admin::AdminError::Status { status, message }) => {
            assert_eq!(status, 409);
            assert!(message.contains("ztunnel"), "{message}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("rotation accepted in ztunnel mode"),
    }

    // The pod leaves: del.
    std::fs::remove_file(manifests.join("web.yaml")).unwrap();
    assert_eq!(ztunnel.expect_del().await, "shop/web");
}

#[test]
fn agent_flags_refuse_incoherent_combinations() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_zmesh"))
            .args([
                "agent",
                "--node",
                NODE,
                "--manifests",
                "/nonexistent",
                "--dry-run",
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["--identity-source", "spire", "--data-plane", "ztunnel"]);
    assert!(!ok && err.contains("ztunnel asks the CA"), "{err}");
    let (ok, _, err) = run(&["--proxy-ip", "10.0.0.1"]);
    assert!(!ok && err.contains("--ca HOST:PORT is required"), "{err}");
    let (ok, _, err) = run(&["--ca", "ca:15012"]);
    assert!(!ok && err.contains("--proxy-ip IP is required"), "{err}");

    let (ok, out, err) = run(&[
        "--identity-source",
        "spire",
        "--spire-socket",
        "/run/spire/test.sock",
        "--proxy-ip",
        "10.0.0.1",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Spire") && out.contains("/run/spire/test.sock"),
        "{out}"
    );
    let (ok, out, err) = run(&["--data-plane", "ztunnel", "--zds-socket", "/run/z.sock"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Ztunnel") && out.contains("/run/z.sock"),
        "{out}"
    );
}
