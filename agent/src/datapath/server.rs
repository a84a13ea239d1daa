//! `zmesh datapath`: the proxy in a process of its own, so that the connections it carries
//! outlive the agent. An agent that crashes, is OOM-killed or upgraded takes nothing with
//! it: the data path keeps serving with the last workload table, policies and certificates
//! it was given, and the next agent to connect brings it up to date.
//!
//! The data path is configured only by the agent (see `protocol`): it binds the proxy when
//! the first agent says hello, and when a later agent asks for another configuration (a
//! mode change, new limits) it starts a new proxy on the same listening sockets and drains
//! the old one, as an agent restart does in-process. One agent at a time: a new
//! connection replaces the previous one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zmesh_identity::{SpiffeId, TrustBundle, TrustDomain, WorkloadId};
use zmesh_proxy::connections::OpenConnections;
use zmesh_proxy::flows::FlowHub;
use zmesh_proxy::policy::{PolicyAuthorizer, PolicyStore, TableLabels};
use zmesh_proxy::{
    DrainHandle, Proxy, ProxyConfig, ProxyDeps, ProxyError, StaticCredentials, TlsCredentials,
    TlsError, WorkloadStore, WorkloadTable,
};

use super::protocol::{
    read_message, write_message, Credentials, FrameError, FromDataPath, ToDataPath,
    PROTOCOL_VERSION,
};
use crate::flows_api::{query_hub, FlowStream};
use crate::local_socket::bind_private;
use crate::steering::MapOriginalDst;

/// Why the data path stopped.
#[derive(Debug, thiserror::Error)]
pub enum DataPathServerError {
    #[error("cannot listen for agents on {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the proxy stopped on its own: {0}")]
    Proxy(#[from] ProxyError),
    #[error("the proxy's task failed: {0}")]
    Panicked(String),
}

/// What every proxy generation shares, and what agents replace.
struct Shared {
    workloads: Arc<WorkloadStore>,
    policies: Arc<PolicyStore>,
    credentials: Arc<PushedCredentials>,
    flows: Arc<FlowHub>,
    /// The proxy running now, if an agent has configured one.
    current: Mutex<Option<Generation>>,
    /// Generations started so far.
    generations: std::sync::atomic::AtomicU64,
    /// A proxy stopped on its own: the process must exit.
    failed: watch::Sender<Option<String>>,
}

struct Generation {
    config: ProxyConfig,
    pin_dir: Option<PathBuf>,
    number: u64,
    drain: DrainHandle,
    connections: Arc<OpenConnections>,
    listener_fds: Vec<std::os::fd::OwnedFd>,
    stopped: tokio::task::JoinHandle<Result<(), ProxyError>>,
}

/// Serves agents on `socket` until `shutdown`, then drains the proxy and returns when its
/// connections are done. Returns an error at once if a proxy stops on its own.
pub async fn serve(
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DataPathServerError> {
    let listener = bind_private(socket).map_err(|source| DataPathServerError::Socket {
        path: socket.to_owned(),
        source,
    })?;
    let shared = Arc::new(Shared {
        workloads: Arc::new(WorkloadStore::new(WorkloadTable::default())),
        policies: Arc::new(PolicyStore::default()),
        credentials: Arc::new(PushedCredentials::default()),
        flows: Arc::new(FlowHub::new(crate::flows_api::FLOW_HISTORY)),
        current: Mutex::new(None),
        generations: Default::default(),
        failed: watch::Sender::new(None),
    });
    tracing::info!(socket = %socket.display(), "waiting for the node agent");
    let mut failed = shared.failed.subscribe();
    let mut agent: Option<CancellationToken> = None;
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // The newest agent wins: an older connection still open belongs to an
                    // agent on its way out.
                    if let Some(previous) = agent.take() {
                        previous.cancel();
                    }
                    let token = CancellationToken::new();
                    agent = Some(token.clone());
                    tokio::spawn(serve_agent(stream, shared.clone(), token));
                }
                Err(e) => {
                    tracing::warn!("agent socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            reason = first_failure(&mut failed) => {
                break Err(DataPathServerError::Panicked(reason));
            }
            () = &mut shutdown => break Ok(()),
        }
    };
    if let Some(agent) = agent {
        agent.cancel();
    }
    let _ = std::fs::remove_file(socket);
    let current = lock(&shared.current).take();
    if let Some(generation) = current {
        if result.is_ok() {
            tracing::info!("shutting down: draining open connections");
            generation.drain.drain();
        }
        match generation.stopped.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(DataPathServerError::Panicked(e.to_string())),
        }
    }
    result
}

