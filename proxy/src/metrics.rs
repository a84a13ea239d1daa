//! Prometheus metrics, served on :15020/metrics.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::outcome::Outcome;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// HBONE on :15008.
    Inbound,
    /// Captured app traffic on :15001.
    Outbound,
    /// Plain TCP to a local workload on :15006.
    InboundPlaintext,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct DirLabels {
    pub direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

/// All of the proxy's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) opened: Family<DirLabels, Counter>,
    pub(crate) closed: Family<ResultLabels, Counter>,
    pub(crate) sent_bytes: Family<DirLabels, Counter>,
    pub(crate) received_bytes: Family<DirLabels, Counter>,
    pub(crate) handshake_failures: Family<ReasonLabels, Counter>,
    pub(crate) pool_connections: Gauge,
    pub(crate) pool_connections_created: Counter,
    pub(crate) inbound_tls_connections: Counter,
    pub(crate) keepalive_failures: Family<DirLabels, Counter>,
    pub(crate) refused_streams: Family<ReasonLabels, Counter>,
    pub(crate) reset_floods: Counter,
}

impl Metrics {
    pub(crate) fn opened(&self, d: Direction) {
        self.opened
            .get_or_create(&DirLabels {
                direction: d.as_str(),
            })
            .inc();
    }

    /// Counts a finished connection; `sent` is toward the client that opened it.
    pub(crate) fn closed(&self, d: Direction, outcome: Outcome, sent: u64, received: u64) {
        let dir = DirLabels {
            direction: d.as_str(),
        };
        self.closed
            .get_or_create(&ResultLabels {
                direction: d.as_str(),
                result: outcome.label(),
            })
            .inc();
        self.sent_bytes.get_or_create(&dir).inc_by(sent);
        self.received_bytes.get_or_create(&dir).inc_by(received);
    }

    pub(crate) fn handshake_failed(&self, d: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                direction: d.as_str(),
                reason,
            })
            .inc();
    }

    pub(crate) fn keepalive_failed(&self, d: Direction) {
        self.keepalive_failures
            .get_or_create(&DirLabels {
                direction: d.as_str(),
            })
            .inc();
    }

    /// An inbound HBONE stream refused (REFUSED_STREAM) for `reason`.
    pub(crate) fn refused_stream(&self, reason: &'static str) {
        self.refused_streams
            .get_or_create(&ReasonLabels {
                direction: Direction::Inbound.as_str(),
                reason,
            })
            .inc();
    }

    /// Inbound HBONE streams refused for `reason` ("connection_limit", "identity_limit").
    pub fn refused_stream_count(&self, reason: &'static str) -> u64 {
        self.refused_streams
            .get_or_create(&ReasonLabels {
                direction: Direction::Inbound.as_str(),
                reason,
            })
            .get()
    }

    /// Inbound HBONE connections closed with GOAWAY ENHANCE_YOUR_CALM for resetting too
    /// many tunnels, so far.
    pub fn reset_flood_count(&self) -> u64 {
        self.reset_floods.get()
    }

    /// HBONE connections closed because the peer stopped answering PINGs, so far.
    pub fn keepalive_failure_count(&self, d: Direction) -> u64 {
        self.keepalive_failures
            .get_or_create(&DirLabels {
                direction: d.as_str(),
            })
            .get()
    }

    /// Connections closed with `outcome` so far (for tests and health checks).
    pub fn closed_count(&self, d: Direction, outcome: Outcome) -> u64 {
        self.closed
            .get_or_create(&ResultLabels {
                direction: d.as_str(),
                result: outcome.label(),
            })
            .get()
    }

    /// TLS handshakes that failed for `reason` so far.
    pub fn handshake_failure_count(&self, d: Direction, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                direction: d.as_str(),
                reason,
            })
            .get()
    }

    /// Outbound HBONE (TLS) connections established so far.
    pub fn pool_connections_created(&self) -> u64 {
        self.pool_connections_created.get()
    }

    /// Outbound HBONE connections currently open.
    pub fn pool_connections(&self) -> i64 {
        self.pool_connections.get()
    }

    /// Inbound HBONE TLS connections accepted (handshake done) so far.
    pub fn inbound_tls_connections(&self) -> u64 {
        self.inbound_tls_connections.get()
    }

    /// A registry with every metric, plus the certificate expiry read from `expiry` at
    /// each scrape.
    pub fn registry(
        self: &Arc<Self>,
        expiry: Arc<dyn Fn() -> Option<SystemTime> + Send + Sync>,
    ) -> Registry {
        let mut r = Registry::with_prefix("zmesh");
        r.register(
            "connections_opened",
            "Connections accepted, by listener",
            self.opened.clone(),
        );
        r.register(
            "connections_closed",
            "Connections finished, by listener and result",
            self.closed.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes sent to the connecting client, by listener",
            self.sent_bytes.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes received from the connecting client, by listener",
            self.received_bytes.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by side and reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "pool_connections",
            "Outbound HBONE connections open in the pool",
            self.pool_connections.clone(),
        );
        r.register(
            "pool_connections_created",
            "Outbound HBONE connections established",
            self.pool_connections_created.clone(),
        );
        r.register(
            "inbound_tls_connections",
            "Inbound HBONE TLS connections accepted",
            self.inbound_tls_connections.clone(),
        );
        r.register(
            "hbone_keepalive_failures",
            "HBONE connections closed because the peer stopped answering HTTP/2 PINGs",
            self.keepalive_failures.clone(),
        );
        r.register(
            "hbone_refused_streams",
            "HBONE streams refused with REFUSED_STREAM, by side and limit reached",
            self.refused_streams.clone(),
        );
        r.register(
            "hbone_reset_floods",
            "Inbound HBONE connections closed with GOAWAY ENHANCE_YOUR_CALM for resetting too many tunnels",
            self.reset_floods.clone(),
        );
        r.register_collector(Box::new(CertExpiry(expiry)));
        r
    }
}

/// Seconds until the first certificate in use expires, computed at scrape time.
struct CertExpiry(Arc<dyn Fn() -> Option<SystemTime> + Send + Sync>);

impl std::fmt::Debug for CertExpiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertExpiry")
    }
}

impl prometheus_client::collector::Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(at) = (self.0)() else {
            return Ok(());
        };
        let seconds = match at.duration_since(SystemTime::now()) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        };
        let gauge = ConstGauge::new(seconds);
        let metric = encoder.encode_descriptor(
            "certificate_expiry_seconds",
            "Seconds until the first workload certificate in use expires",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
