//! Root rotation without breaking traffic, end to end on 127.0.0.1: a real CA; two
//! joined nodes whose renewers keep their node certificates; on each node a certificate
//! manager (identity crate) getting a workload's SVID through `IstioCaClient`; mutual TLS
//! between the two workloads with the identity crate's HBONE configs. A connection opened
//! before the rotation keeps exchanging data, and new connections in both directions
//! succeed at every step of add, renew, switch, renew, drop, renew.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zmesh_certs::{NodeCredentialRenewer, NodeName, Phase, Policy, RotationStep, StoreError};
use zmesh_identity::tls::{client_config, peer_identity, server_config, server_name};
use zmesh_identity::{
    CertManager, CertManagerConfig, SharedBundle, TrustBundle, TrustDomain, WorkloadId,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One node: its renewer (node certificate), trust bundle and workload certificate manager.
struct Node {
    renewer: Arc<NodeCredentialRenewer>,
    bundle: SharedBundle,
    manager: CertManager,
    workload: WorkloadId,
    /// An mTLS echo server for the workload: first line is the client's SPIFFE ID.
    server: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    async fn start(ca: &Ca, name: &str, workload: &str) -> Self {
        join_as(ca, name).await;
        let td = TrustDomain::default();
        let renewer = Arc::new(
            NodeCredentialRenewer::open(
                &ca.addr,
                &ca.node_dir(name),
                &NodeName::new(name).unwrap(),
                &td,
            )
            .unwrap(),
        );
        let mut roots = TrustBundle::new();
        roots
            .add_pem(&td, renewer.credentials().roots_pem.as_bytes())
            .unwrap();
        let bundle = SharedBundle::new(roots);
        let manager = CertManager::new(
            Arc::new(renewer.client()),
            bundle.clone(),
            CertManagerConfig {
                validity: Duration::from_secs(3600),
                backoff_base: Duration::from_millis(100),
                backoff_cap: Duration::from_secs(1),
            },
        );
        let workload: WorkloadId = workload.parse().unwrap();
        tokio::time::timeout(IO_TIMEOUT, manager.certificate(&workload))
            .await
            .expect("first certificate timed out")
            .unwrap();

        let loop_renewer = renewer.clone();
        let renew_task = tokio::spawn(async move {
            loop_renewer
                .run(std::future::pending())
                .await
                .expect("node certificate renewal loop failed");
        });
        let tls = server_config(manager.resolver(&workload), bundle.clone(), td).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
        let server = listener.local_addr().unwrap();
        let serve_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake just ends this connection; the client sees it.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = peer_identity(tls.get_ref().1)
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    if tls.write_all(format!("{peer}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            renewer,
            bundle,
            manager,
            workload,
            server,
            tasks: vec![renew_task, serve_task],
        }
    }

    fn roots(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.bundle.snapshot().roots(&TrustDomain::default())
    }

    /// The PEM leaf + intermediate the workload presents now.
    fn presented_chain(&self) -> String {
        let key = self.manager.current(&self.workload).unwrap();
        key.cert
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect()
    }

    async fn renew_workload(&self) -> String {
        let status = self.manager.force_renew(&self.workload).await.unwrap();
        status.serial.unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An open mTLS connection from one workload to another.
struct Conn {
    tls: BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
    sent: u32,
}

impl Conn {
    /// Dials `to`'s echo server as `from`'s workload; checks both sides' identities.
    async fn open(from: &Node, to: &Node) -> Result<Self, String> {
        let cert = from
            .manager
            .current(&from.workload)
            .ok_or("no current certificate")?;
        let config = client_config(
            cert,
            from.bundle.clone(),
            vec![to.workload.spiffe_id().clone()],
        )
        .map_err(|e| e.to_string())?;
        let connect = async {
            let tcp = TcpStream::connect(to.server).await?;
            TlsConnector::from(Arc::new(config))
                .connect(server_name(LOOPBACK), tcp)
                .await
        };
        let tls = tokio::time::timeout(IO_TIMEOUT, connect)
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let server_id = peer_identity(tls.get_ref().1);
        if server_id.as_ref() != Some(to.workload.spiffe_id()) {
            return Err(format!("server presented {server_id:?}"));
        }
        let mut tls = BufReader::new(tls);
        let mut line = String::new();
        tokio::time::timeout(IO_TIMEOUT, tls.read_line(&mut line))
            .await
            .map_err(|_| "server sent no greeting (handshake refused?)".to_string())?
            .map_err(|e| format!("reading the greeting: {e}"))?;
        if line.trim_end() != from.workload.to_string() {
            return Err(format!("server saw client {:?}", line.trim_end()));
        }
        Ok(Self { tls, sent: 0 })
    }

    /// One echo round trip.
    async fn echo(&mut self) -> Result<(), String> {
        self.sent += 1;
        let msg = format!("message {}\n", self.sent);
        let round_trip = async {
            self.tls.get_mut().write_all(msg.as_bytes()).await?;
            let mut back = String::new();
            self.tls.read_line(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        let back = tokio::time::timeout(IO_TIMEOUT, round_trip)
            .await
            .map_err(|_| "echo timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if back != msg {
            return Err(format!("echoed {back:?} for {msg:?}"));
        }
        Ok(())
    }
}

/// Traffic at one step: the long-running connection still echoes, and new connections
/// in both directions complete mutual TLS and echo.
async fn traffic_works(step: &str, long: &mut Conn, web: &Node, db: &Node) {
    long.echo()
        .await
        .unwrap_or_else(|e| panic!("{step}: long-running connection broke: {e}"));
    for (from, to) in [(web, db), (db, web)] {
        let mut conn = Conn::open(from, to).await.unwrap_or_else(|e| {
            panic!(
                "{step}: new connection {} -> {} failed: {e}",
                from.workload, to.workload
            )
        });
        conn.echo()
            .await
            .unwrap_or_else(|e| panic!("{step}: echo on a new connection failed: {e}"));
    }
}

#[tokio::test]
async fn root_rotation_does_not_break_traffic() {
    let ca = Ca::start(Policy::default()).await;
    let web = Node::start(&ca, "node-a", WEB).await;
    let db = Node::start(&ca, "node-b", DB).await;
    let old_root = ca.bundle_pem();
    let old_root_der = certs(&old_root).remove(0);

    let mut long = Conn::open(&web, &db).await.unwrap();
    traffic_works("stable", &mut long, &web, &db).await;

    // add: the new root is published; nothing signs with it yet.
    assert_eq!(
        ca.store.rotate(RotationStep::Add, false).unwrap(),
        Phase::Added { old: 1, new: 2 }
    );
    traffic_works("add, before renewals", &mut long, &web, &db).await;
    web.renew_workload().await;
    db.renew_workload().await;
    assert_eq!(web.roots().len(), 2, "web's node learned the new root");
    assert_eq!(db.roots().len(), 2, "db's node learned the new root");
    let new_root = ca.bundle_pem()[old_root.len()..].to_string();
    assert!(chains_to(&[web.presented_chain()], &old_root).is_some());
    traffic_works("add, after renewals", &mut long, &web, &db).await;

    // switch: the new root signs.
    assert_eq!(
        ca.store.rotate(RotationStep::Switch, false).unwrap(),
        Phase::Switched { old: 1, new: 2 }
    );
    traffic_works("switch, before renewals", &mut long, &web, &db).await;
    // Only web renews: a new-root leaf talks to an old-root leaf, both ways.
    let mut node_a = web.renewer.subscribe();
    web.renew_workload().await;
    assert!(chains_to(&[web.presented_chain()], &new_root).is_some());
    assert!(chains_to(&[db.presented_chain()], &old_root).is_some());
    traffic_works("switch, web renewed", &mut long, &web, &db).await;
    // Seeing the new intermediate, node-a's renewer moved the node to the new root.
    tokio::time::timeout(IO_TIMEOUT, node_a.changed())
        .await
        .expect("node-a did not renew its node certificate after the switch")
        .unwrap();
    let mut node_b = db.renewer.subscribe();
    db.renew_workload().await;
    tokio::time::timeout(IO_TIMEOUT, node_b.changed())
        .await
        .expect("node-b did not renew its node certificate after the switch")
        .unwrap();
    for node in [&web, &db] {
        let node_cert = node.renewer.credentials().cert_chain_pem;
        assert!(chains_to(&[node_cert], &new_root).is_some());
        assert!(chains_to(&[node.presented_chain()], &new_root).is_some());
    }
    traffic_works("switch, all renewed", &mut long, &web, &db).await;

    // drop: only the workload leaves issued before the switch still hold the old root
    // (the node certificates were renewed); drop waits for them unless forced.
    let status = ca.store.status().unwrap();
    assert!(status
        .leaves_on_old_root
        .iter()
        .all(|l| l.kind == zmesh_certs::LeafKind::Workload));
    assert_eq!(
        status.leaves_on_old_root.len(),
        4,
        "2 initial + 2 add-phase"
    );
    assert!(matches!(
        ca.store.rotate(RotationStep::Drop, false),
        Err(StoreError::Rotation(_))
    ));
    assert_eq!(
        ca.store.rotate(RotationStep::Drop, true).unwrap(),
        Phase::Stable { active: 2 }
    );
    assert_eq!(ca.bundle_pem(), new_root);
    traffic_works("drop, before renewals", &mut long, &web, &db).await;
    // The next renewals carry only the new root; the old one is gone from every bundle.
    web.renew_workload().await;
    db.renew_workload().await;
    for node in [&web, &db] {
        let roots = node.roots();
        assert_eq!(roots.len(), 1);
        assert_ne!(roots[0], old_root_der);
    }
    traffic_works("drop, after renewals", &mut long, &web, &db).await;
    // And the nodes renew their own certificates against the new root alone.
    web.renewer.renew().await.unwrap();
    db.renewer.renew().await.unwrap();
    traffic_works("after node renewals", &mut long, &web, &db).await;
    assert!(long.sent >= 9);
    drop(long);
    drop(web);
    drop(db);
    ca.stop().await;
}
