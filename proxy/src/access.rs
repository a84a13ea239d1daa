//! One access-log line (tracing target "access") and the metrics for each connection.

use std::net::SocketAddr;
use std::time::Instant;

use crate::metrics::{Direction, Metrics};
use crate::workloads::Workload;

pub(crate) struct AccessLog {
    direction: Direction,
    start: Instant,
    pub src_addr: SocketAddr,
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
}

pub(crate) fn workload_name(w: &Workload) -> String {
    format!("{}/{}", w.namespace, w.name)
}

impl AccessLog {
    pub fn start(direction: Direction, src_addr: SocketAddr, metrics: &Metrics) -> Self {
        metrics.opened(direction);
        Self {
            direction,
            start: Instant::now(),
            src_addr,
            src_workload: None,
            src_identity: None,
            dst_addr: None,
            dst_workload: None,
            dst_identity: None,
        }
    }

    pub fn source(&mut self, w: &Workload) {
        self.src_workload = Some(workload_name(w));
        self.src_identity = Some(w.identity.to_string());
    }

    pub fn destination(&mut self, w: &Workload) {
        self.dst_workload = Some(workload_name(w));
        self.dst_identity = Some(w.identity.to_string());
    }

    /// Logs and counts the end of the connection. `sent` went to the client that opened it.
    pub fn finish(self, metrics: &Metrics, result: &'static str, sent: u64, received: u64) {
        metrics.closed(self.direction, result, sent, received);
        let none = || "-".to_string();
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.src_addr,
            src.workload = %self.src_workload.unwrap_or_else(none),
            src.identity = %self.src_identity.unwrap_or_else(none),
            dst.addr = %self.dst_addr.map(|a| a.to_string()).unwrap_or_else(none),
            dst.workload = %self.dst_workload.unwrap_or_else(none),
            dst.identity = %self.dst_identity.unwrap_or_else(none),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            result,
            "connection complete"
        );
    }
}
