//! Plaintext inbound (:15006): TCP to a local workload from a source outside the mesh.
//! Permissive mode passes it through; strict mode refuses it with a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::access::AccessLog;
use crate::metrics::Direction;
use crate::proxy::{Capture, Mode, Shared};

pub(crate) async fn serve(shared: Arc<Shared>, mut tcp: TcpStream, peer: SocketAddr) {
    let metrics = &shared.metrics;
    let mut log = AccessLog::start(Direction::InboundPlaintext, peer, metrics);
    if shared.config.mode == Mode::Strict {
        // RST rather than FIN: the client learns at once that it was refused.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        return log.finish(metrics, "refused_strict", 0, 0);
    }
    let dst = match shared.config.capture {
        // sk_assign delivered it here: the address the client dialed is our local address.
        Capture::Transparent => tcp.local_addr(),
        Capture::Explicit => shared.original_dst.original_dst(&tcp),
    };
    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, "no destination: {e}");
            return log.finish(metrics, "no_original_dst", 0, 0);
        }
    };
    log.dst_addr = Some(dst);
    if shared.is_own_listener(dst) || shared.is_proxy_port(dst.port()) {
        return log.finish(metrics, "proxy_port", 0, 0);
    }
    let table = shared.workloads.snapshot();
    let Some(dest) = table.local_workload(dst.ip(), &shared.config.node) else {
        return log.finish(metrics, "unknown_destination", 0, 0);
    };
    log.destination(dest);
    drop(table);
    let mut upstream =
        match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            _ => return log.finish(metrics, "connect_failed", 0, 0),
        };
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await {
        Ok((up, down)) => log.finish(metrics, "passthrough", down, up),
        Err(_) => log.finish(metrics, "error", 0, 0),
    }
}
