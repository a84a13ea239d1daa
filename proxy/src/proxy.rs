//! Binding, running and draining the proxy's listeners.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zmesh_dataplane as ports;

use crate::authz::{AllowAll, Authorizer};
use crate::balance::{Affinity, AFFINITY_CAPACITY};
use crate::clock::Clock;
use crate::connections::OpenConnections;
use crate::flows::FlowHub;
use crate::keepalive::Keepalive;
use crate::limits::IdentityLimit;
use crate::metrics::{Direction, Metrics};
use crate::pool::{Pool, PoolConfig};
use crate::socket::{
    listener, set_tcp_keepalive, tune_listener, OriginalDst, SoOriginalDst, TcpKeepalive,
};
use crate::tls::TlsCredentials;
use crate::tunnels::Tunnels;
use crate::workloads::{WorkloadStore, WorkloadTable};
use crate::Mode;

/// How traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Capture {
    /// eBPF steers pod traffic to the listeners: the inbound destination is the local
    /// address of the accepted socket, and an HBONE `:authority` must name that address.
    Transparent,
    /// No capture (benchmarks, tests): clients dial the listeners directly; an HBONE
    /// `:authority` must name a workload of this node, and plaintext inbound uses the
    /// [`OriginalDst`] lookup.
    Explicit,
}

/// Where and how the proxy listens.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProxyConfig {
    /// This node's name: workloads with this `node` are local.
    pub node: String,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub plaintext_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// Set IP_TRANSPARENT on the traffic listeners (needed with eBPF sk_assign).
    pub ip_transparent: bool,
    pub capture: Capture,
    pub mode: Mode,
    /// Timeouts and limits: what an operator tunes (`--handshake-timeout` etc.).
    pub limits: Limits,
    pub pool: PoolConfig,
    /// HTTP/2 PINGs on every HBONE connection, inbound and pooled outbound.
    pub keepalive: Keepalive,
    /// The cluster's DNS domain: an HBONE `:authority` may name a Service as
    /// `<name>.<namespace>.svc.<cluster_domain>:<port>`.
    pub cluster_domain: String,
    /// This cluster's id (Istio's `clusterid`), sent in `baggage` on CONNECTs and answers.
    pub cluster_id: String,
}

impl ProxyConfig {
    /// The standard ports on `ip`, transparent capture, permissive mode.
    pub fn new(node: impl Into<String>, ip: IpAddr) -> Self {
        Self {
            node: node.into(),
            inbound_addr: SocketAddr::new(ip, ports::HBONE_PORT),
            outbound_addr: SocketAddr::new(ip, ports::OUTBOUND_PORT),
            plaintext_addr: SocketAddr::new(ip, ports::INBOUND_PLAINTEXT_PORT),
            metrics_addr: SocketAddr::new(ip, ports::METRICS_PORT),
            readiness_addr: SocketAddr::new(ip, ports::READINESS_PORT),
            ip_transparent: true,
            capture: Capture::Transparent,
            mode: Mode::Permissive,
            limits: Limits::default(),
            pool: PoolConfig::default(),
            keepalive: Keepalive::default(),
            cluster_domain: "cluster.local".into(),
            cluster_id: crate::hbone::DEFAULT_CLUSTER_ID.into(),
        }
    }

    /// Every listener on an ephemeral port of `ip`, no capture (for tests and benchmarks).
    pub fn explicit(node: impl Into<String>, ip: IpAddr) -> Self {
        let any = SocketAddr::new(ip, 0);
        Self {
            inbound_addr: any,
            outbound_addr: any,
            plaintext_addr: any,
            metrics_addr: any,
            readiness_addr: any,
            ip_transparent: false,
            capture: Capture::Explicit,
            ..Self::new(node, ip)
        }
    }
}

