//! The authorization hook consulted for every inbound connection, HBONE or plaintext.

use std::net::IpAddr;

use tokio::sync::watch;
use zmesh_identity::SpiffeId;

use crate::policy::Verdict;
use crate::workloads::Workload;

/// What is being asked: may `source` (from `source_ip`) reach `destination` on `port`?
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The verified SPIFFE ID of the client (from its certificate); `None` for plaintext.
    pub source: Option<&'a SpiffeId>,
    /// The peer address of the connection as the proxy accepted it (never a header).
    pub source_ip: IpAddr,
    pub destination: &'a Workload,
    pub port: u16,
}

/// The answer; a denial names the policy that denied, for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String },
}

/// Decides whether an inbound connection may proceed (HBONE: denied is HTTP 401).
pub trait Authorizer: Send + Sync + 'static {
    fn authorize(&self, request: &AuthzRequest<'_>) -> Decision;

    /// The decision with the policy verdict behind it (for flow events). Authorizers
    /// without policies have no verdict to give.
    fn decide(&self, request: &AuthzRequest<'_>) -> (Decision, Option<Verdict>) {
        (self.authorize(request), None)
    }

    /// Ticks whenever the rules change, so that the proxy re-checks open connections.
    /// `None`: the rules never change.
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// Allows everything: identity is still enforced by mTLS.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _request: &AuthzRequest<'_>) -> Decision {
        Decision::Allow
    }
}
