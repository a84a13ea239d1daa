//! The CA server: Istio's `IstioCertificateService` and zmesh's `NodeJoin` over TLS 1.3.
//!
//! Client certificates are accepted at the TLS level whatever they are (the handshake
//! still proves possession of the key) and checked per request in the gRPC layer, so that
//! every refusal, including a bad certificate, gets an audit line and a precise status.
//! Every RPC authenticates on its own: nothing is granted for merely completing TLS.
//!
//! Every request re-reads the state directory if `state.json` changed (one `stat`), so
//! `zmesh ca rotate-root` takes effect on a running server without a restart. The TLS
//! serving certificate is re-issued from the current signing chain when the chain
//! changes or the certificate is past half its life.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, X509Certificate};
use zmesh_identity::WorkloadId;

use crate::audit::{AuditLog, AuditRecord, AuthMethod};
use crate::authority::{Authority, Issued, LeafKind};
use crate::csr::verify_csr;
use crate::error::{CsrError, StoreError};
use crate::files::FileStamp;
use crate::node::NodeName;
use crate::pb::istio::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::pb::istio::{IstioCertificateRequest, IstioCertificateResponse};
use crate::pb::zmesh::node_join_server::{NodeJoin, NodeJoinServer};
use crate::pb::zmesh::{JoinRequest, JoinResponse, RenewRequest};
use crate::policy::{BearerError, BearerValidator, WorkloadPlacement};
use crate::store::{CaStore, JoinTokenFailure, LeafRecord};

/// Istio's CA port.
pub const DEFAULT_CA_PORT: u16 = 15012;
/// Metadata key a node proxy uses to request a workload's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The cluster id Istio assumes when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// gRPC request header in which Istio clients name their cluster.
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// The response header naming the CA's version (`zmesh status`, `zmesh version` show it as
/// the nodes see it).
pub const VERSION_HEADER: &str = "x-zmesh-ca-version";

/// `response` with the CA's version in its metadata.
fn versioned<T>(body: T) -> Response<T> {
    let mut response = Response::new(body);
    response.metadata_mut().insert(
        VERSION_HEADER,
        tonic::metadata::AsciiMetadataValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    response
}
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot issue the serving certificate: {0}")]
    ServingCert(String),
}

/// How the server decides who may ask for what.
pub struct ServerOptions {
    pub listen: SocketAddr,
    /// DNS names and IP addresses for the CA's serving certificate.
    pub serving_names: Vec<String>,
    pub placement: Arc<dyn WorkloadPlacement>,
    /// Accepts `authorization: Bearer` credentials when set.
    pub bearer: Option<Arc<dyn BearerValidator>>,
    /// This CA's cluster; a request whose `clusterid` header names another is refused
    /// (INVALID_ARGUMENT). Istio's default is [`DEFAULT_CLUSTER_ID`].
    pub cluster_id: String,
}

/// A bound, not yet running CA server.
pub struct CaServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
}

struct Shared {
    store: CaStore,
    current: Current,
    placement: Arc<dyn WorkloadPlacement>,
    bearer: Option<Arc<dyn BearerValidator>>,
    cluster_id: String,
    audit: AuditLog,
}

/// The loaded authority, reloaded when `state.json` changes.
struct Current {
    store: CaStore,
    snapshot: RwLock<(FileStamp, Arc<Authority>)>,
}

impl Current {
    fn new(store: CaStore) -> Result<Self, StoreError> {
        let stamp = store
            .state_stamp()
            .map_err(|e| StoreError::io(store.state_path(), e))?;
        let authority = Arc::new(store.load()?);
        Ok(Self {
            store,
            snapshot: RwLock::new((stamp, authority)),
        })
    }

    fn get(&self) -> Result<Arc<Authority>, StoreError> {
        let stamp = self
            .store
            .state_stamp()
            .map_err(|e| StoreError::io(self.store.state_path(), e))?;
        {
            let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
            if snap.0 == stamp {
                return Ok(snap.1.clone());
            }
        }
        // Fail closed: a state that does not load serves nothing.
        let authority = Arc::new(self.store.load()?);
        tracing::info!(
            phase = authority.phase().name(),
            signing_chain = authority.phase().signing(),
            "CA state reloaded"
        );
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = (stamp, authority.clone());
        Ok(authority)
    }
}