/// The proxy's timeouts and limits, each a flag of `zmesh proxy` and `zmesh agent`
/// (README, "Limits and timeouts").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// How long open tunnels may take to finish after a drain starts.
    pub drain_deadline: Duration,
    /// Upstream TCP connect timeout.
    pub connect_timeout: Duration,
    /// How long an inbound HBONE connection may take for each of its TLS handshake and
    /// its HTTP/2 handshake (the client's preface).
    pub handshake_timeout: Duration,
    /// At most this many tunnels at once on one inbound HBONE connection; also advertised
    /// as its SETTINGS_MAX_CONCURRENT_STREAMS. Further streams get REFUSED_STREAM. 200,
    /// what ztunnel's server (hyper's default) advertises; ztunnel's pool uses up to 100.
    pub max_tunnels_per_connection: usize,
    /// At most this many inbound tunnels at once from one peer identity, over all of its
    /// connections; further streams get REFUSED_STREAM.
    pub max_tunnels_per_identity: usize,
    /// An inbound HBONE connection whose client reset more than this many tunnels before
    /// sending a byte through them (and more than it used) gets GOAWAY ENHANCE_YOUR_CALM.
    pub max_client_resets_per_connection: usize,
    /// TCP keepalive on sockets to and from applications (accepted on the outbound and
    /// plaintext listeners, dialed to workloads and passthrough destinations); `None`
    /// leaves the system's default (off).
    pub tcp_keepalive: Option<TcpKeepalive>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            drain_deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_tunnels_per_connection: 200,
            max_tunnels_per_identity: 1000,
            max_client_resets_per_connection: 100,
            tcp_keepalive: Some(TcpKeepalive::default()),
        }
    }
}

/// What the proxy is built from, besides its config.
pub struct ProxyDeps {
    pub workloads: Arc<WorkloadStore>,
    pub credentials: Arc<dyn TlsCredentials>,
    pub authorizer: Arc<dyn Authorizer>,
    pub original_dst: Arc<dyn OriginalDst>,
    /// Where every finished or refused connection is published; `None`: the proxy keeps
    /// only the counters (served on /metrics either way).
    pub flows: Option<Arc<FlowHub>>,
    /// Listening sockets of a predecessor (a restarted agent): each one bound to exactly
    /// a configured address is used instead of a new socket (see [`Proxy::listener_fds`]).
    pub inherited_listeners: Vec<std::net::TcpListener>,
}

impl ProxyDeps {
    /// Allow-all authorization, `SO_ORIGINAL_DST` lookup, no flow subscribers.
    pub fn new(workloads: Arc<WorkloadStore>, credentials: Arc<dyn TlsCredentials>) -> Self {
        Self {
            workloads,
            credentials,
            authorizer: Arc::new(AllowAll),
            original_dst: Arc::new(SoOriginalDst),
            flows: None,
            inherited_listeners: Vec::new(),
        }
    }
}

/// Why the proxy could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen for {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot start the proxy's clock thread: {0}")]
    Clock(io::Error),
    /// A listener's accept failed in a way retrying cannot fix (e.g. EINVAL once the
    /// socket was destroyed): the proxy drained and [`Proxy::run`] returned this.
    #[error("{what} listener on {addr} failed")]
    ListenerFailed {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    /// The task serving a listener panicked or ended on its own: the proxy drained and
    /// [`Proxy::run`] returned this.
    #[error("the task serving the {what} listener on {addr} {how}")]
    ListenerTask {
        what: &'static str,
        addr: SocketAddr,
        how: String,
    },
}

