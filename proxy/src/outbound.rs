//! Outbound (:15001): captured connections from local workloads, sent over HBONE to
//! enrolled destinations and passed through as plain TCP to everything else. A connection
//! to a Service VIP goes to one of the service's endpoints, as if the client had dialed
//! that endpoint (see [`crate::balance`] for which one).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::access::AccessLog;
use crate::balance::{self, random_below, MAX_ATTEMPTS};
use crate::copy::{bridge, splice};
use crate::hbone;
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::plaintext::reset;
use crate::pool::{Lease, PoolKey};
use crate::proxy::Shared;
use crate::services::Service;
use crate::tls::destination_sni;
use crate::workloads::{Protocol, Workload, WorkloadTable};

use zmesh_dataplane::HBONE_PORT;

pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let mut log = AccessLog::start(Direction::Outbound, peer, &shared);
    let dst = match shared.original_dst.original_dst(&tcp, peer) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(%peer, "no original destination: {e}");
            return log.finish(Outcome::NoOriginalDst);
        }
    };
    log.dst_addr = Some(dst);
    if shared.is_own_listener(dst) {
        return log.finish(Outcome::Loop);
    }
    let table = shared.workloads.snapshot();
    let Some(source) = table
        .local_workload(peer.ip(), &shared.config.node)
        .cloned()
    else {
        tracing::debug!(%peer, "connection from an IP that is no workload of this node");
        return log.finish(Outcome::UnknownSource);
    };
    log.source(&source);
    if let Some(service) = table.service_by_vip(dst.ip()).cloned() {
        return to_service(&shared, tcp, peer, dst, &source, &service, table, log).await;
    }
    let route = Route::to(&table, dst);
    drop(table);
    if let Route::Hbone { dest, .. } = &route {
        log.destination(dest);
    }
    let mut client = Client::new(&tcp, peer);
    let dialed = dial(&shared, &source, &mut client, dst, route, &mut log).await;
    let first = client.first;
    match dialed {
        Ok(upstream) => forward(upstream, first, tcp, peer, dst, log).await,
        Err(outcome) => {
            first.lost(&tcp);
            log.finish(outcome)
        }
    }
}

/// How to reach a destination address.
enum Route {
    /// An enrolled workload: HBONE to its node, which must present `dest`'s identity.
    Hbone {
        dest: Arc<Workload>,
        hbone: SocketAddr,
        sni: ServerName<'static>,
    },
    /// Anything else: plain TCP to the address itself.
    Plain,
}

impl Route {
    fn to(table: &WorkloadTable, dst: SocketAddr) -> Self {
        let Some(dest) = table
            .workload_by_ip(dst.ip())
            .filter(|w| w.protocol == Protocol::Hbone)
        else {
            return Route::Plain;
        };
        let hbone = table
            .node(&dest.node)
            .and_then(|n| n.hbone)
            .unwrap_or(SocketAddr::new(dst.ip(), HBONE_PORT));
        // Dialing the pod IP needs no hint; dialing a node address tells it which pod we want.
        let sni = if hbone.ip() == dst.ip() {
            ServerName::IpAddress(dst.ip().into())
        } else {
            destination_sni(dst.ip())
        };
        Route::Hbone {
            dest: dest.clone(),
            hbone,
            sni,
        }
    }
}

/// The way to the destination, open: the client's bytes can flow.
enum Upstream {
    /// An HBONE tunnel its destination answered with 200 (the lease keeps its slot on the
    /// pooled connection).
    Hbone {
        lease: Lease,
        send: SendStream<Bytes>,
        recv: RecvStream,
        /// The client's first bytes went with the CONNECT.
        first_sent: bool,
    },
    Plain(TcpStream),
}

