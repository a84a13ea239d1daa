//! The node side: `IstioCaClient` (Istio's CA API over TLS, presenting the node's client
//! certificate) and `join`, which trades a one-time token for that certificate.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};
use x509_parser::prelude::{FromDer, X509Certificate};
use zmesh_identity::{
    AuthorityError, CertificateAuthority, IssuedChain, SignFuture, TrustDomain, WorkloadId,
};

use crate::csr::new_key_and_csr;
use crate::error::StoreError;
use crate::files;
use crate::node::NodeName;
use crate::pb::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::pb::istio::IstioCertificateRequest;
use crate::pb::zmesh::node_join_client::NodeJoinClient;
use crate::pb::zmesh::{JoinRequest, RenewRequest};
use crate::server::{CLUSTER_ID_HEADER, IMPERSONATED_IDENTITY, VERSION_HEADER};

const NODE_KEY_FILE: &str = "node.key";
const NODE_CERT_FILE: &str = "node.pem";
const NODE_BUNDLE_FILE: &str = "ca-bundle.pem";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid CA address {0:?}: expected host:port")]
    Address(String),
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the CA answered {:?}: {}", .0.code(), .0.message())]
    Rpc(Status),
    #[error("the CA's answer is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("invalid cluster id {0:?}: it must be printable ASCII")]
    InvalidClusterId(String),
    #[error("the node credentials are for {found}, not {expected}")]
    WrongNode { expected: String, found: String },
    #[error("the node certificate expired at {0}; join again with a new token")]
    NodeCertExpired(String),
    #[error("bearer token file {path}: {reason}", path = .path.display())]
    TokenFile { path: PathBuf, reason: String },
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        Self::Rpc(status)
    }
}

/// A node agent's credential: its client certificate chain (leaf + intermediate), key,
/// and the CA bundle it learned when joining (updated by every renewal).
#[derive(Clone)]
pub struct NodeCredentials {
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub roots_pem: String,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("NodeCredentials").finish_non_exhaustive()
    }
}

/// `<file>.next`: a staged replacement written by `NodeCredentials::save`.
fn staged(dir: &Path, file: &str) -> std::path::PathBuf {
    dir.join(format!("{file}.next"))
}

