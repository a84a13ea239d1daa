//! HTTP/2 PINGs on HBONE connections, in both directions as ztunnel does: a peer that stops
//! answering (its node died, the network partitioned) is noticed after `interval + timeout`
//! instead of whenever TCP gives up, and the tunnels it carried end.

use std::time::Duration;

use crate::clock::Clock;

/// How often an idle or busy HBONE connection is pinged, and how long an answer may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// ztunnel's: a PING every 10 s, answered within 20 s.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Pings until the peer fails to answer; returns why. Never returns when `ping_pong` is
/// `None` (h2 hands it out once per connection).
pub(crate) async fn until_unanswered(
    ping_pong: Option<h2::PingPong>,
    keepalive: Keepalive,
    mut clock: Clock,
) -> &'static str {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        clock.sleep(keepalive.interval).await;
        let mut deadline = clock.clone();
        tokio::select! {
            answer = ping_pong.ping(h2::Ping::opaque()) => {
                if answer.is_err() {
                    return "ping_failed";
                }
            }
            _ = deadline.sleep(keepalive.timeout) => return "ping_unanswered",
        }
    }
}
