//! Where workload certificates come from, and the proxy's TLS credentials on top of it.
//!
//! [`WorkloadCertificates`] is the one interface the agent, the proxy credentials and the
//! admin API use, whatever issues the certificates: the zmesh CA through identity's
//! [`CertManager`], or a SPIRE agent (see `crate::spire`). [`ManagedCredentials`] builds
//! rustls configs over it; every handshake uses the workload's current certificate, so
//! renewals and root rotations need no restart.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use zmesh_identity::{CertManager, ExportedCert, SharedBundle, SpiffeId, TrustDomain, WorkloadId};
use zmesh_proxy::{TlsCredentials, TlsError};

use crate::admin::CertInfo;

/// A boxed future, so that [`WorkloadCertificates`] stays object safe.
pub type RotateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<CertInfo, RotateError>> + Send + 'a>>;

/// Why a forced rotation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    #[error("this node holds no certificate for {0}")]
    NotManaged(WorkloadId),
    /// The certificates are issued and renewed by someone else (SPIRE, ztunnel).
    #[error("{0}")]
    NotOurs(String),
    #[error("renewal failed (the current certificate stays in use): {0}")]
    Failed(String),
}

/// The workload certificates of this node, from whichever source issues them.
pub trait WorkloadCertificates: Send + Sync + 'static {
    /// Starts keeping a certificate for `workload` (it was enrolled on this node).
    fn ensure(&self, workload: &WorkloadId);
    /// Stops keeping it (the workload left this node).
    fn forget(&self, workload: &WorkloadId);
    /// The certificate to present now, if one is valid. Never waits.
    fn current(&self, workload: &WorkloadId) -> Option<Arc<CertifiedKey>>;
    /// A resolver that picks the current certificate on every handshake.
    fn resolver(&self, workload: &WorkloadId) -> Arc<dyn ResolvesServerCert>;
    /// One entry per workload kept, sorted by workload (`zmesh certs status`).
    fn status(&self) -> Vec<CertInfo>;
    /// Whether [`WorkloadCertificates::rotate`] can work here; the error says why not.
    fn can_rotate(&self) -> Result<(), RotateError>;
    /// Renews `workload`'s certificate now (`zmesh certs rotate`).
    fn rotate<'a>(&'a self, workload: &'a WorkloadId) -> RotateFuture<'a>;
    /// Every valid certificate with its key, for a data path in another process
    /// (`zmesh datapath`); none where someone else holds them.
    fn export(&self) -> Vec<ExportedCert> {
        Vec::new()
    }
    /// Changes whenever what [`WorkloadCertificates::export`] returns may have changed;
    /// `None`: it never does.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

impl WorkloadCertificates for CertManager {
    fn ensure(&self, workload: &WorkloadId) {
        CertManager::ensure(self, workload);
    }

    fn forget(&self, workload: &WorkloadId) {
        CertManager::forget(self, workload);
    }

    fn current(&self, workload: &WorkloadId) -> Option<Arc<CertifiedKey>> {
        CertManager::current(self, workload)
    }

    fn resolver(&self, workload: &WorkloadId) -> Arc<dyn ResolvesServerCert> {
        CertManager::resolver(self, workload)
    }

    fn status(&self) -> Vec<CertInfo> {
        CertManager::status(self)
            .iter()
            .map(CertInfo::from)
            .collect()
    }

    fn can_rotate(&self) -> Result<(), RotateError> {
        Ok(())
    }

    fn rotate<'a>(&'a self, workload: &'a WorkloadId) -> RotateFuture<'a> {
        Box::pin(async move {
            match self.force_renew(workload).await {
                Ok(status) => Ok(CertInfo::from(&status)),
                Err(zmesh_identity::CertError::UnknownWorkload(id)) => {
                    Err(RotateError::NotManaged(id))
                }
                Err(e) => Err(RotateError::Failed(e.to_string())),
            }
        })
    }

    fn export(&self) -> Vec<ExportedCert> {
        CertManager::export(self)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(CertManager::changes(self))
    }
}

