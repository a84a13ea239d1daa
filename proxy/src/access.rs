//! One access-log line (tracing target "access"), the metrics and one flow event for each
//! connection, refused or finished.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};

use crate::flows::{FlowEndpoint, FlowEvent, FlowVerdict};
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::policy::Verdict;
use crate::proxy::Shared;
use crate::workloads::Workload;

pub(crate) struct AccessLog {
    direction: Direction,
    start: Instant,
    pub src: FlowEndpoint,
    pub dst_addr: Option<SocketAddr>,
    dst: Option<FlowEndpoint>,
    /// Whether the flow crossed the network inside mTLS (set once the tunnel is up or
    /// the peer's certificate is verified).
    pub encrypted: bool,
    /// The authorization verdict, when policies were consulted.
    pub policy: Option<Verdict>,
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
    pub fn start(direction: Direction, src_addr: SocketAddr, shared: &Shared) -> Self {
        shared.metrics.opened(direction);
        Self {
            direction,
            start: Instant::now(),
            src: FlowEndpoint::addr(src_addr),
            dst_addr: None,
            dst: None,
            encrypted: false,
            policy: None,
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

    /// Logs, counts and publishes the end of the connection. `sent` went to the client
    /// that opened it.
    pub fn finish(self, shared: &Shared, outcome: Outcome, sent: u64, received: u64) {
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
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = duration.as_millis() as u64,
            encrypted = self.encrypted,
            result = outcome.label(),
            "connection complete"
        );
        let destination = match self.dst {
            Some(mut d) => {
                if let Some(addr) = self.dst_addr {
                    d.addr = addr;
                }
                d
            }
            None => FlowEndpoint::addr(self.dst_addr.unwrap_or_else(unknown_addr)),
        };
        shared.flows.publish(FlowEvent {
            time: SystemTime::now(),
            source: self.src,
            destination,
            // The flow's direction is source -> destination: what the client sent.
            bytes_sent: received,
            bytes_received: sent,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            verdict: outcome.verdict(),
            encrypted: self.encrypted,
            policy: self.policy,
            reason: outcome.reason().map(str::to_owned),
        });
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
        bytes_sent: 0,
        bytes_received: 0,
        duration_us: 0,
        verdict: FlowVerdict::Error,
        encrypted: false,
        policy: None,
        reason: Some(format!("tls_{reason}")),
    });
}
