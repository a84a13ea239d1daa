//! Outbound (:15001): captured connections from local workloads, sent over HBONE to
//! enrolled destinations and passed through as plain TCP to everything else.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::access::AccessLog;
use crate::copy::{bridge, splice};
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::pool::PoolKey;
use crate::proxy::Shared;
use crate::tls::destination_sni;
use crate::workloads::Protocol;

use zmesh_dataplane::HBONE_PORT;

pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let mut log = AccessLog::start(Direction::Outbound, peer, &shared);
    let dst = match shared.original_dst.original_dst(&tcp) {
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
    let dest = table
        .workload_by_ip(dst.ip())
        .filter(|w| w.protocol == Protocol::Hbone)
        .cloned();
    let Some(dest) = dest else {
        return passthrough(&shared, tcp, dst, log).await;
    };
    log.destination(&dest);
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
    let key = PoolKey {
        source: source.identity.clone(),
        expected: vec![dest.identity.spiffe_id().clone()],
        dst: hbone,
        downstream_ip: peer.ip(),
    };
    drop(table);

    // One retry: a pooled connection may have failed or received GOAWAY since it was leased.
    for attempt in 0..2 {
        let lease = match shared.pool.lease(&key, &sni).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%peer, %dst, %hbone, "no HBONE connection: {e}");
                return log.finish(Outcome::HboneConnectFailed);
            }
        };
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string())
            .header("forwarded", format!("for=\"{peer}\""))
            .body(());
        let Ok(request) = request else {
            // Unreachable: an IP:port is always a valid authority.
            return log.finish(Outcome::InternalError);
        };
        let sent = async {
            let mut send = lease.send_request().ready().await?;
            let (response, stream) = send.send_request(request, false)?;
            Ok::<_, h2::Error>((response, stream))
        }
        .await;
        let (response, stream) = match sent {
            Ok(x) => x,
            Err(e) if attempt == 0 => {
                tracing::debug!(%hbone, "pooled connection unusable, retrying: {e}");
                lease.mark_dead();
                continue;
            }
            Err(e) => {
                tracing::warn!(%hbone, "cannot open HBONE stream: {e}");
                return log.finish(Outcome::HboneStreamFailed);
            }
        };
        let response = match response.await {
            Ok(r) => r,
            // Nothing was sent before the 200, so a new connection may try again when this
            // one was refused or died under the CONNECT (peer gone while idle in the pool).
            Err(e) if attempt == 0 && connection_failed(&e) => {
                tracing::debug!(%hbone, "pooled connection failed, retrying: {e}");
                lease.mark_dead();
                continue;
            }
            Err(e) => {
                tracing::warn!(%hbone, %dst, "HBONE CONNECT failed: {e}");
                return log.finish(Outcome::HboneStreamFailed);
            }
        };
        // The destination answered over mTLS, whatever it said.
        log.encrypted = true;
        if response.status() != StatusCode::OK {
            tracing::info!(%peer, %dst, status = %response.status(), "HBONE CONNECT refused");
            return log.finish(status_outcome(response.status()));
        }
        // The client is on the TCP side: it receives what comes from HTTP/2.
        let (sent, received) = (&log.bytes.sent, &log.bytes.received);
        let outcome = match bridge(tcp, stream, response.into_body(), received, sent).await {
            Ok(()) => Outcome::Ok,
            Err(e) => {
                tracing::debug!(%peer, %dst, "tunnel failed: {e}");
                Outcome::Error
            }
        };
        drop(lease);
        return log.finish(outcome);
    }
}

/// The CONNECT failed because of its connection, not because the peer answered it.
fn connection_failed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_io() || e.is_go_away()
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

/// Plain TCP to a destination outside the mesh.
async fn passthrough(shared: &Shared, mut tcp: TcpStream, dst: SocketAddr, log: AccessLog) {
    let upstream =
        match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%dst, "passthrough connect failed: {e}");
                return log.finish(Outcome::ConnectFailed);
            }
            Err(_) => return log.finish(Outcome::ConnectFailed),
        };
    let _ = upstream.set_nodelay(true);
    let mut upstream = upstream;
    match splice(&mut tcp, &mut upstream, &log.bytes).await {
        Ok(()) => log.finish(Outcome::Passthrough),
        Err(e) => {
            tracing::debug!(%dst, "passthrough failed: {e}");
            log.finish(Outcome::Error)
        }
    }
}
