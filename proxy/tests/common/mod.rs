//! Test fixtures: a CA made with rcgen, certificates with SPIFFE URI SANs, and a two-node
//! mesh on loopback (each test uses its own 127.77.<n>.0/24 so tests can run in parallel).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use zmesh_identity::{TrustBundle, TrustDomain, WorkloadId};
use zmesh_proxy::flows::FlowHub;
use zmesh_proxy::{
    Authorizer, Metrics, Node, Protocol, Proxy, ProxyAddrs, ProxyConfig, ProxyDeps, ProxyError,
    StaticCredentials, StaticOriginalDst, TlsCredentials, Workload, WorkloadStore, WorkloadTable,
};

pub struct Ca {
    pub trust_domain: TrustDomain,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(trust_domain: &str) -> Self {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, format!("test CA {trust_domain}"));
        params.distinguished_name = dn;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            trust_domain: TrustDomain::new(trust_domain).unwrap(),
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub fn bundle(&self) -> TrustBundle {
        let mut b = TrustBundle::new();
        b.add_root(&self.trust_domain, self.root()).unwrap();
        b
    }

    /// A leaf SVID for `uri`, valid over [not_before, not_after].
    pub fn leaf_valid(
        &self,
        uri: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "test workload");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], der)
    }

    pub fn leaf(&self, uri: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let now = OffsetDateTime::now_utc();
        self.leaf_valid(
            uri,
            now - time::Duration::hours(1),
            now + time::Duration::hours(24),
        )
    }

    /// Credentials holding certificates for `ids`.
    pub fn credentials(&self, ids: &[&WorkloadId]) -> Arc<StaticCredentials> {
        let certs = ids.iter().map(|id| {
            let (chain, key) = self.leaf(&id.to_string());
            ((*id).clone(), chain, key)
        });
        Arc::new(StaticCredentials::new(self.trust_domain.clone(), self.bundle(), certs).unwrap())
    }
}

pub fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 77, net, host])
}

pub fn workload(name: &str, sa: &str, node: &str, ip: IpAddr) -> Workload {
    Workload {
        name: name.into(),
        workload_name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        node: node.into(),
        ips: vec![ip],
        protocol: Protocol::Hbone,
        identity: WorkloadId::new(&TrustDomain::default(), "default", sa).unwrap(),
        labels: Arc::default(),
    }
}

/// A client on node "a", a server on node "b", a proxy on each node.
pub struct Mesh {
    pub ca: Ca,
    pub net: u8,
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
    pub store: Arc<WorkloadStore>,
    pub a: Running,
    pub b: Running,
    pub server: TcpListener,
}

pub struct Running {
    pub addrs: ProxyAddrs,
    pub metrics: Arc<Metrics>,
    pub flows: Arc<FlowHub>,
    pub connections: Arc<zmesh_proxy::connections::OpenConnections>,
    pub drain: zmesh_proxy::DrainHandle,
    /// What [`Proxy::run`] returned.
    pub task: tokio::task::JoinHandle<Result<(), ProxyError>>,
}

impl Running {
    pub async fn start(config: ProxyConfig, mut deps: ProxyDeps) -> Self {
        if deps.flows.is_none() {
            deps.flows = Some(Arc::new(FlowHub::new(256)));
        }
        let proxy = Proxy::bind(config, deps).await.unwrap();
        Self {
            addrs: proxy.addrs(),
            metrics: proxy.metrics(),
            flows: proxy.flows(),
            connections: proxy.connections(),
            drain: proxy.drain_handle(),
            task: tokio::spawn(proxy.run()),
        }
    }
}

pub type CredentialsFn = Box<dyn Fn(&Ca, &Workload) -> Arc<dyn TlsCredentials>>;

pub struct MeshOptions {
    pub authorizer: Option<Arc<dyn Authorizer>>,
    pub config: Box<dyn Fn(&mut ProxyConfig)>,
    /// Credentials for node b, from the mesh CA and the server workload (default: its own).
    pub b_credentials: Option<CredentialsFn>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            authorizer: None,
            config: Box::new(|_| {}),
            b_credentials: None,
        }
    }
}

impl Mesh {
    pub async fn new(net: u8) -> Self {
        Self::with(net, MeshOptions::default()).await
    }

    pub async fn with(net: u8, opts: MeshOptions) -> Self {
        let ca = Ca::new("cluster.local");
        let client_ip = ip(net, 1);
        let server_ip = ip(net, 2);
        let client = workload("client", "client-sa", "a", client_ip);
        let server_w = workload("server", "server-sa", "b", server_ip);
        let server = TcpListener::bind(SocketAddr::new(server_ip, 0))
            .await
            .unwrap();
        let server_addr = server.local_addr().unwrap();
        let td = TrustDomain::default();
        let store = Arc::new(WorkloadStore::new(
            WorkloadTable::new(td.clone(), [], [client.clone(), server_w.clone()]).unwrap(),
        ));

        let mut cfg_b = ProxyConfig::explicit("b", ip(net, 20));
        (opts.config)(&mut cfg_b);
        let b_creds = match &opts.b_credentials {
            Some(f) => f(&ca, &server_w),
            None => ca.credentials(&[&server_w.identity]),
        };
        let mut deps_b = ProxyDeps::new(store.clone(), b_creds);
        deps_b.original_dst = Arc::new(StaticOriginalDst::new([(ip(net, 9), server_addr)]));
        if let Some(a) = opts.authorizer {
            deps_b.authorizer = a;
        }
        let b = Running::start(cfg_b, deps_b).await;

        let mut cfg_a = ProxyConfig::explicit("a", ip(net, 10));
        (opts.config)(&mut cfg_a);
        let mut deps_a = ProxyDeps::new(store.clone(), ca.credentials(&[&client.identity]));
        // ip(net, 9) is no workload: tests use it as an outside client.
        deps_a.original_dst = Arc::new(StaticOriginalDst::new([
            (client_ip, server_addr),
            (ip(net, 9), server_addr),
        ]));
        let a = Running::start(cfg_a, deps_a).await;

        // Now that B's port is known, point node b's HBONE address at it.
        let nodes = [Node {
            name: "b".into(),
            hbone: Some(b.addrs.inbound),
        }];
        store.replace(WorkloadTable::new(td, nodes, [client, server_w]).unwrap());
        Self {
            ca,
            net,
            client_ip,
            server_ip,
            store,
            a,
            b,
            server,
        }
    }

    /// A client connection from the client workload's IP through proxy A.
    pub async fn connect(&self) -> TcpStream {
        connect_from(self.client_ip, self.a.addrs.outbound).await
    }
}

pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let sock = match src {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    sock.connect(dst).await.unwrap()
}

/// Waits for `cond` to hold, polling; panics after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A GET over HTTP/1.1: the whole response, status line first.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Sends `up` from `client` to `server`, then `down` back, checking both arrive.
pub async fn exchange(client: &mut TcpStream, server: &mut TcpStream, up: &[u8], down: &[u8]) {
    client.write_all(up).await.unwrap();
    let mut got = vec![0; up.len()];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(got, up);
    server.write_all(down).await.unwrap();
    let mut got = vec![0; down.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, down);
}