impl CaServer {
    /// Loads the CA, prepares TLS and binds the listener.
    pub async fn bind(store: CaStore, options: ServerOptions) -> Result<Self, ServerError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let current = Current::new(store.clone())?;
        let shared = Arc::new(Shared {
            audit: AuditLog::new(store.dir()),
            store,
            current,
            placement: options.placement,
            bearer: options.bearer,
            cluster_id: options.cluster_id,
        });
        let resolver = Arc::new(ServingCert {
            shared: shared.clone(),
            names: options.serving_names,
            provider: provider.clone(),
            cached: Mutex::new(None),
        });
        // Issue once now so a bad name list fails at startup, not at the first handshake.
        resolver.refresh().map_err(ServerError::ServingCert)?;
        let verifier = Arc::new(DeferredClientCert {
            algorithms: provider.signature_verification_algorithms,
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let listener =
            TcpListener::bind(options.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: options.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            shared,
            tls: Arc::new(tls),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
        let listener = self.listener;
        let accept_loop = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                // Handshakes run concurrently so a slow client cannot stall others.
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(TlsConn { stream, peer })).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        let service = Service {
            shared: self.shared,
        };
        let result = tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .add_service(IstioCertificateServiceServer::new(service.clone()))
            .add_service(NodeJoinServer::new(service))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
            .await;
        accept_loop.abort();
        Ok(result?)
    }
}

/// A TLS connection with what the handlers need to know about the peer.
struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
}

/// Request extension describing the connection.
#[derive(Clone)]
struct ConnInfo {
    peer: SocketAddr,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        let certs = self
            .stream
            .get_ref()
            .1
            .peer_certificates()
            .filter(|c| !c.is_empty())
            .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
        ConnInfo {
            peer: self.peer,
            certs,
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Issues the serving certificate from the current signing chain.
struct ServingCert {
    shared: Arc<Shared>,
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cached: Mutex<Option<CachedCert>>,
}

/// The serving certificate, the snapshot that issued it, and when to renew it.
type CachedCert = (Arc<Authority>, OffsetDateTime, Arc<CertifiedKey>);

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish()
    }
}

impl ServingCert {
    fn refresh(&self) -> Result<Arc<CertifiedKey>, String> {
        let authority = self.shared.current.get().map_err(|e| e.to_string())?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = OffsetDateTime::now_utc();
        if let Some((issued_by, renew_at, key)) = cached.as_ref() {
            if Arc::ptr_eq(issued_by, &authority) && now < *renew_at {
                return Ok(key.clone());
            }
        }
        let (issued, key_der) = authority
            .issue_server(&self.names, SERVING_CERT_LIFETIME)
            .map_err(|e| e.to_string())?;
        // Serve leaf + intermediate; the root comes from the client's bundle.
        let chain = issued.cert_chain[..2]
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
        let certified = Arc::new(
            CertifiedKey::from_der(chain, key, &self.provider).map_err(|e| e.to_string())?,
        );
        let renew_at = now + SERVING_CERT_LIFETIME / 2;
        *cached = Some((authority, renew_at, certified.clone()));
        Ok(certified)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.refresh() {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(error = %e, "no serving certificate; refusing TLS");
                None
            }
        }
    }
}

/// Asks for a client certificate but does not require one (bearer tokens and join
/// tokens are the alternatives), and defers checking it to the gRPC layer
/// (`Service::authenticate_cert`), which audits every refusal. rustls still verifies the
/// handshake signature, so a presented certificate always proves possession of its key.
#[derive(Debug)]
struct DeferredClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("dir", &self.store.dir())
            .finish()
    }
}

impl ClientCertVerifier for DeferredClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Not a grant: every RPC checks the chain itself before doing anything.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
}

/// A refusal with what was known when it happened, for the audit line.
struct Refusal {
    status: Status,
    node: Option<NodeName>,
    auth: Option<AuthMethod>,
    identity: Option<String>,
}

impl Refusal {
    fn new(status: Status) -> Self {
        Self {
            status,
            node: None,
            auth: None,
            identity: None,
        }
    }
}

struct Grant {
    issued: Issued,
    node: NodeName,
    auth: AuthMethod,
    identity: String,
    kind: LeafKind,
}

