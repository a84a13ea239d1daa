//! Prometheus metrics, served on :15020/metrics.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::outcome::Outcome;
use crate::telemetry::IstioTcp;

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
    pub(crate) connects_with_first_bytes: Counter,
    /// Istio's `istio_tcp_*` telemetry, with workload labels.
    pub(crate) istio: IstioTcp,
}

/// Reads each workload certificate held (SPIFFE ID, expiry) at scrape time.
pub type ExpirySource = Arc<dyn Fn() -> Vec<(String, SystemTime)> + Send + Sync>;

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

    /// Outbound CONNECTs sent with the client's first bytes behind them so far.
    pub fn connects_with_first_bytes(&self) -> u64 {
        self.connects_with_first_bytes.get()
    }

    /// Inbound HBONE TLS connections accepted (handshake done) so far.
    pub fn inbound_tls_connections(&self) -> u64 {
        self.inbound_tls_connections.get()
    }

    /// A registry with every metric: zmesh's own (`zmesh_*`, with the certificates'
    /// expiry read from `expiry` at each scrape), Istio's TCP telemetry (`istio_tcp_*`), build
    /// information and the process's (`process_*`). `zmesh` registers more metrics with
    /// the zmesh prefix.
    pub fn registry(self: &Arc<Self>, expiry: ExpirySource) -> Registry {
        let mut root = Registry::default();
        self.istio.register(root.sub_registry_with_prefix("istio"));
        root.register_collector(Box::new(ProcessMetrics));
        let r = root.sub_registry_with_prefix("zmesh");
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The running zmesh build", build);
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
        r.register(
            "hbone_connects_with_first_bytes",
            "Outbound HBONE CONNECTs sent with the client's first bytes right behind them",
            self.connects_with_first_bytes.clone(),
        );
        r.register_collector(Box::new(CertExpiry(expiry)));
        root
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// The certificates' expiry, read at scrape time: one timestamp per certificate, and the
/// seconds left on the first to expire.
struct CertExpiry(ExpirySource);

impl std::fmt::Debug for CertExpiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertExpiry")
    }
}

impl prometheus_client::collector::Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let expiries = (self.0)();
        let per_cert: Family<IdentityLabels, Gauge> = Family::default();
        for (identity, at) in &expiries {
            let secs = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            per_cert
                .get_or_create(&IdentityLabels {
                    identity: identity.clone(),
                })
                .set(secs);
        }
        if !expiries.is_empty() {
            let metric = encoder.encode_descriptor(
                "certificate_expiration_timestamp_seconds",
                "When each workload certificate held expires (Unix time), by SPIFFE ID",
                None,
                per_cert.metric_type(),
            )?;
            per_cert.encode(metric)?;
        }
        let Some(at) = expiries.iter().map(|(_, at)| *at).min() else {
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

/// The standard `process_*` metrics of the running process, read from /proc at scrape time.
#[derive(Debug)]
struct ProcessMetrics;

impl prometheus_client::collector::Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(p.cpu_seconds);
        let metric = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(metric)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                p.threads,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    open_fds: i64,
    max_fds: i64,
    threads: i64,
    start_time_seconds: i64,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        // SAFETY: sysconf and getrlimit only read process-wide values.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as i64;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces:
        // state is field 3, so field n is at index n - 3.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
        let threads = field(20)? as i64;
        let started_ticks = field(22)?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let mut statm = statm.split_whitespace().map(|v| v.parse::<i64>().ok());
        let virtual_pages = statm.next()??;
        let resident_pages = statm.next()??;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit for the call to fill.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX)
        } else {
            -1
        };
        Some(Self {
            cpu_seconds,
            resident_bytes: resident_pages * page,
            virtual_bytes: virtual_pages * page,
            open_fds,
            max_fds,
            threads,
            start_time_seconds: boot_time as i64 + (started_ticks as f64 / ticks) as i64,
        })
    }
}

/// Text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
