//! One access-log line (tracing target "access"), the metrics and one flow event for each
//! connection, refused, finished or cut short (an [`AccessLog`] records itself when dropped).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use crate::connections::{OpenConnection, Registration};
use crate::flows::{FlowDirection, FlowEndpoint, FlowEvent, FlowPhase, FlowVerdict};
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::policy::Verdict;
use crate::proxy::Shared;
use crate::telemetry::{Connection, TcpLabels, TcpSeries};
use crate::workloads::Workload;

/// Bytes moved so far, added to as the data flows: a connection cut short (e.g. at the
/// drain deadline) still reports what it carried.
#[derive(Debug, Default)]
pub(crate) struct ByteCounts {
    /// To the client that opened the connection.
    pub sent: ByteCount,
    /// From the client that opened the connection.
    pub received: ByteCount,
}

/// One direction's bytes: this connection's own count, and the `istio_tcp_*_bytes` series
/// it adds to once it is established.
#[derive(Debug, Default)]
pub(crate) struct ByteCount {
    here: AtomicU64,
    series: OnceLock<prometheus_client::metrics::counter::Counter>,
}

impl ByteCount {
    pub fn add(&self, n: u64) {
        self.here.fetch_add(n, Ordering::Relaxed);
        if let Some(series) = self.series.get() {
            series.inc_by(n);
        }
    }

    pub fn get(&self) -> u64 {
        self.here.load(Ordering::Relaxed)
    }

    /// From now on, also adds to `series` (and adds what was counted before).
    fn feed(&self, series: prometheus_client::metrics::counter::Counter) {
        series.inc_by(self.get());
        let _ = self.series.set(series);
    }
}

/// Records one connection: when it is dropped, it logs, counts and publishes the outcome
/// given to [`AccessLog::finish`], or [`Outcome::DrainDeadline`] / [`Outcome::Cancelled`]
/// if it was dropped unfinished (its task cancelled).
pub(crate) struct AccessLog {
    shared: Arc<Shared>,
    direction: Direction,
    start: Instant,
    pub src: FlowEndpoint,
    pub dst_addr: Option<SocketAddr>,
    dst: Option<FlowEndpoint>,
    /// The workloads at both ends, where the table knows them (for Istio's labels).
    src_workload: Option<Arc<Workload>>,
    dst_workload: Option<Arc<Workload>>,
    /// Its `istio_tcp_*` series, once it was counted as opened (set through a shared
    /// reference: the tunnel's copy loop borrows the byte counters meanwhile).
    istio: OnceLock<Arc<TcpSeries>>,
    /// The Service the client addressed (`namespace/name`), if it addressed one.
    pub service: Option<String>,
    /// Whether the flow crossed the network inside mTLS (set once the tunnel is up or
    /// the peer's certificate is verified).
    pub encrypted: bool,
    /// The authorization verdict, when policies were consulted.
    pub policy: Option<Verdict>,
    pub bytes: Arc<ByteCounts>,
    outcome: Option<Outcome>,
    /// Its entry among the open connections, from established until dropped.
    open: OnceLock<Registration>,
}

fn endpoint_of(w: &Workload, addr: SocketAddr) -> FlowEndpoint {
    FlowEndpoint {
        namespace: Some(w.namespace.as_str().into()),
        pod: Some(w.name.as_str().into()),
        identity: Some(w.identity.spiffe_id().as_str().into()),
        addr,
    }
}

impl AccessLog {
    pub fn start(direction: Direction, src_addr: SocketAddr, shared: &Arc<Shared>) -> Self {
        shared.metrics.opened(direction);
        Self {
            shared: shared.clone(),
            direction,
            start: Instant::now(),
            src: FlowEndpoint::addr(src_addr),
            dst_addr: None,
            dst: None,
            src_workload: None,
            dst_workload: None,
            istio: OnceLock::new(),
            service: None,
            encrypted: false,
            policy: None,
            bytes: Arc::default(),
            outcome: None,
            open: OnceLock::new(),
        }
    }

    /// The source is this workload (its identity as the table has it: use only where the
    /// source IP was checked, e.g. a local pod).
    pub fn source(&mut self, w: &Arc<Workload>) {
        self.src = endpoint_of(w, self.src.addr);
        self.src_workload = Some(w.clone());
    }

    /// The source address belongs to this workload: named, but the identity stays what a
    /// certificate proved (or none).
    pub fn source_by_address(&mut self, w: &Arc<Workload>, addr: SocketAddr) {
        self.src.addr = addr;
        self.src.namespace = Some(w.namespace.as_str().into());
        self.src.pod = Some(w.name.as_str().into());
        self.src_workload = Some(w.clone());
    }

    pub fn destination(&mut self, w: &Arc<Workload>) {
        let addr = self.dst_addr.unwrap_or_else(unknown_addr);
        self.dst = Some(endpoint_of(w, addr));
        self.dst_workload = Some(w.clone());
    }

    /// The destination is this workload, reached in plaintext: named, but without an
    /// identity (nothing proved it).
    pub fn plaintext_destination(&mut self, w: &Arc<Workload>) {
        let addr = self.dst_addr.unwrap_or_else(unknown_addr);
        self.dst = Some(FlowEndpoint {
            identity: None,
            ..endpoint_of(w, addr)
        });
        self.dst_workload = Some(w.clone());
    }

    /// Forgets the destination workload (a Service connection moving to another endpoint).
    pub fn clear_destination(&mut self) {
        self.dst = None;
        self.dst_workload = None;
    }

