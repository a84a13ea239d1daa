//! Moving bytes between a TCP socket and an HTTP/2 stream, each direction on its own
//! (and between two TCP sockets, for plain TCP passed through).
//!
//! TCP EOF becomes END_STREAM; END_STREAM becomes shutdown(SHUT_WR); RST_STREAM with
//! NO_ERROR or CANCEL counts as end of stream. Memory per stream stays bounded: we only
//! send what the peer's flow-control window allows, and only release receive capacity
//! once the bytes are written to TCP.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::access::ByteCounts;

/// How much we read from TCP at a time (also caps what one stream buffers for sending).
const READ_CHUNK: usize = 256 * 1024;

/// Why a tunnel ended before both directions finished.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    #[error("TCP: {0}")]
    Tcp(#[from] io::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

fn is_clean_reset(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL)) && e.is_reset()
}

/// How a tunnel's HTTP/2 stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both directions finished (EOF / END_STREAM).
    Finished,
    /// The peer reset the stream with NO_ERROR or CANCEL.
    PeerReset,
}

/// TCP -> HTTP/2, ending with END_STREAM on TCP EOF; true if the peer reset the stream.
async fn tcp_to_h2<R: AsyncRead + Unpin>(
    mut tcp: R,
    send: &mut SendStream<Bytes>,
    counter: &AtomicU64,
) -> Result<bool, CopyError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        // Also watch for the peer resetting the stream while the client is idle.
        let n = tokio::select! {
            // Polled on every wake-up of the tunnel: fixed order, no per-poll RNG.
            biased;
            n = tcp.read_buf(&mut buf) => n?,
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                return match reset {
                    Ok(Reason::NO_ERROR) | Ok(Reason::CANCEL) => Ok(true),
                    Ok(reason) => Err(CopyError::H2(reason.into())),
                    Err(e) => Err(e.into()),
                };
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(false);
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(CopyError::Tcp(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the HTTP/2 stream closed while sending",
                    )))
                }
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            let len = chunk.len() as u64;
            send.send_data(chunk, false)?;
            counter.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// HTTP/2 -> TCP, ending with shutdown(SHUT_WR) on END_STREAM; true if the peer reset
/// the stream.
async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    mut tcp: W,
    counter: &AtomicU64,
) -> Result<bool, CopyError> {
    let mut reset = false;
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let len = chunk.len();
                tcp.write_all(&chunk).await?;
                counter.fetch_add(len as u64, Ordering::Relaxed);
                // Only now may the peer send more: bounded memory per stream.
                let _ = recv.flow_control().release_capacity(len);
            }
            Some(Err(e)) if is_clean_reset(&e) => {
                reset = true;
                break;
            }
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    tcp.shutdown().await?;
    Ok(reset)
}

/// Copies both ways until both directions ended, adding to `to_h2` and `to_tcp` as the
/// bytes go. If either direction fails, both stop and the stream is reset (by dropping
/// it) and the socket closed.
pub(crate) async fn bridge(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    recv: RecvStream,
    to_h2: &AtomicU64,
    to_tcp: &AtomicU64,
) -> Result<Ended, CopyError> {
    // Borrowed halves: no lock between the two directions (tokio::io::split takes one).
    let (r, w) = tcp.split();
    let up = tcp_to_h2(r, &mut send, to_h2);
    let down = h2_to_tcp(recv, w, to_tcp);
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    let mut reset = false;
    while !(up_done && down_done) {
        tokio::select! {
            biased;
            r = &mut up, if !up_done => { reset |= r?; up_done = true; }
            r = &mut down, if !down_done => { reset |= r?; down_done = true; }
        }
    }
    Ok(if reset {
        Ended::PeerReset
    } else {
        Ended::Finished
    })
}

/// Plain TCP both ways between the connecting `client` and `upstream` until both
/// directions ended, adding to `bytes` as they are written.
pub(crate) async fn splice(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    bytes: &ByteCounts,
) -> io::Result<()> {
    let mut client = CountWrites {
        io: client,
        written: &bytes.sent,
    };
    let mut upstream = CountWrites {
        io: upstream,
        written: &bytes.received,
    };
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// A stream that counts the bytes written to it.
struct CountWrites<'a, S> {
    io: &'a mut S,
    written: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountWrites<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountWrites<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}