type ClientKey = (WorkloadId, Vec<SpiffeId>);
/// A client config and the source certificate it was built with.
type CachedClient = (Arc<CertifiedKey>, Arc<ClientConfig>);

/// The proxy's [`TlsCredentials`] over a [`WorkloadCertificates`] source and the trust
/// bundle that source keeps current.
pub struct ManagedCredentials {
    certs: Arc<dyn WorkloadCertificates>,
    bundle: SharedBundle,
    trust_domain: TrustDomain,
    server_configs: Mutex<HashMap<WorkloadId, Arc<ServerConfig>>>,
    /// Client configs are rebuilt only when the source's certificate changed.
    client_configs: Mutex<HashMap<ClientKey, CachedClient>>,
}

impl ManagedCredentials {
    /// `bundle` must be the one `certs` updates (the CA's roots, or SPIRE's bundles), so
    /// peers are verified against the roots the local certificates chain to.
    pub fn new(
        certs: Arc<dyn WorkloadCertificates>,
        bundle: SharedBundle,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            certs,
            bundle,
            trust_domain,
            server_configs: Mutex::default(),
            client_configs: Mutex::default(),
        }
    }

    /// Why `workload` has no valid certificate now, from its source's status.
    fn no_certificate(&self, workload: &WorkloadId) -> TlsError {
        let id = workload.to_string();
        let status = self.certs.status().into_iter().find(|c| c.workload == id);
        let reason = match status {
            None => "this node does not manage it (not enrolled here)".to_owned(),
            Some(c) => {
                let state = match c.not_after {
                    Some(t) => format!("expired at {}", fmt_epoch(t)),
                    None => "not issued yet".to_owned(),
                };
                match c.last_error {
                    Some(e) => format!(
                        "{state}; the last {} issuance attempt(s) failed: {e}",
                        c.consecutive_failures
                    ),
                    None => state,
                }
            }
        };
        TlsError::NoCertificate {
            workload: id,
            reason,
        }
    }

    /// Drops cached configs of a workload that left this node.
    pub fn forget(&self, workload: &WorkloadId) {
        lock(&self.server_configs).remove(workload);
        lock(&self.client_configs).retain(|(source, _), _| source != workload);
    }
}

fn fmt_epoch(seconds: u64) -> String {
    zmesh_identity::svid::fmt_time(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these caches inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsCredentials for ManagedCredentials {
    fn server_config(&self, local: &WorkloadId) -> Result<Arc<ServerConfig>, TlsError> {
        if self.certs.current(local).is_none() {
            return Err(self.no_certificate(local));
        }
        let mut cache = lock(&self.server_configs);
        if let Some(config) = cache.get(local) {
            return Ok(config.clone());
        }
        let config = zmesh_identity::tls::server_config(
            self.certs.resolver(local),
            self.bundle.clone(),
            self.trust_domain.clone(),
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = Arc::new(config);
        cache.insert(local.clone(), config.clone());
        Ok(config)
    }

    fn client_config(
        &self,
        source: &WorkloadId,
        expected: &[SpiffeId],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = self
            .certs
            .current(source)
            .ok_or_else(|| self.no_certificate(source))?;
        let cache_key = (source.clone(), expected.to_vec());
        let mut cache = lock(&self.client_configs);
        if let Some((cached_key, config)) = cache.get(&cache_key) {
            if Arc::ptr_eq(cached_key, &key) {
                return Ok(config.clone());
            }
        }
        let mut config =
            zmesh_identity::tls::client_config(key.clone(), self.bundle.clone(), expected.to_vec())
                .map_err(|e| TlsError::Config(e.to_string()))?;
        // Same-node destinations are dialed at the node's own address with an SNI hint.
        config.enable_sni = true;
        let config = Arc::new(config);
        cache.insert(cache_key, (key, config.clone()));
        Ok(config)
    }

    fn expiries(&self) -> Vec<(String, SystemTime)> {
        self.certs
            .status()
            .into_iter()
            .filter_map(|s| {
                let at = SystemTime::UNIX_EPOCH + Duration::from_secs(s.not_after?);
                Some((s.workload, at))
            })
            .collect()
    }
}
