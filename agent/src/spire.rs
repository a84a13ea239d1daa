//! SPIRE as the agent's identity source (`zmesh agent --identity-source spire`): workload
//! SVIDs and trust bundles come from the SPIRE agent's Workload API (compat's
//! [`SpireSource`]) instead of the zmesh CA.
//!
//! The Workload API hands a caller only the SVIDs registered for that caller, so SPIRE
//! must have a registration entry whose SPIFFE ID is each workload's
//! `spiffe://<td>/ns/<ns>/sa/<sa>` and whose selectors match the zmesh agent. SPIRE renews
//! SVIDs itself; zmesh serves each one it pushes and cannot force a renewal.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use zmesh_compat::spire::{SpireConfig, SpireError, SpireSource};
use zmesh_identity::{SharedBundle, SpiffeId, WorkloadId};

use crate::admin::{epoch_seconds, CertInfo};
use crate::credentials::{RotateError, RotateFuture, WorkloadCertificates};

/// What `zmesh certs rotate` answers when SPIRE issues the certificates.
pub const ROTATE_REFUSAL: &str = "workload certificates on this node come from SPIRE, which \
renews them itself (by default at half of their lifetime); zmesh serves each SVID as SPIRE \
pushes it and cannot force a renewal. Check SPIRE's registration entries and agent logs instead.";

/// Workload certificates from a SPIRE agent, for the workloads enrolled on this node.
pub struct SpireCertificates {
    source: SpireSource,
    /// Workloads enrolled here, including those SPIRE has no SVID for (yet).
    expected: Mutex<BTreeSet<WorkloadId>>,
}

impl SpireCertificates {
    /// Connects to the Workload API at `socket` (reconnecting as needed); the bundles it
    /// receives replace their trust domains' roots in `bundle`.
    pub fn start(socket: impl Into<PathBuf>, bundle: SharedBundle) -> Self {
        Self::new(SpireSource::start(SpireConfig::new(socket), bundle))
    }

    pub fn new(source: SpireSource) -> Self {
        Self {
            source,
            expected: Mutex::default(),
        }
    }

    /// The underlying source (its own status has the refused SVIDs and bundles).
    pub fn source(&self) -> &SpireSource {
        &self.source
    }

    fn expected(&self) -> std::sync::MutexGuard<'_, BTreeSet<WorkloadId>> {
        // Single inserts and removes: a poisoned set is still consistent.
        self.expected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `error` is about the SVID announced as `id`.
fn concerns(error: &SpireError, id: &SpiffeId) -> bool {
    let id_string = id.to_string();
    match error {
        SpireError::BadDer { id: i, .. }
        | SpireError::BadKey { id: i, .. }
        | SpireError::KeyMismatch { id: i }
        | SpireError::InvalidSvid { id: i, .. } => *i == id_string,
        SpireError::BadSpiffeId { announced, .. } => *announced == id_string,
        SpireError::IdMismatch { announced, .. } => announced == id,
        _ => false,
    }
}

impl WorkloadCertificates for SpireCertificates {
    fn ensure(&self, workload: &WorkloadId) {
        self.expected().insert(workload.clone());
        self.source.expect(workload);
    }

    fn forget(&self, workload: &WorkloadId) {
        self.expected().remove(workload);
        self.source.forget(workload);
    }

    fn current(&self, workload: &WorkloadId) -> Option<Arc<CertifiedKey>> {
        self.source.current(workload)
    }

    fn resolver(&self, workload: &WorkloadId) -> Arc<dyn ResolvesServerCert> {
        self.source.resolver(workload)
    }

    fn status(&self) -> Vec<CertInfo> {
        let status = self.source.status();
        let now = SystemTime::now();
        self.expected()
            .iter()
            .map(|workload| {
                let id = workload.spiffe_id();
                let held = status.svids.iter().find(|s| &s.id == id);
                let refused = status.refused.iter().find(|e| concerns(e, id));
                let last_error = match (held, refused) {
                    (_, Some(e)) => Some(format!("SPIRE's latest SVID was refused: {e}")),
                    (Some(s), None) if s.not_after < now => Some(
                        "the SVID from SPIRE has expired and SPIRE has not pushed a new one"
                            .to_owned(),
                    ),
                    (Some(_), None) => None,
                    (None, None) => {
                        let hint = format!(
                            "SPIRE issued no SVID for {id}: it needs a registration entry with \
                             this SPIFFE ID whose selectors match the zmesh agent"
                        );
                        Some(match &status.last_error {
                            Some(e) => format!("{hint} ({e})"),
                            None => hint,
                        })
                    }
                };
                CertInfo {
                    workload: workload.to_string(),
                    serial: held.map(|s| s.serial.clone()),
                    not_after: held.map(|s| epoch_seconds(s.not_after)),
                    // SPIRE decides when to renew.
                    next_attempt: None,
                    consecutive_failures: 0,
                    last_error,
                }
            })
            .collect()
    }

    fn can_rotate(&self) -> Result<(), RotateError> {
        Err(RotateError::NotOurs(ROTATE_REFUSAL.to_owned()))
    }

    fn rotate<'a>(&'a self, workload: &'a WorkloadId) -> RotateFuture<'a> {
        let result = if self.expected().contains(workload) {
            Err(RotateError::NotOurs(ROTATE_REFUSAL.to_owned()))
        } else {
            Err(RotateError::NotManaged(workload.clone()))
        };
        Box::pin(std::future::ready(result))
    }

    fn export(&self) -> Vec<zmesh_identity::ExportedCert> {
        let expected = self.expected().clone();
        self.source
            .export()
            .into_iter()
            .filter(|cert| expected.contains(&cert.workload))
            .collect()
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.source.changes())
    }
}
