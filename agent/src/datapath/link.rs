//! The agent's side of a data path in another process (`--datapath-socket`): it connects,
//! says which proxy it wants, and keeps the data path in step with the agent: the workload
//! table, the authorization policies and the certificates, each sent whole whenever it
//! changed. The data path's flow events are published to the agent's own hub, so `zmesh
//! flows` works as with the proxy in-process.
//!
//! If the data path goes away (restarted, upgraded), the link connects again and sends
//! everything anew; meanwhile the status report says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use zmesh_identity::{SharedBundle, TrustDomain};
use zmesh_proxy::connections::OpenConnection;
use zmesh_proxy::flows::FlowHub;
use zmesh_proxy::policy::PolicyStore;
use zmesh_proxy::{ProxyConfig, WorkloadStore};

use super::protocol::{
    read_message, write_message, Credentials, FrameError, FromDataPath, ToDataPath,
    PROTOCOL_VERSION,
};
use crate::credentials::WorkloadCertificates;

/// What the link keeps the data path in step with.
pub(crate) struct LinkSources {
    pub socket: PathBuf,
    pub config: ProxyConfig,
    pub pin_dir: Option<PathBuf>,
    pub workloads: Arc<WorkloadStore>,
    pub policies: Arc<PolicyStore>,
    pub certs: Arc<dyn WorkloadCertificates>,
    pub bundle: SharedBundle,
    pub trust_domain: TrustDomain,
    pub flows: Arc<FlowHub>,
}

/// Whether the data path is connected, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting {
        last_error: Option<String>,
    },
    /// The data path accepted our hello.
    Connected {
        pid: u32,
        generation: u64,
    },
}

/// The running link.
#[derive(Clone)]
pub struct DataPathLink {
    state: watch::Receiver<LinkState>,
    requests: mpsc::Sender<oneshot::Sender<Vec<OpenConnection>>>,
    socket: PathBuf,
}

/// How often the link looks for a change nobody announced (a certificate that expired),
/// and how long it waits between connection attempts.
const RECHECK: Duration = Duration::from_secs(5);
const RECONNECT: Duration = Duration::from_millis(200);
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

impl DataPathLink {
    /// Starts connecting (and reconnecting) in the background, until `stop` is cancelled.
    pub(crate) fn start(
        sources: LinkSources,
        stop: tokio_util::sync::CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (state_tx, state) = watch::channel(LinkState::Connecting { last_error: None });
        let (requests, requests_rx) = mpsc::channel(16);
        let socket = sources.socket.clone();
        let task = tokio::spawn(async move {
            let requests_rx = Arc::new(Mutex::new(requests_rx));
            loop {
                let outcome = tokio::select! {
                    outcome = session(&sources, &state_tx, requests_rx.clone()) => outcome,
                    () = stop.cancelled() => return,
                };
                let reason = match outcome {
                    Ok(()) => "the data path closed the connection".to_owned(),
                    Err(e) => e,
                };
                let was_connected = matches!(*state_tx.borrow(), LinkState::Connected { .. });
                if was_connected {
                    tracing::warn!(
                        socket = %sources.socket.display(),
                        "lost the data path: {reason}; connecting again"
                    );
                }
                state_tx.send_replace(LinkState::Connecting {
                    last_error: Some(reason),
                });
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
        (
            Self {
                state,
                requests,
                socket,
            },
            task,
        )
    }

    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until the data path accepted our hello, or `timeout`.
    pub async fn connected(&self, timeout: Duration) -> Result<(), String> {
        let mut state = self.state.clone();
        let wait = async {
            state
                .wait_for(|s| matches!(s, LinkState::Connected { .. }))
                .await
                .is_ok()
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the link stopped".into()),
            Err(_) => Err(match self.state() {
                LinkState::Connecting {
                    last_error: Some(e),
                } => e,
                _ => "no answer".into(),
            }),
        }
    }

    /// The data path's open connections.
    pub async fn connections(&self) -> Result<Vec<OpenConnection>, String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| "the link stopped".to_owned())?;
        match tokio::time::timeout(ASK_TIMEOUT, rx).await {
            Ok(Ok(open)) => Ok(open),
            Ok(Err(_)) => Err(format!(
                "the data path at {} is not connected",
                self.socket.display()
            )),
            Err(_) => Err("the data path did not answer within 5 s".into()),
        }
    }
}

/// One connection: hello, everything once, then changes as they come. Returns why it
/// ended.
async fn session(
    sources: &LinkSources,
    state: &watch::Sender<LinkState>,
    requests: Arc<Mutex<mpsc::Receiver<oneshot::Sender<Vec<OpenConnection>>>>>,
) -> Result<(), String> {
    let stream = UnixStream::connect(&sources.socket)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", sources.socket.display()))?;
    let (mut reader, mut writer) = stream.into_split();
    let hello = ToDataPath::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        config: Box::new(sources.config.clone()),
        pin_dir: sources.pin_dir.clone(),
    };
    write_message(&mut writer, &hello)
        .await
        .map_err(|e| e.to_string())?;
    match read_message::<_, FromDataPath>(&mut reader).await {
        Ok(FromDataPath::Welcome {
            protocol: _,
            version,
            pid,
            generation,
        }) => {
            tracing::info!(pid, generation, %version, "connected to the data path");
            state.send_replace(LinkState::Connected { pid, generation });
        }
        Ok(FromDataPath::Refused { reason }) => {
            return Err(format!("the data path refused us: {reason}"))
        }
        Ok(_) => return Err("the data path did not answer the hello".into()),
        Err(e) => return Err(format!("reading the data path's answer: {e}")),
    }