impl NodeCredentials {
    /// Reads `node.pem`, `node.key` (must be 0600) and `ca-bundle.pem` from `dir`, first
    /// finishing or undoing a `save` that a crash interrupted, and checks that the key
    /// belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Self, StoreError> {
        Self::recover(dir)?;
        let key_path = dir.join(NODE_KEY_FILE);
        let credentials = Self {
            key_pem: files::read_secret(&key_path)?,
            cert_chain_pem: files::read_string(&dir.join(NODE_CERT_FILE))?,
            roots_pem: files::read_string(&dir.join(NODE_BUNDLE_FILE))?,
        };
        credentials
            .check_key()
            .map_err(|reason| StoreError::BadStateFile {
                path: key_path,
                reason,
            })?;
        Ok(credentials)
    }

    /// Writes the three files into `dir` (created 0700), replacing what is there as one
    /// unit: a reader (or a restart after a crash) sees the old key and certificate or
    /// the new ones, never a mix. The key is 0600 from creation.
    ///
    /// All new files are first staged as `*.next`; renaming `node.key.next` is the commit
    /// point, after which the certificate and bundle follow. `load` completes a committed
    /// save and discards an uncommitted one.
    pub fn save(&self, dir: &Path) -> Result<(), StoreError> {
        files::create_private_dir(dir)?;
        Self::recover(dir)?;
        let key_next = staged(dir, NODE_KEY_FILE);
        files::write_atomic(&key_next, self.key_pem.as_bytes(), 0o600)?;
        files::write_atomic(
            &staged(dir, NODE_CERT_FILE),
            self.cert_chain_pem.as_bytes(),
            0o644,
        )?;
        files::write_atomic(
            &staged(dir, NODE_BUNDLE_FILE),
            self.roots_pem.as_bytes(),
            0o644,
        )?;
        files::sync_dir(dir)?;
        let key = dir.join(NODE_KEY_FILE);
        std::fs::rename(&key_next, &key).map_err(|e| StoreError::io(&key, e))?;
        files::sync_dir(dir)?;
        Self::roll_forward(dir)
    }

    fn recover(dir: &Path) -> Result<(), StoreError> {
        if staged(dir, NODE_KEY_FILE).exists() {
            // Not committed: the current files are still the consistent set.
            for file in [NODE_KEY_FILE, NODE_CERT_FILE, NODE_BUNDLE_FILE] {
                let path = staged(dir, file);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(path, e)),
                }
            }
            return files::sync_dir(dir);
        }
        Self::roll_forward(dir)
    }

    /// Moves staged certificate and bundle files into place (the key is already there).
    fn roll_forward(dir: &Path) -> Result<(), StoreError> {
        for file in [NODE_CERT_FILE, NODE_BUNDLE_FILE] {
            let next = staged(dir, file);
            if next.exists() {
                let path = dir.join(file);
                std::fs::rename(&next, &path).map_err(|e| StoreError::io(path, e))?;
            }
        }
        files::sync_dir(dir)
    }

    /// The key's public half must be the certificate's.
    pub(crate) fn check_key(&self) -> Result<(), String> {
        use rcgen::PublicKeyData;
        let key = rcgen::KeyPair::from_pem(&self.key_pem)
            .map_err(|e| format!("node key does not parse: {e}"))?;
        let leaf = self.leaf().map_err(|e| e.to_string())?;
        let (_, cert) = X509Certificate::from_der(&leaf.der)
            .map_err(|e| format!("node certificate does not parse: {e}"))?;
        if key.subject_public_key_info() != cert.public_key().raw {
            return Err(format!(
                "{NODE_KEY_FILE} does not belong to the certificate in {NODE_CERT_FILE}"
            ));
        }
        Ok(())
    }

    /// Facts about the node certificate this credential holds.
    pub(crate) fn leaf(&self) -> Result<LeafSummary, ClientError> {
        let chain = parse_certs(&self.cert_chain_pem)?;
        let Some(der) = chain.first().cloned() else {
            return Err(ClientError::Pem(
                "the node certificate file is empty".into(),
            ));
        };
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| ClientError::Pem(format!("node certificate: {e}")))?;
        let validity = cert.validity();
        Ok(LeafSummary {
            uris: leaf_uris(&der).map_err(ClientError::Pem)?,
            not_before: validity.not_before.to_datetime().into(),
            not_after: validity.not_after.to_datetime().into(),
            intermediate: chain.get(1).cloned(),
            der,
        })
    }
}

/// What the renewer needs to know about a node certificate.
pub(crate) struct LeafSummary {
    pub der: CertificateDer<'static>,
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The intermediate that issued it, which tells the signing chain.
    pub intermediate: Option<CertificateDer<'static>>,
}

/// How the client proves who it is to the CA.
#[derive(Clone, Debug)]
pub enum ClientCredential {
    /// A node client certificate from `join`.
    NodeCert(NodeCredentials),
    /// `authorization: Bearer <token>`, checked by the CA's `BearerValidator`.
    Bearer(String),
    /// `authorization: Bearer <token>` with the token read from this file for every
    /// request, so a token the kubelet rotates (a projected ServiceAccount token) is
    /// always current.
    BearerFile(PathBuf),
    /// Nothing (only `Join` accepts this).
    None,
}

/// Client for Istio's `IstioCertificateService` and zmesh's node join/renewal, usable by
/// the node's certificate manager through `CertificateAuthority`. It verifies the CA's
/// serving certificate against the bundle, and adopts the bundle each response carries,
/// so it keeps trusting the CA through a root rotation. Clones share one connection and
/// one credential, so a node certificate renewal reaches every user.
#[derive(Clone)]
pub struct IstioCaClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    addr: String,
    server_name: ServerName<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: Arc<RwLock<Vec<CertificateDer<'static>>>>,
    bearer: Option<Bearer>,
    cluster_id: RwLock<Option<AsciiMetadataValue>>,
    /// Replaced (with a new connection) when the node certificate changes.
    channel: RwLock<Channel>,
    /// The intermediate of the last chain the CA issued: the signing chain right now.
    signing_intermediate: watch::Sender<Option<CertificateDer<'static>>>,
    /// The version the CA named in its last answer.
    ca_version: RwLock<Option<String>>,
}

