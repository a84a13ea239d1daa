//! Outbound HBONE connection pool, keyed as ztunnel keys it.
//!
//! One TLS+HTTP/2 connection carries up to min(100, peer's max) tunnels for the same
//! (source identity, expected destination identities, destination address, downstream
//! source IP). A full pool opens another connection; connections are established one at a
//! time per key so that a burst of tunnels shares a few connections instead of racing to
//! open one each. Idle connections close after a timeout; dead ones are dropped.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use zmesh_identity::{SpiffeId, WorkloadId};

use crate::clock::Clock;
use crate::keepalive::Keepalive;
use crate::metrics::{Direction, Metrics};
use crate::tls::{TlsCredentials, TlsError, ALPN_H2};

/// Pool tuning; the defaults are ztunnel's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PoolConfig {
    /// Close a connection after it carried no tunnel for this long.
    pub idle_timeout: Duration,
    /// At most this many tunnels per connection (capped by the peer's own limit).
    pub max_streams: usize,
    /// TCP connect and TLS handshake timeout.
    pub connect_timeout: Duration,
    /// A client's first bytes go with its CONNECT only on a connection whose peer answered
    /// within this long (zero: never). A CONNECT that carried them is not tried again when
    /// its connection dies (the destination may have delivered them), so a connection that
    /// has been quiet, whose peer may have vanished unnoticed, sends the CONNECT alone.
    #[serde(default = "default_first_bytes_within")]
    pub first_bytes_within: Duration,
}

fn default_first_bytes_within() -> Duration {
    Duration::from_secs(1)
}

impl PoolConfig {
    /// How often a connection checks whether it has been idle for `idle_timeout`.
    pub(crate) fn idle_check_every(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            max_streams: 100,
            connect_timeout: Duration::from_secs(10),
            first_bytes_within: default_first_bytes_within(),
        }
    }
}

/// Which connections may carry a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub source: WorkloadId,
    pub expected: Vec<SpiffeId>,
    pub dst: SocketAddr,
    pub downstream_ip: IpAddr,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddr),
    #[error(transparent)]
    Credentials(#[from] TlsError),
    #[error("TLS handshake with {0}: {1}")]
    Handshake(SocketAddr, std::io::Error),
    #[error("{0} did not negotiate ALPN h2")]
    NoAlpn(SocketAddr),
    #[error("{0} presented no usable certificate chain")]
    NoPeerCertificate(SocketAddr),
    #[error("HTTP/2 handshake with {0}: {1}")]
    H2(SocketAddr, h2::Error),
    #[error("the proxy is shutting down")]
    Closed,
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    dead: AtomicBool,
    idle_since: Mutex<Instant>,
    /// When the peer's certificate chain expires: no new tunnels after that.
    peer_valid_until: SystemTime,
    /// When the handshake finished, and when the peer last answered a CONNECT after that
    /// (in microseconds since).
    born: Instant,
    answered_us: AtomicU64,
}

impl Conn {
    /// False once the peer sent GOAWAY or the connection failed (hbone.md: a pooled
    /// connection is reused only if it has not received GOAWAY), or the certificate the
    /// peer authenticated with expired. Its open tunnels go on.
    fn accepts_streams(&self) -> bool {
        // h2 answers this from its own state; the waker is never stored (no pending open).
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.send.clone().poll_ready(&mut cx), Poll::Ready(Ok(())))
            && SystemTime::now() < self.peer_valid_until
    }
}