/// The addresses actually bound (ports resolved when 0 was asked).
#[derive(Debug, Clone, Copy)]
pub struct ProxyAddrs {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub plaintext: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// Starts a graceful drain: stop accepting, GOAWAY on inbound HTTP/2, let tunnels finish
/// until the deadline, then close the rest.
#[derive(Debug, Clone)]
pub struct DrainHandle(CancellationToken);

impl DrainHandle {
    pub fn drain(&self) {
        self.0.cancel();
    }
}

pub(crate) struct Shared {
    pub config: ProxyConfig,
    pub workloads: Arc<WorkloadStore>,
    pub credentials: Arc<dyn TlsCredentials>,
    pub authorizer: Arc<dyn Authorizer>,
    pub original_dst: Arc<dyn OriginalDst>,
    pub metrics: Arc<Metrics>,
    pub flows: Arc<FlowHub>,
    /// Every established connection, for the admin API.
    pub connections: Arc<OpenConnections>,
    /// Open inbound connections, re-authorized when policies or local pods' labels change.
    pub tunnels: Tunnels,
    pub pool: Arc<Pool>,
    /// `sessionAffinity: ClientIP` pins of outbound Service connections.
    pub affinity: Affinity,
    /// Ticks the long timers (keepalive, idle connections): see clock.rs.
    pub clock: Clock,
    pub addrs: ProxyAddrs,
    /// Cancelled when draining starts.
    pub drain: CancellationToken,
    /// Cancelled when the drain deadline passes: everything closes.
    pub force: CancellationToken,
    pub tracker: TaskTracker,
    /// Open inbound tunnels per peer identity.
    pub identity_tunnels: Arc<IdentityLimit>,
    pub ready: AtomicBool,
    /// Why the proxy is failing (a listener died), for readiness to say.
    pub failure: OnceLock<String>,
}

impl Shared {
    /// TCP connect to a workload or passthrough destination, given up after the connect
    /// timeout. Timed by the coarse clock (clock.rs), up to two ticks late: a tokio timer
    /// per connection would cost the runtime an eventfd wake-up when it is armed and a
    /// kernel timer in every park while any dial is pending.
    pub(crate) async fn connect_upstream(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let mut deadline = self.clock.clone();
        tokio::select! {
            biased;
            connected = TcpStream::connect(dst) => connected,
            _ = deadline.sleep(self.config.limits.connect_timeout) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {dst}: timed out"),
            )),
        }
    }

    /// True if `target` would reach the proxy itself (never a tunnel target): one of the
    /// mesh's fixed proxy ports on any address, or the address of one of our listeners (a
    /// wildcard listener's port on any address). A workload's port that merely has the
    /// number of a listener bound to another address is not ours.
    pub fn is_proxy_target(&self, target: SocketAddr) -> bool {
        let a = &self.addrs;
        let target = crate::socket::canonical(target);
        crate::PROXY_PORTS.contains(&target.port())
            || [a.inbound, a.outbound, a.plaintext, a.metrics, a.readiness]
                .iter()
                .any(|listener| {
                    let listener = crate::socket::canonical(*listener);
                    listener.port() == target.port()
                        && (listener.ip().is_unspecified() || listener.ip() == target.ip())
                })
    }

    /// Settings for a socket to or from an application: no Nagle delay, TCP keepalive.
    pub fn tune_app_socket(&self, stream: &TcpStream) {
        let _ = stream.set_nodelay(true);
        if let Err(e) = set_tcp_keepalive(stream, self.config.limits.tcp_keepalive) {
            tracing::debug!("cannot set TCP keepalive: {e}");
        }
    }

    /// True if `addr` is one of our listeners (a connection there would loop).
    pub fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let a = &self.addrs;
        [a.inbound, a.outbound, a.plaintext].contains(&addr)
    }
}

/// The listeners' names, as errors and logs give them.
const INBOUND: &str = "HBONE";
const OUTBOUND: &str = "outbound";
const PLAINTEXT: &str = "plaintext inbound";
pub(crate) const METRICS: &str = "metrics";
pub(crate) const READINESS: &str = "readiness";

/// A bound proxy; call [`Proxy::run`] to serve.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: [TcpListener; 5],
}

