//! The memory test (`--tests memory`, mesh path only): what an idle TCP connection to the
//! HBONE port before TLS, an idle tunnel and a stalled stream cost each proxy in resident
//! memory, and whether the RSS comes back down once the load is gone.
//!
//! Method. Every phase runs on a freshly started proxy pair, after one warm-up exchange
//! that opens the pooled HBONE connection (as on a running node). A fresh pair because
//! glibc keeps freed heap memory resident (the proxy trims only past its TRIM_SLACK of
//! 8 MiB): a phase run after another would reuse what the earlier one freed and show
//! less growth than it costs. A cost is the growth of a proxy's RSS while N connections
//! are held, divided by N: VmRSS, and RssAnon (heap, stacks) beside it, since code paged
//! in for the first time is not a per-connection cost. The proxies' descriptor counts
//! show that all N reached them before anything is read.
//!
//! Phases, in this order:
//! - before TLS: N TCP connections to B:15008 that never send a byte, read well within
//!   B's 10 s handshake timeout (which would close them);
//! - idle tunnels: N tunnels client -> A:15001 -> HBONE -> B -> server, one 64-byte round
//!   trip each, then left idle;
//! - stalled streams: N tunnels whose server never reads while the client writes until
//!   its writes block, read once the proxy's trim thread has run (5 s); then all are
//!   closed and the RSS followed as after the burst;
//! - burst: N concurrent uploads of a few MiB each; the peak RSS (VmHWM), then the RSS
//!   every 250 ms for up to 10 s.
//!
//! The server side is a small tokio server of its own ([`MemServer`]): thousands of idle
//! or stalled connections, no thread and no read timeout each.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use zmesh_bench::load::{self, Target, MSG};
use zmesh_bench::procs::{self, ProxyProcess};

/// After the connections are in place, before reading the RSS.
const SETTLE: Duration = Duration::from_millis(300);
/// The RSS after the load is read this often, for at most `FOLLOW_FOR`.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const FOLLOW_FOR: Duration = Duration::from_secs(10);
/// "Back" means within this much of the RSS before the phase.
pub const BACK_WITHIN_KIB: u64 = 2048;
/// How often the proxy trims freed heap memory past its slack (proxy/src/runtime.rs).
const TRIM_PERIOD: Duration = Duration::from_secs(5);
/// B's handshake timeout (the proxy's default; the harness does not change it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for the proxies or the server to catch up.
const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// Stalled streams: the client's send buffer (fixed, so the kernel holds little on the
/// client side), the size of its writes, when its writes count as blocked (none went
/// through for this long), and the bounds on the whole fill.
const CLIENT_SNDBUF: usize = 64 * 1024;
const FILL_CHUNK: usize = 64 * 1024;
const STALL_QUIET: Duration = Duration::from_secs(1);
const FILL_LIMIT: Duration = Duration::from_secs(30);
const MAX_PER_STREAM: u64 = 256 << 20;

/// How many connections each phase holds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizes {
    pub idle_conns: usize,
    pub stalled_streams: usize,
    pub burst_conns: usize,
    pub burst_bytes: usize,
}

/// A proxy's resident set, KiB.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Rss {
    pub rss_kib: u64,
    pub anon_kib: u64,
}

/// N connections held: both proxies' RSS (A, B) before and while they were held.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Held {
    pub n: usize,
    pub before: [Rss; 2],
    pub after: [Rss; 2],
    /// Seconds from the first connect to the reading.
    pub held_secs: f64,
}

impl Held {
    /// Growth per connection of proxy `i`, KiB: (VmRSS, RssAnon).
    pub fn kib_each(&self, i: usize) -> (f64, f64) {
        let per = |after: u64, before: u64| (after as f64 - before as f64) / self.n.max(1) as f64;
        (
            per(self.after[i].rss_kib, self.before[i].rss_kib),
            per(self.after[i].anon_kib, self.before[i].anon_kib),
        )
    }
}

