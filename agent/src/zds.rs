//! Stock Istio ztunnel as the data plane (`zmesh agent --data-plane ztunnel`): instead of
//! running our proxy and eBPF redirection, the agent serves ZDS (compat's [`ZdsServer`])
//! and hands ztunnel every enrolled pod of this node with its network namespace, and
//! installs the pod's capture there ([`crate::inpod`]: what istio-cni does in Istio), so
//! that ztunnel's in-pod listeners see the pod's traffic; ztunnel asks the CA for the pod's
//! certificate itself. A pod taken away loses its capture first (its traffic is plaintext
//! again), then leaves ztunnel.
//!
//! A pod's ZDS uid is `<namespace>/<name>` (the cluster state carries no Kubernetes UID).
//! A pod recreated under the same name has a new network namespace: it is sent as a `del`
//! of the old one followed by an `add`.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use zmesh_compat::zds::{Delivery, WorkloadInfo, ZdsError, ZdsHandle, ZdsServer};
use zmesh_identity::{TrustDomain, WorkloadId};

use crate::admin::{self, AdminState, CertInfo};
use crate::credentials::{RotateError, RotateFuture, WorkloadCertificates};
use crate::flows_api;
use crate::table::local_enrolled;
use zmesh_cluster::{ClusterState, PodInfo};
use zmesh_dataplane::Mode;

use crate::inpod::{self, InPodError};

/// Why a pod could not be handed to ztunnel (it is retried on the next change).
#[derive(Debug, thiserror::Error)]
pub enum PodHandoverError {
    #[error("pod {pod} has no network namespace path (annotation zmesh.io/netns)")]
    NoNetnsPath { pod: String },
    #[error("pod {pod}: cannot open its network namespace {path}: {source}")]
    OpenNetns {
        pod: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {pod}: {source}")]
    Zds { pod: String, source: ZdsError },
    #[error("pod {pod}: its capture (nftables in its network namespace): {source}")]
    Capture { pod: String, source: InPodError },
}

/// What was handed to ztunnel for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    info: WorkloadInfo,
    /// (device, inode) of the network namespace: a recreated pod has a new one.
    netns: (u64, u64),
    /// ztunnel refused the add: it is sent again on the next reconcile.
    refused: bool,
    /// Where its network namespace is, to take the capture out again.
    netns_path: PathBuf,
    /// The capture is in place (it is installed after ztunnel took the pod).
    captured: bool,
}

/// What the reconciler's last pass achieved, for the agent's status report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandoverReport {
    /// The node's enrolled pods.
    pub enrolled: usize,
    /// What went wrong with some of them (not handed over, or not captured).
    pub failed: Vec<String>,
}

/// Keeps a ZDS server's workloads equal to the enrolled pods of one node.
pub struct ZdsReconciler {
    handle: ZdsHandle,
    trust_domain: TrustDomain,
    node: String,
    mode: Mode,
    sent: BTreeMap<String, Sent>,
    report: watch::Sender<HandoverReport>,
    /// Local pods that are not enrolled have been checked for a capture left behind by an
    /// earlier agent (once, at the first reconcile).
    swept: bool,
}

impl ZdsReconciler {
    pub fn new(
        handle: ZdsHandle,
        trust_domain: TrustDomain,
        node: impl Into<String>,
        mode: Mode,
    ) -> Self {
        Self {
            handle,
            trust_domain,
            node: node.into(),
            mode,
            sent: BTreeMap::new(),
            report: watch::channel(HandoverReport::default()).0,
            swept: false,
        }
    }

    /// Follows [`HandoverReport`]s, one after each pass.
    pub fn reports(&self) -> watch::Receiver<HandoverReport> {
        self.report.subscribe()
    }

