//! One access-log line (tracing target "access"), the metrics and one flow event for each
//! connection, refused, finished or cut short (an [`AccessLog`] records itself when dropped).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::flows::{FlowEndpoint, FlowEvent, FlowVerdict};
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::policy::Verdict;
use crate::proxy::Shared;
use crate::workloads::Workload;

/// Bytes moved so far, added to as the data flows: a connection cut short (e.g. at the
/// drain deadline) still reports what it carried.
#[derive(Debug, Default)]
pub(crate) struct ByteCounts {
    /// To the client that opened the connection.
    pub sent: AtomicU64,
    /// From the client that opened the connection.
    pub received: AtomicU64,
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
    /// The Service the client addressed (`namespace/name`), if it addressed one.
    pub service: Option<String>,
    /// Whether the flow crossed the network inside mTLS (set once the tunnel is up or
    /// the peer's certificate is verified).
    pub encrypted: bool,
    /// The authorization verdict, when policies were consulted.
    pub policy: Option<Verdict>,
    pub bytes: ByteCounts,
    outcome: Option<Outcome>,
}

fn endpoint_of(w: &Workload, addr: SocketAddr) -> FlowEndpoint {
    FlowEndpoint {
        namespace: Some(w.namespace.clone()),
        pod: Some(w.name.clone()),
        identity: Some(w.identity.to_string()),
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
            service: None,
            encrypted: false,
            policy: None,
            bytes: ByteCounts::default(),
            outcome: None,
        }
    }

    /// The source is this workload (its identity as the table has it: use only where the
    /// source IP was checked, e.g. a local pod).
    pub fn source(&mut self, w: &Workload) {
        self.src = endpoint_of(w, self.src.addr);
    }

    pub fn destination(&mut self, w: &Workload) {
        let addr = self.dst_addr.unwrap_or_else(unknown_addr);
        self.dst = Some(endpoint_of(w, addr));
    }

    /// The destination is this workload, reached in plaintext: named, but without an
    /// identity (nothing proved it).
    pub fn plaintext_destination(&mut self, w: &Workload) {
        let addr = self.dst_addr.unwrap_or_else(unknown_addr);
        self.dst = Some(FlowEndpoint {
            identity: None,
            ..endpoint_of(w, addr)
        });
    }

    /// Forgets the destination workload (a Service connection moving to another endpoint).
    pub fn clear_destination(&mut self) {
        self.dst = None;
    }

    /// Ends the connection with `outcome` (recorded as the log drops).
    pub fn finish(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    /// Logs, counts and publishes the end of the connection.
    fn record(&mut self, outcome: Outcome) {
        let shared = &*self.shared;
        let sent = self.bytes.sent.load(Ordering::Relaxed);
        let received = self.bytes.received.load(Ordering::Relaxed);
        shared
            .metrics
            .closed(self.direction, outcome, sent, received);
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
        let destination = match self.dst.take() {
            Some(mut d) => {
                if let Some(addr) = self.dst_addr {
                    d.addr = addr;
                }
                d
            }
            None => FlowEndpoint::addr(self.dst_addr.unwrap_or_else(unknown_addr)),
        };
        let src_addr = self.src.addr;
        let source = std::mem::replace(&mut self.src, FlowEndpoint::addr(src_addr));
        shared.flows.publish(FlowEvent {
            time: SystemTime::now(),
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
