//! Flow events: one record per connection (or eBPF drop) saying who talked to whom, whether
//! it was encrypted, and which policy decided, so that every drop can be explained.
//!
//! The proxy [`FlowHub::publish`]es events; `zmesh observe` streams them as NDJSON from
//! the agent's admin endpoint through [`FlowHub::subscribe`], with Hubble-like filters.
//! A bounded ring of recent events answers `--since` queries.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::policy::{Allowed, Denial, Verdict};

/// What happened to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    /// Proxied to the destination.
    Forwarded,
    /// Refused by an authorization policy.
    Denied,
    /// Dropped in the data path (e.g. plaintext in strict mode), see `reason`.
    Dropped,
    /// Failed (connect error, TLS failure, reset), see `reason`.
    Error,
}

impl FlowVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "forwarded",
            FlowVerdict::Denied => "denied",
            FlowVerdict::Dropped => "dropped",
            FlowVerdict::Error => "error",
        }
    }
}

impl std::str::FromStr for FlowVerdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "forwarded" => Ok(Self::Forwarded),
            "denied" => Ok(Self::Denied),
            "dropped" => Ok(Self::Dropped),
            "error" => Ok(Self::Error),
            _ => Err(format!(
                "unknown verdict {s:?}; use forwarded, denied, dropped or error"
            )),
        }
    }
}

/// Whether an event opens a flow or ends it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowPhase {
    /// The connection is established: bytes are about to flow (its end comes later).
    Open,
    /// The connection ended, or was refused, failed or dropped.
    #[default]
    Close,
}

/// Which way the observing node saw the flow. A flow between two pods of one node is seen
/// twice, once each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowDirection {
    /// Leaving a pod of this node (its proxy's outbound side).
    Outbound,
    /// Arriving at a pod of this node (HBONE, plaintext, or dropped by eBPF).
    Inbound,
}

impl FlowDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowDirection::Outbound => "outbound",
            FlowDirection::Inbound => "inbound",
        }
    }
}

impl std::str::FromStr for FlowDirection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "outbound" => Ok(Self::Outbound),
            "inbound" => Ok(Self::Inbound),
            _ => Err(format!("unknown direction {s:?}; use inbound or outbound")),
        }
    }
}

/// One end of a flow. Its names are shared (`Arc<str>`): one connection's endpoints go
/// into its open and close events and its entry among the open connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    /// The pod's namespace, if the address belongs to a known workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Arc<str>>,
    /// The pod's name, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<str>>,
    /// SPIFFE ID: for the source, only one verified from its certificate (`None` for
    /// plaintext); for the destination, the identity it holds in the workload table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<str>>,
    pub addr: SocketAddr,
}

impl FlowEndpoint {
    /// An address with nothing known about it.
    pub fn addr(addr: SocketAddr) -> Self {
        Self {
            namespace: None,
            pod: None,
            identity: None,
            addr,
        }
    }
}

/// One connection (or dropped packet flow) as the proxy or eBPF saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// When the flow opened, or ended (or was refused), in RFC 3339.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// An `open` event comes when the connection is established, a `close` one when it
    /// ends (its bytes, duration and verdict are final then).
    #[serde(default)]
    pub phase: FlowPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<FlowDirection>,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    /// The Kubernetes Service the client addressed, `namespace/name` (by its VIP, or by
    /// its hostname in an HBONE `:authority`); `destination` is the endpoint chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Bytes from source to destination.
    pub bytes_sent: u64,
    /// Bytes from destination back to source.
    pub bytes_received: u64,
    pub duration_us: u64,
    pub verdict: FlowVerdict,
    /// Whether the flow crossed the network inside mTLS.
    pub encrypted: bool,
    /// The authorization decision, when policies were consulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Verdict>,
    /// Why it was dropped or failed (a fixed, short string such as `plaintext_strict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FlowEvent {
    /// RFC 3339 in UTC with millisecond precision, as flows are shown.
    pub fn format_time(t: SystemTime) -> String {
        let millis = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 1_000_000)
            .unwrap_or(0);
        rfc3339::format(t - Duration::from_nanos(u64::from(millis))).unwrap_or_else(|_| "-".into())
    }

    pub fn duration(&self) -> Duration {
        Duration::from_micros(self.duration_us)
    }

    /// The denial behind a `denied` verdict.
    pub fn denial(&self) -> Option<&Denial> {
        match &self.policy {
            Some(Verdict::Deny(d)) => Some(d),
            _ => None,
        }
    }
}

pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;

    pub fn format(t: SystemTime) -> Result<String, time::error::Format> {
        OffsetDateTime::from(t).format(&Rfc3339)
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t).map_err(serde::ser::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        OffsetDateTime::parse(&s, &Rfc3339)
            .map(SystemTime::from)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses an RFC 3339 time, as flow events carry them.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn human_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{}µs", d.as_micros())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn endpoint(f: &mut fmt::Formatter<'_>, e: &FlowEndpoint) -> fmt::Result {
    match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => write!(f, "{ns}/{pod}:{}", e.addr.port()),
        _ => write!(f, "{}", e.addr),
    }
}

/// One compact line, like `hubble observe`:
/// `2025-01-02T03:04:05.678Z default/web-1:40000 (cluster.local/ns/default/sa/web) -> prod/db-0:5432 mTLS FORWARDED sent=1.2KiB recv=300B 12ms`,
/// with ` (service prod/db)` after the destination when the client addressed a Service.
impl fmt::Display for FlowEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Millisecond precision is plenty for reading.
        f.write_str(&Self::format_time(self.time))?;
        f.write_str(" ")?;
        endpoint(f, &self.source)?;
        match &self.source.identity {
            Some(id) => write!(f, " ({})", id.strip_prefix("spiffe://").unwrap_or(id))?,
            None => f.write_str(" (no identity)")?,
        }
        f.write_str(" -> ")?;
        endpoint(f, &self.destination)?;
        if let Some(service) = &self.service {
            write!(f, " (service {service})")?;
        }
        let enc = if self.encrypted { "mTLS" } else { "plaintext" };
        write!(f, " {enc} {}", self.verdict.as_str().to_ascii_uppercase())?;
        match (&self.verdict, self.denial(), &self.reason) {
            (FlowVerdict::Denied, Some(d), _) => write!(f, " ({d})")?,
            (_, _, Some(r)) => write!(f, " ({r})")?,
            _ => {}
        }
        if self.verdict == FlowVerdict::Forwarded || self.bytes_sent + self.bytes_received > 0 {
            write!(
                f,
                " sent={} recv={} {}",
                human_bytes(self.bytes_sent),
                human_bytes(self.bytes_received),
                human_duration(self.duration())
            )?;
        }
        Ok(())
    }
}

/// Which events a subscriber wants, like Hubble's filters. Within a field any value may
/// match; all fields that are set must match. Endpoint fields match either end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowFilter {
    /// Namespace of the source or destination pod.
    pub namespaces: Vec<String>,
    /// `name-prefix` or `namespace/name-prefix` of the source or destination pod.
    pub pods: Vec<String>,
    /// SPIFFE ID of either end, with or without `spiffe://`.
    pub identities: Vec<String>,
    pub verdicts: Vec<FlowVerdict>,
    pub encrypted: Option<bool>,
    /// Only events at or after this time (also selects the history replayed on subscribe).
    #[serde(with = "opt_rfc3339")]
    pub since: Option<SystemTime>,
    /// Only events before this time.
    #[serde(with = "opt_rfc3339")]
    pub until: Option<SystemTime>,
    /// The same, for the source only.
    pub from: EndpointFilter,
    /// The same, for the destination only.
    pub to: EndpointFilter,
    /// Port of either end.
    pub ports: Vec<u16>,
    pub directions: Vec<FlowDirection>,
    pub phases: Vec<FlowPhase>,
}

/// What one end of a flow must be (`--from-*`, `--to-*`): any value of a field may match,
/// every field that is set must.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointFilter {
    pub namespaces: Vec<String>,
    /// `name-prefix` or `namespace/name-prefix`.
    pub pods: Vec<String>,
    pub identities: Vec<String>,
    pub ports: Vec<u16>,
}

