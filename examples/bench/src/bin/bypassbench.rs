//! zmesh-bypassbench: what a sockmap/sk_msg bypass of the pod <-> node leg would give, and
//! what it would cost (issue 17 lists it as a lever for the proxy's local legs).
//!
//! One pod leg of the lab's cluster (a pod's network namespace and cgroup, its veth to the
//! node's namespace): a sender in the pod, a receiver on the node side of the veth, as the
//! outbound leg from a client pod to the node proxy. Each round measures that leg twice,
//! over TCP as it is, and with `bpf/local_bypass.c` attached (sockops puts both ends in a
//! sockhash, sk_msg hands every write to the peer's receive queue):
//!
//! - bulk: one connection, a fixed amount pod -> node, wall time and this process's CPU
//!   (sender, receiver and the kernel work done on their behalf); every byte is checked in
//!   order at the receiver;
//! - ping-pong: 64-byte round trips, p50 and p99;
//! - flow control: a receiver that accepts and never reads; how much the sender can queue
//!   before its writes stop, and how much of the node's TCP memory that takes.
//!
//! Needs root; everything it makes is removed on exit, on error and on panic. See
//! BENCHMARKS.md, "The local-leg bypass".

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use clap::Parser;

use zmesh_bench::compare::{median, percentiles};
use zmesh_bench::procs;
use zmesh_testbed::{cgroup2_mount, Cluster, ClusterSpec};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/local_bypass.o"));

/// The leg's port on the node side (any port: the probe matches on it).
const LEG_PORT: u16 = 15_091;
const CHUNK: usize = 64 * 1024;
const PING: usize = 64;

#[derive(Parser)]
#[command(name = "zmesh-bypassbench")]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB moved pod -> node per bulk test.
    #[arg(long, default_value_t = 4096)]
    bulk_mib: u64,
    #[arg(long, default_value_t = 20_000)]
    pings: usize,
    /// Connections for the ordering test (write at once after connect(), before the node
    /// end is accepted).
    #[arg(long, default_value_t = 2000)]
    early_writes: usize,
    /// Stop the flow-control test once this many MiB are queued to a receiver that
    /// never reads (without the bypass the sender stops after a few MiB).
    #[arg(long, default_value_t = 256)]
    flood_cap_mib: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path_ {
    Tcp,
    Bypass,
}

impl Path_ {
    fn name(self) -> &'static str {
        match self {
            Path_::Tcp => "TCP over the veth",
            Path_::Bypass => "sk_msg bypass",
        }
    }
}

#[derive(Default)]
struct Samples {
    gbps: Vec<f64>,
    cpu_s_per_gb: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    queued_mib: Vec<f64>,
    tcp_mem_mib: Vec<f64>,
    legs_in_map: Vec<f64>,
    reordered: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("zmesh-bypassbench needs root (network namespaces, cgroups, eBPF)");
    }
    let spec = ClusterSpec::new().node("node1", |n| n.pod("client", "bench", "client"));
    let cluster = Cluster::build(&spec).context("building the one-pod cluster")?;
    let result = run(&args, &cluster);
    let teardown = cluster.teardown().context("tearing down the cluster");
    result.and(teardown)
}

