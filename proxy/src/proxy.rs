//! Binding, running and draining the proxy's listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::{AllowAll, Authorizer};
use crate::clock::Clock;
use crate::flows::FlowHub;
use crate::keepalive::Keepalive;
use crate::metrics::{Direction, Metrics};
use crate::pool::{Pool, PoolConfig};
use crate::socket::{bind_listener, OriginalDst, SoOriginalDst};
use crate::tls::TlsCredentials;
use crate::tunnels::Tunnels;
use crate::workloads::{WorkloadStore, WorkloadTable};

/// How traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// eBPF steers pod traffic to the listeners: the inbound destination is the local
    /// address of the accepted socket, and an HBONE `:authority` must name that address.
    Transparent,
    /// No capture (benchmarks, tests): clients dial the listeners directly; an HBONE
    /// `:authority` must name a workload of this node, and plaintext inbound uses the
    /// [`OriginalDst`] lookup.
    Explicit,
}

/// What to do with plain TCP to local workloads from outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Pass it through (migration friendly; the default, as Istio's PERMISSIVE).
    #[default]
    Permissive,
    /// Refuse it: only mTLS reaches the workloads.
    Strict,
}

/// Where and how the proxy listens.
#[derive(Debug, Clone)]
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
    /// How long open tunnels may take to finish after a drain starts.
    pub drain_deadline: Duration,
    /// Upstream TCP connect timeout.
    pub connect_timeout: Duration,
    pub pool: PoolConfig,
    /// HTTP/2 PINGs on every HBONE connection, inbound and pooled outbound.
    pub keepalive: Keepalive,
}

