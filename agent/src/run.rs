//! `zmesh agent`: one per node. Keeps the proxy's workload table, the workload certificates
//! and the eBPF enrollment maps in step with the cluster state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use zmesh_cluster::ClusterState;
use zmesh_identity::{SharedBundle, TrustDomain};
use zmesh_proxy::flows::FlowHub;
use zmesh_proxy::policy::{PolicyAuthorizer, PolicyStore, TableLabels};
use zmesh_proxy::{Limits, Mode, ProxyConfig, ProxyDeps, WorkloadStore};

use crate::admin::{self, AdminState};
use crate::ca::{zmesh_ca_certificates, CaError, CaSettings, CaTokenCredential, NodeRenewal};
use crate::cni_install::{self, CniInstall};
use crate::cni_server::{self, CniServer, EnrollmentView};
use crate::cni_state::CniStateFile;
use crate::credentials::{ManagedCredentials, WorkloadCertificates};
use crate::datapath::link::{DataPathLink, LinkSources};
use crate::datapath::{DataPath, DataPathError};
use crate::discovery::{NetnsRegistry, PodNetnsDiscovery};
use crate::flows_api;
use crate::handover;
use crate::spire::SpireCertificates;
use crate::steering::{Applied, Enrolled, MapOriginalDst, Steering};
use crate::table::workload_table;

/// Everything `zmesh agent` is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub trust_domain: TrustDomain,
    /// `host:port` of the CA.
    pub ca_addr: String,
    /// Node credentials from `zmesh ca join` (node.pem, node.key, ca-bundle.pem).
    pub credentials_dir: PathBuf,
    /// Authenticate to the CA with a ServiceAccount token instead (Kubernetes).
    pub ca_token: Option<CaTokenCredential>,
    /// The address pods reach the node at; the proxy's outbound listener is here.
    pub proxy_ip: Ipv4Addr,
    /// The IPv6 address pods reach the node at: with it IPv6 is steered too (dual-stack
    /// pods) and the proxy listens on `[::]` (both families) instead of 0.0.0.0.
    pub proxy_ip6: Option<Ipv6Addr>,
    pub mode: Mode,
    /// The proxy's timeouts and limits.
    pub proxy_limits: Limits,
    /// The cluster's DNS domain (Service hostnames in HBONE requests).
    pub cluster_domain: String,
    /// This cluster's id, in the `baggage` of HBONE requests and answers.
    pub cluster_id: String,
    /// Worker threads of the proxy's runtime (1: one thread, 0: one per CPU), as `zmesh
    /// proxy --worker-threads`.
    pub proxy_threads: usize,
    pub admin_socket: PathBuf,
    pub cert_validity: Duration,
    /// eBPF redirection; `None` runs the proxy without capture (explicit clients only).
    pub redirect: Option<RedirectSettings>,
    /// Who issues workload certificates.
    pub identity: IdentitySource,
    /// Who carries the traffic.
    pub data_plane: DataPlane,
    /// The node's /proc, where pods' network namespaces are found by their cgroups
    /// (`/proc` with hostPID; the host's /proc mounted elsewhere without).
    pub host_proc: PathBuf,
    /// Network namespaces told to the agent by pod UID (by the CNI plugin); they take
    /// precedence over the scan of `host_proc`. Clones share the table.
    pub netns_registry: NetnsRegistry,
    /// Where to keep the list of namespaces that enroll pods, for the CNI plugin (`None`:
    /// not written).
    pub cni_state_file: Option<PathBuf>,
    /// Where the CNI plugin asks to enroll starting pods (`None`: not served).
    pub cni_socket: Option<PathBuf>,
    /// Install the CNI plugin on the node and keep it installed (`None`: someone else
    /// installs it). Left installed when the agent stops.
    pub cni_install: Option<CniInstall>,
    /// This build, as the admin API's `GET /version` reports it.
    pub build: crate::config_api::BuildInfo,
    /// Changes the log filter at run time (admin API `PUT /log`); `None`: fixed.
    pub log: Option<crate::config_api::LogControl>,
    /// Where to send the agent's status report every `REPORT_EVERY` (the Kubernetes Lease
    /// publisher); `None`: only `GET /status` on the admin socket.
    pub status_reports: Option<watch::Sender<Option<zmesh_cluster::agent_status::AgentStatus>>>,
}

/// Who issues workload certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// The zmesh CA at `ca_addr`, with this node's credential.
    ZmeshCa,
    /// A SPIRE agent's Workload API socket (SVIDs and bundles; no zmesh CA involved).
    Spire { socket: PathBuf },
}

