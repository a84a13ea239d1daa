//! What the agent and a data path in another process (`zmesh datapath`) say to each other
//! over the data path's unix socket: length-prefixed JSON messages, one connection per
//! agent.
//!
//! The agent speaks first ([`ToDataPath::Hello`]: the proxy it wants and where the eBPF
//! pins are), then sends whole snapshots whenever they change: the workload table, the
//! authorization policies and the workload certificates with their keys. The data path
//! answers the hello and then requests: for its open connections, and for its flow
//! events (the history a query asks for, then live ones while the agent follows). The
//! data path's hub is the node's: the agent hands it the eBPF drop reports it reads. Flow
//! events cross to the agent only when asked for: a node nobody observes pays nothing for
//! them here. Nothing here is incremental, so an agent that starts over (a crash, an
//! upgrade) brings the data path in step by sending what it has.
//!
//! The socket is the trust boundary: it carries private keys, so it is created 0600 in a
//! root-owned directory, and messages are never logged.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zmesh_identity::{ExportedCert, TrustBundle, TrustDomain, WorkloadId};
use zmesh_proxy::connections::OpenConnection;
use zmesh_proxy::flows::FlowEvent;
use zmesh_proxy::policy::PolicySet;
use zmesh_proxy::{ProxyConfig, WorkloadTable};

use crate::flows_api::FlowQuery;

/// Bumped on any incompatible change; both sides refuse another version.
pub const PROTOCOL_VERSION: u32 = 2;

/// The largest message either side accepts (a table of many thousand workloads fits).
pub const MAX_MESSAGE: usize = 64 << 20;

/// From the agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToDataPath {
    /// The first message of every connection.
    Hello {
        protocol: u32,
        agent_version: String,
        /// The proxy the agent wants; a data path serving another one starts this one on
        /// the same listening sockets and drains the old.
        config: Box<ProxyConfig>,
        /// The eBPF pins, for original destinations (`None`: no redirection).
        pin_dir: Option<PathBuf>,
    },
    Workloads(Arc<WorkloadTable>),
    Policies(Arc<PolicySet>),
    Credentials(Credentials),
    /// Asks for [`FromDataPath::Connections`].
    Connections,
    /// Asks for the flow events `query` selects, as [`FromDataPath::Flow`]s tagged `id`:
    /// the retained history it asks for and, with `follow`, live events until
    /// [`ToDataPath::StopFlows`]; without `follow`, [`FromDataPath::FlowsEnd`] after the
    /// history.
    Flows {
        id: u64,
        query: Box<FlowQuery>,
    },
    /// Ends the flow request `id` (its reader went away); unknown ids are ignored.
    StopFlows {
        id: u64,
    },
    /// A flow event the agent saw (the eBPF programs' drop reports), for the data path's
    /// history and its `/metrics` (`zmesh_flow_drops_total`), which serve the node.
    Flow(Box<FlowEvent>),
}

/// From the data path.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FromDataPath {
    /// The hello was accepted: the proxy runs as asked.
    Welcome {
        protocol: u32,
        version: String,
        pid: u32,
        /// How many proxies this process has started (1 for the first; more after
        /// configuration changes).
        generation: u64,
    },
    /// The hello was not accepted; the connection closes after this.
    Refused {
        reason: String,
    },
    /// One event for the flow request `id`.
    Flow {
        id: u64,
        event: Box<FlowEvent>,
    },
    /// The flow request `id` has all it gets.
    FlowsEnd {
        id: u64,
    },
    Connections(Vec<OpenConnection>),
}

/// The trust bundle and every workload certificate with its key, PEM encoded.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub trust_domain: TrustDomain,
    /// Roots per trust domain.
    pub roots: Vec<(TrustDomain, String)>,
    pub certs: Vec<WorkloadCredential>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("trust_domain", &self.trust_domain)
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadCredential {
    pub workload: WorkloadId,
    /// Leaf first.
    pub chain_pem: String,
    pub key_pem: String,
}

/// Why a credentials message cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the roots of {trust_domain}: {reason}")]
    Roots {
        trust_domain: TrustDomain,
        reason: String,
    },
    #[error("the certificate of {workload}: {reason}")]
    Cert {
        workload: WorkloadId,
        reason: String,
    },
}

impl Credentials {
    pub fn new(trust_domain: TrustDomain, bundle: &TrustBundle, certs: Vec<ExportedCert>) -> Self {
        let roots = bundle
            .trust_domains()
            .map(|td| (td.clone(), pem_certs(&bundle.roots(td))))
            .collect();
        let certs = certs
            .into_iter()
            .map(|cert| WorkloadCredential {
                workload: cert.workload,
                chain_pem: pem_certs(&cert.chain),
                key_pem: pem::encode(&pem::Pem::new(
                    "PRIVATE KEY",
                    cert.key.secret_pkcs8_der().to_vec(),
                )),
            })
            .collect();
        Self {
            trust_domain,
            roots,
            certs,
        }
    }

    /// The bundle these roots make.
    pub fn bundle(&self) -> Result<TrustBundle, CredentialsError> {
        let mut bundle = TrustBundle::new();
        for (td, pem) in &self.roots {
            bundle
                .add_pem(td, pem.as_bytes())
                .map_err(|e| CredentialsError::Roots {
                    trust_domain: td.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(bundle)
    }

    /// Each certificate with its key, or why it cannot be read.
    #[allow(clippy::type_complexity)]
    pub fn certs(
        &self,
    ) -> impl Iterator<
        Item = Result<
            (
                WorkloadId,
                Vec<CertificateDer<'static>>,
                PrivateKeyDer<'static>,
            ),
            CredentialsError,
        >,
    > + '_ {
        self.certs.iter().map(|c| {
            let bad = |reason: String| CredentialsError::Cert {
                workload: c.workload.clone(),
                reason,
            };
            let chain = CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("chain: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
                .map_err(|e| bad(format!("key: {e}")))?;
            Ok((c.workload.clone(), chain, key))
        })
    }
}

fn pem_certs(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the other side closed the connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("a malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Writes one message: a 4-byte big-endian length, then JSON.
pub async fn write_message<W, M>(writer: &mut W, message: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Serialize,
{
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_MESSAGE {
        return Err(FrameError::TooLarge(body.len()));
    }
    writer.write_all(&(body.len() as u32).to_be_bytes()).await?;
    writer.write_all(&body).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one message; [`FrameError::Closed`] at a clean end of stream.
pub async fn read_message<R, M>(reader: &mut R) -> Result<M, FrameError>
where
    R: AsyncRead + Unpin,
    M: for<'de> Deserialize<'de>,
{
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip_and_bad_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_message(&mut a, &ToDataPath::Connections)
            .await
            .unwrap();
        let got: ToDataPath = read_message(&mut b).await.unwrap();
        assert!(matches!(got, ToDataPath::Connections));

        // A length over the limit is refused before anything is allocated.
        a.write_all(&(MAX_MESSAGE as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let err = read_message::<_, ToDataPath>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let junk = br#"{"launch_missiles":true}"#;
        a.write_all(&(junk.len() as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(junk).await.unwrap();
        let err = read_message::<_, ToDataPath>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        drop(a);
        let err = read_message::<_, ToDataPath>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
    }
}
