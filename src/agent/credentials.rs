//! The proxy's TLS credentials backed by the node's certificate manager: every handshake
//! uses the workload's current certificate, so renewals and root rotations need no restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use zmesh_identity::{CertManager, SharedBundle, SpiffeId, TrustDomain, WorkloadId};
use zmesh_proxy::{TlsCredentials, TlsError};

type ClientKey = (WorkloadId, Vec<SpiffeId>);
/// A client config and the source certificate it was built with.
type CachedClient = (Arc<CertifiedKey>, Arc<ClientConfig>);

pub struct ManagedCredentials {
    certs: Arc<CertManager>,
    bundle: SharedBundle,
    trust_domain: TrustDomain,
    server_configs: Mutex<HashMap<WorkloadId, Arc<ServerConfig>>>,
    /// Client configs are rebuilt only when the source's certificate changed.
    client_configs: Mutex<HashMap<ClientKey, CachedClient>>,
}

impl ManagedCredentials {
    pub fn new(certs: Arc<CertManager>, bundle: SharedBundle, trust_domain: TrustDomain) -> Self {
        Self {
            certs,
            bundle,
            trust_domain,
            server_configs: Mutex::default(),
            client_configs: Mutex::default(),
        }
    }

    /// Drops cached configs of a workload that left this node.
    pub fn forget(&self, workload: &WorkloadId) {
        lock(&self.server_configs).remove(workload);
        lock(&self.client_configs).retain(|(source, _), _| source != workload);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these caches inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsCredentials for ManagedCredentials {
    fn server_config(&self, local: &WorkloadId) -> Result<Arc<ServerConfig>, TlsError> {
        if self.certs.current(local).is_none() {
            return Err(TlsError::NoCertificate(local.to_string()));
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
            .ok_or_else(|| TlsError::NoCertificate(source.to_string()))?;
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

    fn earliest_expiry(&self) -> Option<SystemTime> {
        self.certs.status().iter().filter_map(|s| s.not_after).min()
    }
}
