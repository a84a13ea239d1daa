//! The plain TCP relay of the "relay" path: accept, connect onwards, copy both ways. No
//! TLS, no HTTP/2, nothing per byte beyond the copy, so two of them in a chain (client ->
//! relay A -> relay B -> server) are the floor that any two-process proxy chain pays on
//! this machine: the wake-ups and socket hops, without the mesh's own work.
//!
//! With `--relay-tls-out DIR` (relay A) or `--relay-tls-in DIR` (relay B) the hop between
//! the two relays is mutual TLS instead: the same rustls, aws-lc and SPIFFE verifiers as
//! zmesh's proxies, one TLS connection per client connection, and still nothing else (no
//! HTTP/2, no routing, no policy). Such a pair is the least work any pair of user-space
//! mutual-TLS proxies can do per byte on a machine without kTLS: the side-by-side harness
//! measures it as the floor that zmesh and ztunnel both stand on.
//!
//! The harness runs it as this same binary re-executed with the hidden arguments
//! `--relay-listen IP:PORT --relay-to IP:PORT [--relay-tls-out DIR | --relay-tls-in DIR]`,
//! on a tokio current_thread runtime (as the proxies run by default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zmesh_bench::certs::{NAMESPACE, TRUST_DOMAIN};
use zmesh_identity::{TrustDomain, WorkloadId};
use zmesh_proxy::{StaticCredentials, TlsCredentials};

/// Bound on connecting onwards (on loopback a refusal is immediate; this only catches a
/// target that does not answer at all).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copy buffer per direction: as large as the proxies' reads (256 KiB), so that the floor
/// is not held back by more, smaller syscalls than theirs.
const COPY_BUFFER: usize = 256 * 1024;

/// Which end of the TLS hop this relay is, with the certificate directory (the layout of
/// `zmesh proxy --cert-dir`) holding its SVID: `bench/client` for A, `bench/server` for B.
#[derive(Debug, Clone)]
pub enum Tls {
    /// Relay A: accepts plaintext, dials onwards in TLS and expects B's SVID.
    Out(PathBuf),
    /// Relay B: accepts TLS (a client SVID of the trust domain is mandatory).
    In(PathBuf),
}

/// The relay process: binds `listen` (failing if it is taken) and relays to `to` until
/// killed, plain or with one TLS side; with `hbone`, that TLS side carries HTTP/2 CONNECT
/// streams (hbone_relay.rs).
pub fn run(listen: SocketAddr, to: SocketAddr, tls: Option<Tls>, hbone: bool) -> Result<()> {
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("relay: binding {listen}"))?;
    listener.set_nonblocking(true)?;
    let tls = tls.map(|t| TlsEnd::load(&t)).transpose()?;
    runtime()?.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        serve_any(listener, to, tls, hbone).await
    })
}

async fn serve_any(
    listener: TcpListener,
    to: SocketAddr,
    tls: Option<TlsEnd>,
    hbone: bool,
) -> Result<()> {
    match (tls, hbone) {
        (Some(tls), true) => crate::hbone_relay::serve(listener, to, tls).await,
        (None, true) => anyhow::bail!("relay: HBONE needs a TLS side"),
        (tls, false) => serve(listener, to, tls).await,
    }
    Ok(())
}

#[derive(Clone)]
pub(crate) enum TlsEnd {
    Connector(TlsConnector),
    Acceptor(TlsAcceptor),
}

impl TlsEnd {
    fn load(tls: &Tls) -> Result<Self> {
        let dir: &Path = match tls {
            Tls::Out(d) | Tls::In(d) => d,
        };
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let creds = StaticCredentials::load_dir(dir, &td)
            .with_context(|| format!("relay: loading {}", dir.display()))?;
        let id = |sa: &str| WorkloadId::new(&td, NAMESPACE, sa);
        Ok(match tls {
            Tls::Out(_) => {
                let server = id("server")?.spiffe_id().clone();
                let config = creds.client_config(&id("client")?, &[server])?;
                TlsEnd::Connector(TlsConnector::from(config))
            }
            Tls::In(_) => {
                let config = creds.server_config(&id("server")?)?;
                TlsEnd::Acceptor(TlsAcceptor::from(config))
            }
        })
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("relay: building the tokio runtime")
}

/// Accepts forever; each connection is relayed to `to` in its own task, with TLS on one
/// side if `tls` says so. A connection that fails (target refused, reset, handshake
/// refused, ...) is dropped; nothing here panics or stops the loop.
async fn serve(listener: TcpListener, to: SocketAddr, tls: Option<TlsEnd>) {
    accept_each(listener, move |inbound| {
        let tls = tls.clone();
        async move { relay_one(inbound, to, tls).await }
    })
    .await
}

/// Accepts forever, handing each connection to `handle` in a task of its own; a failed
/// connection is dropped.
pub(crate) async fn accept_each<F, Fut, E>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((inbound, _)) => {
                let relayed = handle(inbound);
                tokio::spawn(async move {
                    let _ = relayed.await;
                });
            }
            // E.g. EMFILE: back off a little instead of spinning on the error.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Connects onwards (bounded by CONNECT_TIMEOUT), without Nagle.
pub(crate) async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let outbound = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    outbound.set_nodelay(true)?;
    Ok(outbound)
}

