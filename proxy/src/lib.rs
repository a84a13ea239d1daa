//! The zmesh node proxy: HBONE (HTTP/2 CONNECT inside mutual TLS) on :15008,
//! captured outbound traffic on :15001, plain TCP to local workloads on :15006,
//! metrics on :15020 and readiness on :15021. Wire-compatible with Istio's ztunnel.
//!
//! The pieces, as in ztunnel: [`workloads`] (who is where), [`tls`] (what the proxy needs
//! from the identity layer), `inbound`, `outbound`, `pool`, `plaintext`, and [`Proxy`]
//! which binds and runs them all until drained.

mod access;
mod admin;
mod authz;
mod balance;
mod clock;
pub mod connections;
mod copy;
mod credentials;
mod inbound;
mod keepalive;
mod limits;
mod linger;
mod outbound;
mod outcome;
mod plaintext;
mod pool;
mod proxy;
pub mod runtime;
mod telemetry;
mod tunnels;

pub mod flows;
pub mod hbone;
pub mod metrics;
pub mod policy;
pub mod services;
pub mod socket;
pub mod tls;
pub mod workloads;

pub use authz::{AllowAll, Authorizer, AuthzRequest, Decision};
pub use credentials::{CredentialsError, StaticCredentials};
pub use keepalive::Keepalive;
pub use metrics::{Direction, Metrics};
pub use outcome::Outcome;
pub use pool::PoolConfig;
pub use proxy::{
    Capture, DrainHandle, Limits, Proxy, ProxyAddrs, ProxyConfig, ProxyDeps, ProxyError,
};
pub use services::{Endpoint, Service, ServicePort, TargetPort};
pub use socket::{canonical, OriginalDst, SoOriginalDst, StaticOriginalDst, TcpKeepalive};
pub use tls::{TlsCredentials, TlsError};
pub use workloads::{Node, Protocol, TableError, Workload, WorkloadStore, WorkloadTable};
/// What happens to plaintext from outside the mesh (shared with the eBPF programs).
pub use zmesh_dataplane::Mode;

/// HTTP/2 settings, ztunnel's (hbone.md).
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONN_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MAX_FRAME: u32 = 1024 * 1024;
/// What one stream may queue in h2 before the connection task writes it to TLS (h2's
/// default is 400 KiB). Local only: the peer never sees it, so interop is unaffected.
pub(crate) const MAX_SEND_BUFFER: usize = 128 * 1024;

/// Ports that belong to the proxy and must never be tunnel targets.
pub use zmesh_dataplane::PROXY_PORTS;

/// A short, fixed label for why a TLS handshake failed (for metrics; never peer data).
pub(crate) fn handshake_reason(e: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        // zmesh-identity's verifiers name the SVID rule that failed.
        Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<zmesh_identity::SvidError>()
            .map_or("bad_certificate", |e| e.rule_name()),
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::AlertReceived(AlertDescription::CertificateRequired) => "no_certificate",
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied,
        ) => "peer_rejected_certificate",
        Error::AlertReceived(_) => "alert",
        Error::NoApplicationProtocol => "alpn",
        _ => "protocol",
    }
}
