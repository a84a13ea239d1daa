//! The node's workload certificate manager.
//!
//! One task per local workload keeps a fresh X.509-SVID: a new ECDSA P-256 key and CSR per
//! issuance (keys never touch disk; [`CertManager::export`] hands them to a data path in
//! another process of the node), renewal at half of the lifetime, jittered exponential
//! backoff on failure while the previous certificate stays in use until it expires. What the
//! CA returns is validated as an SVID of the requested identity before it is used, and the
//! CA's roots replace the node's roots for that trust domain (so root rotations are learned).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bundle::{BundleError, SharedBundle};
use crate::pem::{parse_certs, PemError};
use crate::svid::{self, SvidError};
use crate::{AuthorityError, CertificateAuthority, SpiffeId, WorkloadId};

/// Why a workload certificate could not be obtained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("workload {0} has no certificate managed on this node")]
    UnknownWorkload(WorkloadId),
    #[error("cannot build the key or CSR: {0}")]
    Csr(String),
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("the CA's answer is not PEM certificates: {0}")]
    Pem(PemError),
    #[error("the CA's roots were not accepted: {0}")]
    Roots(BundleError),
    #[error("the CA issued an invalid SVID ({rule}): {0}", rule = .0.rule_name())]
    InvalidSvid(SvidError),
    #[error("the CA issued a certificate for {got} instead of {requested}")]
    WrongIdentity { requested: SpiffeId, got: SpiffeId },
    #[error("the CA issued a certificate for a different key than the CSR's")]
    KeyMismatch,
    #[error("the certificate manager stopped managing this workload")]
    Stopped,
}

/// Tunables. Defaults are ztunnel's: 24 h certificates, retries from 1 s doubling to 150 s.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// Lifetime requested from the CA.
    pub validity: Duration,
    /// First retry delay after a failed issuance.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        Self {
            validity: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(150),
        }
    }
}

/// A certificate in use for one workload.
#[derive(Debug)]
pub(crate) struct IssuedCert {
    pub key: Arc<CertifiedKey>,
    /// The private key as issued, for [`CertManager::export`].
    pub pkcs8: Arc<PrivatePkcs8KeyDer<'static>>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the CA's answer arrived.
    pub obtained: SystemTime,
}

impl IssuedCert {
    /// Half of the lifetime, as ztunnel and Istio renew. If that moment had already
    /// passed when the certificate arrived (CAs back-date NotBefore for clock skew, zmesh
    /// by 60 s, so a short-lived certificate would be due on arrival: a hot loop), half of
    /// what was left on arrival instead.
    pub fn renew_at(&self) -> SystemTime {
        let half_from = |from: SystemTime| {
            from + self
                .not_after
                .duration_since(from)
                .unwrap_or(Duration::ZERO)
                / 2
        };
        let usual = half_from(self.not_before);
        if usual > self.obtained {
            usual
        } else {
            half_from(self.obtained.min(self.not_after))
        }
    }

    fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// One line of `zmesh certs status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    pub workload: WorkloadId,
    /// Serial of the certificate in use (colon-separated hex), if any.
    pub serial: Option<String>,
    pub not_after: Option<SystemTime>,
    /// When the next issuance attempt is due (renewal or retry).
    pub next_attempt: Option<SystemTime>,
    /// The error of the last attempt, cleared by a success.
    pub last_error: Option<CertError>,
    pub consecutive_failures: u32,
}

#[derive(Debug, Default, Clone)]
struct State {
    cert: Option<Arc<IssuedCert>>,
    next_attempt: Option<SystemTime>,
    last_error: Option<CertError>,
    failures: u32,
}

type RenewReply = oneshot::Sender<Result<CertStatus, CertError>>;

struct Slot {
    state: watch::Receiver<State>,
    renew: mpsc::Sender<RenewReply>,
    task: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Inner {
    ca: Arc<dyn CertificateAuthority>,
    bundle: SharedBundle,
    config: CertManagerConfig,
    slots: RwLock<HashMap<WorkloadId, Slot>>,
    /// Bumped whenever a certificate is issued or a workload is forgotten.
    changes: Arc<watch::Sender<u64>>,
}

/// A workload's certificate chain (leaf first) and its private key, as handed to a data
/// path that runs in another process.
#[derive(Debug)]
pub struct ExportedCert {
    pub workload: WorkloadId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

/// Keeps certificates for the workloads local to this node. Cheap to clone. Its tasks run
/// on the Tokio runtime that [`CertManager::ensure`] is called from, and stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("config", &self.inner.config)
            .field("workloads", &self.read_slots().len())
            .finish()
    }
}

