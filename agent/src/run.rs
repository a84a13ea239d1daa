//! `zmesh agent`: one per node. Keeps the proxy's workload table, the workload certificates
//! and the eBPF enrollment maps in step with the cluster state.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
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
use crate::credentials::{ManagedCredentials, WorkloadCertificates};
use crate::datapath::{DataPath, DataPathError};
use crate::flows_api;
use crate::spire::SpireCertificates;
use crate::steering::{Enrolled, MapOriginalDst, Steering};
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
    /// Our proxy and eBPF redirection.
    Zmesh,
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
    #[error("the reconcile loop failed: {0}")]
    Reconcile(String),
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
        return Ok(crate::zds::run_ztunnel(
            zds_socket,
            &config.admin_socket,
            config.trust_domain.clone(),
            config.node.clone(),
            cluster,
            shutdown,
        )
        .await?);
    }
    let (certs, bundle, renewal): (
        Arc<dyn WorkloadCertificates>,
        SharedBundle,
        Option<NodeRenewal>,
    ) = match &config.identity {
        IdentitySource::Spire { socket } => {
            // SPIRE's bundles fill the trust bundle as they arrive; no node credential.
            let bundle = SharedBundle::default();
            let certs = SpireCertificates::start(socket.clone(), bundle.clone());
            (Arc::new(certs), bundle, None)
        }
        IdentitySource::ZmeshCa => {
            let (certs, bundle, renewal) = zmesh_ca_certificates(&CaSettings {
                node: config.node.clone(),
                trust_domain: config.trust_domain.clone(),
                ca_addr: config.ca_addr.clone(),
                credentials_dir: config.credentials_dir.clone(),
                ca_token: config.ca_token.clone(),
                cert_validity: config.cert_validity,
            })?;
            (certs as Arc<dyn WorkloadCertificates>, bundle, renewal)
        }
    };
    let tls = Arc::new(ManagedCredentials::new(
        certs.clone(),
        bundle.clone(),
        config.trust_domain.clone(),
    ));

    let listen = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
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
            let (proxy_ip, listeners, settings) =
                (config.proxy_ip, proxy_config.clone(), settings.clone());
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
    let mut data_path = DataPath::start(proxy_config, deps, config.proxy_threads).await?;
    let admin_task = admin::serve(
        &config.admin_socket,
        AdminState {
            certs: certs.clone(),
            trust_domain: config.trust_domain.clone(),
            flows: flows.clone(),
        },
    )
    .await?;
    let admin_inode = admin::socket_inode(&config.admin_socket);

    // The kernel-facing half of reconciling (map updates, netns reads, netlink) blocks:
    // it runs on a blocking thread, handed back and forth with each state.
    let mut kernel = Some((Enrolled::default(), steering));
    let reconcile = async {
        loop {
            let state = cluster.borrow_and_update().clone();
            workloads.replace(workload_table(
                &state,
                &config.trust_domain,
                &config.node,
                own_hbone,
            ));
            flows_api::sync_policies(&policies, &state);
            let Some((mut enrolled, mut steering)) = kernel.take() else {
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
                enrolled.apply(
                    &state,
                    &trust_domain,
                    &node,
                    &*certs,
                    &tls,
                    redirector.as_deref(),
                );
                (enrolled, steering)
            })
            .await;
            match applied {
                Ok(kept) => kernel = Some(kept),
                Err(reason) => return AgentError::Reconcile(reason),
            }
            if cluster.changed().await.is_err() {
                // The source is gone (only at shutdown): keep serving the last state.
                std::future::pending::<()>().await;
            }
        }
    };
    let result = tokio::select! {
        error = reconcile => Err(error),
        stopped = data_path.stopped() => {
            // The proxy stopped on its own: nothing carries traffic any more.
            Err(match stopped {
                Ok(()) => AgentError::Proxy(DataPathError::Panicked(
                    "the proxy stopped without being asked to".into(),
                )),
                Err(e) => AgentError::Proxy(e),
            })
        }
        _ = shutdown => {
            tracing::info!("shutting down: draining open connections");
            // The pinned ring buffer has one reader position: while we drain, a new agent
            // (an upgrade) already reads it, and every report we took would be lost to it.
            if let Some(task) = &drop_events {
                task.abort();
            }
            data_path.drain();
            data_path.stopped().await.map_err(AgentError::from)
        }
    };
    if let Err(e) = &result {
        tracing::error!("agent stopping: {e}");
    }
    admin_task.abort();
    if let Some((stop, task)) = renewal {
        stop.cancel();
        let _ = task.await;
    }
    if let Some(task) = drop_events {
        task.abort();
    }
    admin::remove_socket_if_ours(&config.admin_socket, admin_inode);
    result
}

/// Runs blocking work on tokio's blocking pool; `Err` says why it did not finish.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("blocking task failed: {e}"))
}
