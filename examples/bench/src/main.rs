//! zmesh-bench: measures, in one run and on one machine, direct TCP against
//! client -> zmesh proxy A (outbound) -> HBONE/mTLS -> zmesh proxy B (inbound) -> server,
//! with both proxies as separate `zmesh proxy --explicit` processes so that their CPU and
//! memory are theirs alone. A third path, client -> relay A -> relay B -> server through
//! two plain TCP relay processes (this binary re-executed, see relay.rs), measures the
//! floor that any two-process chain costs on this machine. All traffic stays on
//! 127.0.0.0/8. See BENCHMARKS.md.

mod hbone_relay;
mod memory;
mod relay;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::report::{CpuUse, PathResult, Report, RoundResult};
use zmesh_bench::certs::{Ca, Topology};
use zmesh_bench::load::{Server, Target};
use zmesh_bench::procs::{metric, metric_sum, ProxyProcess};
use zmesh_bench::{load, procs};

/// Direct TCP vs. the zmesh HBONE data path, on loopback.
#[derive(Parser)]
#[command(name = "zmesh-bench", version)]
struct Args {
    /// The zmesh binary (default: `zmesh` next to this binary).
    #[arg(long, value_name = "PATH")]
    zmesh: Option<PathBuf>,
    /// Seconds per throughput and connection-rate test (and the cap for ping-pong).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Streams in the multi-stream throughput test.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// At most this many recorded ping-pong round trips per path.
    #[arg(long, default_value_t = 50_000)]
    pings: usize,
    /// Client threads in the connection-rate test.
    #[arg(long, default_value_t = 4)]
    conn_threads: usize,
    /// Repeat every test this many times (each round runs every path: direct, relay,
    /// mesh); the table shows the median of the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Third octet of the loopback addresses: 127.0.NET.{11,12,21,22,31,32}.
    #[arg(long, default_value_t = 0)]
    net: u8,
    /// Log level of the proxies ("info" keeps their per-connection access log on, as a
    /// deployed proxy would have it).
    #[arg(long, default_value = "info")]
    proxy_log: String,
    /// Which tests to run (all by default; skipped ones show as 0 / NaN). "memory" runs
    /// after the others, on proxy pairs of its own (mesh path only).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "single,multi,ping-pong,conn-rate,memory"
    )]
    tests: Vec<Test>,
    /// Memory test: idle tunnels held at once (and idle TCP connections to B's HBONE port
    /// before TLS).
    #[arg(long, default_value_t = 1000)]
    idle_conns: usize,
    /// Memory test: stalled streams (the server never reads) held at once.
    #[arg(long, default_value_t = 200)]
    stalled_streams: usize,
    /// Memory test: concurrent uploads in the burst.
    #[arg(long, default_value_t = 256)]
    burst_conns: usize,
    /// Memory test: MiB each upload of the burst sends.
    #[arg(long, default_value_t = 4)]
    burst_mib: usize,
    /// Which paths to measure, run in the order direct, relay, mesh in each round. Direct
    /// (the denominator) and mesh are always measured; "relay" (two plain TCP relay
    /// processes, the floor of any two-process chain) can be left out.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,relay,mesh"
    )]
    paths: Vec<PathKind>,
    /// Pin the harness, and so the proxies and relays it starts, to these CPUs (e.g. `0`
    /// or `0,1`). Default: no pinning.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Also write every figure of every round as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Internal: run as a plain TCP relay listening here (the harness starts two).
    #[arg(long, hide = true, value_name = "ADDR", requires = "relay_to")]
    relay_listen: Option<SocketAddr>,
    /// Internal: where the relay forwards to.
    #[arg(long, hide = true, value_name = "ADDR", requires = "relay_listen")]
    relay_to: Option<SocketAddr>,
    /// Internal: the relay dials onwards in mutual TLS with the SVIDs in this directory.
    #[arg(
        long,
        hide = true,
        value_name = "DIR",
        requires = "relay_listen",
        conflicts_with = "relay_tls_in"
    )]
    relay_tls_out: Option<PathBuf>,
    /// Internal: the relay accepts mutual TLS with the SVIDs in this directory.
    #[arg(long, hide = true, value_name = "DIR", requires = "relay_listen")]
    relay_tls_in: Option<PathBuf>,
    /// Internal: the TLS hop carries HTTP/2 CONNECT streams, one per client connection on
    /// one connection between the relays (HBONE's framing; see hbone_relay.rs).
    #[arg(long, hide = true)]
    relay_hbone: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum PathKind {
    /// client -> server.
    Direct,
    /// client -> relay A -> relay B -> server: plain TCP relays, no TLS, no HTTP/2.
    Relay,
    /// client -> proxy A -> HBONE/mTLS -> proxy B -> server.
    Mesh,
}