impl Service {
    /// Writes the audit line and ledger entry for a decision and turns it into the
    /// response. An issuance that cannot be recorded is not returned.
    fn conclude(
        &self,
        rpc: &'static str,
        peer: Option<SocketAddr>,
        decision: Result<Grant, Refusal>,
    ) -> Result<Vec<String>, Status> {
        let mut record = AuditRecord {
            time: OffsetDateTime::now_utc(),
            rpc,
            peer: peer.map(|p| p.to_string()),
            caller_node: None,
            auth: None,
            identity: None,
            decision: "refused",
            serial: None,
            not_after: None,
            code: None,
            reason: None,
        };
        match decision {
            Ok(grant) => {
                record.caller_node = Some(grant.node.to_string());
                record.auth = Some(grant.auth);
                record.identity = Some(grant.identity.clone());
                record.decision = "issued";
                record.serial = Some(grant.issued.serial.clone());
                record.not_after = Some(grant.issued.not_after);
                let leaf = LeafRecord {
                    serial: grant.issued.serial.clone(),
                    identity: grant.identity,
                    kind: grant.kind,
                    not_after: grant.issued.not_after,
                    chain: grant.issued.chain_id,
                    root_fingerprint: grant.issued.root_fingerprint.clone(),
                };
                let recorded = self
                    .shared
                    .store
                    .record_leaf(&leaf)
                    .and_then(|()| self.shared.audit.write(&record));
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot record an issued certificate; withholding it");
                    return Err(Status::internal("the CA cannot record the issuance"));
                }
                Ok(grant.issued.cert_chain)
            }
            Err(refusal) => {
                record.caller_node = refusal.node.map(|n| n.to_string());
                record.auth = refusal.auth;
                record.identity = refusal.identity;
                record.code = Some(format!("{:?}", refusal.status.code()));
                record.reason = Some(refusal.status.message().to_owned());
                if let Err(e) = self.shared.audit.write(&record) {
                    tracing::error!(error = %e, "cannot write the audit log");
                }
                Err(refusal.status)
            }
        }
    }

    fn authority(&self) -> Result<Arc<Authority>, Refusal> {
        self.shared.current.get().map_err(|e| {
            tracing::error!(error = %e, "CA state does not load");
            Refusal::new(Status::unavailable("the CA state is not loadable"))
        })
    }

    /// Refuses a request whose `clusterid` header names another cluster.
    fn check_cluster_id(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Refusal> {
        let Some(value) = metadata.get(CLUSTER_ID_HEADER) else {
            return Ok(());
        };
        match value.to_str() {
            Ok(id) if id == self.shared.cluster_id => Ok(()),
            Ok(id) => Err(Refusal::new(Status::invalid_argument(format!(
                "request is for cluster {id:?}, but this CA serves cluster {:?}",
                self.shared.cluster_id
            )))),
            Err(_) => Err(Refusal::new(Status::invalid_argument(
                "the clusterid header is not valid text",
            ))),
        }
    }

    /// The node named by the connection's client certificate, checked against the
    /// current bundle on every request (the handshake accepted any certificate, and the
    /// bundle may have changed since). Returns the verified chain's leaf too.
    fn authenticate_cert<'c>(
        &self,
        authority: &Authority,
        certs: &'c [CertificateDer<'static>],
    ) -> Result<(NodeName, &'c CertificateDer<'static>), Refusal> {
        let refuse = |reason: String| {
            let mut r = Refusal::new(Status::unauthenticated(reason));
            r.auth = Some(AuthMethod::NodeCert);
            r
        };
        let (leaf, intermediates) = certs
            .split_first()
            .ok_or_else(|| refuse("empty client certificate chain".into()))?;
        let node = authority
            .verify_node_chain(leaf, intermediates, UnixTime::now())
            .map_err(|reason| match crate::client::leaf_uris(leaf) {
                // Name the claimed identity: it tells an operator which node is broken.
                Ok(uris) if !uris.is_empty() => {
                    refuse(format!("{reason} (certificate for {})", uris.join(", ")))
                }
                _ => refuse(reason),
            })?;
        Ok((node, leaf))
    }

    /// Finds the calling node from its client certificate or bearer token.
    async fn authenticate(
        &self,
        authority: &Authority,
        conn: Option<&ConnInfo>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(NodeName, AuthMethod), Refusal> {
        if let Some(certs) = conn.and_then(|c| c.certs.as_ref()) {
            // A presented certificate must be valid; no falling back to a bearer token.
            return self
                .authenticate_cert(authority, certs)
                .map(|(node, _)| (node, AuthMethod::NodeCert));
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(Refusal::new(Status::unauthenticated(
                "no credential: present a node client certificate or an authorization bearer token",
            )));
        };
        let refuse = |msg: &str| {
            let mut r = Refusal::new(Status::unauthenticated(msg));
            r.auth = Some(AuthMethod::Bearer);
            r
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse("authorization header is not \"Bearer <token>\""))?;
        let Some(validator) = &self.shared.bearer else {
            return Err(refuse("this CA does not accept bearer tokens"));
        };
        match validator.validate(token).await {
            Ok(node) => Ok((node, AuthMethod::Bearer)),
            // The reason (never the token) names what was wrong, for the audit line.
            Err(e @ BearerError::Rejected(_)) => Err(refuse(&e.to_string())),
            Err(BearerError::Unavailable(e)) => {
                tracing::error!(error = %e, "bearer validator unavailable");
                let mut r = Refusal::new(Status::unavailable("cannot validate bearer tokens now"));
                r.auth = Some(AuthMethod::Bearer);
                Err(r)
            }
        }
    }

    async fn decide_workload(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Grant, Refusal> {
        self.check_cluster_id(request.metadata())?;
        let authority = self.authority()?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let (node, auth) = self
            .authenticate(&authority, conn.as_ref(), request.metadata())
            .await?;
        let with_caller = |status: Status, identity: Option<String>| Refusal {
            status,
            node: Some(node.clone()),
            auth: Some(auth),
            identity,
        };
        let body = request.into_inner();
        let td = authority.trust_domain();
        let csr = verify_csr(&body.csr, td)
            .map_err(|e| with_caller(Status::invalid_argument(e.to_string()), None))?;
        let csr_id = csr.id.to_string();
        let workload = WorkloadId::try_from(csr.id.clone()).map_err(|_| {
            with_caller(
                Status::invalid_argument(CsrError::NotWorkload(csr_id.clone()).to_string()),
                Some(csr_id.clone()),
            )
        })?;
        if let Some(impersonated) = impersonated_identity(body.metadata.as_ref())
            .map_err(|e| with_caller(Status::invalid_argument(e), Some(csr_id.clone())))?
        {
            if impersonated != csr_id {
                return Err(with_caller(
                    Status::invalid_argument(format!(
                        "ImpersonatedIdentity {impersonated} does not match the CSR identity {csr_id}"
                    )),
                    Some(csr_id),
                ));
            }
        }
        match self.shared.placement.is_scheduled(&node, &workload) {
            Ok(true) => {}
            Ok(false) => {
                return Err(with_caller(
                    Status::permission_denied(format!(
                        "{workload} is not scheduled on node {node}"
                    )),
                    Some(csr_id),
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "workload placement unavailable");
                return Err(with_caller(
                    Status::unavailable("workload placement is unavailable"),
                    Some(csr_id),
                ));
            }
        }
        let lifetime = authority.policy().workload_lifetime(body.validity_duration);
        let issued = authority
            .issue(&csr, LeafKind::Workload, lifetime)
            .map_err(|e| {
                tracing::error!(error = %e, "signing failed");
                with_caller(Status::internal("signing failed"), Some(csr_id.clone()))
            })?;
        Ok(Grant {
            issued,
            node,
            auth,
            identity: csr_id,
            kind: LeafKind::Workload,
        })
    }

    async fn decide_join(&self, request: Request<JoinRequest>) -> Result<Grant, Refusal> {
        self.check_cluster_id(request.metadata())?;
        let authority = self.authority()?;
        let body = request.into_inner();
        let td = authority.trust_domain().clone();
        let spent = self.shared.store.consume_join_token(&body.token, |node| {
            let csr = verify_csr(&body.csr, &td).map_err(|e| (node.clone(), e))?;
            let want = node.spiffe_id(&td);
            if csr.id != want {
                let got = csr.id.to_string();
                let want = want.to_string();
                return Err((node.clone(), CsrError::IdentityMismatch { got, want }));
            }
            Ok(csr)
        });
        let unauth = |status: Status| {
            let mut r = Refusal::new(status);
            r.auth = Some(AuthMethod::JoinToken);
            r
        };
        let (node, csr) = match spent {
            Err(JoinTokenFailure::Token(e, node)) => {
                let mut r = unauth(Status::unauthenticated(e.to_string()));
                r.node = node;
                return Err(r);
            }
            Err(JoinTokenFailure::Store(e)) => {
                tracing::error!(error = %e, "join token store unusable");
                return Err(unauth(Status::internal(
                    "the CA cannot read its join tokens",
                )));
            }
            Ok(Err((node, e))) => {
                let mut r = unauth(Status::invalid_argument(e.to_string()));
                r.node = Some(node);
                return Err(r);
            }
            Ok(Ok(v)) => v,
        };
        let identity = csr.id.to_string();
        let issued = authority
            .issue(&csr, LeafKind::Node, authority.policy().node_cert_lifetime)
            .map_err(|e| {
                tracing::error!(error = %e, "signing failed");
                let mut r = unauth(Status::internal("signing failed"));
                r.node = Some(node.clone());
                r
            })?;
        Ok(Grant {
            issued,
            node,
            auth: AuthMethod::JoinToken,
            identity,
            kind: LeafKind::Node,
        })
    }

    /// A new node certificate for the node whose current certificate authenticates the
    /// call, from the current signing chain (so renewal after a root switch moves the
    /// node onto the new root). Bearer credentials cannot renew: they are not node
    /// certificates, and a join token is the only way to get a first one.
    async fn decide_renew(&self, request: Request<RenewRequest>) -> Result<Grant, Refusal> {
        self.check_cluster_id(request.metadata())?;
        let authority = self.authority()?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let Some(certs) = conn.as_ref().and_then(|c| c.certs.clone()) else {
            let bearer = request.metadata().contains_key("authorization");
            let mut r = Refusal::new(Status::unauthenticated(if bearer {
                "a bearer token cannot renew a node certificate; present the current node \
                 certificate, or join with a token first"
            } else {
                "Renew needs the node's current client certificate; join with a token first"
            }));
            r.auth = bearer.then_some(AuthMethod::Bearer);
            return Err(r);
        };
        let (node, leaf) = self.authenticate_cert(&authority, &certs)?;
        let td = authority.trust_domain();
        let want = node.spiffe_id(td);
        let with_caller = |status: Status, identity: Option<String>| Refusal {
            status,
            node: Some(node.clone()),
            auth: Some(AuthMethod::NodeCert),
            identity,
        };
        let body = request.into_inner();
        let csr = verify_csr(&body.csr, td)
            .map_err(|e| with_caller(Status::invalid_argument(e.to_string()), None))?;
        let csr_id = csr.id.to_string();
        if csr.id != want {
            return Err(with_caller(
                Status::permission_denied(format!(
                    "node {node} may renew only its own identity {want}, not {csr_id}"
                )),
                Some(csr_id),
            ));
        }
        let (_, current) = X509Certificate::from_der(leaf).map_err(|e| {
            with_caller(
                Status::unauthenticated(format!("client certificate does not parse: {e}")),
                Some(csr_id.clone()),
            )
        })?;
        if current.public_key().raw == csr.spki_der.as_slice() {
            return Err(with_caller(
                Status::invalid_argument("a renewal must use a new key, not the current one"),
                Some(csr_id),
            ));
        }
        let issued = authority
            .issue(&csr, LeafKind::Node, authority.policy().node_cert_lifetime)
            .map_err(|e| {
                tracing::error!(error = %e, "signing failed");
                with_caller(Status::internal("signing failed"), Some(csr_id.clone()))
            })?;
        Ok(Grant {
            issued,
            node,
            auth: AuthMethod::NodeCert,
            identity: csr_id,
            kind: LeafKind::Node,
        })
    }
}

/// The `ImpersonatedIdentity` metadata field, if present.
fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<String>, String> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(format!("metadata {IMPERSONATED_IDENTITY} must be a string")),
    }
}

fn peer_of<T>(request: &Request<T>) -> Option<SocketAddr> {
    request.extensions().get::<ConnInfo>().map(|c| c.peer)
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = peer_of(&request);
        let decision = self.decide_workload(request).await;
        let cert_chain = self.conclude("CreateCertificate", peer, decision)?;
        Ok(versioned(IstioCertificateResponse { cert_chain }))
    }
}

#[tonic::async_trait]
impl NodeJoin for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let peer = peer_of(&request);
        let decision = self.decide_join(request).await;
        let cert_chain = self.conclude("Join", peer, decision)?;
        Ok(versioned(JoinResponse { cert_chain }))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<JoinResponse>, Status> {
        let peer = peer_of(&request);
        let decision = self.decide_renew(request).await;
        let cert_chain = self.conclude("Renew", peer, decision)?;
        Ok(versioned(JoinResponse { cert_chain }))
    }
}