/// The RSS once the load ended.
#[derive(Debug, Clone, Serialize)]
pub struct Return {
    /// Before the phase.
    pub baseline: [Rss; 2],
    /// Peak VmRSS during the phase (VmHWM, reset at its start), KiB.
    pub peak_kib: [u64; 2],
    /// From when the last connection was closed: every 250 ms, up to 10 s (earlier
    /// stop once 5 s passed and both proxies are back).
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub secs: f64,
    pub rss: [Rss; 2],
}

impl Return {
    /// The first sample at or after `secs`.
    fn at(&self, secs: f64) -> Option<&Sample> {
        self.samples.iter().find(|s| s.secs >= secs - 0.02)
    }

    fn back(&self, s: &Sample, i: usize) -> bool {
        s.rss[i].rss_kib <= self.baseline[i].rss_kib + BACK_WITHIN_KIB
    }

    /// When proxy `i` was first back within `BACK_WITHIN_KIB` of its baseline, if it was.
    pub fn back_after(&self, i: usize) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| self.back(s, i))
            .map(|s| s.secs)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stalled {
    pub held: Held,
    /// Bytes the client could write into each stream before its writes blocked (mean):
    /// what the client's socket, both proxies and the server's socket hold together.
    pub bytes_per_stream: f64,
    /// Growth of all TCP socket buffers on the machine meanwhile, KiB (in no RSS).
    pub kernel_tcp_kib: i64,
    pub after_close: Return,
}

#[derive(Debug, Clone, Serialize)]
pub struct Burst {
    pub conns: usize,
    pub bytes_each: usize,
    pub secs: f64,
    pub after: Return,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRound {
    pub before_tls: Held,
    pub idle: Held,
    pub stalled: Stalled,
    pub burst: Burst,
}

/// Everything the memory test measured, for the table and the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub sizes: Sizes,
    /// The open-file limit the harness and the proxies ran with (soft, after raising it
    /// to the hard limit), and what it was before.
    pub nofile: u64,
    pub nofile_before: u64,
    /// B's --max-tunnels-per-identity in the memory test's pairs.
    pub b_identity_limit: usize,
    pub rounds: Vec<MemoryRound>,
}

/// What a phase needs: a way to start a fresh pair (returns A, B), where to connect.
pub struct Env<'a> {
    pub start_pair: &'a dyn Fn(&str) -> Result<(ProxyProcess, ProxyProcess)>,
    /// client -> A:15001; A's --static-dst sends it on to `server`.
    pub mesh: Target,
    pub b_hbone: SocketAddr,
    pub b_metrics: SocketAddr,
    pub server: &'a MemServer,
    pub sizes: Sizes,
}

/// One round: every phase on its own fresh pair.
pub fn run_round(env: &Env) -> Result<MemoryRound> {
    let s = env.sizes;
    eprintln!("  memory: {} idle TCP connections before TLS", s.idle_conns);
    let before_tls = with_pair(env, "before-tls", |a, b| before_tls(env, a, b))?;
    eprintln!("  memory: {} idle tunnels", s.idle_conns);
    let idle = with_pair(env, "idle", |a, b| idle_tunnels(env, a, b))?;
    eprintln!("  memory: {} stalled streams", s.stalled_streams);
    let stalled = with_pair(env, "stalled", |a, b| stalled_streams(env, a, b))?;
    eprintln!(
        "  memory: burst of {} x {} MiB",
        s.burst_conns,
        s.burst_bytes >> 20
    );
    let burst = with_pair(env, "burst", |a, b| burst(env, a, b))?;
    Ok(MemoryRound {
        before_tls,
        idle,
        stalled,
        burst,
    })
}

/// Starts a pair, opens the pooled HBONE connection, runs `phase`, checks that both
/// proxies lived through it and that the server has closed every connection, stops the
/// pair.
fn with_pair<T>(
    env: &Env,
    tag: &str,
    phase: impl FnOnce(&ProxyProcess, &ProxyProcess) -> Result<T>,
) -> Result<T> {
    let (mut a, mut b) = (env.start_pair)(tag)?;
    load::ping_pong(&env.mesh, 0, 1, WAIT_LIMIT).context("memory test: warm-up exchange")?;
    let (_, metrics) = procs::http_get(env.b_metrics, "/metrics")?;
    if procs::metric(&metrics, "zmesh_inbound_tls_connections_total").unwrap_or(0.0) < 1.0 {
        bail!("memory test: the warm-up exchange did not reach proxy B over mTLS");
    }
    std::thread::sleep(SETTLE);
    let out = phase(&a, &b);
    env.server.release();
    a.check_alive()?;
    b.check_alive()?;
    let out = out?;
    wait_for("the server to close every connection", || {
        Ok(env.server.live() == 0)
    })?;
    drop(a);
    drop(b);
    Ok(out)
}

