//! The agent's side of a data path in another process (`--datapath-socket`): it connects,
//! says which proxy it wants, and keeps the data path in step with the agent: the workload
//! table, the authorization policies and the certificates, each sent whole whenever it
//! changed. The data path's flow hub is the node's: the link hands it the agent's eBPF
//! drop reports (counted on its `/metrics`, kept in its history), and the agent's `GET
//! /flows` asks it for its flow events (history, and live ones while a client follows), so
//! `zmesh observe` works as with the proxy in-process, and flow events cost nothing on the
//! socket while nobody observes.
//!
//! If the data path goes away (restarted, upgraded), the link connects again and sends
//! everything anew; meanwhile the status report says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use zmesh_identity::{SharedBundle, TrustDomain};
use zmesh_proxy::connections::OpenConnection;
use zmesh_proxy::flows::{FlowEvent, FlowFilter, FlowHub, FlowSubscription};
use zmesh_proxy::policy::PolicyStore;
use zmesh_proxy::{ProxyConfig, WorkloadStore};

use super::protocol::{
    read_message, write_message, Credentials, FrameError, FromDataPath, ToDataPath,
    PROTOCOL_VERSION,
};
use crate::credentials::WorkloadCertificates;
use crate::flows_api::{FlowQuery, FlowStream, FLOW_HISTORY};

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
    /// The agent's own flow events (its eBPF drop reports), handed to the data path.
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
    requests: mpsc::Sender<Request>,
    socket: PathBuf,
}

/// What the agent asks the data path, with where the answer goes.
enum Request {
    Connections(oneshot::Sender<Vec<OpenConnection>>),
    Flows {
        query: Box<FlowQuery>,
        events: mpsc::Sender<Arc<FlowEvent>>,
    },
}

/// The open flow requests of one session, by id: where their events go.
type FlowReaders = Arc<std::sync::Mutex<HashMap<u64, mpsc::Sender<Arc<FlowEvent>>>>>;

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
        // From the start, and across sessions: reports made while the data path is away
        // wait here (up to the hub's capacity) for the next one.
        let mut agent_flows = sources.flows.subscribe(FlowFilter {
            since: Some(std::time::SystemTime::UNIX_EPOCH),
            ..FlowFilter::default()
        });
        let task = tokio::spawn(async move {
            let requests_rx = Arc::new(Mutex::new(requests_rx));
            loop {
                let session = session(&sources, &state_tx, requests_rx.clone(), &mut agent_flows);
                let outcome = tokio::select! {
                    outcome = session => outcome,
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
            .send(Request::Connections(tx))
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

    /// The data path's answer to `query` (see `flows_api::query_hub`): it ends after the
    /// history, or for a follow when the data path goes away. An error if the data path is
    /// not connected now. A reader more than [`FLOW_HISTORY`] events behind loses the
    /// newest (logged), as a subscriber of the agent's own hub loses the oldest.
    pub async fn flows(&self, query: FlowQuery) -> Result<FlowStream, String> {
        if let LinkState::Connecting { last_error } = self.state() {
            return Err(format!(
                "the data path at {} is not connected{}",
                self.socket.display(),
                last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        let (events, rx) = mpsc::channel(FLOW_HISTORY);
        self.requests
            .send(Request::Flows {
                query: Box::new(query),
                events,
            })
            .await
            .map_err(|_| "the link stopped".to_owned())?;
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|e| (e, rx))
        })))
    }
}

/// Hands one flow event to its reader; false when the reader is gone (the request is then
/// forgotten, and the caller tells the data path to stop it).
fn deliver(readers: &FlowReaders, id: u64, event: FlowEvent) -> bool {
    let mut readers = readers.lock().unwrap_or_else(|p| p.into_inner());
    let Some(reader) = readers.get(&id) else {
        // Already stopped; events in flight still arrive.
        return true;
    };
    match reader.try_send(Arc::new(event)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::debug!(id, "a flow reader fell behind; an event was left out");
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            readers.remove(&id);
            false
        }
    }
}

/// One connection: hello, everything once, then changes as they come. Returns why it
/// ended.
async fn session(
    sources: &LinkSources,
    state: &watch::Sender<LinkState>,
    requests: Arc<Mutex<mpsc::Receiver<Request>>>,
    agent_flows: &mut FlowSubscription,
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

    // Answers to our requests for connections, in the order asked; flow events by their
    // request's id. The session's flow readers end with it (their streams end).
    let (asked_tx, mut asked_rx) = mpsc::channel::<oneshot::Sender<Vec<OpenConnection>>>(16);
    let flow_readers = FlowReaders::default();
    // Flow requests whose reader went away, for the writer to stop.
    let (gone_tx, mut gone_rx) = mpsc::unbounded_channel::<u64>();
    let readers = flow_readers.clone();
    let reading = async move {
        loop {
            match read_message::<_, FromDataPath>(&mut reader).await {
                Ok(FromDataPath::Flow { id, event }) => {
                    if !deliver(&readers, id, *event) {
                        let _ = gone_tx.send(id);
                    }
                }
                Ok(FromDataPath::FlowsEnd { id }) => {
                    readers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                }
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
        let mut next_flow_id = 0u64;
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
                    request = requests.recv() => {
                        let message = match request {
                            None => return "the agent is stopping".into(),
                            Some(Request::Connections(reply)) => {
                                if asked_tx.send(reply).await.is_err() {
                                    return "the reader stopped".into();
                                }
                                ToDataPath::Connections
                            }
                            Some(Request::Flows { query, events }) => {
                                next_flow_id += 1;
                                flow_readers
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(next_flow_id, events);
                                ToDataPath::Flows { id: next_flow_id, query }
                            }
                        };
                        if let Err(e) = write_message(&mut writer, &message).await {
                            return e.to_string();
                        }
                        continue;
                    }
                    Some(event) = agent_flows.recv() => {
                        let event = Box::new(Arc::unwrap_or_clone(event));
                        if let Err(e) = write_message(&mut writer, &ToDataPath::Flow(event)).await {
                            return e.to_string();
                        }
                        continue;
                    }
                    Some(id) = gone_rx.recv() => {
                        if let Err(e) = write_message(&mut writer, &ToDataPath::StopFlows { id }).await {
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