/// Where the bearer token comes from.
enum Bearer {
    Fixed(String),
    File(PathBuf),
}

impl Bearer {
    /// The `authorization` header value. A token file that cannot be read (or is empty)
    /// fails the request as UNAVAILABLE, so it is retried once the kubelet has written it.
    fn header(&self) -> Result<tonic::metadata::AsciiMetadataValue, Status> {
        let token = match self {
            Self::Fixed(token) => token.clone(),
            Self::File(path) => read_token(path).map_err(|e| Status::unavailable(e.to_string()))?,
        };
        format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::invalid_argument("bearer token is not a valid header value"))
    }
}

/// Reads a token file, trimming the line break tools add; never puts the token in errors.
fn read_token(path: &Path) -> Result<String, ClientError> {
    let err = |reason: String| ClientError::TokenFile {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(err(
            "the token holds characters a header cannot carry".into()
        ));
    }
    Ok(token.to_owned())
}

type ClientCert = Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>;

impl std::fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl IstioCaClient {
    /// A client for the CA at `addr` (`host:port`; the host is also the TLS server name),
    /// trusting `roots_pem`. Connects lazily.
    pub fn new(
        addr: &str,
        roots_pem: &str,
        credential: ClientCredential,
    ) -> Result<Self, ClientError> {
        let roots = parse_certs(roots_pem)?;
        if roots.is_empty() {
            return Err(ClientError::Pem(
                "the CA bundle holds no certificate".into(),
            ));
        }
        let (client_cert, bearer) = match credential {
            ClientCredential::NodeCert(c) => (Some(client_cert(&c)?), None),
            ClientCredential::Bearer(t) => (None, Some(Bearer::Fixed(t))),
            ClientCredential::BearerFile(path) => {
                // Fail at startup on a missing or unusable file, not at the first request.
                read_token(&path)?;
                (None, Some(Bearer::File(path)))
            }
            ClientCredential::None => (None, None),
        };
        let (host, _port) = split_host_port(addr)?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| ClientError::Address(addr.to_owned()))?;
        let roots = Arc::new(RwLock::new(roots));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let channel = make_channel(addr, &server_name, &roots, &provider, client_cert)?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                addr: addr.to_owned(),
                server_name,
                provider,
                roots,
                bearer,
                cluster_id: RwLock::new(None),
                channel: RwLock::new(channel),
                signing_intermediate: watch::Sender::new(None),
                ca_version: RwLock::new(None),
            }),
        })
    }

    /// Sends `clusterid: <id>` with every request, as Istio clients do; a CA serving
    /// another cluster then refuses instead of issuing.
    pub fn set_cluster_id(&self, id: &str) -> Result<(), ClientError> {
        let value = id
            .parse::<AsciiMetadataValue>()
            .map_err(|_| ClientError::InvalidClusterId(id.to_owned()))?;
        *self
            .inner
            .cluster_id
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// Presents `credentials` from now on. Requests already in flight finish on the old
    /// connection; new ones open a new connection with the new certificate.
    pub fn set_node_credentials(&self, credentials: &NodeCredentials) -> Result<(), ClientError> {
        let inner = &self.inner;
        let channel = make_channel(
            &inner.addr,
            &inner.server_name,
            &inner.roots,
            &inner.provider,
            Some(client_cert(credentials)?),
        )?;
        *inner.channel.write().unwrap_or_else(|p| p.into_inner()) = channel;
        Ok(())
    }

    /// The roots this client currently trusts, PEM.
    pub fn roots_pem(&self) -> Vec<String> {
        let roots = self.inner.roots.read().unwrap_or_else(|p| p.into_inner());
        roots.iter().map(|r| der_to_pem(r)).collect()
    }

    fn channel(&self) -> Channel {
        self.inner
            .channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A request with the headers every RPC carries: `clusterid`, and the bearer token
    /// if that is this client's credential (so a refusal names what was presented).
    fn request<T>(&self, body: T) -> Result<tonic::Request<T>, Status> {
        let mut request = tonic::Request::new(body);
        if let Some(bearer) = &self.inner.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.header()?);
        }
        let cluster_id = self
            .inner
            .cluster_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(id) = cluster_id {
            request.metadata_mut().insert(CLUSTER_ID_HEADER, id);
        }
        Ok(request)
    }

    /// Raw `CreateCertificate`: returns Istio's `cert_chain` as sent.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        impersonate: Option<&str>,
        validity_secs: i64,
    ) -> Result<Vec<String>, Status> {
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
                },
            )]
            .into(),
        });
        let request = self.request(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: validity_secs,
            metadata,
        })?;
        let response = IstioCertificateServiceClient::new(self.channel())
            .create_certificate(request)
            .await?;
        self.note_version(response.metadata());
        let chain = response.into_inner().cert_chain;
        self.note_signing_chain(&chain);
        Ok(chain)
    }

    /// Raw `Join`.
    pub async fn join_raw(&self, token: &str, csr_pem: &str) -> Result<Vec<String>, Status> {
        let request = self.request(JoinRequest {
            token: token.to_owned(),
            csr: csr_pem.to_owned(),
        })?;
        let response = NodeJoinClient::new(self.channel()).join(request).await?;
        Ok(response.into_inner().cert_chain)
    }

    /// Raw `Renew`, authenticated by the node certificate this client presents.
    pub async fn renew_raw(&self, csr_pem: &str) -> Result<Vec<String>, Status> {
        let request = self.request(RenewRequest {
            csr: csr_pem.to_owned(),
        })?;
        let response = NodeJoinClient::new(self.channel()).renew(request).await?;
        self.note_version(response.metadata());
        let chain = response.into_inner().cert_chain;
        self.note_signing_chain(&chain);
        Ok(chain)
    }

    fn note_version(&self, metadata: &tonic::metadata::MetadataMap) {
        let version = metadata
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        *self
            .inner
            .ca_version
            .write()
            .unwrap_or_else(|p| p.into_inner()) = version;
    }

    /// The version the CA named in its last answer (`None`: no answer yet, or a CA that
    /// does not name one, such as istiod).
    pub fn ca_version(&self) -> Option<String> {
        self.inner
            .ca_version
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes to the CA's signing intermediate, as seen in the chains it issues.
    pub(crate) fn watch_signing_intermediate(
        &self,
    ) -> watch::Receiver<Option<CertificateDer<'static>>> {
        self.inner.signing_intermediate.subscribe()
    }

    fn note_signing_chain(&self, chain: &[String]) {
        // [leaf, intermediate, roots]: only a full chain names its intermediate.
        let [_, intermediate, _] = chain else {
            return;
        };
        let Ok(der) = CertificateDer::from_pem_slice(intermediate.as_bytes()) else {
            return;
        };
        self.inner.signing_intermediate.send_if_modified(|seen| {
            if seen.as_ref() == Some(&der) {
                return false;
            }
            *seen = Some(der);
            true
        });
    }

    pub(crate) fn adopt_roots(&self, roots: &[CertificateDer<'static>]) {
        if !roots.is_empty() {
            *self.inner.roots.write().unwrap_or_else(|p| p.into_inner()) = roots.to_vec();
        }
    }
}

