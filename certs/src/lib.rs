//! The zmesh CA: a root and intermediate in a private state directory, leaf issuance for
//! checked CSRs over Istio's CA gRPC API, node enrolment with one-time join tokens,
//! caller authentication and placement checks, an audit log, and staged root rotation.
//! Also the node side: `IstioCaClient`, `join`, and `NodeCredentialRenewer`.

mod audit;
mod authority;
mod bearer_cache;
mod client;
mod csr;
mod error;
mod files;
mod node;
mod policy;
mod renewer;
mod server;
mod store;

pub mod pb {
    //! Generated protobuf and gRPC code.
    pub mod istio {
        tonic::include_proto!("istio.v1.auth");
    }
    pub mod zmesh {
        tonic::include_proto!("zmesh.ca.v1");
    }
}

pub use audit::{AuditRecord, AuthMethod};
pub use authority::{Authority, Issued, LeafKind, Phase, Policy, CLOCK_SKEW};
pub use bearer_cache::CachedBearer;
pub use client::{join, ClientCredential, ClientError, IstioCaClient, NodeCredentials};
pub use csr::{new_key_and_csr, verify_csr, VerifiedCsr};
pub use error::{CsrError, NodeNameError, StoreError, TokenError};
pub use node::NodeName;
pub use policy::{
    BearerError, BearerFuture, BearerValidator, FilePlacement, SourceError, StaticTokens,
    WorkloadPlacement,
};
pub use renewer::NodeCredentialRenewer;
pub use server::{
    CaServer, ServerError, ServerOptions, CLUSTER_ID_HEADER, DEFAULT_CA_PORT, DEFAULT_CLUSTER_ID,
    IMPERSONATED_IDENTITY,
};
pub use store::{CaStore, InitOptions, LeafRecord, RootInfo, RotationStep, Status};
