//! The load generator: a server and the clients of the four tests, on blocking sockets
//! (one thread per connection, as iperf/netperf do, so the harness adds no event loop of
//! its own to the figures). Every loop is bounded by a deadline and every socket by
//! timeouts, so a stuck proxy fails the run instead of hanging it.
//!
//! Wire protocol: the first byte of a connection picks the server's behaviour:
//! `S` sink (read to EOF, answer the byte count as u64 big-endian), `E` echo 64-byte
//! messages until EOF, `C` one 64-byte exchange (the mode byte is the first of the 64).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};

/// Size of a ping-pong / connection-rate message.
pub const MSG: usize = 64;
const WRITE_CHUNK: usize = 256 * 1024;
/// Per-operation socket timeout: far above any sane latency, so only a stall trips it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last write, how long the proxies may take to flush what they buffer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a client binds and what it dials: the server (direct) or proxy A's outbound port.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub src: IpAddr,
    pub dst: SocketAddr,
}

/// Connects from `t.src` (any port) to `t.dst`. IP_BIND_ADDRESS_NO_PORT defers the port
/// choice to connect(), so tens of thousands of short connections from one IP do not run
/// out of ports while earlier ones sit in TIME_WAIT.
pub fn connect(t: &Target) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(t.dst), Type::STREAM, None)?;
    if t.src.is_ipv4() {
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value is a c_int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    sock.bind(&SocketAddr::new(t.src, 0).into())?;
    sock.connect_timeout(&t.dst.into(), IO_TIMEOUT)?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// The benchmark server; stops its acceptors when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Server {
    /// Listens on `ip` (ephemeral port) with `acceptors` threads; one-exchange
    /// connections are served on the acceptor, longer ones get a thread each.
    pub fn start(ip: IpAddr, acceptors: usize) -> Result<Self> {
        Self::start_on(SocketAddr::new(ip, 0), acceptors)
    }

    /// As [`Server::start`], on a given address.
    pub fn start_on(addr: SocketAddr, acceptors: usize) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("binding the benchmark server on {addr}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..acceptors.max(1) {
            let l = listener.try_clone()?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || accept_loop(l, &stop)));
        }
        Ok(Self {
            addr,
            stop,
            acceptors: handles,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake every acceptor blocked in accept().
        for _ in &self.acceptors {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        for h in self.acceptors.drain(..) {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: &AtomicBool) {
    loop {
        let Ok((mut s, _)) = listener.accept() else {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = s.set_read_timeout(Some(DRAIN_TIMEOUT));
        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
        let mut mode = [0u8; 1];
        if s.read_exact(&mut mode).is_err() {
            continue;
        }
        match mode[0] {
            b'C' => {
                let mut msg = [0u8; MSG];
                msg[0] = b'C';
                if s.read_exact(&mut msg[1..]).is_ok() {
                    let _ = s.write_all(&msg);
                }
            }
            b'S' => {
                std::thread::spawn(move || {
                    let _ = sink(s);
                });
            }
            b'E' => {
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    let _ = echo(s);
                });
            }
            _ => {}
        }
    }
}

fn sink(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_be_bytes())
}

fn echo(mut s: TcpStream) -> io::Result<()> {
    let mut msg = [0u8; MSG];
    loop {
        match s.read_exact(&mut msg) {
            Ok(()) => s.write_all(&msg)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Bytes the server received, and over how long (from the common start to the server's
/// acknowledgement of the last one).
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub bytes: u64,
    pub secs: f64,
}

impl Throughput {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
}

/// `streams` connections each writing as fast as they can for `duration`, then waiting
/// until the server has received every byte (so buffering in the proxies is not counted
/// as moved).
pub fn throughput(t: &Target, streams: usize, duration: Duration) -> Result<Throughput> {
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut s = connect(t).with_context(|| format!("connecting to {}", t.dst))?;
        s.write_all(b"S")?;
        conns.push(s);
    }
    let barrier = Barrier::new(streams + 1);
    let results: Vec<Result<(u64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|s| scope.spawn(|| stream_upload(s, &barrier, duration)))
            .collect();
        barrier.wait();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("upload thread panicked")))
            })
            .collect()
    });
    let mut bytes = 0;
    let mut secs: f64 = 0.0;
    for r in results {
        let (b, s) = r?;
        bytes += b;
        secs = secs.max(s);
    }
    Ok(Throughput { bytes, secs })
}

fn stream_upload(mut s: TcpStream, barrier: &Barrier, duration: Duration) -> Result<(u64, f64)> {
    let buf = vec![0x5au8; WRITE_CHUNK];
    barrier.wait();
    let start = Instant::now();
    // Payload only: the server consumed the mode byte before counting.
    let mut sent = 0u64;
    while start.elapsed() < duration {
        s.write_all(&buf).context("writing")?;
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(DRAIN_TIMEOUT))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .context("waiting for the server's byte count")?;
    let secs = start.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(count);
    if received != sent {
        bail!("sent {sent} bytes but the server received {received}");
    }
    Ok((received, secs))
}

/// Round trips a ping-pong makes before those it times (the harnesses' `warmup`).
pub const WARMUP_PINGS: usize = 1000;