fn client_cert(credentials: &NodeCredentials) -> Result<ClientCert, ClientError> {
    let chain = parse_certs(&credentials.cert_chain_pem)?;
    if chain.is_empty() {
        return Err(ClientError::Pem(
            "the node certificate file is empty".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(credentials.key_pem.as_bytes())
        .map_err(|e| ClientError::Pem(format!("node key: {e}")))?;
    Ok(Arc::new((chain, key)))
}

fn make_channel(
    addr: &str,
    server_name: &ServerName<'static>,
    roots: &Arc<RwLock<Vec<CertificateDer<'static>>>>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    client_cert: Option<ClientCert>,
) -> Result<Channel, ClientError> {
    let connector = TlsConnector {
        addr: addr.to_owned(),
        server_name: server_name.clone(),
        roots: roots.clone(),
        client_cert,
        provider: provider.clone(),
    };
    // "http" here only names the h2 :scheme; TLS is done by the connector.
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .connect_with_connector_lazy(connector))
}

impl CertificateAuthority for IstioCaClient {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a WorkloadId,
        validity: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            let validity = i64::try_from(validity.as_secs()).unwrap_or(i64::MAX);
            let chain = self
                .create_certificate(csr_pem, Some(&identity.to_string()), validity)
                .await
                .map_err(|s| match s.code() {
                    Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::FailedPrecondition => {
                        AuthorityError::Refused(format!("{:?}: {}", s.code(), s.message()))
                    }
                    _ => AuthorityError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
                })?;
            let split =
                split_chain(&chain, &identity.to_string()).map_err(AuthorityError::Malformed)?;
            self.adopt_roots(&split.roots);
            Ok(IssuedChain {
                chain_pem: split.chain_pem,
                roots_pem: split.roots.iter().map(|r| der_to_pem(r)).collect(),
            })
        })
    }
}

