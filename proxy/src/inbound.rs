//! Inbound HBONE (:15008): mTLS, HTTP/2, one CONNECT stream per tunnel. The `:authority`
//! names the target as `IP:port`, or as a Service's `<name>.<namespace>.svc.<cluster
//! domain>:<port>` (ztunnel's tunnels through east-west gateways do), which resolves to an
//! endpoint of that service on this node.

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use zmesh_identity::{SpiffeId, WorkloadId};

use crate::access::AccessLog;
use crate::authz::{AuthzRequest, Decision};
use crate::balance;
use crate::copy::{bridge, CopyError, Ended};
use crate::hbone::{self, ConnectTarget, MalformedConnect};
use crate::limits::ConnLimits;
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::proxy::{Capture, Shared};
use crate::tls::{parse_destination_sni, ALPN_H2};
use crate::workloads::WorkloadTable;

/// Serves one accepted TCP connection until it closes.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let Ok(local) = crate::socket::local_addr(&tcp) else {
        return;
    };
    let failed = |reason: &'static str| {
        shared.metrics.handshake_failed(Direction::Inbound, reason);
        crate::access::refused(&shared, peer, local, reason);
    };
    let handshake_timeout = shared.config.limits.handshake_timeout;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = match tokio::time::timeout(handshake_timeout, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            failed(crate::handshake_reason(&e));
            tracing::debug!(%peer, "TLS ClientHello rejected: {e}");
            return;
        }
        Err(_) => {
            failed("timeout");
            return;
        }
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let table = shared.workloads.snapshot();
    let Some(identity) = server_identity(&shared, &table, local, sni.as_deref()) else {
        failed("unknown_destination");
        tracing::debug!(%peer, %local, ?sni, "no local workload to present a certificate for");
        return;
    };
    let config = match shared.credentials.server_config(&identity) {
        Ok(c) => c,
        Err(e) => {
            failed("no_local_certificate");
            tracing::warn!(%identity, "cannot serve HBONE: {e}");
            return;
        }
    };
    let tls = match tokio::time::timeout(handshake_timeout, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            failed(crate::handshake_reason(&e));
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            failed("timeout");
            return;
        }
    };
    // As ztunnel: HBONE is HTTP/2 only. rustls already fails a client offering only other
    // protocols (no_application_protocol); one offering none gets here without any.
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        failed("alpn");
        tracing::debug!(%peer, "refusing a connection that did not negotiate ALPN h2");
        return;
    }
    // The verifier already checked the SVID; without an ID we fail closed.
    let Some(peer_id) = zmesh_identity::tls::peer_identity(tls.get_ref().1) else {
        failed("bad_peer_identity");
        return;
    };
    let Some(peer_valid_until) = zmesh_identity::tls::peer_valid_until(tls.get_ref().1) else {
        failed("bad_peer_identity");
        return;
    };
    let peer_id = Arc::new(peer_id);
    shared.metrics.inbound_tls_connections.inc();

    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONN_WINDOW)
        .max_frame_size(crate::MAX_FRAME)
        .max_send_buffer_size(crate::MAX_SEND_BUFFER)
        .max_concurrent_streams(
            u32::try_from(shared.config.limits.max_tunnels_per_connection).unwrap_or(u32::MAX),
        )
        // No SETTINGS_ENABLE_CONNECT_PROTOCOL, as ztunnel: an extended CONNECT
        // (`:protocol`) is then malformed and h2 resets it (PROTOCOL_ERROR).
        .max_header_list_size(64 * 1024);
    // A peer that finished TLS but never sends the HTTP/2 preface must not hold the
    // connection forever.
    let mut conn = match tokio::time::timeout(
        handshake_timeout,
        builder.handshake::<_, Bytes>(crate::linger::Lingering::new(tls)),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            failed("h2_handshake");
            tracing::debug!(%peer, "HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            failed("h2_timeout");
            tracing::debug!(%peer, "no HTTP/2 preface within {handshake_timeout:?}");
            return;
        }
    };
    let keepalive = crate::keepalive::until_unanswered(
        conn.ping_pong(),
        shared.config.keepalive,
        shared.clock.clone(),
    );
    tokio::pin!(keepalive);
    let limits = ConnLimits::new(
        shared.config.limits.max_tunnels_per_connection,
        shared.config.limits.max_client_resets_per_connection,
    );
    let mut draining = false;
    let mut calmed = false;
    loop {
        // Woken for every frame of the connection (accept() drives it): fixed order.
        tokio::select! {
            biased;
            next = conn.accept() => match next {
                Some(Ok((req, mut respond))) => {
                    // The peer authenticated with a chain that has since expired: no new
                    // tunnels on this connection; GOAWAY sends the client to a new
                    // handshake, which needs a valid certificate.
                    if SystemTime::now() >= peer_valid_until {
                        shared.metrics.refused_stream("peer_certificate_expired");
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        if !draining {
                            draining = true;
                            tracing::info!(
                                %peer, src = %peer_id,
                                expired = %zmesh_identity::svid::fmt_time(peer_valid_until),
                                "closing HBONE connection: the peer's certificate expired"
                            );
                            conn.graceful_shutdown();
                        }
                        continue;
                    }
                    // Checked before any work: a refused stream costs no task, no dial.
                    let Some(conn_slot) = limits.try_tunnel() else {
                        shared.metrics.refused_stream("connection_limit");
                        tracing::debug!(%peer, "refusing a stream: too many tunnels on the connection");
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    let Some(id_slot) = shared.identity_tunnels.try_acquire(&peer_id) else {
                        shared.metrics.refused_stream("identity_limit");
                        tracing::debug!(%peer, src = %peer_id, "refusing a stream: too many tunnels from the identity");
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    let s = shared.clone();
                    let id = peer_id.clone();
                    let limits = limits.clone();
                    shared.tracker.spawn(async move {
                        let _slots = (conn_slot, id_slot);
                        // The deadline first: a tunnel whose connection is being closed
                        // by it is cut by the deadline, whatever error it would report.
                        tokio::select! {
                            biased;
                            _ = s.force.cancelled() => {}
                            _ = tunnel(&s, req, respond, &id, local, peer, &limits) => {}
                        }
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, "HBONE connection error: {e}");
                    break;
                }
                None => break,
            },
            _ = limits.too_many_resets(), if !calmed => {
                // Rapid reset (CVE-2023-44487) past h2's own guard, which only counts
                // streams reset before they were accepted. GOAWAY goes out as accept()
                // drives the connection on; its tunnels end with it.
                calmed = true;
                tracing::info!(%peer, src = %peer_id, "closing HBONE connection: the client reset too many tunnels");
                shared.metrics.reset_floods.inc();
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            }
            _ = shared.drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            reason = &mut keepalive => {
                // Its tunnels end with the connection: their peer is gone.
                tracing::info!(%peer, reason, "closing HBONE connection: the peer stopped answering PINGs");
                shared.metrics.keepalive_failed(Direction::Inbound);
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                break;
            }
        }
    }
}

/// Which local workload's certificate to present on this connection.
fn server_identity(
    shared: &Shared,
    table: &WorkloadTable,
    local: SocketAddr,
    sni: Option<&str>,
) -> Option<WorkloadId> {
    let node = &shared.config.node;
    if shared.config.capture == Capture::Transparent {
        if let Some(w) = table.local_workload(local.ip(), node) {
            return Some(w.identity.clone());
        }
        // Not steered to a pod IP: dialed at the node's own address (same-node traffic
        // from our outbound side, which the kernel cannot loop through tc ingress).
    }
    if let Some(ip) = sni.and_then(parse_destination_sni) {
        return table.local_workload(ip, node).map(|w| w.identity.clone());
    }
    // No hint: only unambiguous if every local workload has the same identity.
    let mut ids = table.workloads_on(node).map(|w| &w.identity);
    let first = ids.next()?;
    ids.all(|id| id == first).then(|| first.clone())
}

fn respond_error(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

/// The local endpoint a Service authority resolves to: one of `service`'s endpoints for
/// `port` on this node (the pod the connection arrived on, if it arrived on a pod IP),
/// chosen at random; or why there is none.
fn service_endpoint(
    table: &WorkloadTable,
    node: &str,
    arrived_on: Option<IpAddr>,
    namespace: &str,
    name: &str,
    port: u16,
) -> Result<SocketAddr, (&'static str, Outcome)> {
    let service = table
        .service(namespace, name)
        .ok_or(("unknown service", Outcome::UnknownService))?;
    let local: Vec<SocketAddr> = service
        .endpoints_for(port)
        .filter(|(ip, _)| match arrived_on {
            Some(pod) => *ip == pod,
            None => table.local_workload(*ip, node).is_some(),
        })
        .map(SocketAddr::from)
        .collect();
    balance::pick(&local, &[], &mut balance::random_below).ok_or((
        "no endpoint of the service on this node serves the port",
        Outcome::NoEndpoints,
    ))
}

/// Names the source pod: the `forwarded` address or the peer address, whichever belongs
/// to a workload holding the verified identity (so a header cannot borrow another pod).
fn attribute_source(
    log: &mut AccessLog,
    table: &WorkloadTable,
    peer: SocketAddr,
    forwarded: Option<SocketAddr>,
    peer_id: &SpiffeId,
) {
    for addr in forwarded.into_iter().chain([peer]) {
        if let Some(w) = table.workload_by_ip(addr.ip()) {
            if w.identity.spiffe_id() == peer_id {
                log.source_by_address(w, addr);
                return;
            }
        }
    }
}

async fn tunnel(
    shared: &Arc<Shared>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer_id: &Arc<SpiffeId>,
    local: SocketAddr,
    peer: SocketAddr,
    limits: &ConnLimits,
) {
    let mut log = AccessLog::start(Direction::Inbound, peer, shared);
    log.src.identity = Some(peer_id.as_str().into());
    log.encrypted = true;
    let reject = |log: AccessLog, respond, status: StatusCode, why: &str, outcome| {
        tracing::debug!(%peer, %status, "refusing tunnel: {why}");
        respond_error(respond, status);
        log.finish(outcome);
    };
    let table = shared.workloads.snapshot();
    attribute_source(&mut log, &table, peer, hbone::forwarded_for(&req), peer_id);
    let node = &shared.config.node;
    // A transparent connection arrived on a pod IP and must name it; one dialed at the
    // node's own address (explicit capture, or same-node traffic) may name only workloads
    // of this node.
    let arrived_on_pod_ip = shared.config.capture == Capture::Transparent
        && table.local_workload(local.ip(), node).is_some();
    let target = match hbone::parse_connect(&req, &shared.config.cluster_domain) {
        Ok(ConnectTarget::Addr(t)) => t,
        // A Service: one of its local endpoints, then on as if the authority named it.
        Ok(ConnectTarget::Service {
            namespace,
            name,
            port,
        }) => {
            log.service = Some(format!("{namespace}/{name}"));
            let arrived_on = arrived_on_pod_ip.then_some(local.ip());
            match service_endpoint(&table, node, arrived_on, &namespace, &name, port) {
                Ok(endpoint) => endpoint,
                Err((why, outcome)) => {
                    let status = StatusCode::SERVICE_UNAVAILABLE;
                    return reject(log, respond, status, why, outcome);
                }
            }
        }
        Err(MalformedConnect(why)) => {
            let status = StatusCode::BAD_REQUEST;
            return reject(log, respond, status, why, Outcome::BadRequest);
        }
    };
    log.dst_addr = Some(target);
    if arrived_on_pod_ip {
        if target.ip() != local.ip() {
            let why = "authority is not the address the connection arrived on";
            return reject(
                log,
                respond,
                StatusCode::BAD_REQUEST,
                why,
                Outcome::BadRequest,
            );
        }
    } else {
        // As ztunnel: an authority that is not ours to serve is the client's mistake (400),
        // whether it names another node's workload or no workload at all.
        let why = match table.workload_by_ip(target.ip()) {
            Some(w) if w.node == *node => None,
            Some(_) => Some("authority is a workload of another node"),
            None => Some("authority is not a workload of this node"),
        };
        if let Some(why) = why {
            return reject(
                log,
                respond,
                StatusCode::BAD_REQUEST,
                why,
                Outcome::BadRequest,
            );
        }
    }
    if shared.is_proxy_target(target) {
        let why = "target port belongs to the proxy";
        return reject(
            log,
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            why,
            Outcome::ProxyPort,
        );
    }
    let Some(dest) = table.local_workload(target.ip(), node).cloned() else {
        let why = "unknown destination workload";
        return reject(
            log,
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            why,
            Outcome::UnknownDestination,
        );
    };
    drop(table);
    log.destination(&dest);
    // Registered before the check: a policy change cannot slip in between.
    let guard = shared
        .tunnels
        .register(Some(peer_id.clone()), peer.ip(), target, dest.clone());
    let request = AuthzRequest {
        source: Some(peer_id),
        source_ip: peer.ip(),
        destination: &dest,
        port: target.port(),
    };
    let (decision, verdict) = shared.authorizer.decide(&request);
    log.policy = verdict;
    if let Decision::Deny { policy } = decision {
        tracing::info!(%peer, src = %peer_id, dst = %dest.identity, %policy, "tunnel denied by policy");
        return reject(
            log,
            respond,
            StatusCode::UNAUTHORIZED,
            "denied",
            Outcome::Denied,
        );
    }
    // The client of an inbound tunnel is the HBONE peer: it receives what goes to HTTP/2.
    let (sent, received) = (&log.bytes.sent, &log.bytes.received);
    let work = async {
        let mut respond = respond;
        let dial = shared.connect_upstream(target);
        // A client that resets the stream while we dial gets no dial: it is abandoned at
        // once (rapid reset would otherwise cost one upstream connection per stream).
        let dialed = tokio::select! {
            biased;
            reset = poll_fn(|cx| respond.poll_reset(cx)) => {
                tracing::debug!(%peer, %target, ?reset, "client reset the stream while connecting upstream");
                limits.client_reset();
                return Outcome::ClientReset;
            }
            dialed = dial => dialed,
        };
        let upstream = match dialed {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, %target, "upstream connect failed: {e}");
                respond_error(respond, StatusCode::SERVICE_UNAVAILABLE);
                return Outcome::ConnectFailed;
            }
        };
        shared.tune_app_socket(&upstream);
        let mut ok = Response::new(());
        hbone::add_baggage(ok.headers_mut(), &shared.config.cluster_id, &dest);
        let send = match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(e) => {
                tracing::debug!(%peer, "client went away before 200: {e}");
                limits.client_reset();
                return Outcome::ClientReset;
            }
        };
        log.established();
        let ended = bridge(upstream, send, req.into_body(), sent, received).await;
        // What the client sent us went to the upstream: `received` counts it.
        if received.get() > 0 {
            limits.used();
        } else if matches!(ended, Ok(Ended::PeerReset) | Err(CopyError::H2(_))) {
            // Reset (whatever the reason) or failed on the client's side, unused.
            limits.client_reset();
        }
        match ended {
            Ok(_) => Outcome::Ok,
            Err(e) => {
                tracing::debug!(%peer, %target, "tunnel failed: {e}");
                Outcome::Error
            }
        }
    };
    // A policy change that now denies the tunnel drops `work`: the upstream socket closes
    // and the HTTP/2 stream is reset, which closes the client's side.
    let outcome = tokio::select! {
        biased;
        outcome = work => outcome,
        _ = guard.closed_by_policy() => {
            log.policy = guard.verdict();
            Outcome::PolicyChanged
        }
    };
    log.finish(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"
workloads:
  - {name: web-1, namespace: shop, serviceAccount: web, node: b, ips: [10.0.2.1], labels: {app: web}, ports: {http: 8080}}
  - {name: web-2, namespace: shop, serviceAccount: web, node: b, ips: [10.0.2.2], labels: {app: web}, ports: {http: 9090}}
  - {name: web-3, namespace: shop, serviceAccount: web, node: a, ips: [10.0.1.1], labels: {app: web}, ports: {http: 7070}}
  - {name: web-4, namespace: shop, serviceAccount: web, node: b, ips: [10.0.2.3], labels: {app: web}}
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: http}, {port: 81, targetPort: grpc}]
    selector: {app: web}
