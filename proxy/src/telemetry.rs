//! Istio's standard TCP telemetry (`istio_tcp_*`), with Istio's labels, so that Kiali and
//! the dashboards written for Istio ambient (ztunnel) work unchanged on zmesh. The names,
//! labels and values are ztunnel's: one series per (reporter, source, destination,
//! security policy, response flags), `unknown` where a value is not known.
//!
//! Bytes follow Istio's definitions, for both reporters: `received` is what the client
//! (the side that opened the connection) sent, `sent` is what went back to it. They are
//! counted as they flow, so a long-lived connection shows up in rates while it runs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::workloads::Workload;

const UNKNOWN: &str = "unknown";

/// The labels of every `istio_tcp_*` series, named as Istio names them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
    /// Locality (ztunnel has them from istiod; zmesh does not know nodes' topology labels).
    source_region: &'static str,
    source_zone: &'static str,
    destination_region: &'static str,
    destination_zone: &'static str,
}

/// What one connection is known to be when it opens.
pub(crate) struct Connection<'a> {
    pub direction: Direction,
    pub source: Option<&'a Workload>,
    /// The source's SPIFFE ID, only when mTLS proved it (or, outbound, the local identity
    /// the tunnel presents).
    pub source_principal: Option<&'a str>,
    pub destination: Option<&'a Workload>,
    /// The Service the client addressed, `namespace/name`.
    pub service: Option<&'a str>,
    pub mutual_tls: bool,
    pub cluster_id: &'a str,
    pub cluster_domain: &'a str,
}

impl TcpLabels {
    pub(crate) fn new(c: &Connection<'_>) -> Self {
        let known = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_owned();
        let src = c.source;
        let dst = c.destination;
        let (service, service_namespace, service_name) =
            match c.service.and_then(|s| s.split_once('/')) {
                Some((ns, name)) => (
                    format!("{name}.{ns}.svc.{}", c.cluster_domain),
                    ns.to_owned(),
                    name.to_owned(),
                ),
                None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
            };
        let cluster = |w: Option<&Workload>| known(w.map(|_| c.cluster_id));
        Self {
            // The client's proxy reports as the source, the server's as the destination.
            reporter: match c.direction {
                Direction::Outbound => "source",
                Direction::Inbound | Direction::InboundPlaintext => "destination",
            },
            source_workload: known(src.map(|w| w.workload_name.as_str())),
            source_canonical_service: known(src.map(Workload::canonical_service)),
            source_canonical_revision: known(src.map(Workload::canonical_revision)),
            source_workload_namespace: known(src.map(|w| w.namespace.as_str())),
            source_principal: known(c.source_principal),
            source_app: known(src.map(Workload::canonical_service)),
            source_version: known(src.map(Workload::canonical_revision)),
            source_cluster: cluster(src),
            destination_service: service,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_workload: known(dst.map(|w| w.workload_name.as_str())),
            destination_canonical_service: known(dst.map(Workload::canonical_service)),
            destination_canonical_revision: known(dst.map(Workload::canonical_revision)),
            destination_workload_namespace: known(dst.map(|w| w.namespace.as_str())),
            destination_principal: dst.map_or_else(|| UNKNOWN.into(), |w| w.identity.to_string()),
            destination_app: known(dst.map(Workload::canonical_service)),
            destination_version: known(dst.map(Workload::canonical_revision)),
            destination_cluster: cluster(dst),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if c.mutual_tls { "mutual_tls" } else { UNKNOWN },
            source_region: UNKNOWN,
            source_zone: UNKNOWN,
            destination_region: UNKNOWN,
            destination_zone: UNKNOWN,
        }
    }

    /// The same series with the flags `outcome` gives it (how a closed connection is counted).
    fn closed_as(&self, outcome: Outcome) -> Self {
        Self {
            response_flags: response_flags(outcome),
            ..self.clone()
        }
    }
}

/// Istio's (Envoy's) response flags for how a connection ended, as ztunnel sets them.
fn response_flags(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok | Outcome::Passthrough => "-",
        Outcome::Denied | Outcome::PolicyChanged | Outcome::Status401 | Outcome::RefusedStrict => {
            "DENY"
        }
        // The client gave up, or the proxy was stopping: nothing failed on the way.
        Outcome::ClientReset | Outcome::DrainDeadline | Outcome::Cancelled => "-",
        _ => "CONNECT",
    }
}

/// The `istio_tcp_*` families.
#[derive(Debug, Default)]
pub(crate) struct IstioTcp {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
}