fn both(a: &ProxyProcess, b: &ProxyProcess) -> Result<[Rss; 2]> {
    let rss = |p: &ProxyProcess| {
        p.memory().map(|m| Rss {
            rss_kib: m.rss_kib,
            anon_kib: m.rss_anon_kib,
        })
    };
    Ok([rss(a)?, rss(b)?])
}

/// Polls `done` every 10 ms for up to `WAIT_LIMIT`.
fn wait_for(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !done()? {
        if Instant::now() >= deadline {
            bail!("memory test: timed out after {WAIT_LIMIT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn before_tls(env: &Env, a: &ProxyProcess, b: &ProxyProcess) -> Result<Held> {
    let n = env.sizes.idle_conns;
    let before = both(a, b)?;
    let fds = b.open_fds()?;
    let start = Instant::now();
    let to_b = Target {
        src: env.mesh.src,
        dst: env.b_hbone,
    };
    let conns = (0..n)
        .map(|_| load::connect(&to_b))
        .collect::<io::Result<Vec<_>>>()
        .context("connecting to B's HBONE port")?;
    wait_for("B to accept the connections", || {
        Ok(b.open_fds()? >= fds + n)
    })?;
    std::thread::sleep(SETTLE);
    let after = both(a, b)?;
    let held_secs = start.elapsed().as_secs_f64();
    // None may have been closed by the handshake timeout before the reading.
    if held_secs >= HANDSHAKE_TIMEOUT.as_secs_f64() || b.open_fds()? < fds + n {
        bail!("memory test: B's handshake timeout closed connections before the reading");
    }
    drop(conns);
    Ok(Held {
        n,
        before,
        after,
        held_secs,
    })
}

/// A tunnel through the mesh that carried one 64-byte round trip, left open.
fn echo_once(t: &Target) -> Result<TcpStream> {
    let mut s = load::connect(t)?;
    s.set_nodelay(true)?;
    let mut msg = [0x49u8; MSG];
    msg[0] = b'E';
    s.write_all(&msg[..1])?;
    s.write_all(&msg)?;
    let mut back = [0u8; MSG];
    s.read_exact(&mut back)?;
    if back != msg {
        bail!("the echo differs from what was sent");
    }
    Ok(s)
}

fn idle_tunnels(env: &Env, a: &ProxyProcess, b: &ProxyProcess) -> Result<Held> {
    let n = env.sizes.idle_conns;
    let before = both(a, b)?;
    let (fds_a, fds_b) = (a.open_fds()?, b.open_fds()?);
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(echo_once(&env.mesh).with_context(|| format!("idle tunnel {} of {n}", i + 1))?);
    }
    wait_for("both proxies to hold every tunnel", || {
        Ok(a.open_fds()? >= fds_a + n && b.open_fds()? >= fds_b + n && env.server.live() >= n)
    })?;
    std::thread::sleep(SETTLE);
    let after = both(a, b)?;
    let held_secs = start.elapsed().as_secs_f64();
    drop(conns);
    Ok(Held {
        n,
        before,
        after,
        held_secs,
    })
}

/// A tunnel whose server has answered its mode byte and will read nothing more.
fn hold_open(t: &Target) -> Result<TcpStream> {
    let mut s = load::connect(t)?;
    socket2::SockRef::from(&s).set_send_buffer_size(CLIENT_SNDBUF)?;
    s.write_all(b"H")?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    if &ack != b"h" {
        bail!("unexpected answer from the holding server");
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Writes into every stream until no write has gone through for `STALL_QUIET`; returns
/// the bytes each accepted. Fails if a stream takes more than `MAX_PER_STREAM` (nothing
/// is holding it back) or the writes still move after `FILL_LIMIT`.
fn fill(conns: &mut [TcpStream]) -> Result<Vec<u64>> {
    let chunk = vec![0x5au8; FILL_CHUNK];
    let mut sent = vec![0u64; conns.len()];
    let start = Instant::now();
    let mut moved = start;
    loop {
        for (s, n) in conns.iter_mut().zip(&mut sent) {
            loop {
                match s.write(&chunk) {
                    Ok(0) => bail!("a stalled stream's socket is closed"),
                    Ok(k) => {
                        *n += k as u64;
                        moved = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("writing into a stalled stream"),
                }
                if *n > MAX_PER_STREAM {
                    bail!(
                        "a stream whose server never reads took {} MiB without blocking",
                        *n >> 20
                    );
                }
            }
        }
        if moved.elapsed() >= STALL_QUIET {
            return Ok(sent);
        }
        if start.elapsed() >= FILL_LIMIT {
            bail!("writes into the stalled streams still went through after {FILL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stalled_streams(env: &Env, a: &ProxyProcess, b: &ProxyProcess) -> Result<Stalled> {
    let n = env.sizes.stalled_streams;
    let before = both(a, b)?;
    let kernel_before = procs::kernel_tcp_kib()?;
    a.reset_peak()?;
    b.reset_peak()?;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(
            hold_open(&env.mesh).with_context(|| format!("stalled stream {} of {n}", i + 1))?,
        );
    }
    let sent = fill(&mut conns)?;
    // Filling makes A allocate and free far more than it keeps (its peak is much higher
    // than what it holds once the streams are blocked); the trim thread returns that
    // within one period, so read after it had its chance.
    std::thread::sleep(TRIM_PERIOD + SETTLE);
    let after = both(a, b)?;
    let kernel_after = procs::kernel_tcp_kib()?;
    let held_secs = start.elapsed().as_secs_f64();
    // The server closes first: with data unread that is a reset, which B passes on as a
    // stream reset and A as closing the client's socket. Then the client closes.
    env.server.release();
    drop(conns);
    let after_close = follow(a, b, before)?;
    Ok(Stalled {
        held: Held {
            n,
            before,
            after,
            held_secs,
        },
        bytes_per_stream: sent.iter().sum::<u64>() as f64 / n.max(1) as f64,
        kernel_tcp_kib: kernel_after as i64 - kernel_before as i64,
        after_close,
    })
}

fn burst(env: &Env, a: &ProxyProcess, b: &ProxyProcess) -> Result<Burst> {
    let Sizes {
        burst_conns: conns,
        burst_bytes: bytes_each,
        ..
    } = env.sizes;
    let before = both(a, b)?;
    a.reset_peak()?;
    b.reset_peak()?;
    let start = Instant::now();
    uploads(&env.mesh, conns, bytes_each)?;
    let secs = start.elapsed().as_secs_f64();
    let after = follow(a, b, before)?;
    Ok(Burst {
        conns,
        bytes_each,
        secs,
        after,
    })
}

/// `conns` connections each uploading `bytes` at once (one thread each, released
/// together); each checks the server's count of what arrived.
fn uploads(t: &Target, conns: usize, bytes: usize) -> Result<()> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = load::connect(t).context("burst: connecting")?;
        s.write_all(b"S")?;
        streams.push(s);
    }
    let barrier = Barrier::new(conns);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<()> {
                    let block = vec![0x42u8; 256 * 1024];
                    barrier.wait();
                    let mut left = bytes;
                    while left > 0 {
                        let k = left.min(block.len());
                        s.write_all(&block[..k]).context("burst: writing")?;
                        left -= k;
                    }
                    s.shutdown(Shutdown::Write)?;
                    let mut count = [0u8; 8];
                    s.read_exact(&mut count)
                        .context("burst: waiting for the server's byte count")?;
                    if u64::from_be_bytes(count) != bytes as u64 {
                        bail!(
                            "burst: the server received {} of {bytes} bytes",
                            u64::from_be_bytes(count)
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("burst thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// The RSS every `SAMPLE_EVERY` from now, for up to `FOLLOW_FOR` (stopping after 5 s if
/// both proxies are back within `BACK_WITHIN_KIB` of `baseline`), and the phase's peak.
fn follow(a: &ProxyProcess, b: &ProxyProcess, baseline: [Rss; 2]) -> Result<Return> {
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        let secs = start.elapsed().as_secs_f64();
        let rss = both(a, b)?;
        samples.push(Sample { secs, rss });
        let back = (0..2).all(|i| rss[i].rss_kib <= baseline[i].rss_kib + BACK_WITHIN_KIB);
        if secs >= FOLLOW_FOR.as_secs_f64() - 0.02 || (back && secs >= 4.98) {
            break;
        }
        let next = start + SAMPLE_EVERY * samples.len() as u32;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(Return {
        baseline,
        peak_kib: [a.memory()?.hwm_kib, b.memory()?.hwm_kib],
        samples,
    })
}

/// The server of the memory test, on a thread and tokio runtime of its own. The first
/// byte of a connection picks what it does: `E` echo 64-byte messages until EOF (as
/// load.rs's server), `H` answer `h` and then read nothing, `S` read to EOF and answer
/// the byte count (u64 big-endian). [`MemServer::release`] closes every connection open
/// at that moment; dropping the server closes everything and joins its thread.
pub struct MemServer {
    addr: SocketAddr,
    /// The generation: connections end when it moves on; `STOP` ends the server.
    generation: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

const STOP: u64 = u64::MAX;

impl MemServer {
    pub fn start(ip: IpAddr) -> Result<Self> {
        let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding the memory test's server on {ip}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (generation, rx) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let rt = crate::relay::runtime()?;
        let counted = live.clone();
        let thread = std::thread::Builder::new()
            .name("memory-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let mut stop = rx.clone();
                    loop {
                        tokio::select! {
                            _ = stop.wait_for(|g| *g == STOP) => return,
                            accepted = listener.accept() => match accepted {
                                Ok((s, _)) => {
                                    let live = Live::new(&counted);
                                    let rx = rx.clone();
                                    tokio::spawn(async move {
                                        let _live = live;
                                        let _ = serve(s, rx).await;
                                    });
                                }
                                // E.g. EMFILE: back off instead of spinning.
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            },
                        }
                    }
                });
                // Dropping the runtime drops every connection task and its socket.
            })?;
        Ok(Self {
            addr,
            generation,
            live,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted and not yet closed.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Closes every connection open now.
    pub fn release(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        self.generation.send_replace(STOP);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts a connection as live until dropped (also when the runtime drops its task).
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(mut s: tokio::net::TcpStream, mut generation: watch::Receiver<u64>) {
    let born = *generation.borrow_and_update();
    tokio::select! {
        _ = generation.wait_for(|g| *g != born) => {}
        _ = talk(&mut s) => {}
    }
}

async fn talk(s: &mut tokio::net::TcpStream) -> io::Result<()> {
    match s.read_u8().await? {
        b'E' => {
            s.set_nodelay(true)?;
            let mut msg = [0u8; MSG];
            loop {
                match s.read_exact(&mut msg).await {
                    Ok(_) => s.write_all(&msg).await?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        b'H' => {
            s.write_all(b"h").await?;
            std::future::pending().await
        }
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await
        }
        _ => Ok(()),
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A phase's name in the table, and its figures in a round.
type Phase = (&'static str, fn(&MemoryRound) -> Held);

impl MemoryReport {
    pub fn table(&self) -> String {
        let mut o = String::new();
        let s = self.sizes;
        let _ = writeln!(
            o,
            "\nmemory test (mesh path; every phase on a freshly started proxy pair after one \
             warm-up tunnel; cost = RSS growth / N; open-file limit {} (was {}), B's tunnels \
             per identity {})",
            self.nofile, self.nofile_before, self.b_identity_limit,
        );
        let _ = writeln!(
            o,
            "{:<36} {:>5} {:>6} | {:>15} {:>17} | {:>15} {:>17}",
            "phase",
            "round",
            "N",
            "A MB before>at",
            "A KiB each (anon)",
            "B MB before>at",
            "B KiB each (anon)"
        );
        let phases: [Phase; 3] = [
            ("TCP to B:15008, before TLS", |r| r.before_tls),
            ("idle tunnels (one round trip each)", |r| r.idle),
            ("stalled streams (server never reads)", |r| r.stalled.held),
        ];
        for (name, get) in phases {
            for (k, r) in self.rounds.iter().enumerate() {
                let h = get(r);
                let mut line = format!("{name:<36} {:>5} {:>6} |", k + 1, h.n);
                for i in 0..2 {
                    let (rss, anon) = h.kib_each(i);
                    let _ = write!(
                        line,
                        " {:>15} {:>17} |",
                        format!(
                            "{:.1}>{:.1}",
                            mb(h.before[i].rss_kib),
                            mb(h.after[i].rss_kib)
                        ),
                        format!("{rss:.1} ({anon:.1})"),
                    );
                }
                line.pop();
                o.push_str(line.trim_end());
                o.push('\n');
            }
            if self.rounds.len() > 1 {
                let med = |i: usize, anon: bool| {
                    median(
                        self.rounds
                            .iter()
                            .map(|r| {
                                let (rss, a) = get(r).kib_each(i);
                                if anon {
                                    a
                                } else {
                                    rss
                                }
                            })
                            .collect(),
                    )
                };
                let _ = writeln!(
                    o,
                    "{:<36} {:>5} {:>6} | {:>15} {:>17} | {:>15} {:>17}",
                    "",
                    "med",
                    "",
                    "",
                    format!("{:.1} ({:.1})", med(0, false), med(0, true)),
                    "",
                    format!("{:.1} ({:.1})", med(1, false), med(1, true)),
                );
            }
        }
        for (k, r) in self.rounds.iter().enumerate() {
            let st = &r.stalled;
            let _ = writeln!(
                o,
                "stalled streams, round {}: {:.0} KiB written into each before the client's \
                 writes blocked (client SO_SNDBUF {} KiB), RSS read {:.1} s later; kernel TCP \
                 buffers {:+.1} MB meanwhile (in no process's RSS); before TLS held {:.1} s \
                 (B's handshake timeout: {} s)",
                k + 1,
                st.bytes_per_stream / 1024.0,
                CLIENT_SNDBUF / 1024,
                (TRIM_PERIOD + SETTLE).as_secs_f64(),
                st.kernel_tcp_kib as f64 * 1024.0 / 1e6,
                r.before_tls.held_secs,
                HANDSHAKE_TIMEOUT.as_secs(),
            );
        }
        let _ = writeln!(
            o,
            "\nRSS once the load is gone (MB; \"back\" = within {:.1} MB of before)\n\
             {:<40} {:>8} {:>8} {:>8} {:>8} {:>13} {:>12}",
            mb(BACK_WITHIN_KIB),
            "load (round), proxy",
            "before",
            "peak",
            "+1 s",
            "+5 s",
            "last (at s)",
            "back after",
        );
        for (k, r) in self.rounds.iter().enumerate() {
            let loads = [
                (
                    format!("{} stalled streams closed", s.stalled_streams),
                    &r.stalled.after_close,
                ),
                (
                    format!(
                        "burst {} x {} MiB ({:.2} s)",
                        r.burst.conns,
                        r.burst.bytes_each >> 20,
                        r.burst.secs
                    ),
                    &r.burst.after,
                ),
            ];
            for (name, ret) in loads {
                for (i, proxy) in ["A", "B"].iter().enumerate() {
                    let at = |secs: f64| {
                        ret.at(secs)
                            .map_or("-".to_string(), |s| format!("{:.1}", mb(s.rss[i].rss_kib)))
                    };
                    let last = ret.samples.last().map_or("-".to_string(), |s| {
                        format!("{:.1} ({:.1})", mb(s.rss[i].rss_kib), s.secs)
                    });
                    let back = ret
                        .back_after(i)
                        .map_or("not in 10 s".to_string(), |t| format!("{t:.2} s"));
                    let _ = writeln!(
                        o,
                        "{:<40} {:>8.1} {:>8.1} {:>8} {:>8} {:>13} {:>12}",
                        format!("{name} ({}), {proxy}", k + 1),
                        mb(ret.baseline[i].rss_kib),
                        mb(ret.peak_kib[i]),
                        at(1.0),
                        at(5.0),
                        last,
                        back,
                    );
                }
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss(kib: u64) -> Rss {
        Rss {
            rss_kib: kib,
            anon_kib: kib / 2,
        }
    }

    #[test]
    fn cost_per_connection() {
        let h = Held {
            n: 1000,
            before: [rss(10_000), rss(20_000)],
            after: [rss(21_000), rss(20_500)],
            held_secs: 1.0,
        };
        assert_eq!(h.kib_each(0), (11.0, 5.5));
        assert_eq!(h.kib_each(1), (0.5, 0.25));
    }

    #[test]
    fn back_within_the_slack() {
        let sample = |secs, a, b| Sample {
            secs,
            rss: [rss(a), rss(b)],
        };
        let ret = Return {
            baseline: [rss(10_000), rss(10_000)],
            peak_kib: [50_000, 40_000],
            samples: vec![
                sample(0.0, 30_000, 30_000),
                sample(1.0, 12_100, 30_000),
                sample(5.0, 12_000, 30_000),
            ],
        };
        assert_eq!(ret.back_after(0), Some(5.0));
        assert_eq!(ret.back_after(1), None);
        assert_eq!(ret.at(1.0).unwrap().rss[0].rss_kib, 12_100);
        assert!(ret.at(6.0).is_none());
    }

    /// The three modes of the server, and release() closing what is open.
    #[test]
    fn server_modes_and_release() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let server = MemServer::start(ip).unwrap();
        let t = Target {
            src: ip,
            dst: server.addr(),
        };
        let echo = echo_once(&t).unwrap();
        let mut held = hold_open(&t).unwrap();
        let sent = fill(std::slice::from_mut(&mut held)).unwrap();
        assert!(sent[0] > 0 && sent[0] < MAX_PER_STREAM, "{sent:?}");
        uploads(&t, 3, 300_000).unwrap();
        wait_for("the uploads to close", || Ok(server.live() == 2)).unwrap();
        server.release();
        wait_for("release", || Ok(server.live() == 0)).unwrap();
        drop((echo, held));
        let echo = echo_once(&t).unwrap();
        assert_eq!(server.live(), 1);
        drop(server);
        // The server's end is gone: EOF or reset, not a hang.
        let mut echo = echo;
        let mut b = [0u8; 1];
        assert!(!matches!(echo.read(&mut b), Ok(1)));
    }

    #[test]
    fn table_lists_every_phase_and_round() {
        let held = Held {
            n: 100,
            before: [rss(10_000), rss(10_000)],
            after: [rss(11_000), rss(12_000)],
            held_secs: 0.5,
        };
        let ret = Return {
            baseline: [rss(10_000), rss(10_000)],
            peak_kib: [20_000, 20_000],
            samples: vec![Sample {
                secs: 0.0,
                rss: [rss(11_000), rss(15_000)],
            }],
        };
        let round = MemoryRound {
            before_tls: held,
            idle: held,
            stalled: Stalled {
                held,
                bytes_per_stream: 1024.0 * 100.0,
                kernel_tcp_kib: 2048,
                after_close: ret.clone(),
            },
            burst: Burst {
                conns: 4,
                bytes_each: 4 << 20,
                secs: 1.0,
                after: ret,
            },
        };
        let r = MemoryReport {
            sizes: Sizes {
                idle_conns: 100,
                stalled_streams: 100,
                burst_conns: 4,
                burst_bytes: 4 << 20,
            },
            nofile: 20000,
            nofile_before: 1024,
            b_identity_limit: 1100,
            rounds: vec![round.clone(), round],
        };
        let t = r.table();
        assert_eq!(
            t.matches("idle tunnels (one round trip each)").count(),
            2,
            "{t}"
        );
        assert!(t.contains("10.0 (5.0)") && t.contains("20.0 (10.0)"), "{t}");
        assert!(t.contains("100 KiB written into each"), "{t}");
        assert!(t.contains("burst 4 x 4 MiB (1.00 s) (2), B"), "{t}");
        assert!(t.contains("0.00 s") && t.contains("not in 10 s"), "{t}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["rounds"][1]["idle"]["after"][1]["rss_kib"], 12_000);
    }
}