fn run(args: &Args, cluster: &Cluster) -> Result<()> {
    let node = &cluster.nodes()[0];
    let pod = &node.pods()[0];
    let leg = Leg {
        node: node.netns(),
        pod: pod.netns(),
        addr: SocketAddr::new(node.pod_gateway_ip().into(), LEG_PORT),
    };
    // Both ends' sockets take this process's cgroup, where the probe attaches.
    let cgroup = CgroupStay::enter(cluster.cgroup_path().join("bypassbench"))?;

    let mut tcp = Samples::default();
    let mut bypass = Samples::default();
    for round in 1..=args.rounds {
        for path in [Path_::Tcp, Path_::Bypass] {
            let probe = match path {
                Path_::Tcp => None,
                Path_::Bypass => Some(Probe::attach(cgroup.path(), LEG_PORT)?),
            };
            let samples = if path == Path_::Tcp {
                &mut tcp
            } else {
                &mut bypass
            };
            let listener = leg.listen()?;
            let (gbps, cpu) = bulk(&leg, &listener, args.bulk_mib << 20)?;
            let (p50, p99) = ping_pong(&leg, &listener, args.pings)?;
            let reordered = early_writes(&leg, &listener, args.early_writes)?;
            let (tx, rx) = leg.connect(&listener)?;
            let in_map = probe.as_ref().map(Probe::legs_seen).unwrap_or(0);
            let (queued, tcp_mem) = flood(tx, rx, args.flood_cap_mib << 20)?;
            eprintln!(
                "round {round} {:<18} {gbps:6.2} Gb/s  {cpu:5.3} CPU s/GB  p50 {p50:6.1} us  \
                 p99 {p99:6.1} us  queued to a stalled reader {:7.1} MiB (node TCP memory \
                 +{:.1} MiB)  reordered {reordered}/{}",
                path.name(),
                queued as f64 / (1 << 20) as f64,
                tcp_mem as f64 / 1024.0,
                args.early_writes,
            );
            samples.gbps.push(gbps);
            samples.cpu_s_per_gb.push(cpu);
            samples.p50_us.push(p50);
            samples.p99_us.push(p99);
            samples.queued_mib.push(queued as f64 / (1 << 20) as f64);
            samples.tcp_mem_mib.push(tcp_mem as f64 / 1024.0);
            samples.legs_in_map.push(in_map as f64);
            samples.reordered.push(reordered as f64);
            drop(probe);
        }
    }
    print_table(args, &tcp, &bypass);
    if bypass.legs_in_map.contains(&0.0) {
        bail!("the bypass round saw no socket in its sockhash: the probe did not attach");
    }
    Ok(())
}

fn print_table(args: &Args, tcp: &Samples, bypass: &Samples) {
    println!(
        "\nOne pod <-> node leg, medians of {} rounds ({} MiB bulk, {} pings)\n",
        args.rounds, args.bulk_mib, args.pings
    );
    println!("| figure | TCP over the veth | sk_msg bypass | bypass/TCP |");
    println!("|---|---|---|---|");
    let row = |name: &str, t: &[f64], b: &[f64], digits: usize| {
        let (t, b) = (median(t.to_vec()), median(b.to_vec()));
        let ratio = if t > 0.0 {
            format!("{:.2}", b / t)
        } else {
            "-".to_string()
        };
        println!("| {name} | {t:.digits$} | {b:.digits$} | {ratio} |");
    };
    row("throughput, Gb/s", &tcp.gbps, &bypass.gbps, 2);
    row(
        "CPU s/GB (both ends)",
        &tcp.cpu_s_per_gb,
        &bypass.cpu_s_per_gb,
        3,
    );
    row("RTT p50, us", &tcp.p50_us, &bypass.p50_us, 1);
    row("RTT p99, us", &tcp.p99_us, &bypass.p99_us, 1);
    let capped = bypass
        .queued_mib
        .iter()
        .any(|&q| q >= args.flood_cap_mib as f64);
    row(
        "MiB queued to a reader that never reads",
        &tcp.queued_mib,
        &bypass.queued_mib,
        1,
    );
    row(
        "node TCP memory taken by it, MiB",
        &tcp.tcp_mem_mib,
        &bypass.tcp_mem_mib,
        1,
    );
    row(
        &format!(
            "connections of {} whose first writes arrived out of order",
            args.early_writes
        ),
        &tcp.reordered,
        &bypass.reordered,
        0,
    );
    if capped {
        println!(
            "\nWith the bypass the sender never stopped: it reached the test's cap of {} MiB. \
             Nothing bounds that queue but the node's tcp_mem limit.",
            args.flood_cap_mib
        );
    }
}

/// The pod leg: a node-side listener on the pod's gateway address, clients in the pod.
struct Leg<'a> {
    node: &'a zmesh_testbed::Netns,
    pod: &'a zmesh_testbed::Netns,
    addr: SocketAddr,
}

