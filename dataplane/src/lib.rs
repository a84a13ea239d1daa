//! What zmesh's eBPF redirection (`zmesh-redirect`), node proxy (`zmesh-proxy`) and node
//! agent agree on, in one place: the node proxy's well-known ports (Istio ambient's, so
//! ztunnel's tooling, probes and documentation apply unchanged) and how plaintext to
//! enrolled pods is treated.

/// Enrolled pods' outgoing connections are redirected here.
pub const OUTBOUND_PORT: u16 = 15001;
/// Plaintext from outside the mesh to enrolled pods (permissive mode) arrives here.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE: HTTP/2 CONNECT inside mutual TLS, between node proxies.
pub const HBONE_PORT: u16 = 15008;
/// Prometheus metrics (`/metrics`).
pub const METRICS_PORT: u16 = 15020;
/// Readiness (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// ztunnel's admin port: zmesh serves nothing there, but treats it as a proxy port so a
/// mixed zmesh/ztunnel node never tunnels or redirects to it.
pub const ZTUNNEL_ADMIN_PORT: u16 = 15000;

/// Every node proxy port: never a tunnel's destination, never redirected away from.
pub const PROXY_PORTS: [u16; 6] = [
    ZTUNNEL_ADMIN_PORT,
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    METRICS_PORT,
    READINESS_PORT,
];

/// What happens to plaintext TCP that reaches an enrolled pod from outside the mesh.
/// The eBPF programs enforce it in the kernel (per node and per pod), the proxy on its
/// plaintext listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Passed through to the pod, logged as unencrypted (migration friendly; the default,
    /// as Istio's PERMISSIVE).
    #[default]
    Permissive,
    /// Refused: the SYN is dropped and answered with a reset; only mTLS reaches the pods.
    Strict,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Permissive => "permissive",
            Mode::Strict => "strict",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_ports_are_distinct() {
        let mut ports = PROXY_PORTS.to_vec();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), PROXY_PORTS.len());
    }
}