/// A connection to a Service VIP: it goes to one endpoint serving the port, exactly as if
/// the client had dialed `endpoint IP:target port` (the VIP itself is never dialed). An
/// endpoint whose dial fails is replaced by another one not tried yet, up to
/// [`MAX_ATTEMPTS`], before the client sees anything. With no endpoint for the port the
/// client's connection is reset at once.
#[allow(clippy::too_many_arguments)]
async fn to_service(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    source: &Workload,
    service: &Service,
    table: Arc<WorkloadTable>,
    mut log: AccessLog,
) {
    let key = service.key();
    log.service = Some(key.clone());
    let candidates = balance::candidates(service, vip);
    if candidates.is_empty() {
        tracing::info!(%peer, %vip, service = %key, "no endpoint of the service serves this port: resetting the connection");
        reset(&tcp);
        return log.finish(Outcome::NoEndpoints);
    }
    let mut tried = Vec::new();
    let mut client = Client::new(&tcp, peer);
    // Replaced by the first attempt's: there is at least one candidate.
    let mut outcome = Outcome::InternalError;
    while tried.len() < candidates.len().min(MAX_ATTEMPTS) {
        let chosen = match service.affinity {
            Some(timeout) => shared.affinity.choose(
                &key,
                peer.ip(),
                timeout,
                Instant::now(),
                &candidates,
                &tried,
                &mut random_below,
            ),
            None => balance::pick(&candidates, &tried, &mut random_below),
        };
        let Some(endpoint) = chosen else { break };
        tried.push(endpoint);
        // The log describes this attempt only.
        log.dst_addr = Some(endpoint);
        log.encrypted = false;
        log.clear_destination();
        if shared.is_own_listener(endpoint) {
            outcome = Outcome::Loop;
            continue;
        }
        let route = Route::to(&table, endpoint);
        match &route {
            Route::Hbone { dest, .. } => log.destination(dest),
            Route::Plain => {
                if let Some(w) = table.workload_by_ip(endpoint.ip()) {
                    log.plaintext_destination(w);
                }
            }
        }
        match dial(shared, source, &mut client, endpoint, route, &mut log).await {
            Ok(upstream) => {
                // Like any connection, it does not keep an old table alive while it runs.
                drop(table);
                let first = client.first;
                return forward(upstream, first, tcp, peer, endpoint, log).await;
            }
            Err(o) => {
                tracing::debug!(%peer, service = %key, %endpoint, result = %o, "service endpoint failed");
                outcome = o;
            }
        }
    }
    tracing::info!(%peer, %vip, service = %key, ?tried, result = %outcome, "no endpoint of the service could be reached");
    client.first.lost(&tcp);
    log.finish(outcome);
}

/// The client's side of a connection being dialed.
struct Client<'a> {
    tcp: &'a TcpStream,
    peer: SocketAddr,
    first: FirstBytes,
}

impl<'a> Client<'a> {
    fn new(tcp: &'a TcpStream, peer: SocketAddr) -> Self {
        Self {
            tcp,
            peer,
            first: FirstBytes::default(),
        }
    }
}

/// Opens the way to `dst` along `route`. Of the client's connection only its first bytes
/// may be read (kept in `client.first`), so after a failure (its outcome) another
/// destination may still be tried.
async fn dial(
    shared: &Shared,
    source: &Workload,
    client: &mut Client<'_>,
    dst: SocketAddr,
    route: Route,
    log: &mut AccessLog,
) -> Result<Upstream, Outcome> {
    match route {
        Route::Plain => match shared.connect_upstream(dst).await {
            Ok(s) => {
                shared.tune_app_socket(&s);
                Ok(Upstream::Plain(s))
            }
            Err(e) => {
                tracing::debug!(%dst, "passthrough connect failed: {e}");
                Err(Outcome::ConnectFailed)
            }
        },
        Route::Hbone { dest, hbone, sni } => {
            let key = PoolKey {
                source: source.identity.clone(),
                expected: vec![dest.identity.spiffe_id().clone()],
                dst: hbone,
                downstream_ip: client.peer.ip(),
            };
            connect(shared, source, &key, &sni, client, dst, log).await
        }
    }
}

