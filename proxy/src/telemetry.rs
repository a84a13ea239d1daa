//! Istio's standard TCP telemetry (`istio_tcp_*`), with Istio's labels, so that Kiali and
//! the dashboards written for Istio ambient (ztunnel) work unchanged on zmesh. The names,
//! labels and values are ztunnel's: one series per (reporter, source, destination,
//! security policy, response flags), `unknown` where a value is not known.
//!
//! Bytes follow Istio's definitions, for both reporters: `received` is what the client
//! (the side that opened the connection) sent, `sent` is what went back to it. They are
//! counted as they flow, so a long-lived connection shows up in rates while it runs.
//!
//! A connection looks its series up once, when it opens ([`IstioTcp::opened`]), and keeps
//! them ([`TcpSeries`]): closing it or moving its bytes looks nothing up. The series are
//! ztunnel's five families, exported by one collector.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock};

use hashbrown::HashTable;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::workloads::Workload;

const UNKNOWN: &str = "unknown";

/// The labels of every `istio_tcp_*` series, named as Istio names them. A connection's
/// labels borrow from its workloads (`TcpLabels<'_>`): the series it belongs to is looked
/// up with them as they are, and only a new series owns a copy (`TcpLabels<'static>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TcpLabels<'a> {
    reporter: &'static str,
    source_workload: Cow<'a, str>,
    source_canonical_service: Cow<'a, str>,
    source_canonical_revision: Cow<'a, str>,
    source_workload_namespace: Cow<'a, str>,
    source_principal: Cow<'a, str>,
    source_app: Cow<'a, str>,
    source_version: Cow<'a, str>,
    source_cluster: Cow<'a, str>,
    destination_service: Cow<'a, str>,
    destination_service_namespace: Cow<'a, str>,
    destination_service_name: Cow<'a, str>,
    destination_workload: Cow<'a, str>,
    destination_canonical_service: Cow<'a, str>,
    destination_canonical_revision: Cow<'a, str>,
    destination_workload_namespace: Cow<'a, str>,
    destination_principal: Cow<'a, str>,
    destination_app: Cow<'a, str>,
    destination_version: Cow<'a, str>,
    destination_cluster: Cow<'a, str>,
    request_protocol: &'static str,
    connection_security_policy: &'static str,
    /// Locality (ztunnel has them from istiod; zmesh does not know nodes' topology labels).
    source_region: &'static str,
    source_zone: &'static str,
    destination_region: &'static str,
    destination_zone: &'static str,
}

impl EncodeLabelSet for TcpLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let labels: [(&str, &str); 26] = [
            ("reporter", self.reporter),
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_service", &self.destination_service),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &self.destination_workload),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_cluster", &self.destination_cluster),
            ("request_protocol", self.request_protocol),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
            ("source_region", self.source_region),
            ("source_zone", self.source_zone),
            ("destination_region", self.destination_region),
            ("destination_zone", self.destination_zone),
        ];
        labels.encode(encoder)
    }
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

