//! Interoperability with the systems zmesh replaces or works beside:
//!
//! - [`spire`]: a SPIRE agent (SPIFFE Workload API) as the source of workload SVIDs and
//!   trust bundles, instead of the zmesh CA.
//! - [`zds`]: Istio's ZDS protocol, so that a stock ztunnel can be the node proxy.
//! - [`cilium`]: migration of Cilium mutual-auth network policies to Istio
//!   AuthorizationPolicies plus namespace enrollment.

pub mod cilium;
pub mod spire;
pub mod zds;

/// Generated protobuf code. Kept private: the public API speaks our own types.
mod pb {
    #![allow(clippy::all, clippy::pedantic)]

    /// SPIFFE Workload API (its proto has no package).
    pub mod workload {
        tonic::include_proto!("_");
    }

    pub mod zds {
        tonic::include_proto!("istio.workload.zds");
    }
}
