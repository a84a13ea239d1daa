//! `zmesh agent --identity-source spire`: the proxy's credentials over SVIDs from a SPIFFE
//! Workload API. Each node has its own Workload API server (zmesh_compat's test server,
//! written to the spec: gRPC over a unix socket, security header required, full-state
//! streams, PermissionDenied when the caller has no identity), and a real HBONE connection
//! goes through two proxies on loopback before and after SPIRE rotates SVIDs and roots.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use zmesh_agent::admin::{self, AdminClient, AdminError, AdminState, CertInfo};
use zmesh_agent::credentials::{ManagedCredentials, WorkloadCertificates};
use zmesh_agent::spire::SpireCertificates;
use zmesh_compat::spire::test_server::{bundle_map, svid_entry, Ca, WorkloadApi, X509Svid};
use zmesh_compat::spire::{SpireConfig, SpireSource};
use zmesh_identity::{SharedBundle, TrustDomain, WorkloadId};
use zmesh_proxy::{
    Node, Protocol, Proxy, ProxyConfig, ProxyDeps, StaticOriginalDst, Workload, WorkloadStore,
    WorkloadTable,
};

const WAIT: Duration = Duration::from_secs(20);
const TD: &str = "cluster.local";

// ------------------------------------------------------------ SVIDs and roots

/// A new SVID for `id` issued by `ca`, announced with `ca` as its bundle.
fn issue(ca: &Ca, id: &str) -> X509Svid {
    svid_entry(id, ca, &[ca])
}

/// The bundles of this trust domain: `roots`.
fn bundles(roots: &[&Ca]) -> HashMap<String, Vec<u8>> {
    bundle_map(&[(TD, roots)])
}

// ------------------------------------------------------------ the mesh

fn ip(host: u8) -> IpAddr {
    IpAddr::from([127, 79, 1, host])
}

fn workload_id(sa: &str) -> WorkloadId {
    WorkloadId::new(&TrustDomain::new(TD).unwrap(), "default", sa).unwrap()
}

fn workload(name: &str, node: &str, ip: IpAddr) -> Workload {
    Workload {
        name: name.into(),
        workload_name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        node: node.into(),
        ips: vec![ip],
        protocol: Protocol::Hbone,
        identity: workload_id(name),
        labels: Arc::default(),
    }
}

/// One node's identity: SVIDs from its Workload API, the trust bundle SPIRE keeps.
struct NodeIdentity {
    certs: Arc<SpireCertificates>,
    bundle: SharedBundle,
}

impl NodeIdentity {
    fn start(socket: &Path, workload: &WorkloadId) -> NodeIdentity {
        let bundle = SharedBundle::default();
        let source = SpireSource::start(
            SpireConfig {
                socket: socket.to_owned(),
                backoff_base: Duration::from_millis(20),
                backoff_cap: Duration::from_millis(200),
            },
            bundle.clone(),
        );
        let certs = Arc::new(SpireCertificates::new(source));
        // What the agent does when the workload is enrolled on this node.
        certs.ensure(workload);
        NodeIdentity { certs, bundle }
    }

    fn credentials(&self) -> Arc<ManagedCredentials> {
        Arc::new(ManagedCredentials::new(
            self.certs.clone(),
            self.bundle.clone(),
            TrustDomain::new(TD).unwrap(),
        ))
    }