impl<'a> TcpLabels<'a> {
    pub(crate) fn new(c: &Connection<'a>) -> Self {
        let known = |v: Option<&'a str>| Cow::Borrowed(v.unwrap_or(UNKNOWN));
        let src = c.source;
        let dst = c.destination;
        let (service, service_namespace, service_name) =
            match c.service.and_then(|s| s.split_once('/')) {
                Some((ns, name)) => (
                    Cow::Owned(format!("{name}.{ns}.svc.{}", c.cluster_domain)),
                    Cow::Borrowed(ns),
                    Cow::Borrowed(name),
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
            destination_principal: known(dst.map(|w| w.identity.spiffe_id().as_str())),
            destination_app: known(dst.map(Workload::canonical_service)),
            destination_version: known(dst.map(Workload::canonical_revision)),
            destination_cluster: cluster(dst),
            request_protocol: "tcp",
            connection_security_policy: if c.mutual_tls { "mutual_tls" } else { UNKNOWN },
            source_region: UNKNOWN,
            source_zone: UNKNOWN,
            destination_region: UNKNOWN,
            destination_zone: UNKNOWN,
        }
    }

    /// The same labels, owning their values (for a new series).
    fn into_owned(self) -> TcpLabels<'static> {
        let own = |v: Cow<'a, str>| Cow::Owned(v.into_owned());
        TcpLabels {
            reporter: self.reporter,
            source_workload: own(self.source_workload),
            source_canonical_service: own(self.source_canonical_service),
            source_canonical_revision: own(self.source_canonical_revision),
            source_workload_namespace: own(self.source_workload_namespace),
            source_principal: own(self.source_principal),
            source_app: own(self.source_app),
            source_version: own(self.source_version),
            source_cluster: own(self.source_cluster),
            destination_service: own(self.destination_service),
            destination_service_namespace: own(self.destination_service_namespace),
            destination_service_name: own(self.destination_service_name),
            destination_workload: own(self.destination_workload),
            destination_canonical_service: own(self.destination_canonical_service),
            destination_canonical_revision: own(self.destination_canonical_revision),
            destination_workload_namespace: own(self.destination_workload_namespace),
            destination_principal: own(self.destination_principal),
            destination_app: own(self.destination_app),
            destination_version: own(self.destination_version),
            destination_cluster: own(self.destination_cluster),
            request_protocol: self.request_protocol,
            connection_security_policy: self.connection_security_policy,
            source_region: self.source_region,
            source_zone: self.source_zone,
            destination_region: self.destination_region,
            destination_zone: self.destination_zone,
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

/// The response flags a series may carry, in [`TcpSeries`]' order.
const FLAGS: [&str; 3] = ["-", "DENY", "CONNECT"];

fn flag_index(outcome: Outcome) -> usize {
    let flags = response_flags(outcome);
    // Every flag is one of FLAGS (tested).
    FLAGS.iter().position(|f| *f == flags).unwrap_or(0)
}

/// The counters of one label set: the opened connections and their bytes (flags "-"),
/// and the closed and failed ones by response flags. Held by each connection counted in
/// them.
#[derive(Debug, Default)]
pub(crate) struct TcpSeries {
    opened: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
    /// Exported once non-zero, as a family exports a series once created.
    closed: [Counter; FLAGS.len()],
    failed: [Counter; FLAGS.len()],
}

impl TcpSeries {
    /// `istio_tcp_received_bytes` (what the client sent) and `istio_tcp_sent_bytes`.
    pub(crate) fn byte_counters(&self) -> (Counter, Counter) {
        (self.received_bytes.clone(), self.sent_bytes.clone())
    }

    /// Counts the connection closed with `outcome`.
    pub(crate) fn closed(&self, outcome: Outcome) {
        let flags = flag_index(outcome);
        self.closed[flags].inc();
        // As ztunnel counts them: a refusal by policy is a failure to establish too.
        if FLAGS[flags] != "-" {
            self.failed[flags].inc();
        }
    }
}

/// The series by their labels. A hash table of our own hashing, so that a connection's
/// borrowed labels find their series without a copy (a `HashMap` would need an owned key).
#[derive(Debug, Default)]
struct SeriesMap {
    hasher: RandomState,
    series: HashTable<(TcpLabels<'static>, Arc<TcpSeries>)>,
}

impl SeriesMap {
    fn get(&self, hash: u64, labels: &TcpLabels<'_>) -> Option<&Arc<TcpSeries>> {
        self.series.find(hash, |(l, _)| l == labels).map(|(_, s)| s)
    }
}

/// Every `istio_tcp_*` series of the proxy (cheap to clone: the clones share them).
#[derive(Debug, Default, Clone)]
pub(crate) struct IstioTcp {
    series: Arc<RwLock<SeriesMap>>,
}

impl IstioTcp {
    /// Counts a connection opened with `labels`; returns its series.
    pub(crate) fn opened(&self, labels: TcpLabels<'_>) -> Arc<TcpSeries> {
        // Series are only ever added: a poisoned lock still holds a consistent map.
        let read = self.series.read().unwrap_or_else(PoisonError::into_inner);
        let hash = read.hasher.hash_one(&labels);
        let known = read.get(hash, &labels).cloned();
        drop(read);
        let series = match known {
            Some(series) => series,
            None => {
                let mut map = self.series.write().unwrap_or_else(PoisonError::into_inner);
                match map.get(hash, &labels) {
                    // Added meanwhile by another thread.
                    Some(series) => series.clone(),
                    None => {
                        let series = Arc::new(TcpSeries::default());
                        let SeriesMap {
                            hasher,
                            series: table,
                        } = &mut *map;
                        table.insert_unique(
                            hash,
                            (labels.into_owned(), series.clone()),
                            |(l, _)| hasher.hash_one(l),
                        );
                        series
                    }
                }
            }
        };
        series.opened.inc();
        series
    }

    /// Adds the families to `registry` (whose prefix should be `istio`).
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(self.clone()));
    }
}

/// A series' labels with its response flags.
struct WithFlags<'a>(&'a TcpLabels<'static>, &'static str);

impl EncodeLabelSet for WithFlags<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)?;
        [("response_flags", self.1)].encode(encoder)
    }
}

/// ztunnel's five `istio_tcp_*` families.
#[derive(Debug, Clone, Copy)]
enum Family {
    Opened,
    Closed,
    Failed,
    ReceivedBytes,
    SentBytes,
}

impl Family {
    const ALL: [Family; 5] = [
        Family::Opened,
        Family::Closed,
        Family::Failed,
        Family::ReceivedBytes,
        Family::SentBytes,
    ];