/// One agent's connection: the hello, then its snapshots and requests, while our flow
/// events go the other way.
async fn serve_agent(stream: UnixStream, shared: Arc<Shared>, replaced: CancellationToken) {
    let (mut reader, mut writer) = stream.into_split();
    let hello = tokio::select! {
        hello = read_message::<_, ToDataPath>(&mut reader) => hello,
        () = replaced.cancelled() => return,
    };
    let welcome = match hello {
        Ok(ToDataPath::Hello {
            protocol,
            agent_version,
            config,
            pin_dir,
        }) => {
            if protocol != PROTOCOL_VERSION {
                Err(format!(
                    "the agent speaks protocol {protocol}, this data path {PROTOCOL_VERSION}: \
                     run the same zmesh version for both"
                ))
            } else {
                tracing::info!(%agent_version, "a node agent connected");
                configure(&shared, *config, pin_dir).await
            }
        }
        Ok(other) => Err(format!(
            "expected a hello first, got {}",
            message_kind(&other)
        )),
        Err(e) => Err(format!("cannot read the hello: {e}")),
    };
    let generation = match welcome {
        Ok(generation) => generation,
        Err(reason) => {
            tracing::error!("refused an agent: {reason}");
            let _ = write_message(&mut writer, &FromDataPath::Refused { reason }).await;
            return;
        }
    };
    let welcome = FromDataPath::Welcome {
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        generation,
    };
    // One writer: flow events and answers are queued to it.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<FromDataPath>(1024);
    if out_tx.send(welcome).await.is_err() {
        return;
    }
    let writing = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            if let Err(e) = write_message(&mut writer, &message).await {
                tracing::debug!("agent connection: {e}");
                return;
            }
        }
    });
    // The agent's flow requests, each answered by a task of its own.
    let mut flow_requests: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    loop {
        let message = tokio::select! {
            message = read_message::<_, ToDataPath>(&mut reader) => message,
            () = replaced.cancelled() => {
                tracing::info!("a newer agent connected; leaving this one");
                break;
            }
        };
        match message {
            Ok(ToDataPath::Workloads(table)) => {
                tracing::debug!(
                    workloads = table.workloads().count(),
                    "workload table from the agent"
                );
                shared.workloads.replace_shared(table);
            }
            Ok(ToDataPath::Policies(set)) => {
                shared.policies.replace(Arc::unwrap_or_clone(set));
            }
            Ok(ToDataPath::Credentials(credentials)) => {
                shared.credentials.replace(&credentials);
            }
            Ok(ToDataPath::Connections) => {
                let open = lock(&shared.current)
                    .as_ref()
                    .map(|g| g.connections.snapshot())
                    .unwrap_or_default();
                if out_tx.send(FromDataPath::Connections(open)).await.is_err() {
                    break;
                }
            }
            Ok(ToDataPath::Flows { id, query }) => {
                flow_requests.retain(|_, task| !task.is_finished());
                let events = query_hub(&shared.flows, &query);
                let task = tokio::spawn(send_flows(id, events, query.follow, out_tx.clone()));
                if let Some(earlier) = flow_requests.insert(id, task.abort_handle()) {
                    earlier.abort();
                }
            }
            Ok(ToDataPath::Flow(event)) => shared.flows.publish(*event),
            Ok(ToDataPath::StopFlows { id }) => {
                if let Some(task) = flow_requests.remove(&id) {
                    task.abort();
                }
            }
            Ok(ToDataPath::Hello { .. }) => {
                tracing::warn!("agent connection: a second hello; closing it");
                break;
            }
            Err(FrameError::Closed) => {
                tracing::warn!(
                    "the node agent went away; serving with what it last sent until it returns"
                );
                break;
            }
            Err(e) => {
                tracing::warn!("agent connection: {e}; closing it (the state it sent stays)");
                break;
            }
        }
    }
    for task in flow_requests.values() {
        task.abort();
    }
    drop(out_tx);
    let _ = writing.await;
}

/// Makes the running proxy the one `config` describes: nothing to do if it already is;
/// otherwise a new one starts on the current one's listening sockets and the current one
/// drains. Returns the generation serving now.
async fn configure(
    shared: &Arc<Shared>,
    config: ProxyConfig,
    pin_dir: Option<PathBuf>,
) -> Result<u64, String> {
    let inherited = {
        let current = lock(&shared.current);
        match current.as_ref() {
            Some(g) if g.config == config && g.pin_dir == pin_dir => return Ok(g.number),
            Some(g) => g
                .listener_fds
                .iter()
                .map(|fd| fd.try_clone().map(std::net::TcpListener::from))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cannot duplicate the listening sockets: {e}"))?,
            None => Vec::new(),
        }
    };
    let mut deps = ProxyDeps::new(shared.workloads.clone(), shared.credentials.clone());
    deps.authorizer = Arc::new(PolicyAuthorizer::new(
        shared.policies.clone(),
        Arc::new(TableLabels),
    ));
    deps.flows = Some(shared.flows.clone());
    deps.inherited_listeners = inherited;
    if let Some(pins) = &pin_dir {
        let redirector = zmesh_redirect::Redirector::open_pinned(pins)
            .map_err(|e| format!("cannot open the eBPF pins in {}: {e}", pins.display()))?;
        deps.original_dst = Arc::new(MapOriginalDst(Arc::new(Mutex::new(redirector))));
    }
    let proxy = Proxy::bind(config.clone(), deps)
        .await
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    let listener_fds = proxy
        .listener_fds()
        .map_err(|e| format!("cannot duplicate the listening sockets: {e}"))?;
    let number = shared
        .generations
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1;
    let generation = Generation {
        config,
        pin_dir,
        number,
        drain: proxy.drain_handle(),
        connections: proxy.connections(),
        listener_fds,
        stopped: tokio::spawn(watch_proxy(proxy, shared.clone(), number)),
    };
    let previous = lock(&shared.current).replace(generation);
    if let Some(previous) = previous {
        tracing::info!(
            generation = number,
            "configuration changed: draining the previous proxy"
        );
        previous.drain.drain();
        tokio::spawn(async move {
            if let Ok(Err(e)) = previous.stopped.await {
                tracing::warn!("the previous proxy: {e}");
            }
        });
    } else {
        tracing::info!(generation = number, "serving");
    }
    Ok(number)
}

