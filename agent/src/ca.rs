//! The node's side of the zmesh CA: how the agent (and `zmesh proxy --ca`) authenticates
//! to it (a node credential from `zmesh ca join`, renewed here, or a projected Kubernetes
//! ServiceAccount token) and gets workload certificates from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use zmesh_certs::{ClientCredential, ClientError, IstioCaClient, NodeCredentialRenewer, NodeName};
use zmesh_identity::{CertManager, CertManagerConfig, SharedBundle, TrustBundle, TrustDomain};

/// Why the node cannot talk to the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot load node credentials from {dir} (run `zmesh ca join` first): {reason}")]
    Credentials { dir: PathBuf, reason: String },
    #[error("invalid CA bundle: {0}")]
    Bundle(String),
    #[error("node name {0:?} is invalid")]
    NodeName(String),
    #[error("CA token credential: {0}")]
    CaToken(#[from] CaTokenError),
}

/// How a node reaches the zmesh CA.
#[derive(Debug, Clone)]
pub struct CaSettings {
    pub node: String,
    pub trust_domain: TrustDomain,
    pub ca_addr: String,
    /// Node credential from `zmesh ca join` (renewed in the background).
    pub credentials_dir: PathBuf,
    /// Or a projected ServiceAccount token (no renewal of ours needed).
    pub ca_token: Option<CaTokenCredential>,
    pub cert_validity: Duration,
}

/// The node's renewal task of its own credential, and how to stop it.
pub type NodeRenewal = (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
);

/// Workload certificates from the zmesh CA, with the trust bundle it teaches us. The node
/// credential renews itself at half-life (and moves to a new root chain during a root
/// rotation), so a node never needs a second join token.
pub fn zmesh_ca_certificates(ca: &CaSettings) -> Result<ZmeshCaCertificates, CaError> {
    let node_name = NodeName::new(&ca.node).map_err(|_| CaError::NodeName(ca.node.clone()))?;
    let (client, roots_pem, renewal) = match &ca.ca_token {
        Some(token) => {
            let (client, roots_pem) = token.client(&ca.ca_addr)?;
            (client, roots_pem, None)
        }
        None => {
            let renewer = Arc::new(
                NodeCredentialRenewer::open(
                    &ca.ca_addr,
                    &ca.credentials_dir,
                    &node_name,
                    &ca.trust_domain,
                )
                .map_err(|e| CaError::Credentials {
                    dir: ca.credentials_dir.clone(),
                    reason: e.to_string(),
                })?,
            );
            let stop = tokio_util::sync::CancellationToken::new();
            let task = {
                let renewer = renewer.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = renewer.run(stop.cancelled_owned()).await {
                        tracing::error!("node credential renewal stopped: {e}");
                    }
                })
            };
            let roots_pem = renewer.credentials().roots_pem.clone();
            (renewer.client(), roots_pem, Some((stop, task)))
        }
    };
    let mut bundle = TrustBundle::new();
    bundle
        .add_pem(&ca.trust_domain, roots_pem.as_bytes())
        .map_err(|e| CaError::Bundle(e.to_string()))?;
    let bundle = SharedBundle::new(bundle);
    let certs = Arc::new(CertManager::new(
        Arc::new(client.clone()),
        bundle.clone(),
        CertManagerConfig {
            validity: ca.cert_validity,
            ..CertManagerConfig::default()
        },
    ));
    Ok(ZmeshCaCertificates {
        certs,
        bundle,
        renewal,
        client,
    })
}

/// What [`zmesh_ca_certificates`] sets up.
pub struct ZmeshCaCertificates {
    pub certs: Arc<CertManager>,
    /// The trust bundle, kept in step with the CA's roots.
    pub bundle: SharedBundle,
    /// The node credential's renewal (`None` with a ServiceAccount token).
    pub renewal: Option<NodeRenewal>,
    /// The CA client (its version, as the CA last named it).
    pub client: IstioCaClient,
}

/// The agent's credential towards the CA in Kubernetes: its projected ServiceAccount
/// token and the CA's roots.
#[derive(Debug, Clone)]
pub struct CaTokenCredential {
    /// The projected token (audience = the CA's `--token-audience`).
    pub token_file: PathBuf,
    /// PEM roots the CA's serving certificate chains to.
    pub ca_bundle: PathBuf,
}

/// Why the agent cannot use its token credential.
#[derive(Debug, thiserror::Error)]
pub enum CaTokenError {
    #[error("cannot read the CA bundle {path}: {source}", path = .path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl CaTokenCredential {
    /// A client for the CA at `ca_addr` presenting the token, and the roots it trusts
    /// (the workload trust bundle starts from them). Fails now if either file is unusable.
    pub fn client(&self, ca_addr: &str) -> Result<(IstioCaClient, String), CaTokenError> {
        let roots_pem =
            std::fs::read_to_string(&self.ca_bundle).map_err(|source| CaTokenError::Bundle {
                path: self.ca_bundle.clone(),
                source,
            })?;
        let client = IstioCaClient::new(
            ca_addr,
            &roots_pem,
            ClientCredential::BearerFile(self.token_file.clone()),
        )?;
        Ok((client, roots_pem))
    }
}