/// Round-trip times of 64-byte ping-pong on one connection, in nanoseconds: `warmup`
/// unrecorded exchanges, then up to `max` recorded ones or until `duration` passed.
pub fn ping_pong(t: &Target, warmup: usize, max: usize, duration: Duration) -> Result<Vec<u64>> {
    let mut s = connect(t).with_context(|| format!("connecting to {}", t.dst))?;
    s.set_nodelay(true)?;
    let mut msg = [0x42u8; MSG];
    msg[0] = b'E';
    s.write_all(&msg[..1])?;
    let mut back = [0u8; MSG];
    for _ in 0..warmup {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    let mut rtts = Vec::with_capacity(max);
    let start = Instant::now();
    while rtts.len() < max && start.elapsed() < duration {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("waiting for the echo")?;
        rtts.push(t0.elapsed().as_nanos() as u64);
        if back != msg {
            bail!("the echo differs from what was sent");
        }
    }
    Ok(rtts)
}

/// Connections completed (connect, one 64-byte exchange, close) by `threads` clients.
#[derive(Debug, Clone)]
pub struct ConnRate {
    pub conns: u64,
    pub errors: u64,
    pub secs: f64,
    /// Per-connection time from connect() to the reply, nanoseconds.
    pub latencies: Vec<u64>,
    pub first_error: Option<String>,
}

impl ConnRate {
    pub fn per_sec(&self) -> f64 {
        self.conns as f64 / self.secs
    }
}

/// Gives up on a thread after this many failed connections (a broken path, not noise).
const MAX_ERRORS: u64 = 100;

pub fn conn_rate(t: &Target, threads: usize, duration: Duration) -> ConnRate {
    let barrier = Barrier::new(threads);
    let parts: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    conn_loop(t, duration)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut total = ConnRate {
        conns: 0,
        errors: 0,
        secs: 0.0,
        latencies: Vec::new(),
        first_error: None,
    };
    for part in parts {
        let Ok(p) = part else {
            total.errors += 1;
            total
                .first_error
                .get_or_insert("client thread panicked".into());
            continue;
        };
        total.conns += p.conns;
        total.errors += p.errors;
        total.secs = total.secs.max(p.secs);
        total.latencies.extend(p.latencies);
        if total.first_error.is_none() {
            total.first_error = p.first_error;
        }
    }
    total
}

fn conn_loop(t: &Target, duration: Duration) -> ConnRate {
    let mut out = ConnRate {
        conns: 0,
        errors: 0,
        secs: 0.0,
        latencies: Vec::new(),
        first_error: None,
    };
    let mut msg = [0x43u8; MSG];
    msg[0] = b'C';
    let start = Instant::now();
    while start.elapsed() < duration && out.errors < MAX_ERRORS {
        let t0 = Instant::now();
        let one = || -> io::Result<()> {
            let mut s = connect(t)?;
            s.write_all(&msg)?;
            let mut back = [0u8; MSG];
            s.read_exact(&mut back)?;
            if back != msg {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad reply"));
            }
            Ok(())
        };
        match one() {
            Ok(()) => {
                out.conns += 1;
                out.latencies.push(t0.elapsed().as_nanos() as u64);
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct() -> (Server, Target) {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let server = Server::start(ip, 4).unwrap();
        let t = Target {
            src: ip,
            dst: server.addr(),
        };
        (server, t)
    }

    #[test]
    fn throughput_counts_what_the_server_received() {
        let (_server, t) = direct();
        let r = throughput(&t, 3, Duration::from_millis(100)).unwrap();
        // At least one chunk per stream, and a whole number of chunks (the server's count
        // matched the client's, or throughput() would have failed).
        assert!(r.bytes >= 3 * WRITE_CHUNK as u64, "{r:?}");
        assert_eq!(r.bytes % WRITE_CHUNK as u64, 0);
        assert!(r.secs >= 0.1 && r.gbit_per_s() > 0.0);
    }

    #[test]
    fn ping_pong_is_bounded_by_count() {
        let (_server, t) = direct();
        let rtts = ping_pong(&t, 10, 200, Duration::from_secs(30)).unwrap();
        assert_eq!(rtts.len(), 200);
        assert!(rtts.iter().all(|&n| n > 0));
    }

    #[test]
    fn conn_rate_completes_exchanges() {
        let (_server, t) = direct();
        let r = conn_rate(&t, 2, Duration::from_millis(200));
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert!(r.conns > 0);
        assert_eq!(r.latencies.len() as u64, r.conns);
    }

    /// Nothing listening: every test fails fast instead of hanging or reporting zeros.
    #[test]
    fn dead_target_fails() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = free.local_addr().unwrap();
        drop(free);
        let t = Target {
            src: "127.0.0.1".parse().unwrap(),
            dst,
        };
        assert!(throughput(&t, 1, Duration::from_millis(50)).is_err());
        assert!(ping_pong(&t, 1, 1, Duration::from_millis(50)).is_err());
        let r = conn_rate(&t, 1, Duration::from_secs(5));
        assert_eq!(r.conns, 0);
        assert_eq!(r.errors, MAX_ERRORS);
        assert!(r.first_error.is_some());
    }

    /// An unknown mode byte gets the connection closed, not a hang.
    #[test]
    fn unknown_mode_is_dropped() {
        let (_server, t) = direct();
        let mut s = connect(&t).unwrap();
        s.write_all(b"X").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0);
    }
}