/// An HBONE tunnel to `dst` through the node `key` names, answered 200. What the client
/// has sent by the time the CONNECT goes out goes with it, in the same flight (see
/// [`FirstBytes`]).
async fn connect(
    shared: &Shared,
    source: &Workload,
    key: &PoolKey,
    sni: &ServerName<'static>,
    client: &mut Client<'_>,
    dst: SocketAddr,
    log: &mut AccessLog,
) -> Result<Upstream, Outcome> {
    let (hbone, peer) = (key.dst, client.peer);
    // One retry: a pooled connection may have failed or received GOAWAY since it was leased.
    for attempt in 0..2 {
        let lease = match shared.pool.lease(key, sni).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%peer, %dst, %hbone, "no HBONE connection: {e}");
                return Err(Outcome::HboneConnectFailed);
            }
        };
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string())
            .header("forwarded", hbone::forwarded(peer))
            .header("traceparent", hbone::traceparent())
            .body(());
        let Ok(mut request) = request else {
            // Unreachable: an IP:port is always a valid authority.
            return Err(Outcome::InternalError);
        };
        hbone::add_baggage(request.headers_mut(), &shared.config.cluster_id, source);
        let sent = async {
            let mut send = lease.send_request().ready().await?;
            let (response, stream) = send.send_request(request, false)?;
            Ok::<_, h2::Error>((response, stream))
        }
        .await;
        let (response, mut send) = match sent {
            Ok(x) => x,
            Err(e) if attempt == 0 => {
                tracing::debug!(%hbone, "pooled connection unusable, retrying: {e}");
                lease.mark_dead();
                continue;
            }
            Err(e) => {
                tracing::warn!(%hbone, "cannot open HBONE stream: {e}");
                return Err(Outcome::HboneStreamFailed);
            }
        };
        let early = if lease.answered_within(shared.config.pool.first_bytes_within) {
            client.first.read_once(client.tcp)
        } else {
            Bytes::new()
        };
        // h2 queues the bytes behind the HEADERS, sent as the stream's window allows.
        let sent = if early.is_empty() {
            Ok(false)
        } else {
            send.reserve_capacity(early.len());
            send.send_data(early, false).map(|()| true)
        };
        if let Ok(true) = sent {
            shared.metrics.connects_with_first_bytes.inc();
        }
        // The answer, or the failure with whether the client's bytes had gone too.
        let answer = match sent {
            Ok(carried) => response
                .await
                .map(|r| (r, carried))
                .map_err(|e| (e, carried)),
            Err(e) => Err((e, false)),
        };
        let (response, sent_early) = match answer {
            Ok(answered) => answered,
            // A new connection may try again when nothing reached the destination: the
            // peer refused the stream unprocessed, or (when only the CONNECT was sent) this
            // connection died under it (peer gone while idle in the pool). Once the
            // client's bytes went too, only a refusal proves they were not delivered.
            Err((e, carried)) if attempt == 0 && retry_allowed(&e, carried) => {
                tracing::debug!(%hbone, "pooled connection failed, retrying: {e}");
                lease.mark_dead();
                continue;
            }
            Err((e, _)) => {
                tracing::warn!(%hbone, %dst, "HBONE CONNECT failed: {e}");
                return Err(Outcome::HboneStreamFailed);
            }
        };
        lease.answered();
        // The destination answered over mTLS, whatever it said.
        log.encrypted = true;
        if response.status() != StatusCode::OK {
            tracing::info!(%peer, %dst, status = %response.status(), "HBONE CONNECT refused");
            return Err(status_outcome(response.status()));
        }
        return Ok(Upstream::Hbone {
            lease,
            send,
            recv: response.into_body(),
            first_sent: sent_early,
        });
    }
    // Unreachable: the second attempt returns on every path.
    Err(Outcome::InternalError)
}

/// Plain TCP both ways, after what an earlier HBONE attempt read of the client's bytes.
async fn pass_through(
    first: FirstBytes,
    tcp: &mut TcpStream,
    upstream: &mut TcpStream,
    log: &AccessLog,
) -> std::io::Result<()> {
    if !first.bytes.is_empty() {
        upstream.write_all(&first.bytes).await?;
        log.bytes.received.add(first.bytes.len() as u64);
    }
    splice(tcp, upstream, &log.bytes).await
}

