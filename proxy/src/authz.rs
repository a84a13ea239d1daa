//! The authorization hook consulted for every inbound tunnel.

use zmesh_identity::SpiffeId;

use crate::workloads::Workload;

/// What is being asked: may `source` reach `destination` on `port`?
#[derive(Debug)]
pub struct AuthzRequest<'a> {
    /// The verified SPIFFE ID of the client (from its certificate).
    pub source: &'a SpiffeId,
    pub destination: &'a Workload,
    pub port: u16,
}

/// The answer; a denial names the policy that denied, for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String },
}

/// Decides whether an inbound tunnel may proceed (denied: HTTP 401).
pub trait Authorizer: Send + Sync + 'static {
    fn authorize(&self, request: &AuthzRequest<'_>) -> Decision;
}

/// Allows everything: identity is still enforced by mTLS.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _request: &AuthzRequest<'_>) -> Decision {
        Decision::Allow
    }
}