impl IstioTcp {
    /// Counts an opened connection; returns its (received, sent) byte counters.
    pub(crate) fn opened(&self, labels: &TcpLabels) -> (Counter, Counter) {
        self.opened.get_or_create(labels).inc();
        (
            self.received_bytes.get_or_create(labels).clone(),
            self.sent_bytes.get_or_create(labels).clone(),
        )
    }

    /// Counts a closed connection (opened earlier with `labels`).
    pub(crate) fn closed(&self, labels: &TcpLabels, outcome: Outcome) {
        let closed = labels.closed_as(outcome);
        self.closed.get_or_create(&closed).inc();
        // As ztunnel counts them: a refusal by policy is a failure to establish too.
        if closed.response_flags != "-" {
            self.failed.get_or_create(&closed).inc();
        }
    }

    /// Adds the families to `registry` (whose prefix should be `istio`).
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            self.failed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            self.received_bytes.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            self.sent_bytes.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use zmesh_identity::{TrustDomain, WorkloadId};

    fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: "web-5d8f-x1".into(),
            workload_name: "web".into(),
            namespace: ns.into(),
            service_account: "web-sa".into(),
            node: "n1".into(),
            ips: vec![],
            protocol: crate::Protocol::Hbone,
            identity: WorkloadId::new(&TrustDomain::default(), ns, "web-sa").unwrap(),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    fn connection<'a>(
        dst: Option<&'a Workload>,
        service: Option<&'a str>,
        mtls: bool,
    ) -> Connection<'a> {
        Connection {
            direction: Direction::InboundPlaintext,
            source: None,
            source_principal: None,
            destination: dst,
            service,
            mutual_tls: mtls,
            cluster_id: "c1",
            cluster_domain: "cluster.local",
        }
    }

    #[test]
    fn a_plaintext_client_outside_the_mesh_is_unknown() {
        let dst = workload("shop", &[]);
        let l = TcpLabels::new(&connection(Some(&dst), None, false));
        assert_eq!(l.reporter, "destination");
        assert_eq!(l.source_workload, "unknown");
        assert_eq!(l.source_principal, "unknown");
        assert_eq!(l.source_cluster, "unknown");
        assert_eq!(l.connection_security_policy, "unknown");
        assert_eq!(l.destination_service, "unknown");
        // Without labels: the workload's name and Istio's default revision.
        assert_eq!(l.destination_canonical_service, "web");
        assert_eq!(l.destination_canonical_revision, "latest");
        assert_eq!(
            l.destination_principal,
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );
        assert_eq!(l.destination_cluster, "c1");
    }

    #[test]
    fn services_are_named_by_hostname_and_labels_pick_the_canonical_names() {
        let dst = workload(
            "shop",
            &[
                ("app", "ignored"),
                ("app.kubernetes.io/name", "storefront"),
                ("app.kubernetes.io/version", "1.2"),
                ("version", "ignored"),
            ],
        );
        let l = TcpLabels::new(&connection(Some(&dst), Some("shop/web"), true));
        assert_eq!(l.destination_service, "web.shop.svc.cluster.local");
        assert_eq!(l.destination_service_namespace, "shop");
        assert_eq!(l.destination_service_name, "web");
        assert_eq!(l.destination_app, "storefront");
        assert_eq!(l.destination_version, "1.2");
        assert_eq!(l.connection_security_policy, "mutual_tls");
        let named = workload("shop", &[("service.istio.io/canonical-name", "sf")]);
        assert_eq!(named.canonical_service(), "sf");
    }

    #[test]
    fn outcomes_map_to_istio_response_flags() {
        assert_eq!(response_flags(Outcome::Ok), "-");
        assert_eq!(response_flags(Outcome::Passthrough), "-");
        assert_eq!(response_flags(Outcome::Denied), "DENY");
        assert_eq!(response_flags(Outcome::Status401), "DENY");
        assert_eq!(response_flags(Outcome::RefusedStrict), "DENY");
        assert_eq!(response_flags(Outcome::ConnectFailed), "CONNECT");
        assert_eq!(response_flags(Outcome::HboneConnectFailed), "CONNECT");
        assert_eq!(response_flags(Outcome::ClientReset), "-");
        // Every outcome has a flag Istio knows.
        for o in Outcome::ALL {
            assert!(["-", "DENY", "CONNECT"].contains(&response_flags(o)), "{o}");
        }
    }
}