impl CertManager {
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        bundle: SharedBundle,
        config: CertManagerConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                bundle,
                config,
                slots: RwLock::default(),
                changes: Arc::new(watch::channel(0).0),
            }),
        }
    }

    /// Starts keeping a certificate for `workload` (a prefetch: issuance starts now, not
    /// on the first connection). Idempotent. Must be called within a Tokio runtime.
    pub fn ensure(&self, workload: &WorkloadId) {
        if self.read_slots().contains_key(workload) {
            return;
        }
        let mut slots = self.write_slots();
        if slots.contains_key(workload) {
            return;
        }
        let (state_tx, state_rx) = watch::channel(State::default());
        let (renew_tx, renew_rx) = mpsc::channel(8);
        let renewer = Renewer {
            ca: self.inner.ca.clone(),
            bundle: self.inner.bundle.clone(),
            config: self.inner.config.clone(),
            workload: workload.clone(),
            state: state_tx,
            changes: self.inner.changes.clone(),
        };
        let task = tokio::spawn(renewer.run(renew_rx));
        slots.insert(
            workload.clone(),
            Slot {
                state: state_rx,
                renew: renew_tx,
                task,
            },
        );
    }

    /// Stops renewing for `workload` and drops its key. Returns whether it was managed.
    pub fn forget(&self, workload: &WorkloadId) -> bool {
        let forgotten = self.write_slots().remove(workload).is_some();
        if forgotten {
            self.inner.changes.send_modify(|n| *n += 1);
        }
        forgotten
    }

    /// Changes whenever a certificate was issued or a workload forgotten.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Every valid certificate held now with its key, for a data path in another process.
    pub fn export(&self) -> Vec<ExportedCert> {
        let now = SystemTime::now();
        let mut out: Vec<ExportedCert> = self
            .read_slots()
            .iter()
            .filter_map(|(workload, slot)| {
                let state = slot.state.borrow();
                let cert = state.cert.as_ref().filter(|c| c.is_valid_at(now))?;
                Some(ExportedCert {
                    workload: workload.clone(),
                    chain: cert.key.cert.clone(),
                    key: cert.pkcs8.clone_key(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.workload.cmp(&b.workload));
        out
    }

    /// The workload's certificate if one is valid now. Never waits for the CA.
    pub fn current(&self, workload: &WorkloadId) -> Option<Arc<CertifiedKey>> {
        let slots = self.read_slots();
        let state = slots.get(workload)?.state.borrow();
        let cert = state.cert.as_ref()?;
        cert.is_valid_at(SystemTime::now())
            .then(|| cert.key.clone())
    }

    /// The workload's certificate, starting management and waiting for the first issuance
    /// if needed. Fails with the last error when no valid certificate exists and the last
    /// attempt failed (callers bound the wait with a timeout).
    pub async fn certificate(&self, workload: &WorkloadId) -> Result<Arc<CertifiedKey>, CertError> {
        self.ensure(workload);
        let mut rx = self
            .read_slots()
            .get(workload)
            .map(|s| s.state.clone())
            .ok_or_else(|| CertError::UnknownWorkload(workload.clone()))?;
        loop {
            {
                let state = rx.borrow_and_update();
                if let Some(cert) = state.cert.as_ref() {
                    if cert.is_valid_at(SystemTime::now()) {
                        return Ok(cert.key.clone());
                    }
                }
                if let Some(err) = &state.last_error {
                    return Err(err.clone());
                }
            }
            rx.changed().await.map_err(|_| CertError::Stopped)?;
        }
    }

    /// Issues a new certificate now (for `zmesh certs rotate`) and reports the outcome.
    /// On failure the current certificate stays in use.
    pub async fn force_renew(&self, workload: &WorkloadId) -> Result<CertStatus, CertError> {
        let renew = self
            .read_slots()
            .get(workload)
            .map(|s| s.renew.clone())
            .ok_or_else(|| CertError::UnknownWorkload(workload.clone()))?;
        let (tx, rx) = oneshot::channel();
        renew.send(tx).await.map_err(|_| CertError::Stopped)?;
        rx.await.map_err(|_| CertError::Stopped)?
    }

    /// Every managed workload's certificate state, sorted by workload.
    pub fn status(&self) -> Vec<CertStatus> {
        let mut out: Vec<CertStatus> = self
            .read_slots()
            .iter()
            .map(|(w, slot)| status_of(w, &slot.state.borrow()))
            .collect();
        out.sort_by(|a, b| a.workload.cmp(&b.workload));
        out
    }

    /// A server certificate resolver for one workload: each handshake gets the current
    /// certificate, or none (the handshake fails) when there is no valid one.
    pub fn resolver(&self, workload: &WorkloadId) -> Arc<dyn ResolvesServerCert> {
        Arc::new(WorkloadResolver {
            manager: Arc::downgrade(&self.inner),
            workload: workload.clone(),
        })
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, HashMap<WorkloadId, Slot>> {
        // Poisoning means a panic elsewhere while holding the lock; the map itself is
        // always consistent (single inserts/removes), so keep serving.
        self.inner.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_slots(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<WorkloadId, Slot>> {
        self.inner.slots.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn status_of(workload: &WorkloadId, state: &State) -> CertStatus {
    CertStatus {
        workload: workload.clone(),
        serial: state.cert.as_ref().map(|c| c.serial.clone()),
        not_after: state.cert.as_ref().map(|c| c.not_after),
        next_attempt: state.next_attempt,
        last_error: state.last_error.clone(),
        consecutive_failures: state.failures,
    }
}

struct WorkloadResolver {
    manager: Weak<Inner>,
    workload: WorkloadId,
}

impl fmt::Debug for WorkloadResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadResolver")
            .field("workload", &self.workload)
            .finish()
    }
}

impl ResolvesServerCert for WorkloadResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let inner = self.manager.upgrade()?;
        CertManager { inner }.current(&self.workload)
    }
}

/// The delay before retry number `failures` (1-based): base * 2^(failures-1), capped,
/// then scaled by `jitter` in [0.5, 1] so that nodes do not retry in lockstep.
pub(crate) fn backoff(config: &CertManagerConfig, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let raw = config
        .backoff_base
        .checked_mul(1u32 << exp)
        .unwrap_or(config.backoff_cap);
    raw.min(config.backoff_cap).mul_f64(jitter.clamp(0.5, 1.0))
}

/// The per-workload task.
struct Renewer {
    ca: Arc<dyn CertificateAuthority>,
    bundle: SharedBundle,
    config: CertManagerConfig,
    changes: Arc<watch::Sender<u64>>,
    workload: WorkloadId,
    state: watch::Sender<State>,
}

impl Renewer {
    async fn run(self, mut renew: mpsc::Receiver<RenewReply>) {
        let mut next = Instant::now();
        loop {
            let reply = tokio::select! {
                _ = tokio::time::sleep_until(next) => None,
                cmd = renew.recv() => match cmd {
                    Some(reply) => Some(reply),
                    None => return,
                },
            };
            let outcome = self.issue().await;
            let delay = match &outcome {
                Ok(cert) => {
                    tracing::info!(
                        workload = %self.workload,
                        serial = %cert.serial,
                        not_after = %svid::fmt_time(cert.not_after),
                        "workload certificate issued"
                    );
                    cert.renew_at()
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                }
                Err(e) => {
                    let failures = self.state.borrow().failures + 1;
                    let jitter = rand::rng().random_range(0.5..=1.0);
                    let delay = backoff(&self.config, failures, jitter);
                    tracing::warn!(
                        workload = %self.workload,
                        error = %e,
                        failures,
                        retry_in = ?delay,
                        "workload certificate issuance failed; keeping the current one"
                    );
                    delay
                }
            };
            next = Instant::now() + delay;
            // Report the renewal time itself (not now + delay) so status shows the schedule.
            let next_wall = match &outcome {
                Ok(cert) => cert.renew_at().max(SystemTime::now()),
                Err(_) => SystemTime::now() + delay,
            };
            self.state.send_modify(|s| {
                match &outcome {
                    Ok(cert) => {
                        s.cert = Some(cert.clone());
                        s.last_error = None;
                        s.failures = 0;
                    }
                    Err(e) => {
                        s.last_error = Some(e.clone());
                        s.failures += 1;
                    }
                }
                s.next_attempt = Some(next_wall);
            });
            if outcome.is_ok() {
                self.changes.send_modify(|n| *n += 1);
            }
            if let Some(reply) = reply {
                let answer = outcome.map(|_| status_of(&self.workload, &self.state.borrow()));
                // The caller may have given up waiting; nothing to do then.
                let _ = reply.send(answer);
            }
        }
    }

    async fn issue(&self) -> Result<Arc<IssuedCert>, CertError> {
        let (key, csr_pem) = self.make_csr()?;
        let issued = self
            .ca
            .sign(&csr_pem, &self.workload, self.config.validity)
            .await?;
        let chain = pem_list(&issued.chain_pem)?;
        let roots = pem_list(&issued.roots_pem)?;
        let td = self.workload.trust_domain();

        // Judge the answer against the roots it will install (or the current ones).
        let mut candidate = (*self.bundle.snapshot()).clone();
        if !roots.is_empty() {
            candidate
                .set_roots(td, roots.iter().cloned())
                .map_err(CertError::Roots)?;
        }
        let verified = svid::verify_svid(&chain, &candidate, SystemTime::now())
            .map_err(CertError::InvalidSvid)?;
        if &verified.id != self.workload.spiffe_id() {
            return Err(CertError::WrongIdentity {
                requested: self.workload.spiffe_id().clone(),
                got: verified.id,
            });
        }
        let info = svid::describe(&chain[0]).map_err(CertError::InvalidSvid)?;
        let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
        let private = PrivateKeyDer::Pkcs8(pkcs8.clone_key());
        let signing_key = crate::tls::crypto_provider()
            .key_provider
            .load_private_key(private)
            .map_err(|e| CertError::Csr(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|_| CertError::KeyMismatch)?;

        if !roots.is_empty() {
            self.bundle
                .update(|b| b.set_roots(td, roots))
                .map_err(CertError::Roots)?;
        }
        Ok(Arc::new(IssuedCert {
            key: Arc::new(certified),
            pkcs8: Arc::new(pkcs8),
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            obtained: SystemTime::now(),
        }))
    }

    /// A fresh P-256 key and a PKCS#10 CSR with an empty subject and the workload's ID as
    /// the only (critical) URI SAN.
    fn make_csr(&self) -> Result<(KeyPair, String), CertError> {
        let csr_err = |e: rcgen::Error| CertError::Csr(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(self.workload.to_string()).map_err(csr_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(csr_err)?;
        let pem = csr.pem().map_err(csr_err)?;
        Ok((key, pem))
    }
}

fn pem_list(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut out = Vec::new();
    for pem in pems {
        out.extend(parse_certs(pem.as_bytes()).map_err(CertError::Pem)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let config = CertManagerConfig::default();
        let full = |n| backoff(&config, n, 1.0);
        assert_eq!(full(1), Duration::from_secs(1));
        assert_eq!(full(2), Duration::from_secs(2));
        assert_eq!(full(3), Duration::from_secs(4));
        assert_eq!(full(8), Duration::from_secs(128));
        assert_eq!(full(9), Duration::from_secs(150));
        assert_eq!(full(1000), Duration::from_secs(150));
        assert_eq!(backoff(&config, 1, 0.5), Duration::from_millis(500));
        // Out-of-range jitter is clamped, never zero or above the cap.
        assert_eq!(backoff(&config, 1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(&config, 20, 7.0), Duration::from_secs(150));
    }

    #[test]
    fn renews_at_half_life() {
        let ck = dummy_key();
        let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let cert = IssuedCert {
            key: ck.clone(),
            pkcs8: Arc::new(PrivatePkcs8KeyDer::from(vec![1, 2, 3])),
            serial: "01".into(),
            not_before,
            not_after: not_before + Duration::from_secs(100),
            obtained: not_before,
        };
        assert_eq!(cert.renew_at(), not_before + Duration::from_secs(50));
        // Back-dated by 60 s and valid for 10 s more: due in 5 s, not at once.
        let arrived = not_before + Duration::from_secs(60);
        let short = IssuedCert {
            key: ck,
            pkcs8: Arc::new(PrivatePkcs8KeyDer::from(vec![1, 2, 3])),
            serial: "02".into(),
            not_before,
            not_after: arrived + Duration::from_secs(10),
            obtained: arrived,
        };
        assert_eq!(short.renew_at(), arrived + Duration::from_secs(5));
        assert!(cert.is_valid_at(not_before));
        assert!(!cert.is_valid_at(not_before + Duration::from_secs(101)));
    }

    fn dummy_key() -> Arc<CertifiedKey> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = crate::tls::crypto_provider()
            .key_provider
            .load_private_key(private)
            .unwrap();
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(vec![0u8])],
            signing,
        ))
    }
}