    /// Waits (bounded) until `cond` holds, re-checking on every change of the source.
    async fn wait_until(&self, what: &str, mut cond: impl FnMut(&NodeIdentity) -> bool) {
        let mut changes = self.certs.source().changes();
        let outcome = tokio::time::timeout(WAIT, async {
            while !cond(self) {
                changes.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            outcome.is_ok(),
            "timed out waiting for: {what}; status: {:?}",
            self.certs.source().status()
        );
    }

    fn leaf(&self, workload: &WorkloadId) -> Option<Vec<u8>> {
        self.certs.current(workload).map(|k| k.cert[0].to_vec())
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.snapshot().roots(&TrustDomain::new(TD).unwrap())
    }
}

/// A client on node a, a server on node b, a proxy with SPIRE credentials on each.
struct Mesh {
    _dir: tempfile::TempDir,
    spire_a: WorkloadApi,
    spire_b: WorkloadApi,
    a: NodeIdentity,
    b: NodeIdentity,
    client: WorkloadId,
    server_id: WorkloadId,
    server: TcpListener,
    outbound_a: SocketAddr,
    proxies: Vec<JoinHandle<Result<(), zmesh_proxy::ProxyError>>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for p in &self.proxies {
            p.abort();
        }
    }
}

impl Mesh {
    /// `server_svids`: what node b's SPIRE agent hands out.
    async fn start(ca: &Ca, server_svids: Vec<X509Svid>) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let client = workload("client", "a", ip(1));
        let server_w = workload("server", "b", ip(2));
        let spire_a = WorkloadApi::start(
            &dir.path().join("a.sock"),
            vec![issue(ca, &client.identity.to_string())],
            bundles(&[ca]),
        );
        let spire_b = WorkloadApi::start(&dir.path().join("b.sock"), server_svids, bundles(&[ca]));
        let a = NodeIdentity::start(&dir.path().join("a.sock"), &client.identity);
        let b = NodeIdentity::start(&dir.path().join("b.sock"), &server_w.identity);

        let server = TcpListener::bind(SocketAddr::new(ip(2), 0)).await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let td = TrustDomain::new(TD).unwrap();
        let store = Arc::new(WorkloadStore::new(
            WorkloadTable::new(td.clone(), [], [client.clone(), server_w.clone()]).unwrap(),
        ));
        let proxy_b = Proxy::bind(
            ProxyConfig::explicit("b", ip(20)),
            ProxyDeps::new(store.clone(), b.credentials()),
        )
        .await
        .unwrap();
        let inbound_b = proxy_b.addrs().inbound;
        let mut deps_a = ProxyDeps::new(store.clone(), a.credentials());
        deps_a.original_dst = Arc::new(StaticOriginalDst::new([(ip(1), server_addr)]));
        let proxy_a = Proxy::bind(ProxyConfig::explicit("a", ip(10)), deps_a)
            .await
            .unwrap();
        let outbound_a = proxy_a.addrs().outbound;
        let nodes = [Node {
            name: "b".into(),
            hbone: Some(inbound_b),
        }];
        store.replace(WorkloadTable::new(td, nodes, [client.clone(), server_w.clone()]).unwrap());
        Mesh {
            _dir: dir,
            spire_a,
            spire_b,
            a,
            b,
            client: client.identity,
            server_id: server_w.identity,
            server,
            outbound_a,
            proxies: vec![tokio::spawn(proxy_a.run()), tokio::spawn(proxy_b.run())],
        }
    }

    async fn connect(&self) -> TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(ip(1), 0)).unwrap();
        sock.connect(self.outbound_a).await.unwrap()
    }

    /// Opens a connection through both proxies and checks it carries `msg` both ways.
    async fn echo_connection(&self, msg: &[u8]) -> (TcpStream, TcpStream) {
        let mut client = self.connect().await;
        client.write_all(msg).await.unwrap();
        let (mut server, _) = tokio::time::timeout(WAIT, self.server.accept())
            .await
            .expect("the connection reached the server")
            .unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, server.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg, "client -> server bytes");
        server.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, client.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg, "server -> client bytes");
        (client, server)
    }
}

fn serial_of(certs: &SpireCertificates, workload: &WorkloadId) -> Option<String> {
    certs
        .status()
        .into_iter()
        .find(|s| s.workload == workload.to_string())
        .and_then(|s| s.serial)
}

