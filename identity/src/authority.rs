//! The interface between the node's certificate manager and whatever signs its CSRs
//! (the zmesh CA over Istio's gRPC API, a test CA, later SPIRE). Implementations live
//! outside this crate so that `identity` does not depend on gRPC.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::WorkloadId;

/// What a CA returns for one CSR, split the way TLS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedChain {
    /// PEM certificates: the leaf first, then intermediates (never the root).
    pub chain_pem: Vec<String>,
    /// PEM roots the CA says to trust (the whole bundle, so that nodes learn new roots
    /// during a root rotation).
    pub roots_pem: Vec<String>,
}

/// Why a CA did not issue. `Refused` is the CA's final word on this request (e.g. a gRPC
/// PermissionDenied); `Unavailable` is worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("the CA is unavailable: {0}")]
    Unavailable(String),
    #[error("the CA's answer is malformed: {0}")]
    Malformed(String),
}

pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IssuedChain, AuthorityError>> + Send + 'a>>;

/// Signs workload CSRs on behalf of a node.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Asks for a certificate for `identity` (the node requests on the workload's
    /// behalf, as Istio's `ImpersonatedIdentity`) with the requested lifetime.
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a WorkloadId,
        validity: Duration,
    ) -> SignFuture<'a>;
}