    /// The connection is established (bytes are about to flow): counts it as opened in
    /// Istio's telemetry, whose byte counters then follow the data as it moves.
    pub fn established(&self) {
        if self.istio.get().is_some() {
            return;
        }
        self.count_istio_open();
        let now = SystemTime::now();
        let destination = self.destination_endpoint();
        let shown = OpenConnection {
            direction: flow_direction(self.direction),
            opened: now,
            source: self.src.clone(),
            destination: destination.clone(),
            service: self.service.clone(),
            encrypted: self.encrypted,
            bytes_sent: 0,
            bytes_received: 0,
        };
        let _ = self
            .open
            .set(self.shared.connections.add(shown, self.bytes.clone()));
        self.shared.flows.publish(FlowEvent {
            time: now,
            phase: FlowPhase::Open,
            direction: Some(flow_direction(self.direction)),
            source: self.src.clone(),
            destination,
            service: self.service.clone(),
            bytes_sent: 0,
            bytes_received: 0,
            duration_us: 0,
            verdict: FlowVerdict::Forwarded,
            encrypted: self.encrypted,
            policy: self.policy.clone(),
            reason: None,
        });
    }

    fn count_istio_open(&self) {
        let series = self.shared.metrics.istio.opened(self.istio_labels());
        let (received, sent) = series.byte_counters();
        self.bytes.received.feed(received);
        self.bytes.sent.feed(sent);
        let _ = self.istio.set(series);
    }

    /// The destination as flows show it: the workload, at the address actually dialed.
    fn destination_endpoint(&self) -> FlowEndpoint {
        match &self.dst {
            Some(d) => FlowEndpoint {
                addr: self.dst_addr.unwrap_or(d.addr),
                ..d.clone()
            },
            None => FlowEndpoint::addr(self.dst_addr.unwrap_or_else(unknown_addr)),
        }
    }

    fn istio_labels(&self) -> TcpLabels<'_> {
        let config = &self.shared.config;
        TcpLabels::new(&Connection {
            direction: self.direction,
            source: self.src_workload.as_deref(),
            source_principal: self.src.identity.as_deref().filter(|_| self.encrypted),
            destination: self.dst_workload.as_deref(),
            service: self.service.as_deref(),
            mutual_tls: self.encrypted,
            cluster_id: &config.cluster_id,
            cluster_domain: &config.cluster_domain,
        })
    }

    /// Ends the connection with `outcome` (recorded as the log drops).
    pub fn finish(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    /// Logs, counts and publishes the end of the connection.
    fn record(&mut self, outcome: Outcome) {
        let sent = self.bytes.sent.get();
        let received = self.bytes.received.get();
        self.shared
            .metrics
            .closed(self.direction, outcome, sent, received);
        // A connection refused or failed before it carried bytes is counted opened and
        // closed in one go, as ztunnel counts it, once either end is known.
        if self.istio.get().is_none()
            && (self.src_workload.is_some() || self.dst_workload.is_some())
        {
            self.count_istio_open();
        }
        if let Some(series) = self.istio.get() {
            series.closed(outcome);
        }
        let shared = &*self.shared;
        let duration = self.start.elapsed();
        let none = || "-".to_string();
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.src.addr,
            src.workload = %workload_name(&self.src).unwrap_or_else(none),
            src.identity = %self.src.identity.as_deref().unwrap_or("-"),
            dst.addr = %self.dst_addr.map(|a| a.to_string()).unwrap_or_else(none),
            dst.workload = %self.dst.as_ref().and_then(workload_name).unwrap_or_else(none),
            dst.identity = %self.dst.as_ref().and_then(|d| d.identity.as_deref()).unwrap_or("-"),
            dst.service = %self.service.as_deref().unwrap_or("-"),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = duration.as_millis() as u64,
            encrypted = self.encrypted,
            result = outcome.label(),
            "connection complete"
        );
        let destination = self.destination_endpoint();
        let src_addr = self.src.addr;
        let source = std::mem::replace(&mut self.src, FlowEndpoint::addr(src_addr));
        shared.flows.publish(FlowEvent {
            time: SystemTime::now(),
            phase: FlowPhase::Close,
            direction: Some(flow_direction(self.direction)),
            source,
            destination,
            service: self.service.take(),
            // The flow's direction is source -> destination: what the client sent.
            bytes_sent: received,
            bytes_received: sent,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            verdict: outcome.verdict(),
            encrypted: self.encrypted,
            policy: self.policy.take(),
            reason: outcome.reason().map(str::to_owned),
        });
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or_else(|| {
            if self.shared.force.is_cancelled() {
                Outcome::DrainDeadline
            } else {
                Outcome::Cancelled
            }
        });
        self.record(outcome);
    }
}

fn flow_direction(d: Direction) -> FlowDirection {
    match d {
        Direction::Outbound => FlowDirection::Outbound,
        Direction::Inbound | Direction::InboundPlaintext => FlowDirection::Inbound,
    }
}

fn workload_name(e: &FlowEndpoint) -> Option<String> {
    match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => Some(format!("{ns}/{pod}")),
        _ => None,
    }
}

/// Stands for a destination the proxy could not learn (no original destination).
fn unknown_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

/// Publishes a connection refused before it became a tunnel (e.g. a failed TLS
/// handshake): nothing is known of either end but the addresses.
pub(crate) fn refused(shared: &Shared, src: SocketAddr, dst: SocketAddr, reason: &'static str) {
    shared.flows.publish(FlowEvent {
        time: SystemTime::now(),
        phase: FlowPhase::Close,
        direction: Some(FlowDirection::Inbound),
        source: FlowEndpoint::addr(src),
        destination: FlowEndpoint::addr(dst),
        service: None,
        bytes_sent: 0,
        bytes_received: 0,
        duration_us: 0,
        verdict: FlowVerdict::Error,
        encrypted: false,
        policy: None,
        reason: Some(format!("tls_{reason}")),
    });
}