impl Leg<'_> {
    fn listen(&self) -> Result<TcpListener> {
        let addr = self.addr;
        let listener = self.node.run(move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(64)?;
            Ok::<_, std::io::Error>(TcpListener::from(socket))
        })??;
        Ok(listener)
    }

    /// A connection from the pod, and its accepted end. accept() returns once the node
    /// end is established, so both ends are in the sockhash before the first write.
    fn connect(&self, listener: &TcpListener) -> Result<(TcpStream, TcpStream)> {
        let addr = self.addr;
        let client = self.pod.run(move || TcpStream::connect(addr))??;
        let (server, _) = listener.accept().context("accepting the leg")?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok((client, server))
    }
}

/// Bulk pod -> node: Gb/s and CPU s/GB of this process; every byte is checked in order.
fn bulk(leg: &Leg, listener: &TcpListener, bytes: u64) -> Result<(f64, f64)> {
    let (mut tx, mut rx) = leg.connect(listener)?;
    let cpu0 = procs::self_cpu();
    let start = Instant::now();
    let received = std::thread::scope(|s| {
        let reader = s.spawn(move || read_in_order(&mut rx));
        let mut chunk = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < bytes {
            chunk.fill(chunk_byte(sent));
            tx.write_all(&chunk)?;
            sent += CHUNK as u64;
        }
        tx.shutdown(std::net::Shutdown::Write)?;
        match reader.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })?;
    let wall = start.elapsed().as_secs_f64();
    let cpu = (procs::self_cpu() - cpu0).as_secs_f64();
    if received != bytes {
        bail!("bulk: {received} bytes arrived of {bytes}");
    }
    let gb = bytes as f64 / 1e9;
    Ok((gb * 8.0 / wall, cpu / gb))
}

/// Chunk k of the bulk stream is filled with k mod 251: a reordered or lost write shows.
fn chunk_byte(offset: u64) -> u8 {
    ((offset / CHUNK as u64) % 251) as u8
}

fn read_in_order(rx: &mut TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    loop {
        let n = rx.read(&mut buf).context("bulk: reading")?;
        if n == 0 {
            return Ok(offset);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let in_chunk = CHUNK - (offset % CHUNK as u64) as usize;
            let (part, tail) = rest.split_at(in_chunk.min(rest.len()));
            let want = chunk_byte(offset);
            if let Some(bad) = part.iter().position(|&b| b != want) {
                bail!(
                    "bulk: byte {} arrived out of order ({} where {want} was sent)",
                    offset + bad as u64,
                    part[bad]
                );
            }
            offset += part.len() as u64;
            rest = tail;
        }
    }
}

/// 64-byte round trips from the pod, echoed by the node end: p50 and p99 in us.
fn ping_pong(leg: &Leg, listener: &TcpListener, pings: usize) -> Result<(f64, f64)> {
    let (mut tx, mut rx) = leg.connect(listener)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut buf = [0u8; PING];
            while rx.read_exact(&mut buf).is_ok() {
                if rx.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; PING];
        let mut rtts = Vec::with_capacity(pings);
        for i in 0..pings + zmesh_bench::load::WARMUP_PINGS {
            let start = Instant::now();
            tx.write_all(&buf)?;
            tx.read_exact(&mut buf)
                .context("ping-pong: reading the echo")?;
            if i >= zmesh_bench::load::WARMUP_PINGS {
                rtts.push(start.elapsed().as_nanos() as u64);
            }
        }
        tx.shutdown(std::net::Shutdown::Both)?;
        Ok(percentiles(rtts))
    })
}

/// Connections whose client writes two records at once after connect(), as clients do,
/// while the node end may not be established yet: how many arrived out of order.
fn early_writes(leg: &Leg, listener: &TcpListener, connections: usize) -> Result<usize> {
    const RECORD: usize = 4096;
    let addr = leg.addr;
    let mut reordered = 0;
    for _ in 0..connections {
        let client = leg.pod.run(move || {
            let mut client = TcpStream::connect(addr)?;
            client.write_all(&[b'1'; RECORD])?;
            client.write_all(&[b'2'; RECORD])?;
            Ok::<_, std::io::Error>(client)
        })??;
        let (mut server, _) = listener.accept().context("accepting the leg")?;
        let mut got = vec![0u8; 2 * RECORD];
        server.read_exact(&mut got).context("ordering: reading")?;
        if got[..RECORD].iter().any(|&b| b != b'1') || got[RECORD..].iter().any(|&b| b != b'2') {
            reordered += 1;
        }
        client.shutdown(std::net::Shutdown::Both).ok();
    }
    Ok(reordered)
}