// ------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_with_spire_svids_before_and_after_rotation() {
    let old_root = Ca::root("spire old");
    let server_id = workload_id("server");
    let mesh = Mesh::start(&old_root, vec![issue(&old_root, &server_id.to_string())]).await;
    let (client_id, server_id) = (mesh.client.clone(), mesh.server_id.clone());
    mesh.a
        .wait_until("client SVID", |n| n.leaf(&client_id).is_some())
        .await;
    mesh.b
        .wait_until("server SVID", |n| n.leaf(&server_id).is_some())
        .await;
    let (client_serial, server_serial) = (
        serial_of(&mesh.a.certs, &client_id).expect("status shows the client SVID"),
        serial_of(&mesh.b.certs, &server_id).expect("status shows the server SVID"),
    );

    let (mut kept_client, mut kept_server) = mesh.echo_connection(b"before rotation").await;

    // SPIRE rotates to a new root: new SVIDs on both nodes, and a bundle that no longer
    // holds the old root. Only the new SVIDs can pass the handshake from now on.
    let new_root = Ca::root("spire new");
    let new_client = issue(&new_root, &client_id.to_string());
    let new_server = issue(&new_root, &server_id.to_string());
    let (new_client_leaf, new_server_leaf) =
        (new_client.x509_svid.clone(), new_server.x509_svid.clone());
    mesh.spire_a.set_svids(vec![new_client]);
    mesh.spire_b.set_svids(vec![new_server]);
    mesh.spire_a.set_bundles(bundles(&[&new_root]));
    mesh.spire_b.set_bundles(bundles(&[&new_root]));
    let only_new = vec![CertificateDer::from(new_root.der.clone())];
    mesh.a
        .wait_until("client rotated, old root gone", |n| {
            n.leaf(&client_id) == Some(new_client_leaf.clone()) && n.roots() == only_new
        })
        .await;
    mesh.b
        .wait_until("server rotated, old root gone", |n| {
            n.leaf(&server_id) == Some(new_server_leaf.clone()) && n.roots() == only_new
        })
        .await;
    assert_ne!(
        serial_of(&mesh.a.certs, &client_id).unwrap(),
        client_serial,
        "status follows the rotation"
    );
    assert_ne!(serial_of(&mesh.b.certs, &server_id).unwrap(), server_serial);

    // A new connection handshakes with the rotated SVIDs (the old ones are untrusted now).
    let _ = mesh.echo_connection(b"after rotation").await;

    // The connection made before the rotation is still up.
    kept_client.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(WAIT, kept_server.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_svid_from_spire_fails_closed_until_spire_issues_one() {
    let ca = Ca::root("spire");
    // Node b's SPIRE agent has an entry for some other identity, not for the server.
    let other = workload_id("other");
    let mesh = Mesh::start(&ca, vec![issue(&ca, &other.to_string())]).await;
    let (client_id, server_id) = (mesh.client.clone(), mesh.server_id.clone());
    mesh.a
        .wait_until("client SVID", |n| n.leaf(&client_id).is_some())
        .await;
    mesh.b
        .wait_until("b connected", |n| n.certs.source().status().connected)
        .await;
    assert!(
        mesh.b.leaf(&server_id).is_none(),
        "another identity's SVID is never served"
    );
    let status = mesh.b.certs.status();
    assert_eq!(
        status.len(),
        1,
        "only the enrolled workload is listed: {status:?}"
    );
    assert_eq!(status[0].serial, None);
    let why = status[0].last_error.as_deref().unwrap_or_default();
    assert!(why.contains("registration entry"), "status explains: {why}");

    // The connection is refused: node b has nothing to present for the server.
    let mut refused = mesh.connect().await;
    let _ = refused.write_all(b"refused").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, refused.read_to_end(&mut buf))
        .await
        .expect("the proxy closes a connection it cannot secure");
    assert!(
        read.is_err() || buf.is_empty(),
        "no bytes came back: {buf:?}"
    );

    // SPIRE issues the server's SVID: traffic flows without any restart, and the first
    // connection the server ever sees is this one (the refused one never reached it).
    mesh.spire_b
        .set_svids(vec![issue(&ca, &server_id.to_string())]);
    mesh.b
        .wait_until("server SVID", |n| n.leaf(&server_id).is_some())
        .await;
    let _ = mesh.echo_connection(b"now allowed").await;
    assert!(mesh.b.certs.status()[0].last_error.is_none());
}

