//! Plaintext inbound (:15006): TCP to a local workload from a source outside the mesh.
//! Permissive mode passes it through (subject to authorization policies, as a source
//! without identity); strict mode refuses it with a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::access::AccessLog;
use crate::authz::{AuthzRequest, Decision};
use crate::copy::splice;
use crate::metrics::Direction;
use crate::outcome::Outcome;
use crate::proxy::{Capture, Shared};
use crate::Mode;

/// RST rather than FIN: the client learns at once that it was refused.
pub(crate) fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

pub(crate) async fn serve(shared: Arc<Shared>, mut tcp: TcpStream, peer: SocketAddr) {
    let mut log = AccessLog::start(Direction::InboundPlaintext, peer, &shared);
    let table = shared.workloads.snapshot();
    // Named by address only: without a certificate the source proves nothing.
    if let Some(w) = table.workload_by_ip(peer.ip()) {
        log.source_by_address(w, peer);
    }
    let dst = match shared.config.capture {
        // sk_assign delivered it here: the address the client dialed is our local address.
        Capture::Transparent => crate::socket::local_addr(&tcp),
        Capture::Explicit => shared.original_dst.original_dst(&tcp, peer),
    };
    if let Ok(d) = &dst {
        log.dst_addr = Some(*d);
        if let Some(w) = table.local_workload(d.ip(), &shared.config.node) {
            log.destination(w);
        }
    }
    if shared.config.mode == Mode::Strict {
        reset(&tcp);
        return log.finish(Outcome::RefusedStrict);
    }
    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, "no destination: {e}");
            return log.finish(Outcome::NoOriginalDst);
        }
    };
    if shared.is_proxy_target(dst) {
        return log.finish(Outcome::ProxyPort);
    }
    let Some(dest) = table.local_workload(dst.ip(), &shared.config.node).cloned() else {
        return log.finish(Outcome::UnknownDestination);
    };
    drop(table);
    let guard = shared.tunnels.register(None, peer.ip(), dst, dest.clone());
    let (decision, verdict) = shared.authorizer.decide(&AuthzRequest {
        source: None,
        source_ip: peer.ip(),
        destination: &dest,
        port: dst.port(),
    });
    log.policy = verdict;
    if let Decision::Deny { policy } = decision {
        tracing::info!(%peer, dst = %dest.identity, %policy, "plaintext connection denied by policy");
        reset(&tcp);
        return log.finish(Outcome::Denied);
    }
    let Ok(mut upstream) = shared.connect_upstream(dst).await else {
        return log.finish(Outcome::ConnectFailed);
    };
    shared.tune_app_socket(&upstream);
    log.established();
    let outcome = tokio::select! {
        r = splice(&mut tcp, &mut upstream, &log.bytes) => match r {
            Ok(()) => Outcome::Passthrough,
            Err(_) => Outcome::Error,
        },
        _ = guard.closed_by_policy() => {
            log.policy = guard.verdict();
            reset(&tcp);
            reset(&upstream);
            Outcome::PolicyChanged
        }
    };
    log.finish(outcome);
}
