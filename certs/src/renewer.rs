//! Keeps a node agent's client certificate fresh, so a node needs a join token only once:
//! the current certificate authenticates a `Renew` for a new key, at half of its lifetime,
//! and as soon as the CA signs with a new chain (a root rotation's switch), which moves the
//! node onto the new root before the old one is dropped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use zmesh_identity::{SpiffeId, TrustDomain};

use crate::client::{
    der_to_pem, split_chain, ClientCredential, ClientError, IstioCaClient, LeafSummary,
    NodeCredentials,
};
use crate::csr::new_key_and_csr;
use crate::node::NodeName;

/// First retry delay after a failed renewal; doubles up to `RETRY_CAP`.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(300);

/// Renews the node certificate stored in a directory written by [`crate::join`].
///
/// The [`IstioCaClient`] from [`NodeCredentialRenewer::client`] always presents the latest
/// certificate, so the node's workload certificate manager can share it.
pub struct NodeCredentialRenewer {
    client: IstioCaClient,
    dir: PathBuf,
    node: NodeName,
    node_id: SpiffeId,
    state: Mutex<State>,
    credentials: watch::Sender<NodeCredentials>,
    /// Serialises renewals (the loop and `renew` callers).
    renewing: tokio::sync::Mutex<()>,
}

struct State {
    not_after: SystemTime,
    renew_at: SystemTime,
    intermediate: Option<CertificateDer<'static>>,
}

impl std::fmt::Debug for NodeCredentialRenewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentialRenewer")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl NodeCredentialRenewer {
    /// Loads the credentials in `dir` (checking they are `node`'s, with a 0600 key that
    /// matches the certificate) and prepares a client for the CA at `ca_addr`.
    pub fn open(
        ca_addr: &str,
        dir: &Path,
        node: &NodeName,
        trust_domain: &TrustDomain,
    ) -> Result<Self, ClientError> {
        let credentials = NodeCredentials::load(dir)?;
        let node_id = node.spiffe_id(trust_domain);
        let leaf = credentials.leaf()?;
        if leaf.uris != [node_id.to_string()] {
            return Err(ClientError::WrongNode {
                expected: node_id.to_string(),
                found: leaf.uris.join(", "),
            });
        }
        let client = IstioCaClient::new(
            ca_addr,
            &credentials.roots_pem,
            ClientCredential::NodeCert(credentials.clone()),
        )?;
        Ok(Self {
            client,
            dir: dir.to_owned(),
            node: node.clone(),
            node_id,
            state: Mutex::new(State::of(&leaf, SystemTime::now())),
            credentials: watch::Sender::new(credentials),
            renewing: tokio::sync::Mutex::new(()),
        })
    }

    /// A client presenting the current node certificate (shared: it follows renewals).
    pub fn client(&self) -> IstioCaClient {
        self.client.clone()
    }

    /// The credentials in use.
    pub fn credentials(&self) -> NodeCredentials {
        self.credentials.borrow().clone()
    }

    /// Sees every renewal.
    pub fn subscribe(&self) -> watch::Receiver<NodeCredentials> {
        self.credentials.subscribe()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.lock_state().not_after
    }

    /// When the loop renews next (unless the CA's signing chain changes first).
    pub fn renew_at(&self) -> SystemTime {
        self.lock_state().renew_at
    }

    /// Renews now: a new key and CSR, authenticated by the current certificate. The new
    /// key (0600), certificate and bundle replace the files in the directory as one unit
    /// before the client starts presenting them. On failure nothing changes.
    pub async fn renew(&self) -> Result<NodeCredentials, ClientError> {
        let _one_at_a_time = self.renewing.lock().await;
        let (key_pem, csr_pem) = new_key_and_csr(&self.node_id)?;
        let chain = self.client.renew_raw(&csr_pem).await?;
        let split =
            split_chain(&chain, &self.node_id.to_string()).map_err(ClientError::Malformed)?;
        let credentials = NodeCredentials {
            cert_chain_pem: split.chain_pem.concat(),
            key_pem,
            roots_pem: split.roots.iter().map(|r| der_to_pem(r)).collect(),
        };
        credentials.check_key().map_err(ClientError::Malformed)?;
        let leaf = credentials.leaf()?;
        credentials.save(&self.dir)?;
        self.client.adopt_roots(&split.roots);
        self.client.set_node_credentials(&credentials)?;
        let state = State::of(&leaf, SystemTime::now());
        tracing::info!(
            node = %self.node,
            not_after = %fmt_time(state.not_after),
            renew_at = %fmt_time(state.renew_at),
            "node certificate renewed"
        );
        *self.lock_state() = state;
        self.credentials.send_replace(credentials.clone());
        Ok(credentials)
    }

    /// Renews at half of each certificate's lifetime, and at once when the CA is seen
    /// signing with another intermediate than the one that issued the node certificate.
    /// Failures are retried with jittered exponential backoff (1 s to 5 min) while the
    /// certificate is valid. Returns when `shutdown` completes, or with
    /// [`ClientError::NodeCertExpired`] when the certificate expired unrenewed (the node
    /// must join again).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), ClientError> {
        tokio::pin!(shutdown);
        let mut signing = self.client.watch_signing_intermediate();
        let mut failures: u32 = 0;
        loop {
            let due = match failures {
                0 => self.renew_at(),
                n => SystemTime::now() + retry_delay(n),
            };
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(wait) => {}
                changed = signing.changed() => {
                    let moved = changed.is_ok() && {
                        let seen = signing.borrow_and_update();
                        seen.is_some() && *seen != self.lock_state().intermediate
                    };
                    if !moved {
                        continue;
                    }
                    tracing::info!(
                        node = %self.node,
                        "the CA signs with a new chain; renewing the node certificate now"
                    );
                }
            }
            match self.renew().await {
                Ok(_) => failures = 0,
                Err(e) => {
                    let not_after = self.not_after();
                    if SystemTime::now() >= not_after {
                        tracing::error!(
                            node = %self.node,
                            error = %e,
                            "node certificate expired before it could be renewed"
                        );
                        return Err(ClientError::NodeCertExpired(fmt_time(not_after)));
                    }
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        node = %self.node,
                        error = %e,
                        failures,
                        "node certificate renewal failed; retrying"
                    );
                }
            }
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole, never left half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn of(leaf: &LeafSummary, obtained: SystemTime) -> Self {
        Self {
            not_after: leaf.not_after,
            renew_at: renew_time(leaf.not_before, leaf.not_after, obtained),
            intermediate: leaf.intermediate.clone(),
        }
    }
}