#[tokio::test]
async fn admin_api_lists_spire_svids_and_refuses_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root("spire");
    let web = workload_id("web");
    let svid = issue(&ca, &web.to_string());
    let _spire = WorkloadApi::start(&dir.path().join("spire.sock"), vec![svid], bundles(&[&ca]));
    let node = NodeIdentity::start(&dir.path().join("spire.sock"), &web);
    node.wait_until("web SVID", |n| n.leaf(&web).is_some())
        .await;

    let admin_socket = dir.path().join("admin.sock");
    let certs: Arc<dyn WorkloadCertificates> = node.certs.clone();
    let task = admin::serve(
        &admin_socket,
        AdminState {
            certs,
            trust_domain: TrustDomain::new(TD).unwrap(),
            flows: Arc::new(zmesh_proxy::flows::FlowHub::new(16)),
            data_path: None,
            cluster: tokio::sync::watch::channel(Arc::default()).1,
            build: Default::default(),
            log: None,
            status: None,
        },
    )
    .await
    .unwrap();
    let client = AdminClient::new(&admin_socket);

    let listed: Vec<CertInfo> = client.get_json("/certs").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].workload, web.to_string());
    assert_eq!(listed[0].serial, serial_of(&node.certs, &web));
    assert!(listed[0].serial.is_some() && listed[0].not_after.is_some());
    assert_eq!(listed[0].last_error, None);

    // Rotation is SPIRE's: the answer says so instead of pretending.
    for query in [
        "/certs/rotate?all=true",
        "/certs/rotate?workload=default/web",
    ] {
        match client.lines(http::Method::POST, query).await {
            Err(AdminError::Status { status, message }) => {
                assert_eq!(status, 409, "{query}");
                assert!(message.contains("SPIRE"), "{query}: {message}");
            }
            Err(e) => panic!("{query}: unexpected error {e}"),
            Ok(_) => panic!("{query}: rotation accepted"),
        }
    }
    // A workload this node does not hold is still a 404.
    match client
        .lines(http::Method::POST, "/certs/rotate?workload=default/nobody")
        .await
    {
        Err(AdminError::Status { status, .. }) => assert_eq!(status, 404),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("rotation of an unknown workload accepted"),
    }
    task.abort();
}

#[tokio::test]
async fn status_explains_an_svid_that_was_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root("spire");
    let rogue = Ca::root("rogue");
    let web = workload_id("web");
    // Announced with the trusted bundle, but signed by a root nobody trusts.
    let mut svid = issue(&rogue, &web.to_string());
    svid.bundle = ca.der.clone();
    let spire = WorkloadApi::start(&dir.path().join("spire.sock"), vec![svid], bundles(&[&ca]));
    let node = NodeIdentity::start(&dir.path().join("spire.sock"), &web);
    node.wait_until("SVID refused", |n| {
        !n.certs.source().status().refused.is_empty()
    })
    .await;
    assert!(
        node.leaf(&web).is_none(),
        "an untrusted SVID is never served"
    );
    let status = node.certs.status();
    let why = status[0].last_error.as_deref().unwrap_or_default();
    assert!(
        why.contains("refused") && why.contains("svid.untrusted-chain"),
        "the status names the rule the SVID broke: {why}"
    );
    assert_eq!(status[0].serial, None);

    // A good SVID clears it.
    spire.set_svids(vec![issue(&ca, &web.to_string())]);
    node.wait_until("good SVID", |n| n.leaf(&web).is_some())
        .await;
    assert_eq!(node.certs.status()[0].last_error, None);
}
