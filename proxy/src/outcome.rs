//! How a connection through the proxy ended: one [`Outcome`] per connection, which
//! decides its `result` label (metrics and access log) and its flow verdict and reason.

use std::fmt;

use crate::flows::FlowVerdict;

/// How a connection ended. Each variant's label, flow verdict and flow reason are fixed
/// in one place, [`Outcome::parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// An HBONE tunnel ran until both directions ended.
    Ok,
    /// Plain TCP to a destination outside the mesh (outbound), or from a source outside
    /// it (plaintext inbound, permissive mode), ran until both directions ended.
    Passthrough,
    /// An authorization policy refused the connection.
    Denied,
    /// An open connection was closed because a policy change now denies it.
    PolicyChanged,
    /// Plaintext to a local workload refused in strict mode.
    RefusedStrict,
    /// The destination's proxy answered the CONNECT with 400.
    Status400,
    /// The destination's proxy answered the CONNECT with 401: its policy denied it.
    Status401,
    /// The destination's proxy answered the CONNECT with 403.
    Status403,
    /// The destination's proxy answered the CONNECT with 503.
    Status503,
    /// The destination's proxy answered the CONNECT with another non-200 status.
    StatusOther,
    /// The captured connection's original destination could not be read.
    NoOriginalDst,
    /// The connection was addressed to one of the proxy's own listeners.
    Loop,
    /// An outbound connection from an IP that is no workload of this node.
    UnknownSource,
    /// The destination is no workload of this node.
    UnknownDestination,
    /// The destination port belongs to the proxy.
    ProxyPort,
    /// No endpoint of the Service serves the port: outbound to a VIP (the client's
    /// connection is reset), or inbound to a service hostname with no endpoint on this
    /// node (503). The flow names the service.
    NoEndpoints,
    /// An HBONE `:authority` named a Service by hostname that the table does not hold.
    UnknownService,
    /// The HBONE CONNECT request was malformed or named a destination it may not.
    BadRequest,
    /// No HBONE (TLS + HTTP/2) connection to the destination's node.
    HboneConnectFailed,
    /// The HBONE stream could not be opened or its CONNECT got no answer.
    HboneStreamFailed,
    /// The TCP connection to the destination failed or timed out.
    ConnectFailed,
    /// The HBONE client reset the stream before the tunnel was answered.
    ClientReset,
    /// A bug (an invariant did not hold).
    InternalError,
    /// The tunnel failed after it was established (reset, I/O error).
    Error,
    /// Still open when the drain deadline passed: the proxy closed it.
    DrainDeadline,
    /// Its task was dropped before the connection finished, the drain deadline aside
    /// (a panic, or the runtime shutting down).
    Cancelled,
}

impl Outcome {
    /// Every outcome, for tests and documentation.
    pub const ALL: [Outcome; 26] = [
        Outcome::Ok,
        Outcome::Passthrough,
        Outcome::Denied,
        Outcome::PolicyChanged,
        Outcome::RefusedStrict,
        Outcome::Status400,
        Outcome::Status401,
        Outcome::Status403,
        Outcome::Status503,
        Outcome::StatusOther,
        Outcome::NoOriginalDst,
        Outcome::Loop,
        Outcome::UnknownSource,
        Outcome::UnknownDestination,
        Outcome::ProxyPort,
        Outcome::NoEndpoints,
        Outcome::UnknownService,
        Outcome::BadRequest,
        Outcome::HboneConnectFailed,
        Outcome::HboneStreamFailed,
        Outcome::ConnectFailed,
        Outcome::ClientReset,
        Outcome::InternalError,
        Outcome::Error,
        Outcome::DrainDeadline,
        Outcome::Cancelled,
    ];