"#;

    #[test]
    fn service_authorities_resolve_to_local_endpoints_only() {
        let t = WorkloadTable::from_yaml(TABLE).unwrap();
        let on_b: std::collections::HashSet<SocketAddr> = (0..200)
            .map(|_| service_endpoint(&t, "b", None, "shop", "web", 80).unwrap())
            .collect();
        let want = ["10.0.2.1:8080", "10.0.2.2:9090"].map(|a| a.parse().unwrap());
        assert_eq!(
            on_b,
            want.into_iter().collect(),
            "both local endpoints, never web-3"
        );
        assert_eq!(
            service_endpoint(&t, "a", None, "shop", "web", 80),
            Ok("10.0.1.1:7070".parse().unwrap())
        );
        // Arrived on a pod IP: that pod, if it is an endpoint.
        let pod = Some("10.0.2.2".parse().unwrap());
        for _ in 0..20 {
            let got = service_endpoint(&t, "b", pod, "shop", "web", 80);
            assert_eq!(got, Ok("10.0.2.2:9090".parse().unwrap()));
        }
        let not_an_endpoint = Some("10.0.2.3".parse().unwrap());
        let no_endpoints = Err((
            "no endpoint of the service on this node serves the port",
            Outcome::NoEndpoints,
        ));
        assert_eq!(
            service_endpoint(&t, "b", not_an_endpoint, "shop", "web", 80),
            no_endpoints
        );
        assert_eq!(
            service_endpoint(&t, "c", None, "shop", "web", 80),
            no_endpoints
        );
        assert_eq!(
            service_endpoint(&t, "b", None, "shop", "web", 81),
            no_endpoints
        );
        assert_eq!(
            service_endpoint(&t, "b", None, "shop", "web", 82),
            no_endpoints
        );
        let unknown = Err(("unknown service", Outcome::UnknownService));
        assert_eq!(service_endpoint(&t, "b", None, "shop", "db", 80), unknown);
        assert_eq!(service_endpoint(&t, "b", None, "other", "web", 80), unknown);
    }
}