async fn relay_one(inbound: TcpStream, to: SocketAddr, tls: Option<TlsEnd>) -> std::io::Result<()> {
    inbound.set_nodelay(true)?;
    let outbound = connect(to).await?;
    match tls {
        None => copy(inbound, outbound).await,
        Some(TlsEnd::Connector(c)) => {
            let name = zmesh_identity::tls::server_name(to.ip());
            copy(inbound, c.connect(name, outbound).await?).await
        }
        Some(TlsEnd::Acceptor(a)) => copy(a.accept(inbound).await?, outbound).await,
    }
}

/// Copies both ways; on EOF from one side it shuts down writing to the other (half-close)
/// and keeps copying the other direction until that ends too.
async fn copy<A, B>(mut a: A, mut b: B) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Shutdown, TcpListener as StdListener};
    use std::thread::JoinHandle;

    use super::*;
    use zmesh_bench::load::{self, Server, Target, MSG};

    /// `serve` on its own thread and runtime (as in the relay process), stopped on drop.
    struct InProcessRelay {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    }

    impl InProcessRelay {
        fn start(ip: IpAddr, to: SocketAddr) -> Self {
            Self::start_with(ip, to, None)
        }

        fn start_with(ip: IpAddr, to: SocketAddr, tls: Option<Tls>) -> Self {
            Self::start_framed(ip, to, tls, false)
        }

        fn start_framed(ip: IpAddr, to: SocketAddr, tls: Option<Tls>, hbone: bool) -> Self {
            let tls = tls.map(|t| TlsEnd::load(&t).unwrap());
            let listener = StdListener::bind(SocketAddr::new(ip, 0)).unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                runtime().unwrap().block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        r = serve_any(listener, to, tls, hbone) => r.unwrap(),
                        _ = stopped => {}
                    }
                })
            });
            Self {
                addr,
                stop: Some(stop),
                thread: Some(thread),
            }
        }
    }

    impl Drop for InProcessRelay {
        fn drop(&mut self) {
            let _ = self.stop.take().map(|s| s.send(()));
            if let Some(t) = self.thread.take() {
                // A panic in the relay thread fails the test here.
                let panicked = t.join().is_err();
                if !std::thread::panicking() {
                    assert!(!panicked, "the relay thread panicked");
                }
            }
        }
    }

    /// Server <- relay B <- relay A, as in the harness; returns the target for clients.
    fn chain(ip: IpAddr) -> (Server, InProcessRelay, InProcessRelay, Target) {
        let server = Server::start(ip, 4).unwrap();
        let b = InProcessRelay::start(ip, server.addr());
        let a = InProcessRelay::start(ip, b.addr);
        let t = Target {
            src: ip,
            dst: a.addr,
        };
        (server, b, a, t)
    }

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn relays_bytes_both_ways() {
        let (_server, _b, _a, t) = chain(ip());
        assert_carries_bytes(&t);
        // Many short connections.
        let c = load::conn_rate(&t, 2, Duration::from_millis(200));
        assert_eq!(c.errors, 0, "{:?}", c.first_error);
        assert!(c.conns > 0);
    }

    /// Echo: every message goes client -> server and back, and must come back intact.
    /// Bulk upload (the client half-closes, then waits for the server's byte count, which
    /// must match what was sent).
    fn assert_carries_bytes(t: &Target) {
        let rtts = load::ping_pong(t, 5, 100, Duration::from_secs(30)).unwrap();
        assert_eq!(rtts.len(), 100);
        let r = load::throughput(t, 2, Duration::from_millis(100)).unwrap();
        assert!(r.bytes > 0);
    }

    /// A TLS (or, with `hbone`, HBONE) relay pair in front of an echo server, with SVIDs
    /// from one throwaway CA, as in the harness. Fields drop in order: relays first.
    struct TlsChain {
        a: InProcessRelay,
        b: InProcessRelay,
        server: Server,
        certs_a: PathBuf,
        hbone: bool,
        dir: tempfile::TempDir,
    }

    impl TlsChain {
        fn start(hbone: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = zmesh_bench::certs::Ca::new().unwrap();
            let (certs_a, certs_b) = (dir.path().join("a"), dir.path().join("b"));
            ca.write_cert_dir(&certs_a, "client").unwrap();
            ca.write_cert_dir(&certs_b, "server").unwrap();
            let server = Server::start(ip(), 4).unwrap();
            let b =
                InProcessRelay::start_framed(ip(), server.addr(), Some(Tls::In(certs_b)), hbone);
            let a =
                InProcessRelay::start_framed(ip(), b.addr, Some(Tls::Out(certs_a.clone())), hbone);
            Self {
                a,
                b,
                server,
                certs_a,
                hbone,
                dir,
            }
        }

        fn target(&self) -> Target {
            Target {
                src: ip(),
                dst: self.a.addr,
            }
        }

        /// A fresh A towards a B whose SVID comes from another root: A's handshake fails
        /// and the client gets no echo.
        fn assert_foreign_root_refused(&self) {
            let other = zmesh_bench::certs::Ca::new().unwrap();
            let certs_x = self.dir.path().join("x");
            other.write_cert_dir(&certs_x, "server").unwrap();
            let tls_in = Some(Tls::In(certs_x));
            let foreign =
                InProcessRelay::start_framed(ip(), self.server.addr(), tls_in, self.hbone);
            let tls_out = Some(Tls::Out(self.certs_a.clone()));
            let a = InProcessRelay::start_framed(ip(), foreign.addr, tls_out, self.hbone);
            let to_foreign = Target {
                src: ip(),
                dst: a.addr,
            };
            assert!(load::ping_pong(&to_foreign, 0, 1, Duration::from_secs(10)).is_err());
        }
    }

    /// The floor's TLS pair: bytes cross intact both ways, the hop between the relays is
    /// TLS (a plaintext client is not relayed by B), and A refuses to talk to a B whose
    /// SVID comes from another root.
    #[test]
    fn tls_relays_carry_bytes_over_mutual_tls_only() {
        let chain = TlsChain::start(false);
        assert_carries_bytes(&chain.target());

        // Plaintext straight to B: nothing is relayed; all that comes back is, at most, a
        // TLS alert record (content type 21), then the connection ends.
        let plain = Target {
            src: ip(),
            dst: chain.b.addr,
        };
        let mut s = load::connect(&plain).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut msg = [0x45u8; MSG];
        msg[0] = b'E';
        let _ = s.write_all(&msg);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        assert!(back.is_empty() || back[0] == 21, "B answered {back:?}");

        chain.assert_foreign_root_refused();
    }

    /// The HBONE pair: every client connection is a CONNECT stream on one TLS connection
    /// between the relays; bytes, half-closes and many short connections cross, and a B
    /// from another root is refused.
    #[test]
    fn hbone_relays_tunnel_connections_as_connect_streams() {
        let chain = TlsChain::start(true);
        let t = chain.target();
        assert_carries_bytes(&t);
        let c = load::conn_rate(&t, 2, Duration::from_millis(200));
        assert_eq!(c.errors, 0, "{:?}", c.first_error);
        assert!(c.conns > 0);

        // B speaks HTTP/2 only (so A, which it just served, does too): a TLS relay A that
        // sends the client's bytes as they are gets nothing through.
        let tls_out = Some(Tls::Out(chain.certs_a.clone()));
        let unframed = InProcessRelay::start_with(ip(), chain.b.addr, tls_out);
        let to_unframed = Target {
            src: ip(),
            dst: unframed.addr,
        };
        assert!(load::ping_pong(&to_unframed, 0, 1, Duration::from_secs(10)).is_err());

        chain.assert_foreign_root_refused();
    }

    #[test]
    fn half_close_is_relayed_both_ways() {
        let (_server, _b, _a, t) = chain(ip());

        // Client half-closes first: the server must see EOF (it answers the byte count
        // only then) while the server -> client direction still carries that answer.
        let mut s = load::connect(&t).unwrap();
        s.write_all(b"S").unwrap();
        s.write_all(&[7u8; 100_000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_be_bytes(count), 100_000);
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);

        // Echo after the client's FIN: what was sent before it still comes back, then EOF.
        let mut s = load::connect(&t).unwrap();
        let mut msgs = vec![0u8; 1 + 3 * MSG];
        msgs[0] = b'E';
        for (i, b) in msgs[1..].iter_mut().enumerate() {
            *b = i as u8;
        }
        s.write_all(&msgs).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, msgs[1..]);

        // Server closes first: the reply arrives, then EOF reaches the client although
        // the client has not closed its side.
        let mut s = load::connect(&t).unwrap();
        let mut msg = [0x43u8; MSG];
        msg[0] = b'C';
        s.write_all(&msg).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, msg);
    }

    /// A target that refuses: each client connection is closed, and the relay lives on
    /// (its thread is joined without a panic when it is dropped).
    #[test]
    fn refused_target_drops_the_connection() {
        let free = StdListener::bind("127.0.0.1:0").unwrap();
        let dead = free.local_addr().unwrap();
        drop(free);
        let relay = InProcessRelay::start(ip(), dead);
        for _ in 0..3 {
            let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(b"E");
            let mut b = [0u8; 1];
            // EOF or reset, never data and never a hang.
            assert!(!matches!(s.read(&mut b), Ok(n) if n > 0));
        }
    }
}