/// Runs a proxy; if it stops without having been replaced (a listener failed), the
/// process exits so that it is restarted.
async fn watch_proxy(proxy: Proxy, shared: Arc<Shared>, number: u64) -> Result<(), ProxyError> {
    let result = proxy.run().await;
    let still_current = lock(&shared.current)
        .as_ref()
        .is_some_and(|g| g.number == number);
    if still_current {
        if let Err(e) = &result {
            shared.failed.send_replace(Some(e.to_string()));
        }
    }
    result
}

/// The reason of the first proxy that stopped on its own.
async fn first_failure(failed: &mut watch::Receiver<Option<String>>) -> String {
    let reason = failed
        .wait_for(Option::is_some)
        .await
        .map(|reason| reason.clone().unwrap_or_default());
    match reason {
        Ok(reason) => reason,
        Err(_) => std::future::pending().await,
    }
}

/// Answers one flow request: its events, then (after a history) the end. A follow that
/// falls behind loses events in its subscription (counted there), never holds up the
/// proxy; the agent's other answers wait behind at most the queue's length.
async fn send_flows(
    id: u64,
    mut events: FlowStream,
    follow: bool,
    out: tokio::sync::mpsc::Sender<FromDataPath>,
) {
    use futures::StreamExt;
    while let Some(event) = events.next().await {
        let event = Box::new(Arc::unwrap_or_clone(event));
        if out.send(FromDataPath::Flow { id, event }).await.is_err() {
            return;
        }
    }
    if !follow {
        let _ = out.send(FromDataPath::FlowsEnd { id }).await;
    }
}

fn message_kind(message: &ToDataPath) -> &'static str {
    match message {
        ToDataPath::Hello { .. } => "hello",
        ToDataPath::Workloads(_) => "workloads",
        ToDataPath::Policies(_) => "policies",
        ToDataPath::Credentials(_) => "credentials",
        ToDataPath::Connections => "connections",
        ToDataPath::Flows { .. } => "flows",
        ToDataPath::StopFlows { .. } => "stop flows",
        ToDataPath::Flow(_) => "flow",
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The certificates the agent sent last; every handshake uses the newest set.
struct PushedCredentials {
    current: ArcSwap<StaticCredentials>,
}

impl Default for PushedCredentials {
    fn default() -> Self {
        let empty = StaticCredentials::new_partial(
            TrustDomain::new("cluster.local").expect("a valid trust domain"),
            TrustBundle::new(),
            Vec::new(),
        )
        .0;
        Self {
            current: ArcSwap::from_pointee(empty),
        }
    }
}

impl PushedCredentials {
    /// Replaces the set; a certificate that fails the checks is left out with an error
    /// (its workload then has none, so its connections fail closed).
    fn replace(&self, credentials: &Credentials) {
        let bundle = match credentials.bundle() {
            Ok(bundle) => bundle,
            Err(e) => {
                tracing::error!("credentials from the agent refused, keeping the last: {e}");
                return;
            }
        };
        let mut certs = Vec::new();
        for cert in credentials.certs() {
            match cert {
                Ok(cert) => certs.push(cert),
                Err(e) => tracing::error!("credentials from the agent: {e}"),
            }
        }
        let count = certs.len();
        let (set, refused) =
            StaticCredentials::new_partial(credentials.trust_domain.clone(), bundle, certs);
        for e in refused {
            tracing::error!("credentials from the agent: {e}");
        }
        tracing::debug!(certificates = count, "workload certificates from the agent");
        self.current.store(Arc::new(set));
    }
}

impl TlsCredentials for PushedCredentials {
    fn server_config(&self, local: &WorkloadId) -> Result<Arc<ServerConfig>, TlsError> {
        self.current.load().server_config(local)
    }

    fn client_config(
        &self,
        source: &WorkloadId,
        expected: &[SpiffeId],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        self.current.load().client_config(source, expected)
    }

    fn expiries(&self) -> Vec<(String, SystemTime)> {
        self.current.load().expiries()
    }
}
