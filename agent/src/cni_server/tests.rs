use std::collections::BTreeMap;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use zmesh_cluster::state::{NamespaceInfo, PodInfo, CILIUM_MTLS_LABEL};

use super::*;

const NODE: &str = "node-a";
const UID: &str = "3f1e2d4c-0000-4000-8000-000000000001";

fn namespace(name: &str, enrolled: bool) -> NamespaceInfo {
    let mut labels = BTreeMap::new();
    if enrolled {
        labels.insert(CILIUM_MTLS_LABEL.to_string(), "true".to_string());
    }
    NamespaceInfo {
        name: name.into(),
        labels,
    }
}

fn pod(namespace: &str, name: &str, uid: &str, node: &str) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        workload_name: name.into(),
        uid: Some(uid.into()),
        node: Some(node.into()),
        ips: vec![],
        service_account: "default".into(),
        host_network: false,
        labels: Default::default(),
        netns_path: None,
        cgroup_path: None,
        ready: false,
        ports: Default::default(),
    }
}

fn view(pods: Vec<PodInfo>, cookies: &[(&str, Option<u64>)]) -> EnrollmentView {
    EnrollmentView {
        state: Arc::new(ClusterState::new(
            [namespace("shop", true), namespace("plain", false)],
            pods,
        )),
        pods: cookies.iter().map(|(k, c)| (k.to_string(), *c)).collect(),
        redirecting: true,
        pass: 0,
    }
}

fn request_pod(namespace: &str, name: &str, uid: &str) -> protocol::Pod {
    protocol::Pod {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[test]
fn decisions() {
    let web = pod("shop", "web", UID, NODE);
    let enrolled = view(vec![web.clone()], &[("shop/web", Some(7))]);
    let pending = view(vec![web.clone()], &[("shop/web", None)]);
    let p = request_pod("shop", "web", UID);
    assert!(matches!(decide(&enrolled, &p, NODE), Decision::Enrolled(m) if m.contains("cookie 7")));
    assert!(matches!(decide(&pending, &p, NODE), Decision::Pending(_)));
    // Without redirection there is nothing to wait for.
    let unredirected = EnrollmentView {
        redirecting: false,
        ..pending.clone()
    };
    assert!(matches!(
        decide(&unredirected, &p, NODE),
        Decision::Enrolled(_)
    ));
    // A namespace that is not enrolled: answered at once, whatever the pod.
    assert!(matches!(
        decide(&enrolled, &request_pod("plain", "x", UID), NODE),
        Decision::NotEnrolled(_)
    ));
    // Not known yet (the API watch lags behind the runtime): wait.
    assert!(matches!(
        decide(&enrolled, &request_pod("shop", "other", UID), NODE),
        Decision::Pending(m) if m.contains("not known")
    ));
    assert!(matches!(
        decide(&enrolled, &request_pod("unknown-ns", "x", UID), NODE),
        Decision::Pending(m) if m.contains("namespace")
    ));
    // The agent still has the previous pod of that name.
    assert!(matches!(
        decide(&enrolled, &request_pod("shop", "web", "another-uid"), NODE),
        Decision::Pending(m) if m.contains("older pod")
    ));
    // Scheduled elsewhere: not ours to enroll.
    let elsewhere = view(vec![pod("shop", "web", UID, "node-b")], &[]);
    assert!(matches!(decide(&elsewhere, &p, NODE), Decision::Pending(m) if m.contains("node-b")));
    // Host network: never enrolled.
    let mut host = pod("shop", "web", UID, NODE);
    host.host_network = true;
    assert!(matches!(
        decide(&view(vec![host], &[]), &p, NODE),
        Decision::NotEnrolled(_)
    ));
}

struct Running {
    dir: tempfile::TempDir,
    publish: watch::Sender<Arc<EnrollmentView>>,
    registry: NetnsRegistry,
    wake: Arc<Notify>,
    passes: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(initial: EnrollmentView) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (publish, view) = watch::channel(Arc::new(initial));
        let registry = NetnsRegistry::default();
        let wake = Arc::new(Notify::new());
        let passes = Arc::new(AtomicU64::new(0));
        let server = CniServer {
            node: NODE.into(),
            registry: registry.clone(),
            view,
            wake: wake.clone(),
            passes: passes.clone(),
        };
        let task = serve(&dir.path().join("cni.sock"), server).expect("serve");
        Self {
            dir,
            publish,
            registry,
            wake,
            passes,
            _task: task,
        }
    }

    /// Sends `line` from a task of its own: the answer may wait for the reconcile loop.
    fn ask(&self, line: Vec<u8>) -> tokio::task::JoinHandle<Reply> {
        let sock = self.dir.path().join("cni.sock");
        tokio::spawn(async move {
            let mut stream = UnixStream::connect(sock).await.expect("connect");
            stream.write_all(&line).await.expect("write");
            let mut answer = String::new();
            BufReader::new(stream)
                .read_line(&mut answer)
                .await
                .expect("read");
            serde_json::from_str::<Reply>(&answer).expect("reply")
        })
    }

    async fn send(&self, line: &[u8]) -> Reply {
        let mut stream = UnixStream::connect(self.dir.path().join("cni.sock"))
            .await
            .expect("connect");
        stream.write_all(line).await.expect("write");
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .expect("read");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }
}

fn add(namespace: &str, name: &str) -> Vec<u8> {
    protocol::encode(&Request {
        command: Command::Add,
        container_id: "c1".into(),
        netns: "/var/run/netns/cni-1".into(),
        ifname: "eth0".into(),
        pod: request_pod(namespace, name, UID),
        ips: vec![],
    })
}

#[tokio::test]
async fn add_is_answered_once_the_pod_is_enrolled_and_registers_its_netns() {
    let web = pod("shop", "web", UID, NODE);
    let server = Running::start(view(vec![web.clone()], &[("shop/web", None)]));
    let woken = server.wake.clone();
    let answer = server.ask(add("shop", "web"));
    // The server wakes the reconcile loop after registering the namespace...
    tokio::time::timeout(Duration::from_secs(10), woken.notified())
        .await
        .expect("reconcile woken");
    assert_eq!(
        server.registry.get(UID),
        Some(PathBuf::from("/var/run/netns/cni-1"))
    );
    assert!(
        !answer.is_finished(),
        "answered before the pod was enrolled"
    );
    // ...which enrolls it.
    server
        .publish
        .send(Arc::new(view(vec![web], &[("shop/web", Some(42))])))
        .expect("publish");
    let reply = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(reply.outcome, Outcome::Enrolled, "{}", reply.message);
    assert!(reply.message.contains("42"));
}

#[tokio::test]
async fn add_outside_the_mesh_waits_for_a_pass_that_started_after_it() {
    let web = pod("shop", "web", UID, NODE);
    let server = Running::start(view(vec![web.clone()], &[("shop/web", Some(5))]));
    // A pass is under way when the request comes: it may have listed the node's
    // interfaces before the runtime made this pod's.
    server.passes.store(3, Ordering::SeqCst);
    let woken = server.wake.clone();
    let mut answer = server.ask(add("plain", "x"));
    tokio::time::timeout(Duration::from_secs(10), woken.notified())
        .await
        .expect("reconcile woken");
    let publish = |pass| {
        server
            .publish
            .send(Arc::new(EnrollmentView {
                pass,
                ..view(vec![web.clone()], &[("shop/web", Some(5))])
            }))
            .expect("publish");
    };
    publish(3);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut answer)
            .await
            .is_err(),
        "answered after a pass that began before the request"
    );
    server.passes.store(4, Ordering::SeqCst);
    publish(4);
    let reply = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(reply.outcome, Outcome::NotEnrolled, "{}", reply.message);
    assert!(
        reply.message.contains("plain is not enrolled"),
        "{}",
        reply.message
    );

    // Without redirection there is no interface to steer: answered at once.
    let unredirected = Running::start(EnrollmentView {
        redirecting: false,
        ..view(vec![web], &[])
    });
    let reply = unredirected.send(&add("plain", "x")).await;
    assert_eq!(reply.outcome, Outcome::NotEnrolled, "{}", reply.message);
}