    /// Sends the differences between `state` and what ztunnel has: `del` for pods that
    /// left (or were recreated), `add` for new ones. Returns the pods that could not be
    /// handed over; they are retried on the next call.
    pub async fn apply(&mut self, state: &ClusterState) -> Vec<PodHandoverError> {
        let mut problems = Vec::new();
        if !self.swept {
            self.swept = true;
            problems.extend(self.sweep_unenrolled(state).await);
        }
        let mut want: BTreeMap<String, (&PodInfo, WorkloadId)> = BTreeMap::new();
        for (pod, id) in local_enrolled(state, &self.trust_domain, &self.node) {
            want.insert(pod.key().to_string(), (pod, id));
        }
        let enrolled = want.len();
        // Open every wanted namespace first, so a recreated pod is noticed by its inode.
        let mut opened: BTreeMap<String, (OwnedFd, (u64, u64), WorkloadInfo, PathBuf)> =
            BTreeMap::new();
        for (uid, (pod, id)) in &want {
            match open_netns(uid, pod) {
                Ok((fd, ns, path)) => {
                    let info = WorkloadInfo {
                        name: pod.name.clone(),
                        namespace: id.namespace().to_owned(),
                        service_account: id.service_account().to_owned(),
                    };
                    opened.insert(uid.clone(), (fd, ns, info, path));
                }
                Err(e) => problems.push(e),
            }
        }

        let gone: Vec<String> = self
            .sent
            .iter()
            .filter(|(uid, sent)| match opened.get(*uid) {
                Some((_, ns, info, _)) => sent.netns != *ns || sent.info != *info,
                // A pod whose namespace cannot be opened any more has gone away too.
                None => true,
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            let Some(sent) = self.sent.remove(&uid) else {
                continue;
            };
            // Plaintext again before ztunnel closes the pod's listeners: no connection is
            // captured to a listener that is going away.
            if sent.captured {
                if let Err(source) = uncapture(&sent.netns_path, sent.netns).await {
                    problems.push(PodHandoverError::Capture {
                        pod: uid.clone(),
                        source,
                    });
                }
            }
            tracing::info!(pod = %uid, "taking the pod away from ztunnel");
            match self.handle.del(&uid).await {
                Ok(delivery) => log_delivery("del", &uid, delivery),
                // ztunnel forgot it already; the server dropped it from its snapshot.
                Err(e) => tracing::warn!(pod = %uid, "ztunnel refused the del: {e}"),
            }
        }

        for (uid, (fd, ns, info, path)) in opened {
            match self.sent.get_mut(&uid) {
                Some(s) if !s.refused && s.captured => continue,
                // Handed over, but its capture failed: try the capture again.
                Some(s) if !s.refused => {
                    match capture(&fd, self.mode).await {
                        Ok(()) => s.captured = true,
                        Err(source) => {
                            problems.push(PodHandoverError::Capture { pod: uid, source })
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let for_capture = match fd.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    problems.push(PodHandoverError::OpenNetns {
                        pod: uid.clone(),
                        path: path.clone(),
                        source: e,
                    });
                    continue;
                }
            };
            tracing::info!(pod = %uid, service_account = %info.service_account, "handing the pod to ztunnel");
            match self.handle.add(&uid, info.clone(), fd).await {
                Ok(delivery) => {
                    log_delivery("add", &uid, delivery);
                    // After ztunnel has the pod (its in-pod listeners are up once it acked);
                    // with no ztunnel connected the pod's traffic fails closed until one is.
                    let captured = match capture(&for_capture, self.mode).await {
                        Ok(()) => true,
                        Err(source) => {
                            problems.push(PodHandoverError::Capture {
                                pod: uid.clone(),
                                source,
                            });
                            false
                        }
                    };
                    self.sent.insert(
                        uid,
                        Sent {
                            info,
                            netns: ns,
                            refused: false,
                            netns_path: path,
                            captured,
                        },
                    );
                }
                // The server keeps a refused pod for the next snapshot: remember it so
                // that it is deleted when it leaves, and retry the add.
                Err(source @ ZdsError::Nack { .. }) => {
                    self.sent.insert(
                        uid.clone(),
                        Sent {
                            info,
                            netns: ns,
                            refused: true,
                            netns_path: path,
                            captured: false,
                        },
                    );
                    problems.push(PodHandoverError::Zds { pod: uid, source });
                }
                Err(source) => problems.push(PodHandoverError::Zds { pod: uid, source }),
            }
        }
        for p in &problems {
            tracing::warn!("{p}");
        }
        self.report.send_replace(HandoverReport {
            enrolled,
            failed: problems.iter().map(ToString::to_string).collect(),
        });
        problems
    }

    /// Takes the capture out of every local pod that is not enrolled (any more): an earlier
    /// agent may have left it when the pod's namespace was un-enrolled while no agent ran.
    async fn sweep_unenrolled(&self, state: &ClusterState) -> Vec<PodHandoverError> {
        let enrolled: Vec<(String, String)> = state
            .enrolled_on(&self.node)
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        let candidates: Vec<(String, PathBuf)> = state
            .pods()
            .filter(|p| p.node.as_deref() == Some(self.node.as_str()) && !p.host_network)
            .filter(|p| !enrolled.contains(&(p.namespace.clone(), p.name.clone())))
            .filter_map(|p| Some((format!("{}/{}", p.namespace, p.name), p.netns_path.clone()?)))
            .collect();
        let mut problems = Vec::new();
        for (pod, path) in candidates {
            let Ok(file) = std::fs::File::open(&path) else {
                continue; // gone with its namespace
            };
            let fd = OwnedFd::from(file);
            match blocking(move || inpod::remove(fd.as_fd())).await {
                Ok(true) => tracing::info!(%pod, "removed the capture an earlier agent left"),
                Ok(false) => {}
                Err(source) => problems.push(PodHandoverError::Capture { pod, source }),
            }
        }
        problems
    }

    /// Applies every new cluster state until the source goes away.
    pub async fn follow(mut self, mut cluster: watch::Receiver<Arc<ClusterState>>) {
        loop {
            let state = cluster.borrow_and_update().clone();
            self.apply(&state).await;
            if cluster.changed().await.is_err() {
                return;
            }
        }
    }
}

fn log_delivery(request: &str, uid: &str, delivery: Delivery) {
    match delivery {
        Delivery::Acked => tracing::debug!(pod = %uid, request, "ztunnel acknowledged"),
        Delivery::Pending => {
            tracing::info!(pod = %uid, request, "no ztunnel connected: it gets this in its snapshot")
        }
    }
}

/// Installs the capture in the namespace `fd` on a blocking thread.
async fn capture(fd: &OwnedFd, mode: Mode) -> Result<(), InPodError> {
    let fd = fd.try_clone().map_err(InPodError::Enter)?;
    blocking(move || inpod::install(fd.as_fd(), mode)).await
}

/// Takes the capture out of the namespace at `path`, if it is still the one with identity
/// `ns` (a namespace that is gone took its rules with it).
async fn uncapture(path: &Path, ns: (u64, u64)) -> Result<(), InPodError> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(());
    };
    match file.metadata() {
        Ok(meta) if (meta.dev(), meta.ino()) == ns => {}
        _ => return Ok(()),
    }
    let fd = OwnedFd::from(file);
    blocking(move || inpod::remove(fd.as_fd()).map(drop)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, InPodError> + Send + 'static,
) -> Result<T, InPodError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(InPodError::Enter(std::io::Error::other(e.to_string()))))
}

