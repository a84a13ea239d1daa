//! A SPIRE agent as the identity source: workload X.509-SVIDs and trust bundles come from
//! the SPIFFE Workload API (gRPC over a unix socket) instead of the zmesh CA.
//!
//! Two streams run side by side, each reconnecting with jittered exponential backoff:
//! `FetchX509SVID` (SVIDs, their keys and their trust domain's roots) and
//! `FetchX509Bundles` (every trust bundle). Each message carries the full current state.
//! Every SVID is validated with [`zmesh_identity::verify_svid`] against the roots it comes
//! with before it is used; an SVID whose certificate does not carry the SPIFFE ID it is
//! announced under is refused. Only SVIDs of workloads the node expects
//! ([`SpireSource::expect`]) are served. When the agent goes away the last good SVIDs stay
//! in use until they expire.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rand::Rng;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};
use zmesh_identity::bundle::BundleError;
use zmesh_identity::svid::{self, SvidError};
use zmesh_identity::{SharedBundle, SpiffeId, SpiffeIdError, TrustBundle, TrustDomain, WorkloadId};

use crate::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::pb::workload::{X509BundlesRequest, X509svidRequest, X509svidResponse};

/// The metadata header every Workload API call must carry (SPIFFE Workload API spec).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Why an SVID or bundle from the Workload API was not used, or why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpireError {
    #[error("cannot reach the SPIFFE Workload API at {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("the Workload API call failed: {0}")]
    Rpc(String),
    #[error("the Workload API closed the stream")]
    StreamEnded,
    #[error("SVID announced as {announced:?}: that is not a SPIFFE ID: {source}")]
    BadSpiffeId {
        announced: String,
        source: SpiffeIdError,
    },
    #[error("SVID {id}: the certificate chain is not concatenated DER: {reason}")]
    BadDer { id: String, reason: String },
    #[error("SVID {id}: the private key is not usable PKCS#8: {reason}")]
    BadKey { id: String, reason: String },
    #[error("SVID {id}: the private key does not belong to the certificate")]
    KeyMismatch { id: String },
    #[error("SVID {id} is invalid ({rule}): {source}", rule = .source.rule_name())]
    InvalidSvid { id: String, source: SvidError },
    #[error("SVID announced as {announced} carries the certificate of {actual}; refused")]
    IdMismatch {
        announced: SpiffeId,
        actual: SpiffeId,
    },
    #[error("bundle for {trust_domain:?} refused: {reason}")]
    BadBundle {
        trust_domain: String,
        reason: String,
    },
    #[error("the identity source stopped")]
    Stopped,
    #[error("workload {0} is not expected on this node")]
    NotExpected(WorkloadId),
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct SpireConfig {
    /// The agent's Workload API socket, e.g. `/run/spire/sockets/agent.sock`.
    pub socket: PathBuf,
    /// First reconnection delay.
    pub backoff_base: Duration,
    /// Longest reconnection delay.
    pub backoff_cap: Duration,
}

impl SpireConfig {
    /// Defaults: reconnect after 1 s, doubling up to 30 s.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// One SVID as last received and validated.
#[derive(Debug)]
struct Held {
    key: Arc<CertifiedKey>,
    /// The private key as SPIRE sent it, for [`SpireSource::export`].
    pkcs8: PrivatePkcs8KeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl Held {
    fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// An SVID the source holds, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidStatus {
    pub id: SpiffeId,
    /// Colon-separated hex.
    pub serial: String,
    pub not_after: SystemTime,
    /// Whether a workload expected on this node has this ID (only those are served).
    pub served: bool,
}

/// What the source knows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpireStatus {
    /// Both streams are established.
    pub connected: bool,
    pub svids: Vec<SvidStatus>,
    /// SVIDs or bundles of the last messages that were refused, with the reason.
    pub refused: Vec<SpireError>,
    /// The last connection or stream error; cleared when both streams are up again.
    pub last_error: Option<SpireError>,
}

#[derive(Default)]
struct State {
    svids: HashMap<SpiffeId, Arc<Held>>,
    expected: HashSet<SpiffeId>,
    svid_stream_up: bool,
    bundle_stream_up: bool,
    refused: Vec<SpireError>,
    last_error: Option<SpireError>,
    /// Trust domains this source installed in the bundle (so it can retract them).
    installed: BTreeSet<TrustDomain>,
}

struct Inner {
    bundle: SharedBundle,
    state: Mutex<State>,
    /// Bumped on every change of `state`, so callers can wait for conditions.
    version: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is updated with single assignments, so a poisoned lock still holds a
        // consistent value.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn modify<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let out = f(&mut self.lock());
        self.version.send_modify(|v| *v += 1);
        out
    }
}