impl ProxyConfig {
    /// The standard ports on `ip`, transparent capture, permissive mode.
    pub fn new(node: impl Into<String>, ip: IpAddr) -> Self {
        Self {
            node: node.into(),
            inbound_addr: SocketAddr::new(ip, 15008),
            outbound_addr: SocketAddr::new(ip, 15001),
            plaintext_addr: SocketAddr::new(ip, 15006),
            metrics_addr: SocketAddr::new(ip, 15020),
            readiness_addr: SocketAddr::new(ip, 15021),
            ip_transparent: true,
            capture: Capture::Transparent,
            mode: Mode::Permissive,
            drain_deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            pool: PoolConfig::default(),
            keepalive: Keepalive::default(),
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

/// What the proxy is built from, besides its config.
pub struct ProxyDeps {
    pub workloads: Arc<WorkloadStore>,
    pub credentials: Arc<dyn TlsCredentials>,
    pub authorizer: Arc<dyn Authorizer>,
    pub original_dst: Arc<dyn OriginalDst>,
    /// Where every finished or refused connection is published; `None`: the proxy keeps
    /// only the counters (served on /metrics either way).
    pub flows: Option<Arc<FlowHub>>,
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
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen for {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the proxy's clock thread: {0}")]
    Clock(std::io::Error),
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
    /// Open inbound connections, re-authorized when policies or local pods' labels change.
    pub tunnels: Tunnels,
    pub pool: Arc<Pool>,
    /// Ticks the long timers (keepalive, idle connections): see clock.rs.
    pub clock: Clock,
    pub addrs: ProxyAddrs,
    /// Cancelled when draining starts.
    pub drain: CancellationToken,
    /// Cancelled when the drain deadline passes: everything closes.
    pub force: CancellationToken,
    pub tracker: TaskTracker,
    pub ready: AtomicBool,
}

impl Shared {
    /// True if `port` is one of the proxy's own (never a tunnel target).
    pub fn is_proxy_port(&self, port: u16) -> bool {
        let a = &self.addrs;
        crate::PROXY_PORTS.contains(&port)
            || [a.inbound, a.outbound, a.plaintext, a.metrics, a.readiness]
                .iter()
                .any(|addr| addr.port() == port)
    }

    /// True if `addr` is one of our listeners (a connection there would loop).
    pub fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let a = &self.addrs;
        [a.inbound, a.outbound, a.plaintext].contains(&addr)
    }
}

/// A bound proxy; call [`Proxy::run`] to serve.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: [TcpListener; 5],
}

impl Proxy {
    /// Binds every listener (so that bind errors surface before serving).
    pub async fn bind(config: ProxyConfig, deps: ProxyDeps) -> Result<Self, ProxyError> {
        let bind = |what, addr, transparent| {
            bind_listener(addr, transparent).map_err(|source| ProxyError::Bind {
                what,
                addr,
                source,
            })
        };
        let t = config.ip_transparent;
        let inbound = bind("HBONE", config.inbound_addr, t)?;
        let outbound = bind("outbound", config.outbound_addr, t)?;
        let plaintext = bind("plaintext inbound", config.plaintext_addr, t)?;
        let metrics_l = bind("metrics", config.metrics_addr, false)?;
        let readiness = bind("readiness", config.readiness_addr, false)?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        let addrs = ProxyAddrs {
            inbound: local(&inbound, "HBONE", config.inbound_addr)?,
            outbound: local(&outbound, "outbound", config.outbound_addr)?,
            plaintext: local(&plaintext, "plaintext inbound", config.plaintext_addr)?,
            metrics: local(&metrics_l, "metrics", config.metrics_addr)?,
            readiness: local(&readiness, "readiness", config.readiness_addr)?,
        };
        // Before readiness: the first tunnel after a restart should not pay for it.
        zmesh_identity::tls::warm_up();
        let metrics = Arc::new(Metrics::default());
        let force = CancellationToken::new();
        // Fine enough for every long timer the proxy keeps (at most one period late).
        let tick = [
            config.keepalive.interval,
            config.keepalive.timeout,
            config.pool.idle_check_every(),
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
        let shared = Arc::new(Shared {
            config,
            workloads: deps.workloads,
            credentials: deps.credentials,
            authorizer: deps.authorizer,
            original_dst: deps.original_dst,
            metrics,
            // Without subscribers a one-event ring is enough: it still counts.
            flows: deps.flows.unwrap_or_else(|| Arc::new(FlowHub::new(1))),
            tunnels,
            pool,
            clock,
            addrs,
            drain: CancellationToken::new(),
            force,
            tracker: TaskTracker::new(),
            ready: AtomicBool::new(false),
        });
        Ok(Self {
            shared,
            listeners: [inbound, outbound, plaintext, metrics_l, readiness],
        })
    }

    pub fn addrs(&self) -> ProxyAddrs {
        self.shared.addrs
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

    /// Serves until drained (see [`DrainHandle`]); returns when every connection closed.
    pub async fn run(self) {
        let shared = self.shared;
        let [inbound, outbound, plaintext, metrics_l, readiness] = self.listeners;
        let admin_stop = CancellationToken::new();
        let mut accept = tokio::task::JoinSet::new();
        accept.spawn(accept_loop(shared.clone(), inbound, Direction::Inbound));
        accept.spawn(accept_loop(shared.clone(), outbound, Direction::Outbound));
        accept.spawn(accept_loop(
            shared.clone(),
            plaintext,
            Direction::InboundPlaintext,
        ));
        let admin = tokio::spawn(crate::admin::serve(
            shared.clone(),
            metrics_l,
            readiness,
            admin_stop.clone(),
        ));
        let recheck = tokio::spawn(recheck_on_change(
            shared.clone(),
            shared.authorizer.changes(),
        ));
        shared.ready.store(true, Ordering::Release);
        tracing::info!(
            node = %shared.config.node,
            inbound = %shared.addrs.inbound,
            outbound = %shared.addrs.outbound,
            plaintext = %shared.addrs.plaintext,
            "proxy ready"
        );

        shared.drain.cancelled().await;
        let started = Instant::now();
        shared.ready.store(false, Ordering::Release);
        tracing::info!(deadline = ?shared.config.drain_deadline, "draining");
        // Accept loops return on drain, closing the listeners: new connections are refused.
        while accept.join_next().await.is_some() {}
        shared.pool.clear();
        shared.tracker.close();
        if tokio::time::timeout(shared.config.drain_deadline, shared.tracker.wait())
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
        let _ = admin.await;
        tracing::info!(took = ?started.elapsed(), "drained");
    }
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

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, direction: Direction) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(direction = direction.as_str(), "accept failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = shared.drain.cancelled() => return,
                    }
                }
            },
            _ = shared.drain.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
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
}