#[tokio::test]
async fn other_requests() {
    let web = pod("shop", "web", UID, NODE);
    let server = Running::start(view(vec![web], &[("shop/web", Some(5))]));
    // CHECK of an enrolled pod.
    let mut check: Request = serde_json::from_slice(&add("shop", "web")).expect("request");
    check.command = Command::Check;
    assert_eq!(
        server.send(&protocol::encode(&check)).await.outcome,
        Outcome::Enrolled
    );
    // DEL forgets the registered namespace.
    server.registry.register(UID, "/var/run/netns/cni-1");
    let mut del = check.clone();
    del.command = Command::Del;
    del.netns.clear();
    assert_eq!(
        server.send(&protocol::encode(&del)).await.outcome,
        Outcome::NotEnrolled
    );
    assert_eq!(server.registry.get(UID), None);
    // Garbage, a request naming no pod, an ADD without netns: errors, and the server
    // goes on serving.
    for bad in [
        b"not json\n".to_vec(),
        br#"{"command":"add","container_id":"c","ifname":"eth0","pod":{"namespace":"","name":""}}"#
            .iter()
            .chain(b"\n")
            .copied()
            .collect(),
        {
            let mut r: Request = serde_json::from_slice(&add("shop", "web")).expect("request");
            r.netns.clear();
            protocol::encode(&r)
        },
    ] {
        let reply = server.send(&bad).await;
        assert_eq!(
            reply.outcome,
            Outcome::Error,
            "{}",
            String::from_utf8_lossy(&bad)
        );
    }
    assert_eq!(
        server.send(&protocol::encode(&check)).await.outcome,
        Outcome::Enrolled
    );
}

#[tokio::test]
async fn add_times_out_with_the_reason() {
    let (publish, view_rx) = watch::channel(Arc::new(view(vec![], &[])));
    let server = CniServer {
        node: NODE.into(),
        registry: NetnsRegistry::default(),
        view: view_rx,
        wake: Arc::new(Notify::new()),
        passes: Arc::new(AtomicU64::new(0)),
    };
    let reply = wait_for_decision(
        &server,
        &request_pod("shop", "web", UID),
        0,
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(reply.outcome, Outcome::Error);
    assert!(
        reply.message.contains("not known to the agent"),
        "{}",
        reply.message
    );
    drop(publish);
}