/// Workload SVIDs and trust bundles from a SPIRE agent. Cheap to clone; the streams stop
/// when the last clone is dropped. Must be started within a Tokio runtime.
#[derive(Clone)]
pub struct SpireSource {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
}

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl fmt::Debug for SpireSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpireSource")
            .field("svids", &self.inner.lock().svids.len())
            .finish()
    }
}

impl SpireSource {
    /// Starts both Workload API streams. Bundles received replace the roots of their trust
    /// domains in `bundle`, so TLS verifiers sharing it follow root changes live.
    pub fn start(config: SpireConfig, bundle: SharedBundle) -> Self {
        let (version, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            bundle,
            state: Mutex::default(),
            version,
        });
        let svids = tokio::spawn(run_stream(
            config.clone(),
            Arc::downgrade(&inner),
            StreamKind::Svids,
        ));
        let bundles = tokio::spawn(run_stream(
            config,
            Arc::downgrade(&inner),
            StreamKind::Bundles,
        ));
        Self {
            inner,
            _tasks: Arc::new(Tasks(vec![svids, bundles])),
        }
    }

    /// Serves `workload`'s SVID from now on (when SPIRE issues one with exactly its ID).
    pub fn expect(&self, workload: &WorkloadId) {
        self.inner
            .modify(|s| s.expected.insert(workload.spiffe_id().clone()));
    }

    /// Stops serving `workload`. Returns whether it was expected.
    pub fn forget(&self, workload: &WorkloadId) -> bool {
        self.inner
            .modify(|s| s.expected.remove(workload.spiffe_id()))
    }

    /// The workload's SVID if it is expected here and valid now. Never waits.
    pub fn current(&self, workload: &WorkloadId) -> Option<Arc<CertifiedKey>> {
        let state = self.inner.lock();
        let id = workload.spiffe_id();
        if !state.expected.contains(id) {
            return None;
        }
        let held = state.svids.get(id)?;
        held.is_valid_at(SystemTime::now())
            .then(|| held.key.clone())
    }

    /// The workload's SVID, expecting it and waiting until SPIRE delivers one (callers
    /// bound the wait with a timeout).
    pub async fn certificate(
        &self,
        workload: &WorkloadId,
    ) -> Result<Arc<CertifiedKey>, SpireError> {
        self.expect(workload);
        let mut rx = self.inner.version.subscribe();
        loop {
            if let Some(key) = self.current(workload) {
                return Ok(key);
            }
            rx.changed().await.map_err(|_| SpireError::Stopped)?;
        }
    }

    /// A server certificate resolver for one workload: each handshake gets the current
    /// SVID, or none (the handshake fails) when there is no valid one.
    pub fn resolver(&self, workload: &WorkloadId) -> Arc<dyn ResolvesServerCert> {
        Arc::new(SpireResolver {
            source: Arc::downgrade(&self.inner),
            tasks: Arc::downgrade(&self._tasks),
            workload: workload.clone(),
        })
    }

    /// A snapshot of what the source holds.
    pub fn status(&self) -> SpireStatus {
        let state = self.inner.lock();
        let mut svids: Vec<SvidStatus> = state
            .svids
            .iter()
            .map(|(id, held)| SvidStatus {
                id: id.clone(),
                serial: held.serial.clone(),
                not_after: held.not_after,
                served: state.expected.contains(id),
            })
            .collect();
        svids.sort_by(|a, b| a.id.cmp(&b.id));
        SpireStatus {
            connected: state.svid_stream_up && state.bundle_stream_up,
            svids,
            refused: state.refused.clone(),
            last_error: state.last_error.clone(),
        }
    }

    /// A receiver that is notified on every change (SVIDs, bundles, connection state).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Every expected workload's valid SVID with its key, for a data path in another
    /// process.
    pub fn export(&self) -> Vec<zmesh_identity::ExportedCert> {
        let state = self.inner.lock();
        let now = SystemTime::now();
        let mut out: Vec<zmesh_identity::ExportedCert> = state
            .expected
            .iter()
            .filter_map(|id| {
                let held = state.svids.get(id).filter(|h| h.is_valid_at(now))?;
                Some(zmesh_identity::ExportedCert {
                    workload: WorkloadId::try_from(id.clone()).ok()?,
                    chain: held.key.cert.clone(),
                    key: held.pkcs8.clone_key(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.workload.cmp(&b.workload));
        out
    }
}

struct SpireResolver {
    source: Weak<Inner>,
    tasks: Weak<Tasks>,
    workload: WorkloadId,
}

impl fmt::Debug for SpireResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpireResolver")
            .field("workload", &self.workload)
            .finish()
    }
}

impl ResolvesServerCert for SpireResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let source = SpireSource {
            inner: self.source.upgrade()?,
            _tasks: self.tasks.upgrade()?,
        };
        source.current(&self.workload)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Svids,
    Bundles,
}