impl Proxy {
    /// Binds every listener (so that bind errors surface before serving).
    pub async fn bind(config: ProxyConfig, mut deps: ProxyDeps) -> Result<Self, ProxyError> {
        let mut inherited = std::mem::take(&mut deps.inherited_listeners);
        let mut bind = |what, addr, transparent| {
            listener(addr, transparent, &mut inherited).map_err(|source| ProxyError::Bind {
                what,
                addr,
                source,
            })
        };
        let t = config.ip_transparent;
        let inbound = bind(INBOUND, config.inbound_addr, t)?;
        let outbound = bind(OUTBOUND, config.outbound_addr, t)?;
        let plaintext = bind(PLAINTEXT, config.plaintext_addr, t)?;
        let metrics_l = bind(METRICS, config.metrics_addr, false)?;
        let readiness = bind(READINESS, config.readiness_addr, false)?;
        // Accepted sockets inherit these from their listener: set once here instead of with
        // several system calls per connection. HBONE peers are proxies, watched by HTTP/2
        // PINGs; applications get TCP keepalive.
        let keepalive = config.limits.tcp_keepalive;
        for (what, l, addr, app_keepalive) in [
            (INBOUND, &inbound, config.inbound_addr, None),
            (OUTBOUND, &outbound, config.outbound_addr, keepalive),
            (PLAINTEXT, &plaintext, config.plaintext_addr, keepalive),
        ] {
            tune_listener(l, app_keepalive).map_err(|source| ProxyError::Bind {
                what,
                addr,
                source,
            })?;
        }
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        let addrs = ProxyAddrs {
            inbound: local(&inbound, INBOUND, config.inbound_addr)?,
            outbound: local(&outbound, OUTBOUND, config.outbound_addr)?,
            plaintext: local(&plaintext, PLAINTEXT, config.plaintext_addr)?,
            metrics: local(&metrics_l, METRICS, config.metrics_addr)?,
            readiness: local(&readiness, READINESS, config.readiness_addr)?,
        };
        // Before readiness: the first tunnel after a restart should not pay for it.
        zmesh_identity::tls::warm_up();
        let metrics = Arc::new(Metrics::default());
        let force = CancellationToken::new();
        // Fine enough for every long timer the proxy keeps (at most two periods late).
        let tick = [
            config.keepalive.interval,
            config.keepalive.timeout,
            config.pool.idle_check_every(),
            config.limits.connect_timeout,
        ]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(1))
            / 4;
        let clock = Clock::start(tick.clamp(Duration::from_millis(5), Duration::from_secs(1)))
            .map_err(ProxyError::Clock)?;
        let pool = Pool::new(
            config.pool.clone(),
            config.keepalive,
            clock.clone(),
            deps.credentials.clone(),
            metrics.clone(),
            force.clone(),
        );
        let tunnels = Tunnels::new(deps.workloads.clone(), config.node.clone());
        let max_per_identity = config.limits.max_tunnels_per_identity;
        let shared = Arc::new(Shared {
            config,
            workloads: deps.workloads,
            credentials: deps.credentials,
            authorizer: deps.authorizer,
            original_dst: deps.original_dst,
            metrics,
            // Without subscribers a one-event ring is enough: it still counts.
            flows: deps.flows.unwrap_or_else(|| Arc::new(FlowHub::new(1))),
            connections: Arc::default(),
            tunnels,
            pool,
            affinity: Affinity::new(AFFINITY_CAPACITY),
            clock,
            addrs,
            drain: CancellationToken::new(),
            force,
            tracker: TaskTracker::new(),
            identity_tunnels: IdentityLimit::new(max_per_identity),
            ready: AtomicBool::new(false),
            failure: OnceLock::new(),
        });
        Ok(Self {
            shared,
            listeners: [inbound, outbound, plaintext, metrics_l, readiness],
        })
    }

    pub fn addrs(&self) -> ProxyAddrs {
        self.shared.addrs
    }

    /// Duplicates of the listening sockets, for a successor to inherit
    /// ([`ProxyDeps::inherited_listeners`]).
    pub fn listener_fds(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        self.listeners
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle(self.shared.drain.clone())
    }

    /// Where the proxy publishes flow events.
    pub fn flows(&self) -> Arc<FlowHub> {
        self.shared.flows.clone()
    }

    /// The connections open now.
    pub fn connections(&self) -> Arc<OpenConnections> {
        self.shared.connections.clone()
    }

    /// Serves until drained (see [`DrainHandle`]), or until a listener fails; returns
    /// when every connection closed.
    ///
    /// A listener that fails (an accept error retrying cannot fix, or its task panicking)
    /// turns readiness to 503 naming the failure, and starts a drain like
    /// [`DrainHandle::drain`]; `run` then returns that error. A drain asked for returns
    /// `Ok(())`.
    pub async fn run(self) -> Result<(), ProxyError> {
        let shared = self.shared;
        let [inbound, outbound, plaintext, metrics_l, readiness] = self.listeners;
        let addrs = shared.addrs;
        let admin_stop = CancellationToken::new();
        // Which listener each task serves, to name it if the task fails.
        let mut names = HashMap::new();
        let mut accept = JoinSet::new();
        for (listener, direction, what, addr) in [
            (inbound, Direction::Inbound, INBOUND, addrs.inbound),
            (outbound, Direction::Outbound, OUTBOUND, addrs.outbound),
            (
                plaintext,
                Direction::InboundPlaintext,
                PLAINTEXT,
                addrs.plaintext,
            ),
        ] {
            let name = (what, addr);
            let task = accept.spawn(accept_loop(shared.clone(), listener, direction, name));
            names.insert(task.id(), name);
        }
        let mut admin = JoinSet::new();
        let task = admin.spawn(crate::admin::serve_metrics(
            shared.clone(),
            metrics_l,
            admin_stop.clone(),
        ));
        names.insert(task.id(), (METRICS, addrs.metrics));
        let task = admin.spawn(crate::admin::serve_readiness(
            shared.clone(),
            readiness,
            admin_stop.clone(),
        ));
        names.insert(task.id(), (READINESS, addrs.readiness));
        let recheck = tokio::spawn(recheck_on_change(
            shared.clone(),
            shared.authorizer.changes(),
        ));
        shared.ready.store(true, Ordering::Release);
        tracing::info!(
            node = %shared.config.node,
            inbound = %addrs.inbound,
            outbound = %addrs.outbound,
            plaintext = %addrs.plaintext,
            "proxy ready"
        );

        // Every listener task runs until its stop token: one that ends first failed.
        let mut failure = tokio::select! {
            biased;
            () = shared.drain.cancelled() => None,
            Some(r) = accept.join_next_with_id() => ended(r, &names, shared.drain.is_cancelled()),
            Some(r) = admin.join_next_with_id() => ended(r, &names, false),
        };
        if let Some(e) = &failure {
            failed(&shared, e);
            shared.drain.cancel();
        }
        let started = Instant::now();
        shared.ready.store(false, Ordering::Release);
        tracing::info!(deadline = ?shared.config.limits.drain_deadline, "draining");
        // Accept loops return on drain, closing the listeners: new connections are refused.
        while let Some(r) = accept.join_next_with_id().await {
            if let Some(e) = ended(r, &names, true) {
                failed(&shared, &e);
                failure.get_or_insert(e);
            }
        }
        shared.pool.clear();
        shared.tracker.close();
        if tokio::time::timeout(shared.config.limits.drain_deadline, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = shared.tracker.len(),
                "drain deadline passed; closing remaining connections"
            );
        }
        shared.force.cancel();
        shared.tracker.wait().await;
        recheck.abort();
        admin_stop.cancel();
        while let Some(r) = admin.join_next_with_id().await {
            if let Some(e) = ended(r, &names, true) {
                failed(&shared, &e);
                failure.get_or_insert(e);
            }
        }
        tracing::info!(took = ?started.elapsed(), "drained");
        failure.map_or(Ok(()), Err)
    }
}