/// Who carries the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPlane {
    /// Our proxy (on a thread of the agent: it goes down with the agent) and eBPF
    /// redirection.
    Zmesh,
    /// Our proxy in its own process (`zmesh datapath` serving `socket`), so that the
    /// connections it carries outlive the agent; eBPF redirection.
    ZmeshProcess { socket: PathBuf },
    /// A stock Istio ztunnel, fed the node's pods over ZDS on `zds_socket`.
    Ztunnel { zds_socket: PathBuf },
}

#[derive(Debug, Clone)]
pub struct RedirectSettings {
    /// cgroup v2 directory holding this node's pods (programs attach here).
    pub cgroup: PathBuf,
    /// bpffs directory for this node's pins.
    pub pin_dir: PathBuf,
    /// Interfaces whose ingress steers traffic to enrolled pods (underlay and pod veths).
    /// Empty: every non-loopback interface of the node, followed as pods come and go.
    pub ingress_interfaces: Vec<String>,
    /// How tc ingress attaches (TCX or a clsact filter); `Auto` probes the kernel.
    pub tc_attach: zmesh_redirect::TcAttach,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("eBPF redirection: {0}")]
    Redirect(#[from] zmesh_redirect::RedirectError),
    #[error("proxy: {0}")]
    Proxy(#[from] DataPathError),
    #[error("admin API: {0}")]
    Admin(#[from] admin::AdminError),
    #[error("ztunnel data plane: {0}")]
    Ztunnel(#[from] crate::zds::ZtunnelModeError),
    #[error(transparent)]
    Cni(#[from] crate::cni_server::CniServerError),
    #[error("the reconcile loop failed: {0}")]
    Reconcile(String),
    #[error("listener handover: {0}")]
    Handover(#[from] handover::HandoverError),
}

/// Runs the agent until `shutdown` resolves, then drains the proxy. Redirection stays
/// installed (pinned) so that a restarted agent takes over without breaking connections.
/// Returns an error if the proxy stops on its own (the agent must then be restarted).
pub async fn run(
    config: AgentConfig,
    mut cluster: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    if let DataPlane::Ztunnel { zds_socket } = &config.data_plane {
        return Ok(crate::zds::run_ztunnel(zds_socket, &config, cluster, shutdown).await?);
    }
    let (certs, bundle, renewal, ca_client): (
        Arc<dyn WorkloadCertificates>,
        SharedBundle,
        Option<NodeRenewal>,
        Option<zmesh_certs::IstioCaClient>,
    ) = match &config.identity {
        IdentitySource::Spire { socket } => {
            // SPIRE's bundles fill the trust bundle as they arrive; no node credential.
            let bundle = SharedBundle::default();
            let certs = SpireCertificates::start(socket.clone(), bundle.clone());
            (Arc::new(certs), bundle, None, None)
        }
        IdentitySource::ZmeshCa => {
            let ca = zmesh_ca_certificates(&CaSettings {
                node: config.node.clone(),
                trust_domain: config.trust_domain.clone(),
                ca_addr: config.ca_addr.clone(),
                credentials_dir: config.credentials_dir.clone(),
                ca_token: config.ca_token.clone(),
                cert_validity: config.cert_validity,
            })?;
            let certs = ca.certs as Arc<dyn WorkloadCertificates>;
            (certs, ca.bundle, ca.renewal, Some(ca.client))
        }
    };
    let tls = Arc::new(ManagedCredentials::new(
        certs.clone(),
        bundle.clone(),
        config.trust_domain.clone(),
    ));

    let listen = match config.proxy_ip6 {
        Some(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let mut proxy_config = ProxyConfig::new(config.node.clone(), listen);
    proxy_config.mode = config.mode;
    proxy_config.limits = config.proxy_limits.clone();
    proxy_config.cluster_domain = config.cluster_domain.clone();
    proxy_config.cluster_id = config.cluster_id.clone();
    let own_hbone = SocketAddr::new(
        IpAddr::V4(config.proxy_ip),
        proxy_config.inbound_addr.port(),
    );
    let workloads = Arc::new(WorkloadStore::new(workload_table(
        &cluster.borrow_and_update(),
        &config.trust_domain,
        &config.node,
        own_hbone,
    )));
    let mut deps = ProxyDeps::new(workloads.clone(), tls.clone());
    // Authorization policies from the cluster state, enforced by the proxy; its flow
    // events (and the eBPF drops) go to the hub the admin API streams from.
    let policies = Arc::new(PolicyStore::new((**cluster.borrow().policies()).clone()));
    deps.authorizer = Arc::new(PolicyAuthorizer::new(
        policies.clone(),
        Arc::new(TableLabels),
    ));
    let flows = Arc::new(FlowHub::new(flows_api::FLOW_HISTORY));
    deps.flows = Some(flows.clone());

    let steering = match &config.redirect {
        Some(settings) => {
            let (proxy_ip, listeners, settings) = (
                (config.proxy_ip, config.proxy_ip6),
                proxy_config.clone(),
                settings.clone(),
            );
            let steering = blocking(move || Steering::load(proxy_ip, &listeners, &settings))
                .await
                .map_err(AgentError::Reconcile)??;
            deps.original_dst = Arc::new(MapOriginalDst(steering.redirector.clone()));
            Some(steering)
        }
        None => {
            proxy_config.capture = zmesh_proxy::Capture::Explicit;
            proxy_config.ip_transparent = false;
            None
        }
    };
    let redirector = steering.as_ref().map(|s| s.redirector.clone());
    let drop_events = redirector
        .as_deref()
        .and_then(|r| flows_api::spawn_drop_events(r, workloads.clone(), flows.clone()));
    // A running predecessor hands its listening sockets over: both serve on them until it
    // drains, so a restart refuses no connection.
    let handover_path = handover::socket_path(&config.admin_socket);
    let path = handover_path.clone();
    // (Not with a data path process: it holds the listeners, and sockets taken from an
    // agent that ran the proxy itself would only keep the data path from binding them.)
    let separate = matches!(config.data_plane, DataPlane::ZmeshProcess { .. });
    deps.inherited_listeners = match blocking(move || {
        if separate {
            Ok(Vec::new())
        } else {
            handover::receive(&path)
        }
    })
    .await
    {
        Ok(Ok(listeners)) => {
            if !listeners.is_empty() {
                tracing::info!(
                    count = listeners.len(),
                    "took over the running agent's listening sockets"
                );
            }
            listeners
        }
        Ok(Err(e)) => {
            tracing::warn!("no listener handover, binding fresh sockets: {e}");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(
                "no listener handover (the receiving task failed), binding fresh sockets: {e}"
            );
            Vec::new()
        }
    };
    let link_stop = tokio_util::sync::CancellationToken::new();
    let (mut running, connections) = match &config.data_plane {
        DataPlane::ZmeshProcess { socket } => {
            let (link, task) = DataPathLink::start(
                LinkSources {
                    socket: socket.clone(),
                    config: proxy_config,
                    pin_dir: config.redirect.as_ref().map(|r| r.pin_dir.clone()),
                    workloads: workloads.clone(),
                    policies: policies.clone(),
                    certs: certs.clone(),
                    bundle: bundle.clone(),
                    trust_domain: config.trust_domain.clone(),
                    flows: flows.clone(),
                },
                link_stop.clone(),
            );
            let connections = admin::ConnectionsSource::Process(link.clone());
            (Running::Process { link, task }, connections)
        }
        DataPlane::Zmesh | DataPlane::Ztunnel { .. } => {
            let mut data_path = DataPath::start(proxy_config, deps, config.proxy_threads).await?;
            // Once a successor took the sockets over, it reads the drop reports (one
            // reader of the ring buffer, or reports go to the agent on its way out).
            let drop_reader = drop_events.as_ref().map(|task| task.abort_handle());
            let handover_task = handover::serve(
                &handover_path,
                std::mem::take(&mut data_path.listener_fds),
                move || {
                    if let Some(reader) = &drop_reader {
                        reader.abort();
                    }
                },
            )?;
            let connections = admin::ConnectionsSource::Thread(data_path.connections.clone());
            (
                Running::Thread {
                    data_path,
                    handover_task,
                    handover_inode: admin::socket_inode(&handover_path),
                },
                connections,
            )
        }
    };
    // What the last pass applied, for the CNI plugin's requests (they wake the loop) and
    // the status report.
    let redirecting = steering.is_some();
    let (publish_view, view) = watch::channel(Arc::new(EnrollmentView {
        state: cluster.borrow().clone(),
        pods: Default::default(),
        redirecting,
        pass: 0,
    }));
    let passes = Arc::new(AtomicU64::new(0));
    let status_source = crate::status::StatusSource {
        node: config.node.clone(),
        mode: config.mode,
        build: config.build.clone(),
        ca: ca_client,
        data_plane: crate::status::DataPlaneSource::Zmesh {
            certs: certs.clone(),
            view: view.clone(),
            pin_dir: config.redirect.as_ref().map(|r| r.pin_dir.clone()),
            link: running.link(),
        },
    };
    let admin_task = admin::serve(
        &config.admin_socket,
        AdminState {
            certs: certs.clone(),
            trust_domain: config.trust_domain.clone(),
            flows: flows.clone(),
            data_path: Some(crate::admin::DataPathView {
                workloads: workloads.clone(),
                connections,
            }),
            cluster: cluster.clone(),
            build: config.build.clone(),
            log: config.log.clone(),
            status: Some(status_source.clone()),
        },
    )
    .await?;
    let admin_inode = admin::socket_inode(&config.admin_socket);
    let status_task = config.status_reports.clone().map(|sink| {
        tokio::spawn(crate::status::refresh(
            status_source.clone(),
            sink,
            zmesh_cluster::agent_status::REPORT_EVERY,
        ))
    });

    // The kernel-facing half of reconciling (map updates, netns reads, the /proc scan,
    // netlink, the CNI state file) blocks: it runs on a blocking thread, handed back and
    // forth with each state.
    let discovery = PodNetnsDiscovery::new(&config.host_proc, config.netns_registry.clone());
    let cni_state = config.cni_state_file.as_ref().map(CniStateFile::new);
    let mut kernel = Some((Enrolled::new(discovery), steering, cni_state));
    let wake = Arc::new(tokio::sync::Notify::new());
    let cni_task = match &config.cni_socket {
        Some(path) => Some(cni_server::serve(
            path,
            CniServer {
                node: config.node.clone(),
                registry: config.netns_registry.clone(),
                view,
                wake: wake.clone(),
                passes: passes.clone(),
            },
        )?),
        None => None,
    };
    let cni_inode = config.cni_socket.as_deref().map(admin::socket_inode);
    // Only once the socket is served: a pod started through the entry asks it at once.
    let install_task = config.cni_install.clone().map(cni_install::keep_installed);
    let reconcile = async {
        let mut retry = RetryBackoff::default();
        let mut last_state: Option<Arc<ClusterState>> = None;
        loop {
            let pass = passes.fetch_add(1, Ordering::SeqCst) + 1;
            // Pods the CNI plugin just started have their IPs before their Pod status does.
            let state = config
                .netns_registry
                .fill_pod_ips(cluster.borrow_and_update().clone());
            // A retry for pods' namespaces comes with the same state: the table and the
            // policies are already in step with it.
            if !last_state
                .as_ref()
                .is_some_and(|last| Arc::ptr_eq(last, &state))
            {
                workloads.replace(workload_table(
                    &state,
                    &config.trust_domain,
                    &config.node,
                    own_hbone,
                ));
                flows_api::sync_policies(&policies, &state);
                last_state = Some(state.clone());
            }
            let Some((mut enrolled, mut steering, mut cni_state)) = kernel.take() else {
                return AgentError::Reconcile("lost the enrollment state".into());
            };
            let (certs, tls, trust_domain, node) = (
                certs.clone(),
                tls.clone(),
                config.trust_domain.clone(),
                config.node.clone(),
            );
            let applied = blocking(move || {
                if let Some(steering) = steering.as_mut() {
                    steering.follow_interfaces();
                }
                let redirector = steering.as_ref().map(|s| s.redirector.clone());
                let applied = enrolled.apply(
                    &state,
                    &trust_domain,
                    &node,
                    &*certs,
                    &tls,
                    redirector.as_deref(),
                );
                let enrolled_pods = enrolled.netns_cookies();
                if let Some(file) = cni_state.as_mut() {
                    // Tried again with the next state (the set is remembered only once
                    // written).
                    if let Err(e) = file.update(&state) {
                        tracing::error!("the CNI plugin's state file: {e}");
                    }
                }
                (applied, enrolled_pods, (enrolled, steering, cni_state))
            })
            .await;
            let Applied { unresolved } = match applied {
                Ok((applied, enrolled_pods, kept)) => {
                    kernel = Some(kept);
                    publish_view.send_replace(Arc::new(EnrollmentView {
                        state: last_state.clone().unwrap_or_default(),
                        pods: enrolled_pods,
                        redirecting,
                        pass,
                    }));
                    applied
                }
                Err(reason) => return AgentError::Reconcile(reason),
            };
            // Pods whose containers have not started yet have no namespace to find: look
            // again after a short while (nothing else would wake us), less often the
            // longer it takes; a change of the cluster state wakes us at once.
            let wait = (unresolved > 0).then(|| retry.next());
            tokio::select! {
                changed = cluster.changed() => {
                    retry = RetryBackoff::default();
                    if changed.is_err() {
                        // The source is gone (only at shutdown): keep serving the last state.
                        std::future::pending::<()>().await;
                    }
                }
                () = sleep_or_never(wait) => {
                    tracing::debug!(unresolved, "looking again for pods' network namespaces");
                }
                () = wake.notified() => {
                    tracing::debug!("the CNI plugin registered a pod: enrolling it now");
                }
            }
        }
    };
    let result = tokio::select! {
        error = reconcile => Err(error),
        stopped = running.stopped_on_its_own() => {
            // The proxy stopped on its own: nothing carries traffic any more.
            Err(match stopped {
                Ok(()) => AgentError::Proxy(DataPathError::Panicked(
                    "the proxy stopped without being asked to".into(),
                )),
                Err(e) => AgentError::Proxy(e),
            })
        }
        _ = shutdown => {
            // The pinned ring buffer has one reader position: while we drain, a new agent
            // (an upgrade) already reads it, and every report we took would be lost to it.
            if let Some(task) = &drop_events {
                task.abort();
            }
            match &mut running {
                Running::Thread { data_path, handover_task, .. } => {
                    tracing::info!("shutting down: draining open connections");
                    // The sockets go with the drain (unless a successor holds them too).
                    handover_task.abort();
                    data_path.drain();
                    data_path.stopped().await.map_err(AgentError::from)
                }
                Running::Process { .. } => {
                    tracing::info!(
                        "shutting down; the data path process keeps serving the open connections"
                    );
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = &result {
        tracing::error!("agent stopping: {e}");
    }
    admin_task.abort();
    if let Some(task) = status_task {
        task.abort();
    }
    if let Some(task) = cni_task {
        task.abort();
    }
    // Aborted between passes or while one runs on the blocking pool (it then finishes;
    // every write is atomic). The entry stays: pods keep starting across agent upgrades.
    if let Some(task) = install_task {
        task.abort();
    }
    match running {
        Running::Thread {
            handover_task,
            handover_inode,
            ..
        } => {
            handover_task.abort();
            admin::remove_socket_if_ours(&handover_path, handover_inode);
        }
        Running::Process { task, .. } => {
            link_stop.cancel();
            let _ = task.await;
        }
    }
    if let Some((stop, task)) = renewal {
        stop.cancel();
        let _ = task.await;
    }
    if let Some(task) = drop_events {
        task.abort();
    }
    admin::remove_socket_if_ours(&config.admin_socket, admin_inode);
    if let (Some(path), Some(inode)) = (&config.cni_socket, cni_inode) {
        // The plugin then sees the agent as down (its failure policy) at once.
        admin::remove_socket_if_ours(path, inode);
    }
    result
}

/// The proxy as this agent runs it.
enum Running {
    /// On a thread of ours, its listening sockets offered to a successor.
    Thread {
        data_path: DataPath,
        handover_task: tokio::task::JoinHandle<()>,
        handover_inode: u64,
    },
    /// In the data path process, kept in step over the link.
    Process {
        link: DataPathLink,
        task: tokio::task::JoinHandle<()>,
    },
}

impl Running {
    fn link(&self) -> Option<DataPathLink> {
        match self {
            Running::Process { link, .. } => Some(link.clone()),
            Running::Thread { .. } => None,
        }
    }

    /// Resolves when a proxy on our thread stopped by itself; a data path process that
    /// goes away is reconnected to instead (the link says so meanwhile).
    async fn stopped_on_its_own(&mut self) -> Result<(), DataPathError> {
        match self {
            Running::Thread { data_path, .. } => data_path.stopped().await,
            Running::Process { .. } => std::future::pending().await,
        }
    }
}

/// How long to wait before looking again for pods' network namespaces: 200 ms, doubling
/// up to 5 s.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RetryBackoff {
    next: Duration,
}

impl RetryBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// Sleeps for `wait`, or forever without one.
async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Runs blocking work on tokio's blocking pool; `Err` says why it did not finish.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("blocking task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_200ms_to_5s() {
        let mut backoff = RetryBackoff::default();
        let waits: Vec<u64> = (0..8).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }
}