/// Opens the pod's network namespace; returns the fd, the namespace's identity and path.
fn open_netns(
    uid: &str,
    pod: &PodInfo,
) -> Result<(OwnedFd, (u64, u64), PathBuf), PodHandoverError> {
    let path = pod
        .netns_path
        .as_ref()
        .ok_or_else(|| PodHandoverError::NoNetnsPath {
            pod: uid.to_owned(),
        })?;
    let open_err = |source| PodHandoverError::OpenNetns {
        pod: uid.to_owned(),
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    Ok((OwnedFd::from(file), (meta.dev(), meta.ino()), path.clone()))
}

/// The admin API's certificate view in ztunnel mode: ztunnel holds the certificates.
struct HeldByZtunnel;

const ZTUNNEL_HOLDS_CERTS: &str = "this agent runs with --data-plane ztunnel: ztunnel requests \
and renews the workload certificates itself (see ztunnel's admin port, 15000, /config_dump)";

impl WorkloadCertificates for HeldByZtunnel {
    fn ensure(&self, _: &WorkloadId) {}

    fn forget(&self, _: &WorkloadId) {}

    fn current(&self, _: &WorkloadId) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn resolver(&self, _: &WorkloadId) -> Arc<dyn rustls::server::ResolvesServerCert> {
        Arc::new(NoCertificate)
    }

    fn status(&self) -> Vec<CertInfo> {
        Vec::new()
    }

    fn can_rotate(&self) -> Result<(), RotateError> {
        Err(RotateError::NotOurs(ZTUNNEL_HOLDS_CERTS.to_owned()))
    }

    fn rotate<'a>(&'a self, _: &'a WorkloadId) -> RotateFuture<'a> {
        Box::pin(std::future::ready(Err(RotateError::NotOurs(
            ZTUNNEL_HOLDS_CERTS.to_owned(),
        ))))
    }
}

/// Presents nothing: this agent terminates no TLS in ztunnel mode.
#[derive(Debug)]
struct NoCertificate;

impl rustls::server::ResolvesServerCert for NoCertificate {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// Why the ztunnel-mode agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum ZtunnelModeError {
    #[error("ZDS: {0}")]
    Zds(#[from] ZdsError),
    #[error("admin API: {0}")]
    Admin(#[from] admin::AdminError),
}

/// Runs the agent in ztunnel mode until `shutdown`: ZDS on `zds_socket`, the admin API on
/// `admin_socket` (it says that certificates are ztunnel's).
pub async fn run_ztunnel(
    zds_socket: &std::path::Path,
    config: &crate::AgentConfig,
    cluster: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ZtunnelModeError> {
    let admin_socket = config.admin_socket.as_path();
    let (trust_domain, node, mode) = (
        config.trust_domain.clone(),
        config.node.clone(),
        config.mode,
    );
    let server = ZdsServer::bind(zds_socket)?;
    tracing::info!(socket = %zds_socket.display(), "serving ZDS: waiting for ztunnel to connect");
    let reconciler = ZdsReconciler::new(server.handle(), trust_domain.clone(), node, mode);
    let status_source = crate::status::StatusSource {
        node: config.node.clone(),
        mode,
        build: config.build.clone(),
        ca: None,
        data_plane: crate::status::DataPlaneSource::Ztunnel {
            zds: server.handle(),
            handover: reconciler.reports(),
        },
    };
    let status_task = config.status_reports.clone().map(|sink| {
        tokio::spawn(crate::status::refresh(
            status_source.clone(),
            sink,
            zmesh_cluster::agent_status::REPORT_EVERY,
        ))
    });
    let admin_task = admin::serve(
        admin_socket,
        AdminState {
            certs: Arc::new(HeldByZtunnel),
            trust_domain: trust_domain.clone(),
            flows: Arc::new(zmesh_proxy::flows::FlowHub::new(flows_api::FLOW_HISTORY)),
            // ztunnel holds the workloads and connections (`istioctl ztunnel-config`).
            data_path: None,
            cluster: cluster.clone(),
            build: config.build.clone(),
            log: config.log.clone(),
            status: Some(status_source),
        },
    )
    .await?;
    let admin_inode = admin::socket_inode(admin_socket);
    tokio::select! {
        _ = async {
            reconciler.follow(cluster).await;
            // The source is gone (only at shutdown): ztunnel keeps the last state.
            std::future::pending::<()>().await
        } => {}
        _ = shutdown => {}
    }
    admin_task.abort();
    if let Some(task) = status_task {
        task.abort();
    }
    admin::remove_socket_if_ours(admin_socket, admin_inode);
    // Dropping the server removes its socket; ztunnel keeps its pods until a new agent
    // connects and sends a snapshot.
    drop(server);
    Ok(())
}