pub(crate) struct SplitChain {
    pub chain_pem: Vec<String>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Splits Istio's `cert_chain` into the chain to serve and the roots (the last entry may
/// hold several), checking the leaf is for `expected_uri`.
pub(crate) fn split_chain(cert_chain: &[String], expected_uri: &str) -> Result<SplitChain, String> {
    let Some((roots_entry, chain)) = cert_chain.split_last() else {
        return Err("empty cert_chain".into());
    };
    if chain.is_empty() {
        return Err("cert_chain has one entry; expected the leaf, intermediates and roots".into());
    }
    let roots = parse_certs(roots_entry).map_err(|e| e.to_string())?;
    if roots.is_empty() {
        return Err("the roots entry holds no certificate".into());
    }
    let mut chain_pem = Vec::new();
    for entry in chain {
        let certs = parse_certs(entry).map_err(|e| e.to_string())?;
        if certs.len() != 1 {
            return Err(format!(
                "a chain entry holds {} certificates, expected 1",
                certs.len()
            ));
        }
        chain_pem.push(der_to_pem(&certs[0]));
    }
    let leaf =
        CertificateDer::from_pem_slice(chain_pem[0].as_bytes()).map_err(|e| e.to_string())?;
    let uris = leaf_uris(&leaf)?;
    if uris != [expected_uri] {
        return Err(format!("the leaf is for {uris:?}, expected {expected_uri}"));
    }
    Ok(SplitChain { chain_pem, roots })
}

/// The URI SANs of a certificate.
pub(crate) fn leaf_uris(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Enrols a node: a new key and CSR for `spiffe://<td>/zmesh/node/<node>`, traded with
/// the one-time `token` for a node certificate, saved in `out_dir` (key 0600).
pub async fn join(
    addr: &str,
    roots_pem: &str,
    token: &str,
    node: &NodeName,
    trust_domain: &TrustDomain,
    out_dir: &Path,
) -> Result<NodeCredentials, ClientError> {
    let id = node.spiffe_id(trust_domain);
    let (key_pem, csr_pem) = new_key_and_csr(&id)?;
    let client = IstioCaClient::new(addr, roots_pem, ClientCredential::None)?;
    let chain = client.join_raw(token, &csr_pem).await?;
    let split = split_chain(&chain, &id.to_string()).map_err(ClientError::Malformed)?;
    let credentials = NodeCredentials {
        cert_chain_pem: split.chain_pem.concat(),
        key_pem,
        roots_pem: split.roots.iter().map(|r| der_to_pem(r)).collect(),
    };
    credentials.save(out_dir)?;
    Ok(credentials)
}

fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Pem(e.to_string()))
}

pub(crate) fn der_to_pem(der: &CertificateDer<'_>) -> String {
    ::pem::encode_config(
        &::pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

fn split_host_port(addr: &str) -> Result<(&str, u16), ClientError> {
    let bad = || ClientError::Address(addr.to_owned());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port.parse().map_err(|_| bad())?))
}

