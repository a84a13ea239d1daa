//! The agent's admin API: HTTP/1.1 on a unix socket (mode 0600), never on the network.
//! `zmesh certs status|rotate` and `zmesh observe` talk to it.
//!
//! - `GET /certs`: every workload certificate the agent holds.
//! - `GET /flows?...`: flow events as NDJSON, history then live (see `flows_api`).
//! - `POST /certs/rotate?workload=NS/SA` or `?all=true`: renews now, one JSON line per
//!   workload as each finishes (so the CLI can show progress).
//! - `GET /config/{workloads,services,policies,connections}`, `GET /version`, `GET|PUT
//!   /log`: see `config_api`.
//! - `GET /status`: the agent's report about itself (see `status`).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use zmesh_identity::{CertStatus, TrustDomain, WorkloadId};

use crate::config_api;
use crate::credentials::{RotateError, WorkloadCertificates};
use crate::local_socket;

type Body = BoxBody<Bytes, Infallible>;

/// Why the admin API could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin socket {path}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the agent at {path} (is it running on this node?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin request failed: {0}")]
    Http(String),
    #[error("the agent answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the agent's answer is malformed: {0}")]
    Malformed(String),
}

/// One workload certificate, as `zmesh certs status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub workload: String,
    pub serial: Option<String>,
    /// Seconds since the epoch (RFC 3339 in JSON, as every time the CLI prints).
    #[serde(with = "epoch_rfc3339")]
    pub not_after: Option<u64>,
    #[serde(with = "epoch_rfc3339")]
    pub next_attempt: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

impl From<&CertStatus> for CertInfo {
    fn from(s: &CertStatus) -> Self {
        Self {
            workload: s.workload.to_string(),
            serial: s.serial.clone(),
            not_after: s.not_after.map(epoch_seconds),
            next_attempt: s.next_attempt.map(epoch_seconds),
            last_error: s.last_error.as_ref().map(|e| e.to_string()),
            consecutive_failures: s.consecutive_failures,
        }
    }
}

/// The outcome of one forced renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateResult {
    pub workload: String,
    pub ok: bool,
    pub serial: Option<String>,
    #[serde(with = "epoch_rfc3339")]
    pub not_after: Option<u64>,
    pub error: Option<String>,
}

/// Seconds since the epoch, written as RFC 3339 (UTC).
mod epoch_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            None => s.serialize_none(),
            Some(secs) => {
                let at = OffsetDateTime::from_unix_timestamp(*secs as i64)
                    .map_err(serde::ser::Error::custom)?;
                s.serialize_str(&at.format(&Rfc3339).map_err(serde::ser::Error::custom)?)
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let at = OffsetDateTime::parse(&text, &Rfc3339).map_err(serde::de::Error::custom)?;
        u64::try_from(at.unix_timestamp())
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

pub fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the admin API serves from.
#[derive(Clone)]
pub struct AdminState {
    /// The node's workload certificates, from the zmesh CA or SPIRE.
    pub certs: Arc<dyn WorkloadCertificates>,
    pub trust_domain: TrustDomain,
    /// The flow events `GET /flows` streams (see `flows_api`).
    pub flows: Arc<zmesh_proxy::flows::FlowHub>,
    /// Our proxy, `None` when a stock ztunnel carries the traffic.
    pub data_path: Option<DataPathView>,
    /// The cluster as the agent sees it (policies, and the invalid ones).
    pub cluster: tokio::sync::watch::Receiver<Arc<zmesh_cluster::ClusterState>>,
    pub build: crate::config_api::BuildInfo,
    /// `None`: the log level cannot be changed at run time.
    pub log: Option<crate::config_api::LogControl>,
    /// The agent's report about itself (`GET /status`); `None` in ztunnel mode.
    pub status: Option<crate::status::StatusSource>,
}

/// What the admin API shows of the proxy.
#[derive(Clone)]
pub struct DataPathView {
    /// Its workload table.
    pub workloads: Arc<zmesh_proxy::WorkloadStore>,
    /// Its open connections.
    pub connections: ConnectionsSource,
}

/// Where the proxy's open connections are read.
#[derive(Clone)]
pub enum ConnectionsSource {
    /// The proxy runs on a thread of the agent.
    Thread(Arc<zmesh_proxy::connections::OpenConnections>),
    /// The proxy runs in the data path process: asked over the link.
    Process(crate::datapath::link::DataPathLink),
}

const ZTUNNEL_HOLDS_IT: &str =
    "a stock ztunnel carries this node's traffic: ask it (istioctl ztunnel-config)";

/// Serves the admin API on `path` until the task is dropped. A stale socket from a crashed
/// agent is replaced.
pub async fn serve(
    path: &Path,
    state: AdminState,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let listener = local_socket::bind_private(path).map_err(|source| AdminError::Bind {
        path: path.to_owned(),
        source,
    })?;
    Ok(local_socket::accept_each(
        listener,
        "admin",
        move |stream| {
            let state = state.clone();
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(req, state).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!("admin connection ended: {e}");
                }
            }
        },
    ))
}

