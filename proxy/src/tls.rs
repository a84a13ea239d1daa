//! What the proxy needs from the identity layer, and the TLS settings ztunnel uses.
//!
//! The proxy never builds trust itself: a [`TlsCredentials`] hands it ready rustls configs
//! whose verifiers enforce the SPIFFE rules (server: client in our trust domain; client:
//! the destination's exact SPIFFE ID). The proxy only reads the verified peer identity.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{DnsName, ServerName};
use zmesh_identity::{SpiffeId, WorkloadId};

/// Why TLS could not be set up for a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// No valid certificate to present; `reason` says why (expired, never issued, and the
    /// last issuance error) where the source knows.
    #[error("no valid certificate for {workload}: {reason}")]
    NoCertificate { workload: String, reason: String },
    #[error("TLS configuration error: {0}")]
    Config(String),
}

/// Certificates and verifiers, per workload. Implementations pick up rotated certificates
/// on the next call, so each new connection uses the current leaf.
pub trait TlsCredentials: Send + Sync + 'static {
    /// The server config to present as `local` (the destination workload) on inbound HBONE:
    /// requires a client certificate from our trust domain, ALPN h2, TLS 1.3.
    fn server_config(&self, local: &WorkloadId) -> Result<Arc<ServerConfig>, TlsError>;

    /// The client config for `source` dialing a peer that must prove one of `expected`.
    fn client_config(
        &self,
        source: &WorkloadId,
        expected: &[SpiffeId],
    ) -> Result<Arc<ClientConfig>, TlsError>;

    /// Each workload certificate held, by SPIFFE ID, and when it expires (for the expiry
    /// metrics).
    fn expiries(&self) -> Vec<(String, SystemTime)> {
        Vec::new()
    }
}

pub use zmesh_identity::tls::ALPN_H2;

const SNI_SUFFIX: &str = ".hbone.zmesh.internal";

/// The SNI a zmesh client sends when it dials a node's explicit HBONE address instead of
/// the pod IP, so that the server knows which workload's certificate to present. Stock
/// ztunnel sends no SNI and always dials the pod IP, which needs no hint.
pub fn destination_sni(ip: IpAddr) -> ServerName<'static> {
    let label = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("ip4-{}-{}-{}-{}", o[0], o[1], o[2], o[3])
        }
        IpAddr::V6(v6) => format!("ip6-{:032x}", u128::from(v6)),
    };
    match DnsName::try_from(format!("{label}{SNI_SUFFIX}")) {
        Ok(name) => ServerName::DnsName(name),
        // Unreachable: the label is ASCII digits, letters and dashes.
        Err(_) => ServerName::IpAddress(ip.into()),
    }
}

/// Inverse of [`destination_sni`].
pub fn parse_destination_sni(sni: &str) -> Option<IpAddr> {
    let label = sni.strip_suffix(SNI_SUFFIX)?;
    if let Some(v4) = label.strip_prefix("ip4-") {
        let mut octets = [0u8; 4];
        let mut parts = v4.split('-');
        for o in &mut octets {
            *o = parts.next()?.parse().ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(IpAddr::from(octets))
    } else if let Some(v6) = label.strip_prefix("ip6-") {
        if v6.len() != 32 {
            return None;
        }
        u128::from_str_radix(v6, 16)
            .ok()
            .map(|n| IpAddr::V6(n.into()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips() {
        for ip in ["10.1.2.3", "fd00::1", "::1", "255.255.255.255"] {
            let ip: IpAddr = ip.parse().unwrap();
            let ServerName::DnsName(name) = destination_sni(ip) else {
                panic!("not a DNS name");
            };
            assert_eq!(parse_destination_sni(name.as_ref()), Some(ip));
        }
        assert_eq!(
            parse_destination_sni("ip4-1-2-3.hbone.zmesh.internal"),
            None
        );
        assert_eq!(
            parse_destination_sni("ip4-1-2-3-4-5.hbone.zmesh.internal"),
            None
        );
        assert_eq!(parse_destination_sni("ip4-1-2-3-4.example.com"), None);
        assert_eq!(parse_destination_sni("ip6-12.hbone.zmesh.internal"), None);
    }
}