    // Answers to our requests, in the order asked.
    let (asked_tx, mut asked_rx) = mpsc::channel::<oneshot::Sender<Vec<OpenConnection>>>(16);
    let flows = sources.flows.clone();
    let reading = async move {
        loop {
            match read_message::<_, FromDataPath>(&mut reader).await {
                Ok(FromDataPath::Flow(event)) => flows.publish(*event),
                Ok(FromDataPath::Connections(open)) => {
                    if let Ok(reply) = asked_rx.try_recv() {
                        let _ = reply.send(open);
                    }
                }
                Ok(other) => return format!("unexpected message from the data path: {other:?}"),
                Err(FrameError::Closed) => return "the data path closed the connection".into(),
                Err(e) => return e.to_string(),
            }
        }
    };

    let mut workloads_changed = sources.workloads.subscribe();
    let mut policies_changed = sources.policies.subscribe();
    let mut certs_changed = sources.certs.changes();
    let mut requests = requests.lock().await;
    let writing = async {
        let mut sent_credentials: Option<Credentials> = None;
        let mut recheck = tokio::time::interval(RECHECK);
        let mut first = true;
        loop {
            // Everything on the first pass; afterwards what changed (credentials are
            // compared, since an expiry changes them without a notification).
            let (table, policies) = if first {
                (true, true)
            } else {
                tokio::select! {
                    _ = workloads_changed.changed() => (true, false),
                    _ = policies_changed.changed() => (false, true),
                    _ = changed_or_never(certs_changed.as_mut()) => (false, false),
                    _ = recheck.tick() => (false, false),
                    reply = requests.recv() => {
                        let Some(reply) = reply else { return "the agent is stopping".into() };
                        if asked_tx.send(reply).await.is_err() {
                            return "the reader stopped".into();
                        }
                        if let Err(e) = write_message(&mut writer, &ToDataPath::Connections).await {
                            return e.to_string();
                        }
                        continue;
                    }
                }
            };
            first = false;
            if table {
                workloads_changed.borrow_and_update();
                let message = ToDataPath::Workloads(sources.workloads.snapshot());
                if let Err(e) = write_message(&mut writer, &message).await {
                    return e.to_string();
                }
            }
            if policies {
                policies_changed.borrow_and_update();
                let message = ToDataPath::Policies(sources.policies.snapshot());
                if let Err(e) = write_message(&mut writer, &message).await {
                    return e.to_string();
                }
            }
            let credentials = Credentials::new(
                sources.trust_domain.clone(),
                &sources.bundle.snapshot(),
                sources.certs.export(),
            );
            if sent_credentials.as_ref() != Some(&credentials) {
                let message = ToDataPath::Credentials(credentials.clone());
                if let Err(e) = write_message(&mut writer, &message).await {
                    return e.to_string();
                }
                sent_credentials = Some(credentials);
            }
        }
    };
    let reason = tokio::select! {
        reason = reading => reason,
        reason = writing => reason,
    };
    Err(reason)
}

async fn changed_or_never(rx: Option<&mut watch::Receiver<u64>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