/// The relays listen on 127.0.NET.31 and .32, on this port.
const RELAY_PORT: u16 = 15001;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Test {
    /// Single-stream throughput.
    Single,
    /// Multi-stream throughput.
    Multi,
    /// 64-byte ping-pong latency.
    PingPong,
    /// New connections per second.
    ConnRate,
    /// Memory per idle connection, idle tunnel and stalled stream; RSS after a burst.
    Memory,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match (args.relay_listen, args.relay_to) {
        (Some(listen), Some(to)) => {
            let tls = match (&args.relay_tls_out, &args.relay_tls_in) {
                (Some(dir), _) => Some(relay::Tls::Out(dir.clone())),
                (_, Some(dir)) => Some(relay::Tls::In(dir.clone())),
                _ => None,
            };
            relay::run(listen, to, tls, args.relay_hbone)
        }
        _ => run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    // First of all, before any thread or child exists: everything started from here on
    // inherits the affinity of this (the main) thread.
    let online = procs::online_cpus();
    if let Some(list) = &args.cpus {
        procs::set_affinity(&procs::parse_cpus(list, online)?)?;
    }
    let cpu_set = procs::affinity()?;
    if !args.paths.contains(&PathKind::Direct) || !args.paths.contains(&PathKind::Mesh) {
        bail!("--paths must include direct (the denominator) and mesh; only relay can be left out");
    }
    let with_relay =
        args.paths.contains(&PathKind::Relay) && args.tests.iter().any(|t| *t != Test::Memory);
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be in (0, 600]");
    }
    if args.streams == 0 || args.streams > 256 || args.conn_threads == 0 || args.conn_threads > 64 {
        bail!("--streams must be 1..=256 and --conn-threads 1..=64");
    }
    if args.rounds == 0 || args.rounds > 20 {
        bail!("--rounds must be 1..=20");
    }
    let path_tests = args.tests.iter().any(|t| *t != Test::Memory);
    let with_memory = args.tests.contains(&Test::Memory);
    // The memory test holds up to this many connections at once; the harness holds both
    // ends of each, the proxies inherit its limit.
    let most = args
        .idle_conns
        .max(args.stalled_streams)
        .max(args.burst_conns);
    let (nofile_before, nofile) = procs::raise_nofile()?;
    if with_memory {
        if args.idle_conns == 0
            || args.idle_conns > 100_000
            || args.stalled_streams == 0
            || args.stalled_streams > 10_000
            || args.burst_conns == 0
            || args.burst_conns > 1024
            || args.burst_mib == 0
            || args.burst_mib > 256
        {
            bail!(
                "--idle-conns must be 1..=100000, --stalled-streams 1..=10000, \
                 --burst-conns 1..=1024 and --burst-mib 1..=256"
            );
        }
        if (2 * most + 256) as u64 > nofile {
            bail!(
                "the memory test needs {} open files, the limit is {nofile} (hard limit \
                 reached): lower --idle-conns or raise `ulimit -Hn`",
                2 * most + 256
            );
        }
    }
    let zmesh = match &args.zmesh {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no parent directory")?
            .join("zmesh"),
    };
    if !zmesh.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p zmesh) or pass --zmesh",
            zmesh.display()
        );
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let topo = Topology::loopback(args.net);

    // Certificates, workload table: in a private temp dir removed at the end.
    let dir = tempfile::Builder::new().prefix("zmesh-bench").tempdir()?;
    let ca = Ca::new()?;
    let dir_a = dir.path().join("certs-a");
    let dir_b = dir.path().join("certs-b");
    ca.write_cert_dir(&dir_a, "client")?;
    ca.write_cert_dir(&dir_b, "server")?;
    let table = dir.path().join("workloads.yaml");
    std::fs::write(&table, topo.workload_table())?;

    // A leftover or concurrent run would answer our readiness probes: refuse to start.
    let relay_a = SocketAddr::new(topo.relay_a_ip, RELAY_PORT);
    let relay_b = SocketAddr::new(topo.relay_b_ip, RELAY_PORT);
    let mut ours: Vec<SocketAddr> = [topo.proxy_a_ip, topo.proxy_b_ip]
        .into_iter()
        .flat_map(|ip| [15001, 15006, 15008, 15020, 15021].map(|p| SocketAddr::new(ip, p)))
        .collect();
    if with_relay {
        ours.extend([relay_a, relay_b]);
    }
    for addr in ours {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!("{addr} is not free ({e}): is another zmesh-bench running? Try --net");
        }
    }
    let server = Server::start(topo.server_ip, 8)?;
    let mem_server = if with_memory {
        Some(memory::MemServer::start(topo.server_ip)?)
    } else {
        None
    };
    let proxy_args = |node: &str, certs: &PathBuf, ip| {
        let mut v: Vec<String> = [
            "--log",
            &args.proxy_log,
            "proxy",
            "--explicit",
            "--node",
            node,
            "--listen-ip",
            &ip_str(ip),
            "--drain-seconds",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("--workloads".into());
        v.push(table.display().to_string());
        v.push("--cert-dir".into());
        v.push(certs.display().to_string());
        v
    };
    let mut args_a = proxy_args("bench-a", &dir_a, topo.proxy_a_ip);
    args_a.push("--static-dst".into());
    args_a.push(format!("{}={}", topo.client_ip, server.addr()));
    let args_b = proxy_args("bench-b", &dir_b, topo.proxy_b_ip);

    let ready = |ip| SocketAddr::new(ip, 15021);
    let metrics = |ip| SocketAddr::new(ip, 15020);
    // Starts proxy B, then A, and waits until both are ready; returns (A, B).
    let start_pair = |args_a: &[String], args_b: &[String], tag: &str| {
        let log = |p: &str| dir.path().join(format!("proxy-{p}{tag}.log"));
        let mut b = ProxyProcess::spawn("proxy B", &zmesh, args_b, log("b"))?;
        let mut a = ProxyProcess::spawn("proxy A", &zmesh, args_a, log("a"))?;
        b.wait_ready(ready(topo.proxy_b_ip), Duration::from_secs(15))?;
        a.wait_ready(ready(topo.proxy_a_ip), Duration::from_secs(15))?;
        anyhow::Ok((a, b))
    };
    let (mut a, mut b) = start_pair(&args_a, &args_b, "")?;
    let idle = [a.memory()?, b.memory()?];

    // The relays: this binary again, B forwarding to the server, A to B.
    let mut relays = if with_relay {
        let me = std::env::current_exe().context("locating this binary for the relays")?;
        let relay_args = |listen: SocketAddr, to: SocketAddr| {
            vec![
                "--relay-listen".to_string(),
                listen.to_string(),
                "--relay-to".into(),
                to.to_string(),
            ]
        };
        let log = |n: &str| dir.path().join(format!("relay-{n}.log"));
        let mut rb = ProxyProcess::spawn(
            "relay B",
            &me,
            &relay_args(relay_b, server.addr()),
            log("b"),
        )?;
        rb.wait_listening(relay_b, Duration::from_secs(15))?;
        let mut ra = ProxyProcess::spawn("relay A", &me, &relay_args(relay_a, relay_b), log("a"))?;
        ra.wait_listening(relay_a, Duration::from_secs(15))?;
        Some((ra, rb))
    } else {
        None
    };
    let relay_idle = match &relays {
        Some((ra, rb)) => Some([ra.memory()?, rb.memory()?]),
        None => None,
    };

    let direct = Target {
        src: topo.client_ip,
        dst: server.addr(),
    };
    let relay = Target {
        src: topo.client_ip,
        dst: relay_a,
    };
    let mesh = Target {
        src: topo.client_ip,
        dst: SocketAddr::new(topo.proxy_a_ip, 15001),
    };
    if relays.is_some() {
        load::ping_pong(&relay, 0, 10, Duration::from_secs(10)).context("first relay exchange")?;
    }
    // One exchange through the mesh: opens the pooled HBONE connection (a deployed proxy
    // has it open too) and proves the path really is A -> mTLS -> B.
    let first = std::time::Instant::now();
    load::ping_pong(&mesh, 0, 1, Duration::from_secs(10)).context("first mesh exchange")?;
    let first_tunnel_ms = first.elapsed().as_secs_f64() * 1e3;
    let (_, b_metrics) = procs::http_get(metrics(topo.proxy_b_ip), "/metrics")?;
    let tls_in = metric(&b_metrics, "zmesh_inbound_tls_connections_total").unwrap_or(0.0);
    if tls_in < 1.0 {
        bail!("the mesh exchange did not arrive at proxy B over mTLS (inbound TLS = {tls_in})");
    }

    let mut rounds = Vec::new();
    for round in (0..args.rounds).filter(|_| path_tests) {
        eprintln!("round {}/{}", round + 1, args.rounds);
        let children = Children {
            proxies: [&a, &b],
            relays: relays.as_ref().map(|(ra, rb)| [ra, rb]),
        };
        let direct = run_path(args, &children, "direct", &direct, duration)?;
        let relay = match &relays {
            Some(_) => Some(run_path(args, &children, "relay", &relay, duration)?),
            None => None,
        };
        let mesh = run_path(args, &children, "mesh", &mesh, duration)?;
        a.check_alive()?;
        b.check_alive()?;
        if let Some((ra, rb)) = &mut relays {
            ra.check_alive()?;
            rb.check_alive()?;
        }
        rounds.push(RoundResult {
            direct,
            relay,
            mesh,
        });
    }
    let end_memory = [a.memory()?, b.memory()?];
    let relay_end = match &relays {
        Some((ra, rb)) => Some([ra.memory()?, rb.memory()?]),
        None => None,
    };

    // The proxies' own counters must account for every mesh connection we made.
    let (_, a_metrics) = procs::http_get(metrics(topo.proxy_a_ip), "/metrics")?;
    let (_, b_metrics) = procs::http_get(metrics(topo.proxy_b_ip), "/metrics")?;
    let counters = report::Counters {
        a_outbound_ok: metric_sum(
            &a_metrics,
            "zmesh_connections_closed_total",
            &[("direction", "outbound"), ("result", "ok")],
        ),
        a_outbound_failed: metric_sum(
            &a_metrics,
            "zmesh_connections_closed_total",
            &[("direction", "outbound")],
        ) - metric_sum(
            &a_metrics,
            "zmesh_connections_closed_total",
            &[("direction", "outbound"), ("result", "ok")],
        ),
        a_hbone_connections: metric(&a_metrics, "zmesh_pool_connections_created_total")
            .unwrap_or(0.0),
        b_inbound_tls: metric(&b_metrics, "zmesh_inbound_tls_connections_total").unwrap_or(0.0),
        b_inbound_ok: metric_sum(
            &b_metrics,
            "zmesh_connections_closed_total",
            &[("direction", "inbound"), ("result", "ok")],
        ),
        first_tunnel_ms,
    };
    // The memory test's pairs take over the addresses.
    drop(a);
    drop(b);
    let memory = match &mem_server {
        Some(mem_server) => {
            // Its own pairs: A sends the client's connections to the memory test's server;
            // B admits more tunnels per identity than its default 1000.
            let mut args_a = proxy_args("bench-a", &dir_a, topo.proxy_a_ip);
            args_a.push("--static-dst".into());
            args_a.push(format!("{}={}", topo.client_ip, mem_server.addr()));
            let b_identity_limit = (most + 100).max(1000);
            let mut args_b = args_b.clone();
            args_b.push("--max-tunnels-per-identity".into());
            args_b.push(b_identity_limit.to_string());
            let start = |tag: &str| start_pair(&args_a, &args_b, &format!("-memory-{tag}"));
            let env = memory::Env {
                start_pair: &start,
                mesh,
                b_hbone: SocketAddr::new(topo.proxy_b_ip, 15008),
                b_metrics: metrics(topo.proxy_b_ip),
                server: mem_server,
                sizes: memory::Sizes {
                    idle_conns: args.idle_conns,
                    stalled_streams: args.stalled_streams,
                    burst_conns: args.burst_conns,
                    burst_bytes: args.burst_mib << 20,
                },
            };
            let mut rounds = Vec::new();
            for round in 0..args.rounds {
                eprintln!("memory round {}/{}", round + 1, args.rounds);
                rounds.push(memory::run_round(&env)?);
            }
            Some(memory::MemoryReport {
                sizes: env.sizes,
                nofile,
                nofile_before,
                b_identity_limit,
                rounds,
            })
        }
        None => None,
    };

    let report = Report {
        seconds: args.seconds,
        streams: args.streams,
        conn_threads: args.conn_threads,
        proxy_log: args.proxy_log.clone(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpus_online: online,
        cpu_set,
        cpu_pinned: args.cpus.is_some(),
        cpu_model: cpu_model(),
        paths: [PathKind::Direct, PathKind::Relay, PathKind::Mesh]
            .into_iter()
            .filter(|p| args.paths.contains(p))
            .map(|p| format!("{p:?}").to_lowercase())
            .collect(),
        rounds,
        idle_memory: idle,
        end_memory,
        relay_idle_memory: relay_idle,
        relay_end_memory: relay_end,
        counters,
        memory,
    };
    if path_tests {
        print!("{}", report.table());
    }
    if let Some(m) = &report.memory {
        print!("{}", m.table());
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(relays);
    drop(server);
    drop(mem_server);
    Ok(())
}

/// The child processes whose CPU and memory each test records.
struct Children<'a> {
    proxies: [&'a ProxyProcess; 2],
    relays: Option<[&'a ProxyProcess; 2]>,
}

/// The four tests on one path.
fn run_path(
    args: &Args,
    children: &Children,
    path: &str,
    target: &Target,
    duration: Duration,
) -> Result<PathResult> {
    let mut out = PathResult::default();
    let run = |t: Test| args.tests.contains(&t);
    if run(Test::Single) {
        eprintln!("  {path}: 1 stream");
        let (t, cpu) = measure(children, || load::throughput(target, 1, duration))?;
        out.single = (t.gbit_per_s(), cpu.per_gb(t.bytes));
    }
    if run(Test::Multi) {
        eprintln!("  {path}: {} streams", args.streams);
        let (t, cpu) = measure(children, || {
            load::throughput(target, args.streams, duration)
        })?;
        out.multi = (t.gbit_per_s(), cpu.per_gb(t.bytes));
    }
    if run(Test::PingPong) {
        eprintln!("  {path}: ping-pong");
        let (rtts, cpu) = measure(children, || {
            load::ping_pong(target, 1000, args.pings, duration)
        })?;
        out.latency_cost = cpu.per_conn(rtts.len() as u64);
        out.latency = report::Percentiles::of(rtts);
    }
    if run(Test::ConnRate) {
        eprintln!("  {path}: connection rate");
        let (c, cpu) = measure(children, || {
            Ok(load::conn_rate(target, args.conn_threads, duration))
        })?;
        if c.errors > 0 {
            bail!(
                "{path}: {} of {} connections failed; first: {}",
                c.errors,
                c.errors + c.conns,
                c.first_error.as_deref().unwrap_or("?")
            );
        }
        out.conn_rate = c.per_sec();
        out.conn_cpu = cpu.per_conn(c.conns);
        out.conn_latency = report::Percentiles::of(c.latencies);
    }
    Ok(out)
}

fn ip_str(ip: std::net::IpAddr) -> String {
    ip.to_string()
}

/// Runs `f`, returning CPU used meanwhile by the load generator, the proxies, the relays
/// and the box.
fn measure<T>(children: &Children, f: impl FnOnce() -> Result<T>) -> Result<(T, CpuUse)> {
    let proxies = &children.proxies;
    let relays: &[&ProxyProcess] = children.relays.as_ref().map_or(&[], |r| r.as_slice());
    let cpu_of = |procs: &[&ProxyProcess]| -> Result<f64> {
        procs.iter().map(|p| p.cpu().map(|d| d.as_secs_f64())).sum()
    };
    for p in proxies.iter().chain(relays) {
        p.reset_peak()?;
    }
    let p0 = cpu_of(proxies)?;
    let r0 = cpu_of(relays)?;
    let l0 = procs::self_cpu();
    let (busy0, total0) = procs::machine_cpu()?;
    let start = std::time::Instant::now();
    let out = f()?;
    let wall = start.elapsed().as_secs_f64();
    let (busy1, total1) = procs::machine_cpu()?;
    let use_ = CpuUse {
        load: (procs::self_cpu() - l0).as_secs_f64(),
        proxies: cpu_of(proxies)? - p0,
        relays: cpu_of(relays)? - r0,
        machine_busy: (busy1 - busy0).as_secs_f64(),
        machine_total: (total1 - total0).as_secs_f64(),
        wall,
        proxy_peak_kib: [proxies[0].memory()?.hwm_kib, proxies[1].memory()?.hwm_kib],
        relay_peak_kib: match children.relays {
            Some([ra, rb]) => [ra.memory()?.hwm_kib, rb.memory()?.hwm_kib],
            None => [0, 0],
        },
    };
    Ok((out, use_))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
