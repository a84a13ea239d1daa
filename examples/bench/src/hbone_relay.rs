//! The HBONE relays: the TLS relays of relay.rs with HTTP/2 CONNECT on their TLS hop, as
//! HBONE has it. Relay A keeps one HTTP/2 connection to B (in mutual TLS) and opens a
//! CONNECT stream on it for each client connection; relay B answers each stream with 200,
//! connects to its target and copies. The h2 crate with zmesh's window, frame and read
//! sizes and its malloc tuning, and nothing else: no routing, policy, pool management,
//! access log or metrics. A pair
//! of them is the least work an HBONE proxy pair built on these libraries does per byte
//! and per round trip, which is what the side-by-side harness measures it for.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::io::poll_read_buf;

use crate::relay::{connect, TlsEnd};

/// zmesh's own HTTP/2 settings (proxy/src/lib.rs), so that the floor's flow control and
/// framing are the proxy's.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONN_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 128 * 1024;
/// zmesh's read sizes from TCP (proxy/src/copy.rs): each read takes a fresh buffer (its
/// bytes go to h2 as they are), so a chatty tunnel must not allocate a bulk-sized one per
/// 64-byte message; reads that fill the buffer grow the next one, short ones shrink it.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 256 * 1024;

fn next_read_size(size: usize, read: usize) -> usize {
    if read >= size {
        (size * 4).min(MAX_READ)
    } else if read < size / 16 {
        (size / 4).max(MIN_READ)
    } else {
        size
    }
}

/// Accepts forever on `listener`: relay A (TLS connector) tunnels each connection to B at
/// `to`; relay B (TLS acceptor) serves the tunnels of each connection A opens to `to`.
pub async fn serve(listener: TcpListener, to: SocketAddr, tls: TlsEnd) {
    // Each read hands its buffer to h2: keep freed buffers instead of returning them to
    // the kernel after every read, as zmesh's proxy does.
    zmesh_proxy::runtime::tune_malloc();
    match tls {
        TlsEnd::Connector(connector) => {
            let pool = Arc::new(Mutex::new(None));
            crate::relay::accept_each(listener, move |inbound| {
                let (pool, connector) = (pool.clone(), connector.clone());
                async move { tunnel_out(inbound, to, &connector, &pool).await }
            })
            .await
        }
        TlsEnd::Acceptor(acceptor) => {
            crate::relay::accept_each(listener, move |inbound| {
                let acceptor = acceptor.clone();
                async move { serve_in(inbound, to, acceptor).await }
            })
            .await
        }
    }
}

/// The connection to B and whether it has ended (set by its driving task).
type Pooled = Mutex<Option<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>)>>;

/// Relay A, one client connection: a CONNECT stream on the pooled connection to B (made
/// on first use, or again once it has closed), then the copy.
async fn tunnel_out(
    inbound: TcpStream,
    to: SocketAddr,
    connector: &TlsConnector,
    pool: &Pooled,
) -> Result<()> {
    inbound.set_nodelay(true)?;
    let sender = {
        let mut pooled = pool.lock().await;
        match pooled.as_ref() {
            Some((sender, ended)) if !ended.load(Ordering::Relaxed) => sender.clone(),
            _ => {
                let fresh = dial(to, connector).await?;
                let sender = fresh.0.clone();
                *pooled = Some(fresh);
                sender
            }
        }
    };
    let mut sender = sender.ready().await?;
    let request = http::Request::connect(to.to_string()).body(())?;
    let (response, send) = sender.send_request(request, false)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        bail!("relay B answered {}", response.status());
    }
    bridge(inbound, send, response.into_body()).await
}

async fn dial(
    to: SocketAddr,
    connector: &TlsConnector,
) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>)> {
    let tcp = connect(to).await?;
    let name = zmesh_identity::tls::server_name(to.ip());
    let tls = connector.connect(name, tcp).await?;
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake with relay B")?;
    let ended = Arc::new(AtomicBool::new(false));
    let ending = ended.clone();
    tokio::spawn(async move {
        let _ = connection.await;
        ending.store(true, Ordering::Relaxed);
    });
    Ok((sender, ended))
}

/// Relay B, one connection from A: each CONNECT stream gets 200 and a connection to `to`.
async fn serve_in(inbound: TcpStream, to: SocketAddr, acceptor: TlsAcceptor) -> Result<()> {
    inbound.set_nodelay(true)?;
    let tls = acceptor.accept(inbound).await?;
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(tls)
        .await?;
    while let Some(accepted) = connection.accept().await {
        let (request, mut respond) = accepted?;
        tokio::spawn(async move {
            if request.method() != http::Method::CONNECT {
                respond.send_reset(h2::Reason::PROTOCOL_ERROR);
                return;
            }
            let Ok(outbound) = connect(to).await else {
                respond.send_reset(h2::Reason::CONNECT_ERROR);
                return;
            };
            let Ok(send) = respond.send_response(http::Response::new(()), false) else {
                return;
            };
            let _ = bridge(outbound, send, request.into_body()).await;
        });
    }
    Ok(())
}

/// Both directions of one tunnel until both ended: TCP EOF becomes END_STREAM and
/// END_STREAM a TCP shutdown, as in zmesh's copy.rs.
async fn bridge(mut tcp: TcpStream, mut send: SendStream<Bytes>, recv: RecvStream) -> Result<()> {
    let (mut r, w) = tcp.split();
    tokio::try_join!(tcp_to_h2(&mut r, &mut send), h2_to_tcp(recv, w))?;
    Ok(())
}

async fn tcp_to_h2(
    tcp: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
) -> Result<()> {
    let mut size = MIN_READ;
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        // Through AsyncRead, as copy.rs: a short read spares the EAGAIN read after it.
        let read = poll_fn(|cx| Poll::Ready(poll_read_buf(Pin::new(&mut *tcp), cx, &mut buf)));
        let n = match read.await {
            Poll::Ready(n) => n?,
            Poll::Pending => continue,
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        size = next_read_size(size, n);
        let mut data = buf.freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => bail!("the stream closed while sending"),
            };
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false)?;
        }
    }
}

async fn h2_to_tcp(mut recv: RecvStream, mut tcp: tokio::net::tcp::WriteHalf<'_>) -> Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        tcp.write_all(&chunk).await?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    tcp.shutdown().await?;
    Ok(())
}
