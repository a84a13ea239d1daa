//! Tiny TCP servers and clients that live in a namespace: echo and HTTP/1.1.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::netns::{Netns, IO_TIMEOUT};

/// Requests larger than this are refused by the HTTP server (it is a test server).
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// A TCP server running on background threads; stops (and closes its connections) on drop.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Where clients reach it: the pod (or node) address and the bound port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // shutdown() on a listening socket wakes a blocked accept() with EINVAL on Linux.
        // SAFETY: the fd belongs to self.listener, which is still alive.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for conn in connections.iter() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// Serves each connection with `handler` on its own thread.
fn serve<H>(netns: &Netns, ip: Ipv4Addr, port: u16, handler: H) -> Result<Server>
where
    H: Fn(TcpStream) -> io::Result<()> + Send + Sync + 'static,
{
    let listener = Arc::new(netns.tcp_listener(port)?);
    let local = listener.local_addr().map_err(|source| Error::Socket {
        action: "reading the listener's address".into(),
        netns: netns.name().to_owned(),
        source,
    })?;
    let addr = SocketAddr::new(IpAddr::V4(ip), local.port());
    let stopping = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let acceptor = {
        let (listener, stopping, connections) =
            (listener.clone(), stopping.clone(), connections.clone());
        std::thread::Builder::new()
            .name(format!("testbed-server-{}", local.port()))
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let conn = match conn {
                        Ok(conn) => conn,
                        Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
                        Err(e) => {
                            tracing::debug!("accept on {addr}: {e}");
                            continue;
                        }
                    };
                    if let Ok(clone) = conn.try_clone() {
                        connections
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(clone);
                    }
                    let handler = handler.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("testbed-conn-{}", addr.port()))
                        .spawn(move || {
                            if let Err(e) = handler(conn) {
                                tracing::debug!("connection to {addr}: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("cannot spawn a connection thread: {e}");
                    }
                }
            })
            .map_err(|source| Error::Socket {
                action: "spawning the accept thread".into(),
                netns: netns.name().to_owned(),
                source,
            })?
    };
    Ok(Server {
        addr,
        listener,
        stopping,
        connections,
        acceptor: Some(acceptor),
    })
}

pub(crate) fn serve_echo(netns: &Netns, ip: Ipv4Addr, port: u16) -> Result<Server> {
    serve(netns, ip, port, |mut conn| {
        let mut reader = conn.try_clone()?;
        io::copy(&mut reader, &mut conn)?;
        conn.shutdown(Shutdown::Write)
    })
}

pub(crate) fn serve_http(
    netns: &Netns,
    ip: Ipv4Addr,
    port: u16,
    identity: String,
) -> Result<Server> {
    serve(netns, ip, port, move |mut conn| {
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while find(&head, b"\r\n\r\n").is_none() {
            let n = conn.read(&mut buf)?;
            if n == 0 || head.len() > MAX_REQUEST_HEAD {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             x-served-by: {identity}\r\nconnection: close\r\n\r\n{identity}",
            identity.len()
        );
        conn.write_all(response.as_bytes())?;
        conn.shutdown(Shutdown::Write)
    })
}

pub(crate) fn echo_roundtrip(netns: &Netns, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let mut conn = netns.tcp_connect(addr)?;
    let io_err = |source| Error::Socket {
        action: format!("echo exchange with {addr}"),
        netns: netns.name().to_owned(),
        source,
    };
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    // Read while writing so a large payload cannot deadlock on full socket buffers.
    let reader = {
        let mut reader = conn.try_clone().map_err(io_err)?;
        std::thread::spawn(move || {
            let mut echoed = Vec::new();
            reader.read_to_end(&mut echoed).map(|_| echoed)
        })
    };
    conn.write_all(payload).map_err(io_err)?;
    conn.shutdown(Shutdown::Write).map_err(io_err)?;
    match reader.join() {
        Ok(result) => result.map_err(io_err),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// What a test HTTP server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower-cased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let mut conn = netns.tcp_connect(addr)?;
    let io_err = |source| Error::Socket {
        action: format!("HTTP exchange with {addr}"),
        netns: netns.name().to_owned(),
        source,
    };
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).map_err(io_err)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let end = find(raw, b"\r\n\r\n")
        .ok_or_else(|| Error::Http(format!("no complete response head in {} bytes", raw.len())))?;
    let head = std::str::from_utf8(&raw[..end])
        .map_err(|_| Error::Http("response head is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| Error::Http(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .map(|line| {
            line.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .ok_or_else(|| Error::Http(format!("bad header line {line:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut body = raw[end + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse::<usize>())
    {
        let len = len.map_err(|_| Error::Http("bad content-length".into()))?;
        if body.len() < len {
            return Err(Error::Http(format!(
                "body truncated: {} of {len} bytes",
                body.len()
            )));
        }
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nX-Served-By: a/b\r\ncontent-length: 3\r\n\r\na/bEXTRA",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-served-by"), Some("a/b"));
        assert_eq!(r.body, b"a/b");
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nno length").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no length"[..]));
    }

    #[test]
    fn rejects_bad_responses() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(raw), Err(Error::Http(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn finds_subslices() {
        assert_eq!(find(b"abcdef", b"cd"), Some(2));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"abc", b""), Some(0));
    }
}
