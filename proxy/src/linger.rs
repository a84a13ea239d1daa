//! Lingering close. Dropping a socket that still holds unread bytes, without having sent
//! FIN, makes the kernel send RST, and that RST makes the peer's kernel throw away what its
//! application has not read yet: the GOAWAY that says why we closed. h2 shuts the stream
//! down (close_notify, FIN) when it completes a close itself, but a connection we abandon
//! (keepalive failed, I/O errors, the drain deadline) is just dropped. So a closed HBONE
//! connection keeps being read, and what arrives discarded, for a moment before its socket
//! goes (as web servers' lingering close).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long, and how much, a closed connection is read before its socket is dropped.
const LINGER_FOR: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// An I/O stream that lingers when dropped (inside a tokio runtime; else it just closes).
pub(crate) struct Lingering<T: AsyncRead + Unpin + Send + 'static>(Option<T>);

impl<T: AsyncRead + Unpin + Send + 'static> Lingering<T> {
    pub(crate) fn new(io: T) -> Self {
        Self(Some(io))
    }

    fn io(&mut self) -> &mut T {
        // Only Drop takes it out.
        self.0.as_mut().expect("lingering stream used after drop")
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> Drop for Lingering<T> {
    fn drop(&mut self) {
        let (Some(io), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        runtime.spawn(async move {
            let mut io = io;
            let mut buf = vec![0u8; 16 * 1024];
            let mut read = 0;
            let _ = tokio::time::timeout(LINGER_FOR, async {
                while read < LINGER_BYTES {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                }
            })
            .await;
        });
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.io()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.io()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// The server says "bye" and drops its socket while the client's bytes are unread;
    /// returns what the client then reads.
    async fn last_words(linger: bool) -> std::io::Result<Vec<u8>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut client = TcpStream::connect(listener.local_addr()?).await?;
        let (mut server, _) = listener.accept().await?;
        client.write_all(&[7u8; 64 * 1024]).await?;
        // The server has the client's bytes queued, unread.
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await?;
        server.write_all(b"bye").await?;
        if linger {
            drop(Lingering::new(server));
        } else {
            drop(server);
        }
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn the_peer_reads_our_last_words_although_we_did_not_read_its() {
        assert_eq!(last_words(true).await.unwrap(), b"bye");
        // What lingering prevents: the RST discards "bye" at the peer.
        assert_eq!(
            last_words(false).await.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }
}