async fn route(req: Request<Incoming>, state: AdminState) -> Response<Body> {
    let query = parse_query(req.uri().query().unwrap_or(""));
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/certs") => {
            let infos: Vec<CertInfo> = state.certs.status();
            json(StatusCode::OK, &infos)
        }
        (&Method::POST, "/certs/rotate") => rotate(&state, &query),
        (&Method::GET, "/config/workloads") => match &state.data_path {
            Some(dp) => json(
                StatusCode::OK,
                &config_api::workloads(&dp.workloads.snapshot()),
            ),
            None => error(StatusCode::NOT_IMPLEMENTED, ZTUNNEL_HOLDS_IT),
        },
        (&Method::GET, "/config/services") => match &state.data_path {
            Some(dp) => json(
                StatusCode::OK,
                &config_api::services(&dp.workloads.snapshot()),
            ),
            None => error(StatusCode::NOT_IMPLEMENTED, ZTUNNEL_HOLDS_IT),
        },
        (&Method::GET, "/config/policies") => {
            let cluster = state.cluster.borrow().clone();
            json(StatusCode::OK, &config_api::policies(&cluster))
        }
        (&Method::GET, "/config/connections") => match &state.data_path {
            Some(DataPathView {
                connections: ConnectionsSource::Thread(open),
                ..
            }) => json(StatusCode::OK, &open.snapshot()),
            Some(DataPathView {
                connections: ConnectionsSource::Process(link),
                ..
            }) => match link.connections().await {
                Ok(open) => json(StatusCode::OK, &open),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
            },
            None => error(StatusCode::NOT_IMPLEMENTED, ZTUNNEL_HOLDS_IT),
        },
        (&Method::GET, "/version") => {
            let ca_version = state
                .status
                .as_ref()
                .and_then(|s| s.ca.as_ref())
                .and_then(|ca| ca.ca_version());
            json(
                StatusCode::OK,
                &config_api::VersionReport {
                    build: state.build.clone(),
                    ca_version,
                },
            )
        }
        (&Method::GET, "/status") => match &state.status {
            Some(source) => match source.report().await {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("status: {e}")),
            },
            None => error(
                StatusCode::NOT_IMPLEMENTED,
                "this agent makes no status report",
            ),
        },
        (&Method::GET, "/log") => match &state.log {
            Some(log) => json(
                StatusCode::OK,
                &config_api::LogLevel {
                    level: log.current(),
                },
            ),
            None => error(
                StatusCode::NOT_IMPLEMENTED,
                "this agent's log level is fixed",
            ),
        },
        (&Method::PUT, "/log") => set_log(&state, &query),
        (&Method::GET, "/flows") => {
            match crate::flows_api::parse_query(&query, SystemTime::now()) {
                Ok(q) => {
                    // The node's flows are in the data path process when it runs apart.
                    let events = match &state.data_path {
                        Some(DataPathView {
                            connections: ConnectionsSource::Process(link),
                            ..
                        }) => match link.flows(q).await {
                            Ok(events) => events,
                            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
                        },
                        _ => crate::flows_api::query_hub(&state.flows, &q),
                    };
                    crate::flows_api::flows_response(events)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

fn set_log(state: &AdminState, query: &[(String, String)]) -> Response<Body> {
    let Some(log) = &state.log else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this agent's log level is fixed",
        );
    };
    let level = match query {
        [(key, level)] if key == "level" => level,
        _ => return error(StatusCode::BAD_REQUEST, "give exactly one parameter: level"),
    };
    match log.set(level) {
        Ok(()) => {
            tracing::info!(level = %level, "log level changed through the admin API");
            json(
                StatusCode::OK,
                &config_api::LogLevel {
                    level: log.current(),
                },
            )
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            &format!("invalid log level {level:?}: {e}"),
        ),
    }
}

fn rotate(state: &AdminState, query: &[(String, String)]) -> Response<Body> {
    let get = |key: &str| {
        query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let targets: Vec<WorkloadId> = match (get("workload"), get("all")) {
        (Some(ns_sa), None) => {
            let Some((ns, sa)) = ns_sa.split_once('/') else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "workload must be NAMESPACE/SERVICEACCOUNT",
                );
            };
            let id = match WorkloadId::new(&state.trust_domain, ns, sa) {
                Ok(id) => id,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid workload: {e}")),
            };
            if !state
                .certs
                .status()
                .iter()
                .any(|s| s.workload == id.to_string())
            {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("this node holds no certificate for {ns_sa}"),
                );
            }
            vec![id]
        }
        (None, Some("true")) => state
            .certs
            .status()
            .into_iter()
            .filter_map(|s| s.workload.parse().ok())
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either workload=NS/SA or all=true",
            )
        }
    };
    // SPIRE (or ztunnel) renews on its own: say so instead of pretending to rotate.
    if let Err(e) = state.certs.can_rotate() {
        return error(StatusCode::CONFLICT, &e.to_string());
    }
    // One JSON line per workload as its renewal finishes.
    let certs = state.certs.clone();
    let lines = futures::stream::iter(targets).then(move |id| {
        let certs = certs.clone();
        async move {
            let workload = id.to_string();
            // Spawned: the body stream must be Sync, the rotation future need not be.
            let outcome = tokio::spawn(async move { certs.rotate(&id).await })
                .await
                .unwrap_or_else(|e| {
                    Err(RotateError::Failed(format!(
                        "the rotation task failed: {e}"
                    )))
                });
            let result = match outcome {
                Ok(status) => RotateResult {
                    workload,
                    ok: true,
                    serial: status.serial,
                    not_after: status.not_after,
                    error: None,
                },
                Err(e) => RotateResult {
                    workload,
                    ok: false,
                    serial: None,
                    not_after: None,
                    error: Some(e.to_string()),
                },
            };
            let mut line = serde_json::to_vec(&result).unwrap_or_default();
            line.push(b'\n');
            Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(lines)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k.to_owned(), percent_decode(v)),
            None => (pair.to_owned(), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match u8::from_str_radix(&String::from_utf8_lossy(hex), 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// A client of the admin API, for the CLI.
pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Sends a request and returns the response body as it streams, line by line.
    pub async fn lines(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<impl futures::Stream<Item = Result<String, AdminError>>, AdminError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| AdminError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "zmesh-agent")
            .body(Full::new(Bytes::new()))
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let status = response.status();
        let body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| AdminError::Http(e.to_string()))?
                .to_bytes();
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(AdminError::Status {
                status: status.as_u16(),
                message,
            });
        }
        // Split the body into lines as it arrives (rotations report progress, flows follow).
        let state = (body, Vec::<u8>::new(), false);
        Ok(futures::stream::unfold(
            state,
            |(mut body, mut buffer, mut done)| async move {
                loop {
                    if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let line = String::from_utf8_lossy(&line[..end]).into_owned();
                        if line.is_empty() {
                            continue;
                        }
                        return Some((Ok(line), (body, buffer, done)));
                    }
                    if done {
                        if buffer.is_empty() {
                            return None;
                        }
                        let line =
                            String::from_utf8_lossy(&std::mem::take(&mut buffer)).into_owned();
                        return Some((Ok(line), (body, buffer, done)));
                    }
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                buffer.extend_from_slice(&data);
                            }
                        }
                        Some(Err(e)) => {
                            done = true;
                            buffer.clear();
                            return Some((
                                Err(AdminError::Http(e.to_string())),
                                (body, buffer, done),
                            ));
                        }
                        None => done = true,
                    }
                }
            },
        ))
    }

    /// `GET` returning one JSON document.
    pub async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
    ) -> Result<T, AdminError> {
        self.send_json(Method::GET, path).await
    }

    /// A request without a body returning one JSON document.
    pub async fn send_json<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, AdminError> {
        let mut lines = Box::pin(self.lines(method, path).await?);
        let mut text = String::new();
        while let Some(line) = lines.next().await {
            text.push_str(&line?);
        }
        serde_json::from_str(&text).map_err(|e| AdminError::Malformed(e.to_string()))
    }
}

pub use crate::local_socket::{remove_socket_if_ours, socket_inode};
