//! `zmesh agent`: one per node. Keeps the proxy's workload table, the workload certificates
//! and the eBPF enrollment maps in step with the cluster state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use zmesh_certs::{NodeCredentialRenewer, NodeName};
use zmesh_identity::{
    CertManager, CertManagerConfig, SharedBundle, TrustBundle, TrustDomain, WorkloadId,
};
use zmesh_proxy::flows::FlowHub;
use zmesh_proxy::policy::{PolicyAuthorizer, PolicyStore, TableLabels};
use zmesh_proxy::{Mode, OriginalDst, Proxy, ProxyConfig, ProxyDeps, WorkloadStore};
use zmesh_redirect::{InboundMode, RedirectConfig, Redirector};

use super::admin::{self, AdminState};
use super::cluster_state::ClusterState;
use super::credentials::{ManagedCredentials, WorkloadCertificates};
use super::flows_api;
use super::spire::SpireCertificates;
use super::table::{local_enrolled, workload_table};

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
    pub ca_token: Option<super::token_review::CaTokenCredential>,
    /// The address pods reach the node at; the proxy's outbound listener is here.
    pub proxy_ip: Ipv4Addr,
    pub mode: Mode,
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
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot load node credentials from {dir} (run `zmesh ca join` first): {reason}")]
    Credentials { dir: PathBuf, reason: String },
    #[error("invalid CA bundle: {0}")]
    Bundle(String),
    #[error("eBPF redirection: {0}")]
    Redirect(#[from] zmesh_redirect::RedirectError),
    #[error("proxy: {0}")]
    Proxy(#[from] zmesh_proxy::ProxyError),
    #[error("admin API: {0}")]
    Admin(#[from] admin::AdminError),
    #[error("node name {0:?} is invalid")]
    NodeName(String),
    #[error("CA token credential: {0}")]
    CaToken(#[from] super::token_review::CaTokenError),
    #[error("ztunnel data plane: {0}")]
    Ztunnel(#[from] super::zds::ZtunnelModeError),
}

/// The original destination of a captured connection, from the eBPF map (keyed by the
/// client's address), so the proxy needs no cgroup/getsockopt hook in its own cgroup.
struct MapOriginalDst(Arc<Mutex<Redirector>>);

impl OriginalDst for MapOriginalDst {
    fn original_dst(&self, stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
        let peer = stream.peer_addr()?;
        let mut redirector = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match redirector.original_dst(peer) {
            Ok(Some(dst)) => Ok(dst),
            Ok(None) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no original destination recorded for {peer}"),
            )),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }
}

/// Runs the agent until `shutdown` resolves, then drains the proxy. Redirection stays
/// installed (pinned) so that a restarted agent takes over without breaking connections.
pub async fn run(
    config: AgentConfig,
    mut cluster: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    if let DataPlane::Ztunnel { zds_socket } = &config.data_plane {
        return Ok(super::zds::run_ztunnel(
            zds_socket,
            &config.admin_socket,
            config.trust_domain.clone(),
            config.node.clone(),
            cluster,
            shutdown,
        )
        .await?);
    }
    // The node credential's renewal (zmesh CA only): stopped at shutdown.
    type Renewal = (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    );
    let (certs, bundle, renewal): (Arc<dyn WorkloadCertificates>, SharedBundle, Option<Renewal>) =
        match &config.identity {
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

    let mut steering = match &config.redirect {
        Some(settings) => {
            let steering = Steering::load(&config, settings)?;
            deps.original_dst = Arc::new(MapOriginalDst(steering.redirector.clone()));
            Some(steering)
        }
        None => None,
    };
    let redirector = steering.as_ref().map(|s| s.redirector.clone());
    let drop_events = redirector
        .as_deref()
        .and_then(|r| flows_api::spawn_drop_events(r, workloads.clone(), flows.clone()));
    if config.redirect.is_none() {
        proxy_config.capture = zmesh_proxy::Capture::Explicit;
        proxy_config.ip_transparent = false;
    }
    let proxy = Proxy::bind(proxy_config, deps).await?;
    let drain = proxy.drain_handle();
    let proxy_task = tokio::spawn(proxy.run());
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

    let mut enrolled = Enrolled::default();
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
            if let Some(steering) = steering.as_mut() {
                steering.follow_interfaces();
            }
            enrolled.apply(&state, &config, &*certs, &tls, redirector.as_deref());
            if cluster.changed().await.is_err() {
                // The source is gone (only at shutdown): keep serving the last state.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = reconcile => {}
        _ = shutdown => {}
    }
    tracing::info!("shutting down: draining open connections");
    drain.drain();
    let _ = proxy_task.await;
    admin_task.abort();
    if let Some((stop, task)) = renewal {
        stop.cancel();
        let _ = task.await;
    }
    if let Some(task) = drop_events {
        task.abort();
    }
    admin::remove_socket_if_ours(&config.admin_socket, admin_inode);
    Ok(())
}

/// The installed eBPF programs and which interfaces steer inbound traffic.
struct Steering {
    config: RedirectConfig,
    redirector: Arc<Mutex<Redirector>>,
    /// Attach to every non-loopback interface, following changes.
    follow: bool,
}

impl Steering {
    fn load(config: &AgentConfig, settings: &RedirectSettings) -> Result<Self, AgentError> {
        let mut proxy = zmesh_redirect::ProxyConfig::new(SocketAddrV4::new(config.proxy_ip, 15001));
        proxy.node_mode = match config.mode {
            Mode::Permissive => InboundMode::Permissive,
            Mode::Strict => InboundMode::Strict,
        };
        proxy.other_ports = vec![15000, 15020, 15021];
        let follow = settings.ingress_interfaces.is_empty();
        let ingress_interfaces = if follow {
            node_interfaces().unwrap_or_default()
        } else {
            settings.ingress_interfaces.clone()
        };
        let redirect_config = RedirectConfig {
            pin_dir: settings.pin_dir.clone(),
            cgroup: settings.cgroup.clone(),
            ingress_interfaces,
            proxy,
        };
        // Over an existing installation this reuses the pinned maps: enrollment survives.
        let redirector = Redirector::load(&redirect_config)?;
        Ok(Self {
            config: redirect_config,
            redirector: Arc::new(Mutex::new(redirector)),
            follow,
        })
    }

    /// Attaches tc ingress to interfaces that appeared (new pods' veths) and lets go of
    /// those that left, by reloading over the pins: maps and enrollment are kept.
    fn follow_interfaces(&mut self) {
        if !self.follow {
            return;
        }
        let interfaces = match node_interfaces() {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("cannot list the node's interfaces: {e}");
                return;
            }
        };
        if interfaces == self.config.ingress_interfaces {
            return;
        }
        let mut config = self.config.clone();
        config.ingress_interfaces = interfaces;
        match Redirector::load(&config) {
            Ok(redirector) => {
                tracing::info!(interfaces = ?config.ingress_interfaces, "steering inbound traffic on");
                *self.redirector.lock().unwrap_or_else(|p| p.into_inner()) = redirector;
                self.config = config;
            }
            Err(e) => tracing::error!("cannot attach to the node's new interfaces: {e}"),
        }
    }
}

/// The node's non-loopback interfaces (in this process's network namespace), sorted.
fn node_interfaces() -> std::io::Result<Vec<String>> {
    let output = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()?;
    if !output.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// What this agent has enrolled so far, to apply only the differences.
#[derive(Default)]
struct Enrolled {
    workloads: BTreeSet<WorkloadId>,
    /// Pod (namespace/name) -> (netns cookie, pod IPs) as put into the maps.
    pods: BTreeMap<String, (Option<u64>, Vec<IpAddr>)>,
}

impl Enrolled {
    fn apply(
        &mut self,
        state: &ClusterState,
        config: &AgentConfig,
        certs: &dyn WorkloadCertificates,
        tls: &ManagedCredentials,
        redirector: Option<&Mutex<Redirector>>,
    ) {
        let mut want_workloads = BTreeSet::new();
        let mut want_pods = BTreeMap::new();
        for (pod, id) in local_enrolled(state, &config.trust_domain, &config.node) {
            want_workloads.insert(id);
            let key = pod.key().to_string();
            // Keep a cookie we already resolved: the netns of a running pod does not change.
            let cookie = match self.pods.get(&key) {
                Some((Some(cookie), _)) => Some(*cookie),
                _ => pod.netns_path.as_deref().and_then(|path| match netns_cookie(path) {
                    Ok(cookie) => Some(cookie),
                    Err(e) => {
                        tracing::warn!(pod = %key, path = %path.display(), "cannot read the pod's network namespace: {e}");
                        None
                    }
                }),
            };
            want_pods.insert(key, (cookie, pod.ips.clone()));
        }
        for id in want_workloads.difference(&self.workloads) {
            tracing::info!(workload = %id, "enrolled: fetching its certificate");
            certs.ensure(id);
        }
        for id in self.workloads.difference(&want_workloads) {
            tracing::info!(workload = %id, "left the mesh on this node: forgetting its certificate");
            certs.forget(id);
            tls.forget(id);
        }
        self.workloads = want_workloads;

        if let Some(redirector) = redirector {
            let mut r = redirector.lock().unwrap_or_else(|p| p.into_inner());
            for (key, (cookie, ips)) in &self.pods {
                if want_pods.get(key) != Some(&(*cookie, ips.clone())) {
                    tracing::info!(pod = %key, "un-enrolling from redirection");
                    if let Some(cookie) = cookie {
                        log_err(key, r.unenroll_netns(*cookie));
                    }
                    for ip in ips {
                        log_err(key, r.unenroll_pod_ip(*ip));
                    }
                }
            }
            for (key, (cookie, ips)) in &want_pods {
                if self.pods.get(key) != Some(&(*cookie, ips.clone())) {
                    tracing::info!(pod = %key, ?cookie, ?ips, "enrolling in redirection");
                    if let Some(cookie) = cookie {
                        log_err(key, r.enroll_netns(*cookie));
                    }
                    for ip in ips {
                        log_err(key, r.enroll_pod_ip(*ip, InboundMode::Permissive));
                    }
                }
            }
        }
        self.pods = want_pods;
    }
}

fn log_err(pod: &str, result: Result<(), zmesh_redirect::RedirectError>) {
    if let Err(e) = result {
        tracing::error!(%pod, "redirect map update failed: {e}");
    }
}

/// The cookie of the network namespace at `path` (e.g. /run/netns/NAME), read from a
/// socket created inside it on a short-lived thread.
pub fn netns_cookie(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                zmesh_redirect::current_netns_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// How a node reaches the zmesh CA.
#[derive(Debug, Clone)]
pub struct CaSettings {
    pub node: String,
    pub trust_domain: TrustDomain,
    pub ca_addr: String,
    /// Node credential from `zmesh ca join` (renewed in the background).
    pub credentials_dir: PathBuf,
    /// Or a projected ServiceAccount token (no renewal of ours needed).
    pub ca_token: Option<super::token_review::CaTokenCredential>,
    pub cert_validity: Duration,
}

/// The node's renewal task of its own credential, and how to stop it.
pub type NodeRenewal = (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
);

/// Workload certificates from the zmesh CA, with the trust bundle it teaches us. The node
/// credential renews itself at half-life (and moves to a new root chain during a root
/// rotation), so a node never needs a second join token.
pub fn zmesh_ca_certificates(
    ca: &CaSettings,
) -> Result<(Arc<CertManager>, SharedBundle, Option<NodeRenewal>), AgentError> {
    let node_name = NodeName::new(&ca.node).map_err(|_| AgentError::NodeName(ca.node.clone()))?;
    let (client, roots_pem, renewal) = match &ca.ca_token {
        Some(token) => {
            let (client, roots_pem) = token.client(&ca.ca_addr)?;
            (client, roots_pem, None)
        }
        None => {
            let renewer = Arc::new(
                NodeCredentialRenewer::open(
                    &ca.ca_addr,
                    &ca.credentials_dir,
                    &node_name,
                    &ca.trust_domain,
                )
                .map_err(|e| AgentError::Credentials {
                    dir: ca.credentials_dir.clone(),
                    reason: e.to_string(),
                })?,
            );
            let stop = tokio_util::sync::CancellationToken::new();
            let task = {
                let renewer = renewer.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = renewer.run(stop.cancelled_owned()).await {
                        tracing::error!("node credential renewal stopped: {e}");
                    }
                })
            };
            let roots_pem = renewer.credentials().roots_pem.clone();
            (renewer.client(), roots_pem, Some((stop, task)))
        }
    };
    let mut bundle = TrustBundle::new();
    bundle
        .add_pem(&ca.trust_domain, roots_pem.as_bytes())
        .map_err(|e| AgentError::Bundle(e.to_string()))?;
    let bundle = SharedBundle::new(bundle);
    let certs = Arc::new(CertManager::new(
        Arc::new(client),
        bundle.clone(),
        CertManagerConfig {
            validity: ca.cert_validity,
            ..CertManagerConfig::default()
        },
    ));
    Ok((certs, bundle, renewal))
}