impl StreamKind {
    fn set_up(self, state: &mut State, up: bool) {
        match self {
            Self::Svids => state.svid_stream_up = up,
            Self::Bundles => state.bundle_stream_up = up,
        }
    }
}

/// The delay before reconnection attempt `failures` (1-based), jittered in [0.5, 1].
fn backoff(config: &SpireConfig, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let raw = config
        .backoff_base
        .checked_mul(1u32 << exp)
        .unwrap_or(config.backoff_cap);
    raw.min(config.backoff_cap).mul_f64(jitter.clamp(0.5, 1.0))
}

async fn run_stream(config: SpireConfig, inner: Weak<Inner>, kind: StreamKind) {
    let mut failures = 0u32;
    loop {
        let outcome = stream_once(&config, &inner, kind, &mut failures).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        failures += 1;
        let delay = backoff(&config, failures, rand::rng().random_range(0.5..=1.0));
        tracing::warn!(
            stream = ?kind,
            error = %outcome,
            retry_in = ?delay,
            "SPIFFE Workload API stream lost; keeping the last good SVIDs and bundles"
        );
        inner.modify(|s| {
            kind.set_up(s, false);
            s.last_error = Some(outcome);
        });
        drop(inner);
        tokio::time::sleep(delay).await;
    }
}

/// Runs one stream until it fails; returns why. Resets `failures` once a message arrived.
async fn stream_once(
    config: &SpireConfig,
    inner: &Weak<Inner>,
    kind: StreamKind,
    failures: &mut u32,
) -> SpireError {
    let channel = match connect(&config.socket).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut client = SpiffeWorkloadApiClient::new(channel);
    match kind {
        StreamKind::Svids => {
            let mut stream = match client.fetch_x509svid(request(X509svidRequest {})).await {
                Ok(r) => r.into_inner(),
                Err(status) => return rpc_error(&status),
            };
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        let Some(inner) = inner.upgrade() else {
                            return SpireError::Stopped;
                        };
                        *failures = 0;
                        apply_svids(&inner, msg);
                    }
                    Ok(None) => return SpireError::StreamEnded,
                    Err(status) => return rpc_error(&status),
                }
            }
        }
        StreamKind::Bundles => {
            let mut stream = match client
                .fetch_x509_bundles(request(X509BundlesRequest {}))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(status) => return rpc_error(&status),
            };
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        let Some(inner) = inner.upgrade() else {
                            return SpireError::Stopped;
                        };
                        *failures = 0;
                        apply_bundles(&inner, msg.bundles);
                    }
                    Ok(None) => return SpireError::StreamEnded,
                    Err(status) => return rpc_error(&status),
                }
            }
        }
    }
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

fn rpc_error(status: &tonic::Status) -> SpireError {
    SpireError::Rpc(format!("{:?}: {}", status.code(), status.message()))
}