/// What the client sent before its tunnel was asked for, read once without waiting. HBONE
/// sends it right behind the CONNECT instead of after the 200: the destination's node gets
/// it with the request and hands it to the application as soon as it has connected, one
/// round trip between the nodes sooner (most protocols speak first from the client: HTTP,
/// TLS). Kept until the connection is established: a refused or retried CONNECT, or
/// another endpoint of a Service, gets the same bytes.
#[derive(Default)]
struct FirstBytes {
    read: bool,
    bytes: Bytes,
}

/// At most this much is read ahead of the tunnel; the rest follows by the usual copy.
const FIRST_BYTES_MAX: usize = 16 * 1024;

impl FirstBytes {
    fn read_once(&mut self, client: &TcpStream) -> Bytes {
        if !self.read {
            self.read = true;
            self.bytes = read_now(client);
        }
        self.bytes.clone()
    }

    /// No destination took the connection: if its first bytes were read, the client is
    /// reset, as it would be by closing the socket with them unread (an EOF would tell it
    /// they were taken).
    fn lost(&self, client: &TcpStream) {
        if !self.bytes.is_empty() {
            reset(client);
        }
    }
}

/// Whatever the socket holds now; empty when nothing yet (or at EOF or on an error, which
/// the copy finds again). A plain `read(2)`: tokio's own would wait for the reactor to have
/// seen the socket readable, which it has not so soon after the accept.
fn read_now(client: &TcpStream) -> Bytes {
    use std::io::Read;
    let mut buf = [0u8; FIRST_BYTES_MAX];
    let socket = socket2::SockRef::from(client);
    match (&*socket).read(&mut buf) {
        Ok(n) => Bytes::copy_from_slice(&buf[..n]),
        Err(_) => Bytes::new(),
    }
}

/// Whether a CONNECT that failed with `e` may be tried again on a new connection.
fn retry_allowed(e: &h2::Error, sent_first_bytes: bool) -> bool {
    let refused = e.reason() == Some(h2::Reason::REFUSED_STREAM);
    refused || (!sent_first_bytes && (e.is_io() || e.is_go_away()))
}

/// Carries the client's connection through `upstream` until both directions end.
async fn forward(
    upstream: Upstream,
    first: FirstBytes,
    mut tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    log: AccessLog,
) {
    log.established();
    let outcome = match upstream {
        Upstream::Hbone {
            lease,
            mut send,
            recv,
            first_sent,
        } => {
            // Read for an earlier attempt that could carry them, they go first now.
            if !first_sent && !first.bytes.is_empty() {
                send.reserve_capacity(first.bytes.len());
                if let Err(e) = send.send_data(first.bytes.clone(), false) {
                    tracing::debug!(%peer, %dst, "tunnel failed: {e}");
                    // A broken tunnel resets the client, as the copy would.
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    drop(lease);
                    return log.finish(Outcome::Error);
                }
            }
            log.bytes.received.add(first.bytes.len() as u64);
            // The client is on the TCP side: it receives what comes from HTTP/2.
            let (sent, received) = (&log.bytes.sent, &log.bytes.received);
            let outcome = match bridge(tcp, send, recv, received, sent).await {
                Ok(_) => Outcome::Ok,
                Err(e) => {
                    tracing::debug!(%peer, %dst, "tunnel failed: {e}");
                    Outcome::Error
                }
            };
            drop(lease);
            outcome
        }
        Upstream::Plain(mut upstream) => {
            match pass_through(first, &mut tcp, &mut upstream, &log).await {
                Ok(()) => Outcome::Passthrough,
                Err(e) => {
                    tracing::debug!(%dst, "passthrough failed: {e}");
                    Outcome::Error
                }
            }
        }
    };
    log.finish(outcome);
}

fn status_outcome(status: StatusCode) -> Outcome {
    match status.as_u16() {
        400 => Outcome::Status400,
        401 => Outcome::Status401,
        403 => Outcome::Status403,
        503 => Outcome::Status503,
        _ => Outcome::StatusOther,
    }
}