impl EndpointFilter {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    fn matches(&self, e: &FlowEndpoint) -> bool {
        (self.namespaces.is_empty()
            || self
                .namespaces
                .iter()
                .any(|ns| e.namespace.as_deref() == Some(ns)))
            && (self.pods.is_empty() || self.pods.iter().any(|p| pod_matches(p, e)))
            && (self.identities.is_empty()
                || self.identities.iter().any(|i| identity_matches(i, e)))
            && (self.ports.is_empty() || self.ports.contains(&e.addr.port()))
    }
}

mod opt_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(serde::Deserialize)]
    struct W(#[serde(with = "super::rfc3339")] SystemTime);

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

fn pod_matches(want: &str, e: &FlowEndpoint) -> bool {
    let Some(pod) = &e.pod else { return false };
    match want.split_once('/') {
        Some((ns, prefix)) => e.namespace.as_deref() == Some(ns) && pod.starts_with(prefix),
        None => pod.starts_with(want),
    }
}

fn identity_matches(want: &str, e: &FlowEndpoint) -> bool {
    let want = want.strip_prefix("spiffe://").unwrap_or(want);
    e.identity
        .as_deref()
        .is_some_and(|id| id.strip_prefix("spiffe://").unwrap_or(id) == want)
}

impl FlowFilter {
    pub fn matches(&self, e: &FlowEvent) -> bool {
        let ends = [&e.source, &e.destination];
        (self.namespaces.is_empty()
            || self
                .namespaces
                .iter()
                .any(|ns| ends.iter().any(|x| x.namespace.as_deref() == Some(ns))))
            && (self.pods.is_empty()
                || self
                    .pods
                    .iter()
                    .any(|p| ends.iter().any(|x| pod_matches(p, x))))
            && (self.identities.is_empty()
                || self
                    .identities
                    .iter()
                    .any(|i| ends.iter().any(|x| identity_matches(i, x))))
            && (self.verdicts.is_empty() || self.verdicts.contains(&e.verdict))
            && self.encrypted.is_none_or(|want| want == e.encrypted)
            && self.since.is_none_or(|since| e.time >= since)
            && self.until.is_none_or(|until| e.time < until)
            && self.from.matches(&e.source)
            && self.to.matches(&e.destination)
            && (self.ports.is_empty() || ends.iter().any(|x| self.ports.contains(&x.addr.port())))
            && (self.directions.is_empty()
                || e.direction.is_some_and(|d| self.directions.contains(&d)))
            && (self.phases.is_empty() || self.phases.contains(&e.phase))
    }
}

/// Fans flow events out to subscribers and keeps the last N for `--since` queries.
#[derive(Debug)]
pub struct FlowHub {
    ring: Mutex<VecDeque<Arc<FlowEvent>>>,
    capacity: usize,
    tx: broadcast::Sender<Arc<FlowEvent>>,
    metrics: Arc<FlowMetrics>,
}

impl FlowHub {
    /// Keeps the last `capacity` events; a subscriber more than `capacity` events behind
    /// loses the oldest ones (counted in [`FlowSubscription::missed`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            tx,
            metrics: Arc::default(),
        }
    }

    /// Counts every published event in `metrics` (instead of counters of its own).
    pub fn with_metrics(mut self, metrics: Arc<FlowMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The counters every published event goes into (the proxy serves them on /metrics).
    pub fn metrics(&self) -> &Arc<FlowMetrics> {
        &self.metrics
    }

    fn ring(&self) -> MutexGuard<'_, VecDeque<Arc<FlowEvent>>> {
        // The ring stays consistent even if a holder panicked: every critical section
        // is a single push/pop/clone.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn publish(&self, event: FlowEvent) {
        // A flow is counted once, when it ends.
        if event.phase == FlowPhase::Close {
            self.metrics.record(&event);
        }
        let event = Arc::new(event);
        let mut ring = self.ring();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(event.clone());
        // Sent under the lock so that subscribe() sees each event exactly once, either
        // in its backlog or live. No subscribers is not an error.
        let _ = self.tx.send(event);
    }

    /// Live events matching `filter`; if `filter.since` is set, the retained events at or
    /// after that time come first.
    pub fn subscribe(&self, filter: FlowFilter) -> FlowSubscription {
        let ring = self.ring();
        let rx = self.tx.subscribe();
        let backlog = match filter.since {
            Some(_) => ring.iter().filter(|e| filter.matches(e)).cloned().collect(),
            None => VecDeque::new(),
        };
        drop(ring);
        FlowSubscription {
            backlog,
            rx,
            filter,
            missed: 0,
        }
    }

    /// Like [`FlowHub::subscribe`], with the last `last` retained events matching `filter`
    /// first (whatever its `since`).
    pub fn subscribe_last(&self, filter: FlowFilter, last: usize) -> FlowSubscription {
        let ring = self.ring();
        let rx = self.tx.subscribe();
        let mut backlog: VecDeque<_> = ring
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(last)
            .cloned()
            .collect();
        drop(ring);
        backlog.make_contiguous().reverse();
        FlowSubscription {
            backlog,
            rx,
            filter,
            missed: 0,
        }
    }

    /// The last `limit` retained events matching `filter`, oldest first.
    pub fn recent(&self, filter: &FlowFilter, limit: usize) -> Vec<Arc<FlowEvent>> {
        let ring = self.ring();
        let mut out: Vec<_> = ring
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

/// A stream of events from a [`FlowHub`].
#[derive(Debug)]
pub struct FlowSubscription {
    backlog: VecDeque<Arc<FlowEvent>>,
    rx: broadcast::Receiver<Arc<FlowEvent>>,
    filter: FlowFilter,
    missed: u64,
}

impl FlowSubscription {
    /// The next matching event; `None` once the hub is gone.
    pub async fn recv(&mut self) -> Option<Arc<FlowEvent>> {
        if let Some(e) = self.backlog.pop_front() {
            return Some(e);
        }
        loop {
            match self.rx.recv().await {
                Ok(e) if self.filter.matches(&e) => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => self.missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Events this subscriber lost by falling behind (to report, not to hide).
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyLabels {
    /// `allow` or `deny`.
    action: &'static str,
    /// `namespace/name`, or empty when no single policy decided.
    policy: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlowLabels {
    verdict: &'static str,
    encrypted: &'static str,
}

/// Prometheus counters derived from flow events.
#[derive(Debug, Default)]
pub struct FlowMetrics {
    verdicts: Family<PolicyLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    flows: Family<FlowLabels, Counter>,
}

impl FlowMetrics {
    /// Adds the counters to `registry` (which may carry a prefix such as `zmesh`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "policy_verdicts",
            "Authorization decisions, by action, deciding policy and reason",
            self.verdicts.clone(),
        );
        registry.register(
            "flow_drops",
            "Flows dropped in the data path, by reason",
            self.drops.clone(),
        );
        registry.register(
            "flows",
            "Flows finished, by verdict and encryption",
            self.flows.clone(),
        );
    }

    /// Counts one event.
    pub fn record(&self, e: &FlowEvent) {
        self.flows
            .get_or_create(&FlowLabels {
                verdict: e.verdict.as_str(),
                encrypted: if e.encrypted { "true" } else { "false" },
            })
            .inc();
        if e.verdict == FlowVerdict::Dropped {
            self.drops
                .get_or_create(&DropLabels {
                    reason: e.reason.clone().unwrap_or_else(|| "unknown".into()),
                })
                .inc();
        }
        let labels = match &e.policy {
            None => return,
            Some(Verdict::Allow(Allowed::NoAllowPolicy)) => PolicyLabels {
                action: "allow",
                policy: String::new(),
                reason: "no_allow_policy",
            },
            Some(Verdict::Allow(Allowed::Policy { policy, .. })) => PolicyLabels {
                action: "allow",
                policy: policy.to_string(),
                reason: "allow_policy",
            },
            Some(Verdict::Deny(Denial::DenyPolicy { policy, .. })) => PolicyLabels {
                action: "deny",
                policy: policy.to_string(),
                reason: "deny_policy",
            },
            Some(Verdict::Deny(Denial::NoAllowMatched { .. })) => PolicyLabels {
                action: "deny",
                policy: String::new(),
                reason: "no_allow_matched",
            },
            Some(Verdict::Deny(Denial::UnknownLabels { .. })) => PolicyLabels {
                action: "deny",
                policy: String::new(),
                reason: "unknown_labels",
            },
        };
        self.verdicts.get_or_create(&labels).inc();
    }
}