async fn connect(path: &Path) -> Result<Channel, SpireError> {
    let err = |reason: String| SpireError::Connect {
        path: path.to_owned(),
        reason,
    };
    let socket = path.to_owned();
    // The URI is required by tonic but unused: the connector always dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| err(source_chain(&e)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Splits concatenated DER certificates (the Workload API's encoding of chains and bundles).
fn split_der(mut data: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = der_element_len(data)?;
        let (one, rest) = data.split_at(len);
        out.push(CertificateDer::from(one.to_vec()));
        data = rest;
    }
    if out.is_empty() {
        return Err("no certificate".into());
    }
    Ok(out)
}

/// Total length (header + content) of the DER SEQUENCE at the start of `data`.
fn der_element_len(data: &[u8]) -> Result<usize, String> {
    let (&tag, rest) = data.split_first().ok_or("truncated DER header")?;
    if tag != 0x30 {
        return Err(format!("expected a DER SEQUENCE, found tag {tag:#04x}"));
    }
    let (&first, rest) = rest.split_first().ok_or("truncated DER length")?;
    let (content_len, header_len) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("unsupported or truncated DER length".into());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let total = header_len
        .checked_add(content_len)
        .ok_or("DER length overflows")?;
    if total > data.len() {
        return Err(format!(
            "DER element claims {total} bytes, only {} left",
            data.len()
        ));
    }
    Ok(total)
}