/// The right to open one stream on a pooled connection; returns the slot when dropped.
pub(crate) struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    pub fn send_request(&self) -> SendRequest<Bytes> {
        self.conn.send.clone()
    }

    /// The connection failed us (e.g. GOAWAY): don't hand it out again.
    pub fn mark_dead(&self) {
        self.conn.dead.store(true, Ordering::Relaxed);
    }

    /// The peer answered a CONNECT on this connection.
    pub fn answered(&self) {
        let us = self.conn.born.elapsed().as_micros() as u64;
        self.conn.answered_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Whether the peer answered (or the handshake finished) less than `window` ago.
    pub fn answered_within(&self, window: Duration) -> bool {
        let answered = Duration::from_micros(self.conn.answered_us.load(Ordering::Relaxed));
        self.conn.born.elapsed().saturating_sub(answered) < window
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (plain inserts/removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type ConnectLock = Arc<tokio::sync::Mutex<()>>;

pub(crate) struct Pool {
    config: PoolConfig,
    keepalive: Keepalive,
    clock: Clock,
    credentials: Arc<dyn TlsCredentials>,
    metrics: Arc<Metrics>,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    connecting: Mutex<HashMap<PoolKey, ConnectLock>>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
}

impl Pool {
    pub fn new(
        config: PoolConfig,
        keepalive: Keepalive,
        clock: Clock,
        credentials: Arc<dyn TlsCredentials>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            keepalive,
            clock,
            credentials,
            metrics,
            conns: Mutex::default(),
            connecting: Mutex::default(),
            next_id: AtomicU64::new(0),
            shutdown,
        })
    }

    /// A slot on a connection for `key`, opening a connection if every one is full.
    pub async fn lease(
        self: &Arc<Self>,
        key: &PoolKey,
        sni: &ServerName<'static>,
    ) -> Result<Lease, PoolError> {
        if let Some(lease) = self.try_lease(key) {
            return Ok(lease);
        }
        let connect_lock = lock(&self.connecting)
            .entry(key.clone())
            .or_default()
            .clone();
        let _guard = connect_lock.lock().await;
        // Someone may have opened a connection while we waited.
        if let Some(lease) = self.try_lease(key) {
            return Ok(lease);
        }
        if self.shutdown.is_cancelled() {
            return Err(PoolError::Closed);
        }
        let conn = self.open(key, sni).await?;
        conn.active.store(1, Ordering::Release);
        lock(&self.conns)
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(Lease { conn })
    }

    fn try_lease(&self, key: &PoolKey) -> Option<Lease> {
        let mut conns = lock(&self.conns);
        let list = conns.get_mut(key)?;
        list.retain(|c| {
            let usable = !c.dead.load(Ordering::Relaxed) && c.accepts_streams();
            if !usable {
                c.dead.store(true, Ordering::Relaxed);
            }
            usable
        });
        for conn in list.iter() {
            let limit = self
                .config
                .max_streams
                .min(conn.send.current_max_send_streams());
            if conn.active.load(Ordering::Acquire) < limit {
                conn.active.fetch_add(1, Ordering::AcqRel);
                return Some(Lease { conn: conn.clone() });
            }
        }
        None
    }

    /// Removes the connection if it has been idle long enough; true if it did.
    fn reap_if_idle(&self, key: &PoolKey, id: u64) -> bool {
        let mut conns = lock(&self.conns);
        let Some(list) = conns.get_mut(key) else {
            return true;
        };
        let Some(pos) = list.iter().position(|c| c.id == id) else {
            return true;
        };
        let conn = &list[pos];
        let idle = conn.active.load(Ordering::Acquire) == 0
            && lock(&conn.idle_since).elapsed() >= self.config.idle_timeout;
        if idle || conn.dead.load(Ordering::Relaxed) {
            conn.dead.store(true, Ordering::Relaxed);
            list.remove(pos);
            if list.is_empty() {
                conns.remove(key);
                lock(&self.connecting).remove(key);
            }
            return true;
        }
        false
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        let mut conns = lock(&self.conns);
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| {
                if c.id == id {
                    c.dead.store(true, Ordering::Relaxed);
                }
                c.id != id
            });
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    /// Drops every pooled connection (tunnels in flight keep theirs until they end).
    pub fn clear(&self) {
        let mut conns = lock(&self.conns);
        for conn in conns.values().flatten() {
            conn.dead.store(true, Ordering::Relaxed);
        }
        conns.clear();
    }

    async fn open(
        self: &Arc<Self>,
        key: &PoolKey,
        sni: &ServerName<'static>,
    ) -> Result<Arc<Conn>, PoolError> {
        let config = self.credentials.client_config(&key.source, &key.expected)?;
        let timeout = self.config.connect_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(key.dst))
            .await
            .map_err(|_| PoolError::Timeout(key.dst))?
            .map_err(|e| PoolError::Connect(key.dst, e))?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(config);
        let tls = match tokio::time::timeout(timeout, connector.connect(sni.clone(), tcp)).await {
            Err(_) => {
                self.metrics
                    .handshake_failed(Direction::Outbound, "timeout");
                return Err(PoolError::Timeout(key.dst));
            }
            Ok(Err(e)) => {
                self.metrics
                    .handshake_failed(Direction::Outbound, crate::handshake_reason(&e));
                return Err(PoolError::Handshake(key.dst, e));
            }
            Ok(Ok(tls)) => tls,
        };
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            self.metrics.handshake_failed(Direction::Outbound, "alpn");
            return Err(PoolError::NoAlpn(key.dst));
        }
        // The verifier accepted the chain, so it parses; if not, fail closed.
        let peer_valid_until = zmesh_identity::tls::peer_valid_until(tls.get_ref().1)
            .ok_or(PoolError::NoPeerCertificate(key.dst))?;
        let handshake = h2::client::Builder::new()
            .initial_window_size(crate::STREAM_WINDOW)
            .initial_connection_window_size(crate::CONN_WINDOW)
            .max_frame_size(crate::MAX_FRAME)
            .max_send_buffer_size(crate::MAX_SEND_BUFFER)
            .max_header_list_size(16 * 1024)
            .max_concurrent_streams(0)
            .initial_max_send_streams(self.config.max_streams)
            .enable_push(false)
            .handshake::<_, Bytes>(tls);
        // Bounded like the TLS handshake: a peer that stops reading cannot hold us here.
        let (send, mut connection) = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.metrics
                    .handshake_failed(Direction::Outbound, "h2_handshake");
                return Err(PoolError::H2(key.dst, e));
            }
            Err(_) => {
                self.metrics
                    .handshake_failed(Direction::Outbound, "h2_timeout");
                return Err(PoolError::Timeout(key.dst));
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            send,
            active: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            peer_valid_until,
            born: Instant::now(),
            answered_us: AtomicU64::new(0),
        });
        self.metrics.pool_connections_created.inc();
        self.metrics.pool_connections.inc();

        let pool: Weak<Pool> = Arc::downgrade(self);
        let key = key.clone();
        let cfg = self.config.clone();
        let shutdown = self.shutdown.clone();
        let metrics = self.metrics.clone();
        let ping_pong = connection.ping_pong();
        let keepalive = self.keepalive;
        let mut clock = self.clock.clone();
        tokio::spawn(async move {
            let keepalive = crate::keepalive::until_unanswered(ping_pong, keepalive, clock.clone());
            let check_every = cfg.idle_check_every();
            let idle = async {
                loop {
                    clock.sleep(check_every).await;
                    match pool.upgrade() {
                        Some(pool) if !pool.reap_if_idle(&key, id) => {}
                        _ => return,
                    }
                }
            };
            tokio::select! {
                biased;
                r = &mut connection => {
                    if let Err(e) = r {
                        tracing::debug!(dst = %key.dst, "HBONE connection ended: {e}");
                    }
                }
                reason = keepalive => {
                    tracing::warn!(dst = %key.dst, reason, "dropping HBONE connection: the peer stopped answering PINGs");
                    metrics.keepalive_failed(Direction::Outbound);
                }
                _ = idle => tracing::debug!(dst = %key.dst, "closing idle HBONE connection"),
                _ = shutdown.cancelled() => {}
            }
            if let Some(pool) = pool.upgrade() {
                pool.remove(&key, id);
            }
            metrics.pool_connections.dec();
        });
        Ok(conn)
    }
}
