//! Workload identities: SPIFFE IDs, X.509-SVID validation, trust bundles, TLS verifiers
//! and the node's certificate manager.

mod spiffe_id;

pub use spiffe_id::{
    SpiffeId, SpiffeIdError, TrustDomain, WorkloadId, DEFAULT_TRUST_DOMAIN, MAX_SPIFFE_ID_LEN,
};

mod authority;

pub use authority::{AuthorityError, CertificateAuthority, IssuedChain, SignFuture};

pub mod bundle;
pub mod pem;
pub mod svid;
pub mod tls;

pub use bundle::{Fingerprint, SharedBundle, TrustBundle};
pub use svid::{lint_chain, verify_svid, SvidError, VerifiedSvid};
pub mod manager;

pub use manager::{CertError, CertManager, CertManagerConfig, CertStatus, ExportedCert};