fn trust_domain_of_key(key: &str) -> Result<TrustDomain, SpireError> {
    TrustDomain::new(key).map_err(|e| SpireError::BadBundle {
        trust_domain: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses bundles keyed by trust domain; refused ones are reported, not fatal.
fn parse_bundles(
    entries: impl IntoIterator<Item = (String, Vec<u8>)>,
    refused: &mut Vec<SpireError>,
) -> BTreeMap<TrustDomain, Vec<CertificateDer<'static>>> {
    let mut out = BTreeMap::new();
    for (key, der) in entries {
        let parsed = trust_domain_of_key(&key).and_then(|td| {
            let roots = split_der(&der).map_err(|reason| SpireError::BadBundle {
                trust_domain: key.clone(),
                reason,
            })?;
            // Check the roots now so that one bad bundle does not block the others.
            TrustBundle::new()
                .set_roots(&td, roots.iter().cloned())
                .map_err(|e: BundleError| SpireError::BadBundle {
                    trust_domain: key.clone(),
                    reason: e.to_string(),
                })?;
            Ok((td, roots))
        });
        match parsed {
            Ok((td, roots)) => {
                out.insert(td, roots);
            }
            Err(e) => refused.push(e),
        }
    }
    out
}

/// Installs `bundles` as the full set of trust domains this source provides.
fn install_bundles(
    inner: &Inner,
    bundles: &BTreeMap<TrustDomain, Vec<CertificateDer<'static>>>,
    retract_missing: bool,
) {
    let previously = inner.lock().installed.clone();
    let result = inner.bundle.update(|b| {
        for (td, roots) in bundles {
            b.set_roots(td, roots.iter().cloned())?;
        }
        if retract_missing {
            for td in previously.iter().filter(|td| !bundles.contains_key(*td)) {
                for (_, fp) in b.fingerprints().into_iter().filter(|(d, _)| d == td) {
                    b.remove_root(td, &fp);
                }
            }
        }
        Ok::<_, BundleError>(())
    });
    if let Err(e) = result {
        // parse_bundles checked every root already; only a bug gets here.
        tracing::error!(error = %e, "trust bundle update failed");
        return;
    }
    inner.modify(|s| {
        if retract_missing {
            s.installed = bundles.keys().cloned().collect();
        } else {
            s.installed.extend(bundles.keys().cloned());
        }
    });
}

fn apply_bundles(inner: &Inner, bundles: HashMap<String, Vec<u8>>) {
    let mut refused = Vec::new();
    let parsed = parse_bundles(bundles, &mut refused);
    for e in &refused {
        tracing::warn!(error = %e, "Workload API bundle refused");
    }
    // A message whose every bundle was refused must not wipe the trusted roots.
    let retract = refused.is_empty();
    install_bundles(inner, &parsed, retract);
    tracing::info!(
        trust_domains = parsed.len(),
        "trust bundles updated from SPIRE"
    );
    inner.modify(|s| {
        s.bundle_stream_up = true;
        if s.svid_stream_up {
            s.last_error = None;
        }
        s.refused
            .retain(|e| !matches!(e, SpireError::BadBundle { .. }));
        s.refused.extend(refused);
    });
}

fn apply_svids(inner: &Inner, msg: X509svidResponse) {
    let mut refused = Vec::new();
    // The roots the message brings: each SVID's own trust domain plus federated ones.
    let mut entries: Vec<(String, Vec<u8>)> = msg.federated_bundles.into_iter().collect();
    for s in &msg.svids {
        if let Ok(id) = SpiffeId::parse(&s.spiffe_id) {
            entries.push((id.trust_domain().id_string(), s.bundle.clone()));
        }
    }
    let bundles = parse_bundles(entries, &mut refused);
    let mut candidate = TrustBundle::clone(&inner.bundle.snapshot());
    for (td, roots) in &bundles {
        // Checked by parse_bundles.
        let _ = candidate.set_roots(td, roots.iter().cloned());
    }

    let now = SystemTime::now();
    let mut fresh: HashMap<SpiffeId, Arc<Held>> = HashMap::new();
    let mut announced: HashSet<SpiffeId> = HashSet::new();
    for s in msg.svids {
        let announced_id = match SpiffeId::parse(&s.spiffe_id) {
            Ok(id) => id,
            Err(source) => {
                refused.push(SpireError::BadSpiffeId {
                    announced: s.spiffe_id,
                    source,
                });
                continue;
            }
        };
        announced.insert(announced_id.clone());
        match validate_svid(
            &announced_id,
            &s.x509_svid,
            s.x509_svid_key,
            &candidate,
            now,
        ) {
            Ok(held) => {
                fresh.insert(announced_id, Arc::new(held));
            }
            Err(e) => refused.push(e),
        }
    }
    for e in &refused {
        tracing::warn!(error = %e, "Workload API SVID refused; not serving it");
    }
    install_bundles(inner, &bundles, false);
    inner.modify(|s| {
        for (id, held) in &fresh {
            let known = s.svids.get(id).is_some_and(|h| h.serial == held.serial);
            if !known {
                tracing::info!(
                    id = %id,
                    serial = %held.serial,
                    not_after = %svid::fmt_time(held.not_after),
                    served = s.expected.contains(id),
                    "SVID received from SPIRE"
                );
            }
            if !s.expected.contains(id) {
                tracing::warn!(id = %id, "SVID is not the identity of any workload on this node; not serving it");
            }
        }
        // Full state: identities no longer announced are gone; ones announced but refused
        // keep their last good SVID (until it expires).
        s.svids.retain(|id, _| announced.contains(id));
        s.svids.extend(fresh);
        s.svid_stream_up = true;
        if s.bundle_stream_up {
            s.last_error = None;
        }
        s.refused.retain(|e| matches!(e, SpireError::BadBundle { .. }));
        s.refused.extend(refused);
    });
}

fn validate_svid(
    announced: &SpiffeId,
    chain_der: &[u8],
    key_der: Vec<u8>,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<Held, SpireError> {
    let id = announced.to_string();
    let chain = split_der(chain_der).map_err(|reason| SpireError::BadDer {
        id: id.clone(),
        reason,
    })?;
    let verified =
        svid::verify_svid(&chain, bundle, now).map_err(|source| SpireError::InvalidSvid {
            id: id.clone(),
            source,
        })?;
    if &verified.id != announced {
        return Err(SpireError::IdMismatch {
            announced: announced.clone(),
            actual: verified.id,
        });
    }
    let info = svid::describe(&chain[0]).map_err(|source| SpireError::InvalidSvid {
        id: id.clone(),
        source,
    })?;
    let pkcs8 = PrivatePkcs8KeyDer::from(key_der);
    let private = PrivateKeyDer::Pkcs8(pkcs8.clone_key());
    let signing = zmesh_identity::tls::crypto_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| SpireError::BadKey {
            id: id.clone(),
            reason: e.to_string(),
        })?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match()
        .map_err(|_| SpireError::KeyMismatch { id: id.clone() })?;
    Ok(Held {
        key: Arc::new(key),
        pkcs8,
        not_before: info.not_before,
        not_after: verified.not_after,
        serial: info.serial,
    })
}

#[cfg(any(test, feature = "test-support"))]
pub mod test_server;

#[cfg(test)]
mod tests;