/// Opens TLS 1.3 to the CA with the current roots (re-read per connection, so a
/// reconnect after a root rotation uses the adopted bundle).
#[derive(Clone)]
struct TlsConnector {
    addr: String,
    server_name: ServerName<'static>,
    roots: Arc<RwLock<Vec<CertificateDer<'static>>>>,
    client_cert: Option<Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl TlsConnector {
    fn config(&self) -> Result<rustls::ClientConfig, rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        for root in self.roots.read().unwrap_or_else(|p| p.into_inner()).iter() {
            store.add(root.clone())?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(store);
        let mut config = match &self.client_cert {
            Some(pair) => builder.with_client_auth_cert(pair.0.clone(), pair.1.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
            + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let config = this.config().map_err(std::io::Error::other)?;
            let tcp = TcpStream::connect(&this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(this.server_name.clone(), tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            split_host_port("ca.example:15012").unwrap(),
            ("ca.example", 15012)
        );
        assert_eq!(split_host_port("[::1]:15012").unwrap(), ("::1", 15012));
        for bad in ["ca.example", ":15012", "ca:port"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    fn credentials(name: &str) -> NodeCredentials {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://cluster.local/zmesh/node/{name}")
                .try_into()
                .unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        NodeCredentials {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            roots_pem: cert.pem(),
        }
    }

    fn same(a: &NodeCredentials, b: &NodeCredentials) -> bool {
        a.key_pem == b.key_pem && a.cert_chain_pem == b.cert_chain_pem
    }

    #[test]
    fn save_replaces_key_and_certificate_as_one_unit() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("node");
        let old = credentials("old");
        let new = credentials("new");
        old.save(&dir).unwrap();
        new.save(&dir).unwrap();
        assert!(same(&NodeCredentials::load(&dir).unwrap(), &new));
        let key_mode = std::fs::metadata(dir.join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);

        // Crash before the commit (staged key still there): the old set stays.
        old.save(&dir).unwrap();
        std::fs::write(staged(&dir, NODE_KEY_FILE), &new.key_pem).unwrap();
        std::fs::write(staged(&dir, NODE_CERT_FILE), &new.cert_chain_pem).unwrap();
        assert!(same(&NodeCredentials::load(&dir).unwrap(), &old));
        assert!(!staged(&dir, NODE_CERT_FILE).exists());

        // Crash after the commit (key renamed, certificate still staged): rolled forward.
        files::write_atomic(&dir.join(NODE_KEY_FILE), new.key_pem.as_bytes(), 0o600).unwrap();
        std::fs::write(staged(&dir, NODE_CERT_FILE), &new.cert_chain_pem).unwrap();
        assert!(same(&NodeCredentials::load(&dir).unwrap(), &new));
        assert!(!staged(&dir, NODE_CERT_FILE).exists());

        // A key that is not the certificate's is refused, never used.
        files::write_atomic(&dir.join(NODE_KEY_FILE), old.key_pem.as_bytes(), 0o600).unwrap();
        match NodeCredentials::load(&dir) {
            Err(StoreError::BadStateFile { reason, .. }) => {
                assert!(reason.contains("does not belong"), "{reason}")
            }
            other => panic!("mismatched key loaded: {other:?}"),
        }
    }

    #[tokio::test]
    async fn token_file_is_read_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let pem = credentials("ca").roots_pem;
        let credential = ClientCredential::BearerFile(path.clone());
        // A missing file fails at construction, naming the file but no token.
        match IstioCaClient::new("ca.example:15012", &pem, credential.clone()) {
            Err(ClientError::TokenFile { path: p, .. }) => assert_eq!(p, path),
            other => panic!("missing token file accepted: {other:?}"),
        }
        std::fs::write(&path, "first\n").unwrap();
        let client = IstioCaClient::new("ca.example:15012", &pem, credential).unwrap();
        let header = |client: &IstioCaClient| {
            client.request(()).map(|r| {
                r.metadata()
                    .get("authorization")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
        };
        assert_eq!(header(&client).unwrap(), "Bearer first");
        // The kubelet rotates the token: the next request carries the new one.
        std::fs::write(&path, "second").unwrap();
        assert_eq!(header(&client).unwrap(), "Bearer second");
        // Emptied or removed: the request fails UNAVAILABLE (retried), nothing is sent.
        std::fs::write(&path, " \n").unwrap();
        assert_eq!(header(&client).unwrap_err().code(), Code::Unavailable);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(header(&client).unwrap_err().code(), Code::Unavailable);
        std::fs::write(&path, "bad token").unwrap();
        let status = header(&client).unwrap_err();
        assert!(!status.message().contains("bad token"), "{status:?}");
    }

    #[test]
    fn split_chain_rejects_short_or_foreign_chains() {
        assert!(split_chain(&[], "x").is_err());
        assert!(split_chain(&["a".into()], "x").is_err());
        assert!(split_chain(&["not pem".into(), "not pem".into()], "x").is_err());
    }
}
