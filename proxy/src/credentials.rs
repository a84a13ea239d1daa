//! The production [`TlsCredentials`]: workload certificates held in memory (loaded from a
//! directory for `zmesh proxy --cert-dir`), verified with zmesh-identity's SVID verifiers.
//!
//! Directory layout: `roots.pem` (the trust bundle), and per workload
//! `<namespace>/<service-account>.pem` (leaf then intermediates) with
//! `<namespace>/<service-account>.key` (PKCS#8, mode 0600).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zmesh_identity::tls::FixedCert;
use zmesh_identity::{verify_svid, SharedBundle, SpiffeId, TrustBundle, TrustDomain, WorkloadId};

use crate::tls::{TlsCredentials, TlsError};

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} is readable by group or others (mode {mode:o}); run chmod 600 on it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: the certificate for {expected} carries identity {found}")]
    WrongIdentity {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("no workload certificates found in {0}")]
    Empty(PathBuf),
}

struct Entry {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// Certificates per workload plus one trust bundle.
pub struct StaticCredentials {
    trust_domain: TrustDomain,
    bundle: SharedBundle,
    certs: HashMap<WorkloadId, Entry>,
    server_configs: Mutex<HashMap<WorkloadId, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("trust_domain", &self.trust_domain)
            .field("workloads", &self.certs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl StaticCredentials {
    /// Checks each chain against `bundle` (it must be a valid SVID naming its workload)
    /// and that each key matches its certificate.
    pub fn new(
        trust_domain: TrustDomain,
        bundle: TrustBundle,
        certs: impl IntoIterator<
            Item = (
                WorkloadId,
                Vec<CertificateDer<'static>>,
                PrivateKeyDer<'static>,
            ),
        >,
    ) -> Result<Self, CredentialsError> {
        let (credentials, mut refused) = Self::new_partial(trust_domain, bundle, certs);
        match refused.is_empty() {
            true => Ok(credentials),
            false => Err(refused.swap_remove(0)),
        }
    }

    /// Like [`StaticCredentials::new`], but a chain that fails the checks is left out
    /// (and returned with the reason) instead of failing the whole set.
    pub fn new_partial(
        trust_domain: TrustDomain,
        bundle: TrustBundle,
        certs: impl IntoIterator<
            Item = (
                WorkloadId,
                Vec<CertificateDer<'static>>,
                PrivateKeyDer<'static>,
            ),
        >,
    ) -> (Self, Vec<CredentialsError>) {
        let mut map = HashMap::new();
        let mut refused = Vec::new();
        for (workload, chain, key) in certs {
            let where_ = PathBuf::from(workload.to_string());
            match certified(&workload, chain, key, &bundle, &where_) {
                Ok(entry) => {
                    map.insert(workload, entry);
                }
                Err(e) => refused.push(e),
            }
        }
        let credentials = Self {
            trust_domain,
            bundle: SharedBundle::new(bundle),
            certs: map,
            server_configs: Mutex::default(),
        };
        (credentials, refused)
    }

    /// Loads a certificate directory (see the module docs).
    pub fn load_dir(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, CredentialsError> {
        let roots_path = dir.join("roots.pem");
        let roots = read(&roots_path)?;
        let mut bundle = TrustBundle::new();
        bundle
            .add_pem(trust_domain, &roots)
            .map_err(|e| invalid(&roots_path, e))?;
        let mut certs = HashMap::new();
        for ns_entry in read_dir(dir)? {
            let ns_path = ns_entry.path();
            if !ns_path.is_dir() {
                continue;
            }
            let namespace = file_name(&ns_path)?;
            for file in read_dir(&ns_path)? {
                let cert_path = file.path();
                if cert_path.extension().and_then(|e| e.to_str()) != Some("pem") {
                    continue;
                }
                let sa = cert_path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .ok_or_else(|| invalid(&cert_path, "file name is not UTF-8"))?;
                let workload = WorkloadId::new(trust_domain, &namespace, sa)
                    .map_err(|e| invalid(&cert_path, e))?;
                let chain = CertificateDer::pem_slice_iter(&read(&cert_path)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid(&cert_path, e))?;
                let key_path = cert_path.with_extension("key");
                check_key_mode(&key_path)?;
                let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?)
                    .map_err(|e| invalid(&key_path, e))?;
                let entry = certified(&workload, chain, key, &bundle, &cert_path)?;
                certs.insert(workload, entry);
            }
        }
        if certs.is_empty() {
            return Err(CredentialsError::Empty(dir.to_owned()));
        }
        Ok(Self {
            trust_domain: trust_domain.clone(),
            bundle: SharedBundle::new(bundle),
            certs,
            server_configs: Mutex::default(),
        })
    }

    /// Workloads we hold certificates for.
    pub fn workloads(&self) -> impl Iterator<Item = &WorkloadId> {
        self.certs.keys()
    }

    fn key(&self, id: &WorkloadId) -> Result<Arc<CertifiedKey>, TlsError> {
        self.certs
            .get(id)
            .map(|e| e.key.clone())
            .ok_or_else(|| TlsError::NoCertificate {
                workload: id.to_string(),
                reason: "none held for it".into(),
            })
    }
}

impl TlsCredentials for StaticCredentials {
    fn server_config(&self, local: &WorkloadId) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cache = self
            .server_configs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(local) {
            return Ok(c.clone());
        }
        let config = zmesh_identity::tls::server_config(
            Arc::new(FixedCert(self.key(local)?)),
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
        let mut config = zmesh_identity::tls::client_config(
            self.key(source)?,
            self.bundle.clone(),
            expected.to_vec(),
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
        // Dialing by IP sends no SNI; dialing a node's explicit address sends the
        // destination hint (see tls::destination_sni).
        config.enable_sni = true;
        Ok(Arc::new(config))
    }

    fn expiries(&self) -> Vec<(String, SystemTime)> {
        self.certs
            .iter()
            .map(|(id, e)| (id.spiffe_id().to_string(), e.not_after))
            .collect()
    }
}

fn certified(
    workload: &WorkloadId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: &TrustBundle,
    path: &Path,
) -> Result<Entry, CredentialsError> {
    let svid = verify_svid(&chain, bundle, SystemTime::now()).map_err(|e| invalid(path, e))?;
    if &svid.id != workload.spiffe_id() {
        return Err(CredentialsError::WrongIdentity {
            path: path.to_owned(),
            expected: workload.to_string(),
            found: svid.id.to_string(),
        });
    }
    let provider = zmesh_identity::tls::crypto_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| invalid(path, e))?;
    Ok(Entry {
        key: Arc::new(key),
        not_after: svid.not_after,
    })
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> CredentialsError {
    CredentialsError::Invalid {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    std::fs::read(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_dir(path: &Path) -> Result<Vec<std::fs::DirEntry>, CredentialsError> {
    let err = |source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut entries = std::fs::read_dir(path)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

fn file_name(path: &Path) -> Result<String, CredentialsError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| invalid(path, "file name is not UTF-8"))
}

fn check_key_mode(path: &Path) -> Result<(), CredentialsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}