/// What a listener task's end means: `None` if it stopped as asked (`stopping`), else
/// the failure.
fn ended(
    r: Result<(tokio::task::Id, Result<(), ProxyError>), JoinError>,
    names: &HashMap<tokio::task::Id, (&'static str, SocketAddr)>,
    stopping: bool,
) -> Option<ProxyError> {
    let id = match &r {
        Ok((id, _)) => *id,
        Err(e) => e.id(),
    };
    // Every task's id was recorded when it was spawned.
    let (what, addr) = names
        .get(&id)
        .copied()
        .unwrap_or(("unknown", unknown_addr()));
    let how = match r {
        Ok((_, Ok(()))) if stopping => return None,
        Ok((_, Ok(()))) => "ended unexpectedly".to_string(),
        Ok((_, Err(e))) => return Some(e),
        Err(e) if e.is_panic() => match panic_message(e.into_panic()) {
            Some(msg) => format!("panicked: {msg}"),
            None => "panicked".to_string(),
        },
        Err(_) => "was cancelled".to_string(),
    };
    Some(ProxyError::ListenerTask { what, addr, how })
}

fn unknown_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> Option<String> {
    match payload.downcast::<String>() {
        Ok(s) => Some(*s),
        Err(payload) => payload.downcast_ref::<&str>().map(|s| s.to_string()),
    }
}

/// `e` and its sources, as one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}

/// Reports a listener failure: logged, and readiness says it (the first one) from now on.
fn failed(shared: &Shared, e: &ProxyError) {
    let why = describe(e);
    if shared.drain.is_cancelled() {
        tracing::error!("{why}");
    } else {
        tracing::error!("{why}: draining; the proxy stops when its connections closed");
    }
    let _ = shared.failure.set(why);
}

/// Re-authorizes open connections whenever the authorizer's rules change, or the workload
/// table gives a local pod another namespace or labels (policies select pods by labels).
async fn recheck_on_change(shared: Arc<Shared>, mut rules: Option<watch::Receiver<u64>>) {
    let mut tables = shared.workloads.subscribe();
    tables.borrow_and_update();
    if let Some(rules) = &mut rules {
        rules.borrow_and_update();
    }
    let node = shared.config.node.as_str();
    let mut local = local_view(&shared.workloads.snapshot(), node);
    loop {
        let why = tokio::select! {
            changed = next_change(&mut rules) => {
                if !changed {
                    rules = None; // the authorizer's rules are final
                    continue;
                }
                "authorization policies changed"
            }
            changed = tables.changed() => {
                if changed.is_err() {
                    return; // the store is gone with the proxy
                }
                tables.borrow_and_update();
                let now = local_view(&shared.workloads.snapshot(), node);
                // Pods coming and going elsewhere change nothing for open connections.
                if now == local {
                    continue;
                }
                local = now;
                "local workloads' labels changed"
            }
            () = shared.tunnels.stale() => "a connection started on an outdated workload table",
        };
        let closed = shared.tunnels.recheck(&shared);
        tracing::info!(
            open = shared.tunnels.len(),
            closed,
            "{why}: open connections re-checked"
        );
    }
}

/// Waits for the next change; `false` when there will be none.
async fn next_change(rules: &mut Option<watch::Receiver<u64>>) -> bool {
    match rules {
        Some(rules) => {
            let changed = rules.changed().await.is_ok();
            rules.borrow_and_update();
            changed
        }
        None => std::future::pending().await,
    }
}

/// What authorization sees of this node's pods: namespace and labels by IP.
fn local_view(table: &WorkloadTable, node: &str) -> LocalView {
    table
        .workloads_on(node)
        .flat_map(|w| {
            w.ips
                .iter()
                .map(|ip| (*ip, (w.namespace.clone(), w.labels.clone())))
        })
        .collect()
}

type LocalView = BTreeMap<IpAddr, (String, Arc<BTreeMap<String, String>>)>;

/// How long to wait after an accept error worth retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Whether an accept error is worth retrying: the listener is fine but the moment is not
/// (out of descriptors, buffers or memory; a connection that failed before it was
/// accepted, as accept(2) lists them; a signal). Anything else will not go away by
/// retrying: EINVAL (the socket no longer listens, e.g. destroyed by `ss -K`), EBADF,
/// ENOTSOCK, EOPNOTSUPP (no stream socket: accept(2) also lists it among a new
/// connection's network errors, but from our own TCP listener it is taken as fatal),
/// EFAULT, and whatever is not listed here.
pub(crate) fn accept_error_is_transient(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(code) => matches!(
            code,
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPERM
                | libc::EPROTO
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ENONET
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENOPROTOOPT
        ),
        None => matches!(
            e.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
        ),
    }
}