    /// The `result` label (metrics, access log), the flow verdict, and the flow reason.
    fn parts(self) -> (&'static str, FlowVerdict, Option<&'static str>) {
        use FlowVerdict::{Denied, Dropped, Error, Forwarded};
        // Failures give their label as the reason.
        let error = |label| (label, Error, Some(label));
        match self {
            Outcome::Ok => ("ok", Forwarded, None),
            Outcome::Passthrough => ("passthrough", Forwarded, None),
            Outcome::Denied => ("denied", Denied, None),
            Outcome::PolicyChanged => ("policy_changed", Denied, Some("policy changed")),
            Outcome::RefusedStrict => ("refused_strict", Dropped, Some("plaintext_strict")),
            Outcome::Status401 => (
                "status_401",
                Denied,
                Some("denied by the destination's policy"),
            ),
            Outcome::Status400 => error("status_400"),
            Outcome::Status403 => error("status_403"),
            Outcome::Status503 => error("status_503"),
            Outcome::StatusOther => error("status_other"),
            Outcome::NoOriginalDst => error("no_original_dst"),
            Outcome::Loop => error("loop"),
            Outcome::UnknownSource => error("unknown_source"),
            Outcome::UnknownDestination => error("unknown_destination"),
            Outcome::ProxyPort => error("proxy_port"),
            Outcome::NoEndpoints => error("no_endpoints"),
            Outcome::UnknownService => error("unknown_service"),
            Outcome::BadRequest => error("bad_request"),
            Outcome::HboneConnectFailed => error("hbone_connect_failed"),
            Outcome::HboneStreamFailed => error("hbone_stream_failed"),
            Outcome::ConnectFailed => error("connect_failed"),
            Outcome::ClientReset => error("client_reset"),
            Outcome::InternalError => error("internal_error"),
            Outcome::Error => error("error"),
            Outcome::DrainDeadline => error("drain_deadline"),
            Outcome::Cancelled => error("cancelled"),
        }
    }

    /// The `result` label of `zmesh_connections_closed_total` and of the access log.
    pub fn label(self) -> &'static str {
        self.parts().0
    }

    /// The verdict of the connection's flow event.
    pub fn verdict(self) -> FlowVerdict {
        self.parts().1
    }

    /// The reason of the connection's flow event (unless a policy verdict explains it).
    pub fn reason(self) -> Option<&'static str> {
        self.parts().2
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn labels_are_unique_and_unchanged() {
        let labels: HashSet<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(
            labels.len(),
            Outcome::ALL.len(),
            "two outcomes share a label"
        );
        // The labels users see in metrics and access logs.
        let expected = [
            "ok",
            "passthrough",
            "denied",
            "policy_changed",
            "refused_strict",
            "status_400",
            "status_401",
            "status_403",
            "status_503",
            "status_other",
            "no_original_dst",
            "loop",
            "unknown_source",
            "unknown_destination",
            "proxy_port",
            "no_endpoints",
            "unknown_service",
            "bad_request",
            "hbone_connect_failed",
            "hbone_stream_failed",
            "connect_failed",
            "client_reset",
            "internal_error",
            "error",
            "drain_deadline",
            "cancelled",
        ];
        assert_eq!(labels, expected.into_iter().collect());
        assert_eq!(Outcome::Status401.to_string(), "status_401");
    }

    #[test]
    fn verdicts_and_reasons() {
        use FlowVerdict::*;
        let cases = [
            (Outcome::Ok, Forwarded, None),
            (Outcome::Passthrough, Forwarded, None),
            (Outcome::Denied, Denied, None),
            (
                Outcome::Status401,
                Denied,
                Some("denied by the destination's policy"),
            ),
            (Outcome::PolicyChanged, Denied, Some("policy changed")),
            (Outcome::RefusedStrict, Dropped, Some("plaintext_strict")),
            (Outcome::ConnectFailed, Error, Some("connect_failed")),
            (Outcome::NoEndpoints, Error, Some("no_endpoints")),
            (Outcome::UnknownService, Error, Some("unknown_service")),
            (Outcome::DrainDeadline, Error, Some("drain_deadline")),
            (Outcome::Cancelled, Error, Some("cancelled")),
        ];
        for (outcome, verdict, reason) in cases {
            assert_eq!(outcome.verdict(), verdict, "{outcome}");
            assert_eq!(outcome.reason(), reason, "{outcome}");
        }
        // Every failure explains itself.
        for o in Outcome::ALL {
            if o.verdict() == Error {
                assert_eq!(o.reason(), Some(o.label()), "{o}");
            }
        }
    }
}
