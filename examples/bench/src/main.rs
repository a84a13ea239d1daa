//! zmesh-bench: measures, in one run and on one machine, direct TCP against
//! client -> zmesh proxy A (outbound) -> HBONE/mTLS -> zmesh proxy B (inbound) -> server,
//! with both proxies as separate `zmesh proxy --explicit` processes so that their CPU and
//! memory are theirs alone. All traffic stays on 127.0.0.0/8. See BENCHMARKS.md.

mod certs;
mod load;
mod procs;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::certs::{Ca, Topology};
use crate::load::{Server, Target};
use crate::procs::{metric, metric_sum, ProxyProcess};
use crate::report::{CpuUse, PathResult, Report, RoundResult};

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
    /// Repeat every test this many times (direct and mesh alternating); the table shows
    /// the median of the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Third octet of the loopback addresses: 127.0.NET.{11,12,21,22}.
    #[arg(long, default_value_t = 0)]
    net: u8,
    /// Log level of the proxies ("info" keeps their per-connection access log on, as a
    /// deployed proxy would have it).
    #[arg(long, default_value = "info")]
    proxy_log: String,
    /// Which tests to run (all by default; skipped ones show as 0 / NaN).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "single,multi,ping-pong,conn-rate"
    )]
    tests: Vec<Test>,
    /// Also write every figure of every round as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

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
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be in (0, 600]");
    }
    if args.streams == 0 || args.streams > 256 || args.conn_threads == 0 || args.conn_threads > 64 {
        bail!("--streams must be 1..=256 and --conn-threads 1..=64");
    }
    if args.rounds == 0 || args.rounds > 20 {
        bail!("--rounds must be 1..=20");
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
    for ip in [topo.proxy_a_ip, topo.proxy_b_ip] {
        for port in [15001, 15006, 15008, 15020, 15021] {
            let addr = SocketAddr::new(ip, port);
            if let Err(e) = std::net::TcpListener::bind(addr) {
                bail!("{addr} is not free ({e}): is another zmesh-bench running? Try --net");
            }
        }
    }
    let server = Server::start(topo.server_ip, 8)?;
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

    let mut b = ProxyProcess::spawn("B", &zmesh, &args_b, dir.path().join("proxy-b.log"))?;
    let mut a = ProxyProcess::spawn("A", &zmesh, &args_a, dir.path().join("proxy-a.log"))?;
    let ready = |ip| SocketAddr::new(ip, 15021);
    let metrics = |ip| SocketAddr::new(ip, 15020);
    b.wait_ready(ready(topo.proxy_b_ip), Duration::from_secs(15))?;
    a.wait_ready(ready(topo.proxy_a_ip), Duration::from_secs(15))?;
    let idle = [a.memory()?, b.memory()?];

    let direct = Target {
        src: topo.client_ip,
        dst: server.addr(),
    };
    let mesh = Target {
        src: topo.client_ip,
        dst: SocketAddr::new(topo.proxy_a_ip, 15001),
    };
    // One exchange through the mesh: opens the pooled HBONE connection (a deployed proxy
    // has it open too) and proves the path really is A -> mTLS -> B.
    load::ping_pong(&mesh, 0, 10, Duration::from_secs(10)).context("first mesh exchange")?;
    let (_, b_metrics) = procs::http_get(metrics(topo.proxy_b_ip), "/metrics")?;
    let tls_in = metric(&b_metrics, "zmesh_inbound_tls_connections_total").unwrap_or(0.0);
    if tls_in < 1.0 {
        bail!("the mesh exchange did not arrive at proxy B over mTLS (inbound TLS = {tls_in})");
    }

    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        let direct = run_path(args, &[&a, &b], "direct", &direct, duration)?;
        let mesh = run_path(args, &[&a, &b], "mesh", &mesh, duration)?;
        a.check_alive()?;
        b.check_alive()?;
        rounds.push(RoundResult { direct, mesh });
    }
    let end_memory = [a.memory()?, b.memory()?];

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
    };

    let report = Report {
        seconds: args.seconds,
        streams: args.streams,
        conn_threads: args.conn_threads,
        proxy_log: args.proxy_log.clone(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpu_model(),
        rounds,
        idle_memory: idle,
        end_memory,
        counters,
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(a);
    drop(b);
    drop(server);
    Ok(())
}

/// The four tests on one path.
fn run_path(
    args: &Args,
    proxies: &[&ProxyProcess],
    path: &str,
    target: &Target,
    duration: Duration,
) -> Result<PathResult> {
    let mut out = PathResult::default();
    let run = |t: Test| args.tests.contains(&t);
    if run(Test::Single) {
        eprintln!("  {path}: 1 stream");
        let (t, cpu) = measure(proxies, || load::throughput(target, 1, duration))?;
        out.single = (t.gbit_per_s(), cpu.per_gb(t.bytes));
    }
    if run(Test::Multi) {
        eprintln!("  {path}: {} streams", args.streams);
        let (t, cpu) = measure(proxies, || load::throughput(target, args.streams, duration))?;
        out.multi = (t.gbit_per_s(), cpu.per_gb(t.bytes));
    }
    if run(Test::PingPong) {
        eprintln!("  {path}: ping-pong");
        let (rtts, cpu) = measure(proxies, || {
            load::ping_pong(target, 1000, args.pings, duration)
        })?;
        out.latency_cost = cpu.per_conn(rtts.len() as u64);
        out.latency = report::Percentiles::of(rtts);
    }
    if run(Test::ConnRate) {
        eprintln!("  {path}: connection rate");
        let (c, cpu) = measure(proxies, || {
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

/// Runs `f`, returning CPU used meanwhile by the load generator, the proxies and the box.
fn measure<T>(proxies: &[&ProxyProcess], f: impl FnOnce() -> Result<T>) -> Result<(T, CpuUse)> {
    let proxy_cpu = || -> Result<f64> {
        proxies
            .iter()
            .map(|p| p.cpu().map(|d| d.as_secs_f64()))
            .sum()
    };
    for p in proxies {
        p.reset_peak()?;
    }
    let p0 = proxy_cpu()?;
    let l0 = procs::self_cpu();
    let (busy0, total0) = procs::machine_cpu()?;
    let start = std::time::Instant::now();
    let out = f()?;
    let wall = start.elapsed().as_secs_f64();
    let (busy1, total1) = procs::machine_cpu()?;
    let use_ = CpuUse {
        load: (procs::self_cpu() - l0).as_secs_f64(),
        proxies: proxy_cpu()? - p0,
        machine_busy: (busy1 - busy0).as_secs_f64(),
        machine_total: (total1 - total0).as_secs_f64(),
        wall,
        proxy_peak_kib: [proxies[0].memory()?.hwm_kib, proxies[1].memory()?.hwm_kib],
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