    fn name_and_help(self) -> (&'static str, &'static str) {
        match self {
            Family::Opened => (
                "tcp_connections_opened",
                "The total number of TCP connections opened",
            ),
            Family::Closed => (
                "tcp_connections_closed",
                "The total number of TCP connections closed",
            ),
            Family::Failed => (
                "tcp_connections_failed",
                "The total number of TCP connections that failed to establish",
            ),
            Family::ReceivedBytes => (
                "tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
            ),
            Family::SentBytes => (
                "tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
            ),
        }
    }

    /// The counter of `s` with `FLAGS[flags]` in this family, if it is exported: opened
    /// connections and bytes have flags "-" only and exist with their series; closed and
    /// failed ones exist once they counted one.
    fn counter(self, s: &TcpSeries, flags: usize) -> Option<&Counter> {
        match self {
            Family::Opened => (flags == 0).then_some(&s.opened),
            Family::ReceivedBytes => (flags == 0).then_some(&s.received_bytes),
            Family::SentBytes => (flags == 0).then_some(&s.sent_bytes),
            Family::Closed => Some(&s.closed[flags]).filter(|c| c.get() > 0),
            Family::Failed => Some(&s.failed[flags]).filter(|c| c.get() > 0),
        }
    }
}

impl Collector for IstioTcp {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
        for family in Family::ALL {
            let counters = || {
                series.series.iter().flat_map(move |(labels, s)| {
                    FLAGS.iter().enumerate().filter_map(move |(f, flags)| {
                        family.counter(s, f).map(|c| (labels, *flags, c))
                    })
                })
            };
            // As a registry leaves out an empty family.
            if counters().next().is_none() {
                continue;
            }
            let (name, help) = family.name_and_help();
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, flags, counter) in counters() {
                counter.encode(metric.encode_family(&WithFlags(labels, flags))?)?;
            }
        }
        Ok(())
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
            assert!(FLAGS.contains(&response_flags(o)), "{o}");
        }
    }

    #[test]
    fn a_connection_counts_in_its_series_once_opened_and_each_family_shows_what_it_counted() {
        let page = |istio: &IstioTcp| {
            let mut registry = Registry::default();
            istio.register(registry.sub_registry_with_prefix("istio"));
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        let istio = IstioTcp::default();
        // Nothing opened: no family at all.
        assert!(!page(&istio).contains("istio_tcp"), "{}", page(&istio));
        let dst = workload("shop", &[]);
        let labels = || TcpLabels::new(&connection(Some(&dst), None, true));
        let first = istio.opened(labels());
        let second = istio.opened(labels());
        // One label set, one series: both connections hold it.
        assert!(Arc::ptr_eq(&first, &second));
        let plaintext = istio.opened(TcpLabels::new(&connection(Some(&dst), None, false)));
        assert!(!Arc::ptr_eq(&first, &plaintext));
        plaintext.closed(Outcome::Ok);
        let (received, _) = first.byte_counters();
        received.inc_by(64);
        first.closed(Outcome::Ok);
        second.closed(Outcome::Denied);
        let text = page(&istio);
        let value = |family: &str, flags: &str| -> Option<u64> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .filter(|l| l.contains("connection_security_policy=\"mutual_tls\""))
                .find(|l| l.contains(&format!("response_flags=\"{flags}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        };
        let mtls = |family: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .filter(|l| l.contains("connection_security_policy=\"mutual_tls\""))
                .count()
        };
        // The plaintext connection has series of its own.
        assert_eq!(mtls("istio_tcp_connections_opened_total"), 1);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
                .count(),
            2
        );
        assert_eq!(mtls("istio_tcp_connections_closed_total"), 2);
        assert_eq!(value("istio_tcp_connections_opened_total", "-"), Some(2));
        assert_eq!(value("istio_tcp_received_bytes_total", "-"), Some(64));
        // Created with the series, though nothing was sent back.
        assert_eq!(value("istio_tcp_sent_bytes_total", "-"), Some(0));
        assert_eq!(value("istio_tcp_connections_closed_total", "-"), Some(1));
        assert_eq!(value("istio_tcp_connections_closed_total", "DENY"), Some(1));
        // A policy refusal failed to establish; the finished connection did not.
        assert_eq!(value("istio_tcp_connections_failed_total", "DENY"), Some(1));
        assert_eq!(value("istio_tcp_connections_failed_total", "-"), None);
        assert_eq!(value("istio_tcp_connections_closed_total", "CONNECT"), None);
        // Every line names its flags once, with Istio's label names.
        for line in text.lines().filter(|l| l.starts_with("istio_tcp_")) {
            assert_eq!(line.matches("response_flags=").count(), 1, "{line}");
            assert!(line.contains("destination_principal=\"spiffe://"), "{line}");
        }
        assert_eq!(
            text.matches("# TYPE istio_tcp_connections_failed counter")
                .count(),
            1
        );
    }
}