/// Half-way through the lifetime; if that had already passed when the certificate was
/// obtained (NotBefore is back-dated for clock skew, so a short-lived certificate would be
/// due on arrival; or it was loaded from disk late in its life), half-way through what was
/// left then. The same rule as the workload certificate manager's.
pub(crate) fn renew_time(
    not_before: SystemTime,
    not_after: SystemTime,
    obtained: SystemTime,
) -> SystemTime {
    let half_from =
        |from: SystemTime| from + not_after.duration_since(from).unwrap_or(Duration::ZERO) / 2;
    let usual = half_from(not_before);
    if usual > obtained {
        usual
    } else {
        half_from(obtained.min(not_after))
    }
}

/// Delay before retry `failures` (1-based), jittered to [50 %, 100 %] so that nodes
/// cut off together do not come back in lockstep.
fn retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = RETRY_BASE.saturating_mul(1 << exp).min(RETRY_CAP);
    let mut byte = [0u8; 1];
    // Without randomness the retry is merely not jittered.
    let _ = aws_lc_rs::rand::fill(&mut byte);
    full.mul_f64(0.5 + f64::from(byte[0]) / 510.0)
}

fn fmt_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_half_way_without_a_hot_loop_on_back_dated_certificates() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs;
        // 30 days, back-dated 60 s, obtained at issuance: half-way from NotBefore.
        let nb = t0 - s(60);
        let na = t0 + s(30 * 86400);
        assert_eq!(renew_time(nb, na, t0), t0 + s(15 * 86400 - 30));
        assert_eq!(renew_time(t0, na, t0), t0 + s(15 * 86400));
        // 4 s, back-dated 60 s: half-way through what is left, not "already due".
        assert_eq!(renew_time(nb, t0 + s(4), t0), t0 + s(2));
        // Loaded from disk late in its life: half of the rest.
        assert_eq!(renew_time(t0, t0 + s(100), t0 + s(90)), t0 + s(95));
        // Already expired: due now (at NotAfter, which is in the past).
        assert_eq!(renew_time(t0, t0 + s(100), t0 + s(200)), t0 + s(100));
    }

    #[test]
    fn retry_delays_double_and_stay_capped() {
        for (n, full) in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (1000, 300)] {
            let d = retry_delay(n);
            let full = Duration::from_secs(full);
            assert!(d >= full / 2 && d <= full, "retry {n}: {d:?}");
        }
    }
}