/// The next connection on `listener` (named `what`, bound to `addr`), retrying transient
/// errors after a short pause; `None` once `stop` is cancelled.
pub(crate) async fn accept(
    listener: &TcpListener,
    (what, addr): (&'static str, SocketAddr),
    stop: &CancellationToken,
) -> Result<Option<(TcpStream, SocketAddr)>, ProxyError> {
    loop {
        let r = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return Ok(None),
        };
        match r {
            // A dual-stack listener reports IPv4 peers as v4-mapped IPv6.
            Ok((stream, peer)) => return Ok(Some((stream, crate::socket::canonical(peer)))),
            Err(e) if accept_error_is_transient(&e) => {
                tracing::warn!(listener = what, %addr, "accept failed, retrying: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = stop.cancelled() => return Ok(None),
                }
            }
            Err(source) => return Err(ProxyError::ListenerFailed { what, addr, source }),
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    direction: Direction,
    name: (&'static str, SocketAddr),
) -> Result<(), ProxyError> {
    // No per-connection socket options: the stream has its listener's (Proxy::bind).
    while let Some((stream, peer)) = accept(&listener, name, &shared.drain).await? {
        let s = shared.clone();
        let force = shared.force.clone();
        shared.tracker.spawn(async move {
            let work = async {
                match direction {
                    Direction::Inbound => crate::inbound::serve(s, stream, peer).await,
                    Direction::Outbound => crate::outbound::serve(s, stream, peer).await,
                    Direction::InboundPlaintext => crate::plaintext::serve(s, stream, peer).await,
                }
            };
            // The deadline first: a connection whose HBONE connection is being closed by
            // it is cut by the deadline (its log says so), whatever error it would report.
            tokio::select! {
                biased;
                _ = force.cancelled() => {}
                _ = work => {}
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_worth_retrying_and_not() {
        let transient = |code| accept_error_is_transient(&io::Error::from_raw_os_error(code));
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EINTR,
            libc::EAGAIN,
            libc::EPERM,
            libc::EPROTO,
            libc::ETIMEDOUT,
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
        ] {
            assert!(transient(code), "{}", io::Error::from_raw_os_error(code));
        }
        for code in [
            libc::EINVAL,
            libc::EBADF,
            libc::ENOTSOCK,
            libc::EOPNOTSUPP,
            libc::EFAULT,
        ] {
            assert!(!transient(code), "{}", io::Error::from_raw_os_error(code));
        }
        let kind = |k: io::ErrorKind| accept_error_is_transient(&io::Error::from(k));
        assert!(kind(io::ErrorKind::Interrupted));
        assert!(kind(io::ErrorKind::WouldBlock));
        assert!(!kind(io::ErrorKind::Other));
    }

    fn boom() -> Result<(), ProxyError> {
        panic!("boom")
    }

    #[tokio::test]
    async fn listener_tasks_that_end_early_or_panic_are_failures() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 15001));
        let mut names = HashMap::new();
        let mut next = async |task: Result<(), ProxyError>, panics: bool, stopping: bool| {
            let mut set = JoinSet::new();
            let handle = if panics {
                set.spawn(async { boom() })
            } else {
                set.spawn(async { task })
            };
            names.insert(handle.id(), (OUTBOUND, addr));
            let r = set.join_next_with_id().await.expect("one task");
            ended(r, &names, stopping).map(|e| describe(&e))
        };
        let failed = || ProxyError::ListenerFailed {
            what: OUTBOUND,
            addr,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        let on = "the task serving the outbound listener on 127.0.0.1:15001";
        assert_eq!(next(Ok(()), false, true).await, None);
        assert_eq!(
            next(Ok(()), false, false).await,
            Some(format!("{on} ended unexpectedly"))
        );
        assert_eq!(
            next(Ok(()), true, true).await,
            Some(format!("{on} panicked: boom"))
        );
        let listener =
            "outbound listener on 127.0.0.1:15001 failed: Invalid argument (os error 22)";
        for stopping in [false, true] {
            assert_eq!(
                next(Err(failed()), false, stopping).await.as_deref(),
                Some(listener)
            );
        }
    }
}