/// Writes to a receiver that never reads until the writes stop (or `cap` is reached):
/// bytes queued, and KiB of the node's TCP memory they took.
fn flood(mut tx: TcpStream, rx: TcpStream, cap: u64) -> Result<(u64, u64)> {
    let tcp_before = procs::kernel_tcp_kib()?;
    tx.set_nonblocking(true)?;
    let chunk = vec![0u8; 1 << 20];
    let mut queued = 0u64;
    while queued < cap {
        match tx.write(&chunk) {
            Ok(n) => queued += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Stopped for good unless the socket turns writable again soon (TCP frees
                // send buffer as the peer acknowledges; a stalled reader stops that).
                if !writable_within(&tx, Duration::from_millis(300))? {
                    break;
                }
            }
            Err(e) => return Err(e).context("flood: writing"),
        }
    }
    let tcp_after = procs::kernel_tcp_kib()?;
    drop((tx, rx));
    Ok((queued, tcp_after.saturating_sub(tcp_before)))
}

fn writable_within(stream: &TcpStream, limit: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("poll");
    }
    Ok(n == 1 && pfd.revents & libc::POLLOUT != 0)
}

/// The bypass probe, attached while this value lives (dropping it detaches everything).
struct Probe {
    _ebpf: Ebpf,
    legs: SockHash<aya::maps::MapData, LegKey>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LegKey([u32; 4]);

// SAFETY: four u32s, no padding; mirrors struct leg_key in bpf/local_bypass.c.
unsafe impl aya::Pod for LegKey {}

impl Probe {
    fn attach(cgroup: &Path, port: u16) -> Result<Self> {
        let port = u32::from(port);
        let mut ebpf = EbpfLoader::new()
            .override_global("bypass_port", &port, true)
            .load(OBJECT)
            .context("loading the bypass probe")?;
        let map: Map = ebpf.take_map("zm_legs").context("no zm_legs map")?;
        let legs: SockHash<_, LegKey> = SockHash::try_from(map)?;
        let msg: &mut SkMsg = ebpf
            .program_mut("zm_bypass_msg")
            .context("no sk_msg program")?
            .try_into()?;
        msg.load()?;
        msg.attach(legs.fd())
            .context("attaching sk_msg to the sockhash")?;
        let ops: &mut SockOps = ebpf
            .program_mut("zm_bypass_sockops")
            .context("no sockops program")?
            .try_into()?;
        ops.load()?;
        let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        ops.attach(cg, CgroupAttachMode::Single)
            .context("attaching sockops")?;
        Ok(Probe { _ebpf: ebpf, legs })
    }

    /// Sockets in the sockhash now (both ends of each open leg).
    fn legs_seen(&self) -> usize {
        self.legs.keys().filter_map(|k| k.ok()).count()
    }
}

/// This process in a cgroup of its own while the value lives; back where it was after.
struct CgroupStay {
    path: PathBuf,
    home: PathBuf,
}

impl CgroupStay {
    fn enter(path: PathBuf) -> Result<Self> {
        let mount = cgroup2_mount()?;
        let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let home = mount.join(relative.trim_start_matches('/'));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let stay = CgroupStay { path, home };
        move_self(&stay.path)?;
        Ok(stay)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CgroupStay {
    fn drop(&mut self) {
        if let Err(e) = move_self(&self.home) {
            eprintln!(
                "zmesh-bypassbench: moving back to {}: {e:#}",
                self.home.display()
            );
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("zmesh-bypassbench: removing {}: {e}", self.path.display());
        }
    }
}

fn move_self(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("writing {}", procs.display()))
}
