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
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::access::{ByteCount, ByteCounts};

/// Read sizes from TCP: a tunnel starts reading at most `MIN_READ` bytes at a time, and
/// each read that fills its buffer quadruples the next one up to `MAX_READ` (which also
/// caps what one stream buffers for sending); short reads shrink it again. So a chatty or
/// idle tunnel holds no read buffer, a chatty one a few KiB at a time, and a bulk transfer reads 256 KiB at a time, as before.
pub(crate) const MIN_READ: usize = 4 * 1024;
pub(crate) const MAX_READ: usize = 256 * 1024;

/// The size of the next read from TCP, from how the last one went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadSize(usize);

impl ReadSize {
    pub fn new() -> Self {
        Self(MIN_READ)
    }

    pub fn get(self) -> usize {
        self.0
    }

    /// After reading `n` bytes into a buffer of the current size.
    pub fn after_read(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 4).min(MAX_READ);
        } else if n < self.0 / 16 {
            self.0 = (self.0 / 4).max(MIN_READ);
        }
    }
}

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
async fn tcp_to_h2(
    mut tcp: ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    counter: &ByteCount,
) -> Result<bool, CopyError> {
    let mut size = ReadSize::new();
    loop {
        // Wait for data before taking a buffer: an idle tunnel holds none. Also watch for
        // the peer resetting the stream meanwhile.
        tokio::select! {
            // Polled on every wake-up of the tunnel: fixed order, no per-poll RNG.
            biased;
            ready = tcp.readable() => ready?,
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                return match reset {
                    Ok(Reason::NO_ERROR) | Ok(Reason::CANCEL) => Ok(true),
                    Ok(reason) => Err(CopyError::H2(reason.into())),
                    Err(e) => Err(e.into()),
                };
            }
        };
        let mut buf = BytesMut::with_capacity(size.get());
        // Read through `AsyncRead`, not `try_read_buf`: a short read tells tokio that the
        // socket is drained, so the next wait goes straight to epoll instead of through a
        // read that fails with EAGAIN (one syscall and one buffer fewer per message).
        let read = poll_fn(|cx| Poll::Ready(poll_read_buf(Pin::new(&mut tcp), cx, &mut buf)));
        let n = match read.await {
            Poll::Ready(n) => n?,
            // The readiness was stale: wait again, holding no buffer.
            Poll::Pending => continue,
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(false);
        }
        size.after_read(n);
        let mut data = buf.freeze();
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
            counter.add(len);
        }
    }
}

/// HTTP/2 -> TCP, ending with shutdown(SHUT_WR) on END_STREAM; true if the peer reset
/// the stream.
async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    mut tcp: W,
    counter: &ByteCount,
) -> Result<bool, CopyError> {
    let mut reset = false;
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let len = chunk.len();
                tcp.write_all(&chunk).await?;
                counter.add(len as u64);
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
/// it). The TCP side is then reset too (RST, not FIN), as it is when the far side reset
/// the stream: its application must not mistake a broken tunnel for a clean end (an EOF
/// would pass a truncated answer off as complete, and a client that keeps its side open,
/// such as `nc`, would never notice).
pub(crate) async fn bridge(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    recv: RecvStream,
    to_h2: &ByteCount,
    to_tcp: &ByteCount,
) -> Result<Ended, CopyError> {
    let result = async {
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
    .await;
    if !matches!(result, Ok(Ended::Finished)) {
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    }
    result
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
    written: &'a ByteCount,
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
            this.written.add(n as u64);
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
            this.written.add(n as u64);
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

#[cfg(test)]
mod tests {
    use super::{ReadSize, MAX_READ, MIN_READ};

    #[test]
    fn reads_grow_while_they_fill_the_buffer_and_shrink_when_short() {
        let mut size = ReadSize::new();
        assert_eq!(size.get(), MIN_READ);
        let mut seen = vec![];
        for _ in 0..6 {
            let full = size.get();
            size.after_read(full);
            seen.push(size.get());
        }
        assert_eq!(seen, [16384, 65536, MAX_READ, MAX_READ, MAX_READ, MAX_READ]);
        // Partial but sizeable reads (a bulk sender a little slower than us) keep it.
        size.after_read(MAX_READ / 2);
        assert_eq!(size.get(), MAX_READ);
        // A chatty tunnel after a burst is back to small reads within three reads.
        for want in [65536, 16384, MIN_READ, MIN_READ] {
            size.after_read(64);
            assert_eq!(size.get(), want);
        }
    }
}
