//! zmesh-sidebyside: zmesh and a stock ztunnel measured in one run on the same topology
//! and the same work (issue 17): two network namespaces joined by a veth, the client's
//! traffic to the server's port captured in the client's namespace with an nftables
//! REDIRECT to the proxy there (as istio-cni's REDIRECT does), one proxy per namespace,
//! HBONE (HTTP/2 CONNECT in mutual TLS) between them:
//!
//!   client (ns C, 10.90.0.1) -> proxy A :15001 -> HBONE :15008 -> proxy B (ns S) -> server (10.90.0.2)
//!
//! Each round runs direct TCP (the same two namespaces, no capture: the denominator), then
//! three floors on the same capture: a pair of plain TCP relays, a pair of TLS relays
//! (zmesh-bench re-executed, see its relay.rs: mutual TLS between them with the same
//! rustls and aws-lc, no HTTP/2, nothing else) and a pair of HBONE relays (the same with
//! HTTP/2 CONNECT streams on one connection, the h2 crate and nothing else: its
//! hbone_relay.rs), then the zmesh pair (`zmesh-datapath proxy`,
//! transparent listeners, original destination from conntrack), then the ztunnel pair
//! (`PROXY_MODE=dedicated`, its fake CA and a static workload table), each pair started
//! fresh for the round. The table shows medians of the rounds, zmesh/ztunnel against the
//! targets and, per target, the best ratio the floor pair reaches against the same
//! ztunnel: where even the floor misses a target, no proxy pair of this kind can meet it
//! on this machine. The ping-pong runs twice per path: as the machine schedules it, and
//! with the client, the server and both proxies held to one CPU, where no wake-up crosses
//! to the other vCPU (see [`Figures::p50_one_cpu_us`]).
//! Needs root; cleans up on exit, on error and on panic. See
//! BENCHMARKS.md, "zmesh and ztunnel side by side".

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use zmesh_bench::certs::{Ca, NAMESPACE, TRUST_DOMAIN};
use zmesh_bench::compare::{percentiles, table, Figures, Measured};
use zmesh_bench::load::{self, Server, Target};
use zmesh_bench::procs::{Pinned, ProxyProcess, Work};

#[derive(Parser)]
#[command(name = "zmesh-sidebyside")]
struct Args {
    /// zmesh's data path binary, run as `zmesh-datapath proxy` (default: `zmesh-datapath`
    /// next to this binary).
    #[arg(long, value_name = "PATH")]
    zmesh_datapath: Option<PathBuf>,
    /// A stock ztunnel (built with its `testing` feature, for the fake CA). Without it
    /// only direct and zmesh are measured.
    #[arg(long, value_name = "PATH", env = "ZTUNNEL_BIN")]
    ztunnel: Option<PathBuf>,
    /// Seconds per throughput and connection-rate test (and the cap for ping-pong).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 8)]
    streams: usize,
    #[arg(long, default_value_t = 20_000)]
    pings: usize,
    #[arg(long, default_value_t = 4)]
    conn_threads: usize,
    /// Worker threads of each proxy: zmesh's `--worker-threads`, ztunnel's
    /// `ZTUNNEL_WORKER_THREADS`.
    #[arg(long, default_value_t = 1)]
    proxy_threads: usize,
    /// zmesh-bench, which runs the floors' relays (default: next to this binary).
    #[arg(long, value_name = "PATH")]
    bench: Option<PathBuf>,
    /// Leave out the three relay floors.
    #[arg(long)]
    no_floors: bool,
    /// Which tests to run (all by default; the figures of the others show as "-").
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "single,multi,ping-pong,conn-rate"
    )]
    tests: Vec<Test>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Test {
    /// Single-stream throughput (and CPU per GB).
    Single,
    /// Multi-stream throughput.
    Multi,
    /// 64-byte ping-pong latency, unpinned and on one CPU, and the work per round trip.
    PingPong,
    /// New connections per second, their set-up time and CPU.
    ConnRate,
}

/// The CPU of the one-CPU ping-pong.
const ONE_CPU: usize = 0;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);

/// The two namespaces and their veth; deleted on drop.
struct Namespaces {
    client: String,
    server: String,
}

impl Namespaces {
    fn create() -> Result<Self> {
        let tag = std::process::id();
        let ns = Self {
            client: format!("zmesh-sbs-c-{tag}"),
            server: format!("zmesh-sbs-s-{tag}"),
        };
        for name in [&ns.client, &ns.server] {
            ip(&["netns", "add", name])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        let (vc, vs) = (format!("sbsc{tag}"), format!("sbss{tag}"));
        ip(&[
            "link", "add", &vc, "netns", &ns.client, "type", "veth", "peer", "name", &vs, "netns",
            &ns.server,
        ])?;
        for (name, dev, addr) in [(&ns.client, &vc, CLIENT_IP), (&ns.server, &vs, SERVER_IP)] {
            ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", name, "link", "set", dev, "up"])?;
            // No TIME_WAIT sockets in these two namespaces. Every pair's proxy A accepts on
            // the same 127.0.0.1:15001 from the same client address, so the tens of
            // thousands of connections one pair's connection-rate test leaves in TIME_WAIT
            // (60 s) meet the next pair's SYNs on reused client ports: each such SYN waits
            // a 1 s retransmission, and the pair measured later loses (seen: ztunnel,
            // measured last, at 662 connections/s after the floors instead of ~4,000).
            let sysctl = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    name,
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_max_tw_buckets=0",
                ])
                .status()
                .context("running sysctl")?;
            if !sysctl.success() {
                bail!("sysctl net.ipv4.tcp_max_tw_buckets=0 in {name} failed");
            }
        }
        Ok(ns)
    }

    fn path(name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.client, &self.server] {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread inside the named namespace: sockets it creates, and threads it
/// starts, live there.
fn in_ns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(Namespaces::path(name))
        .with_context(|| format!("opening netns {name}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only, with a valid netns fd.
                let rc = unsafe {
                    libc::setns(
                        std::os::fd::AsRawFd::as_raw_fd(&file.as_fd()),
                        libc::CLONE_NEWNET,
                    )
                };
                if rc != 0 {
                    bail!("setns {name}: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| bail!("a thread in netns {name} panicked"))
    })
}

/// The client namespace's capture: TCP to the mesh server's port goes to the proxy's
/// 15001 (REDIRECT: the original destination stays in conntrack for SO_ORIGINAL_DST).
fn capture(ns: &str, port: u16) -> Result<()> {
    let rules = format!(
        "table inet zmesh_sbs {{\n chain out {{\n  type nat hook output priority -100;\n  \
         ip daddr {SERVER_IP} tcp dport {port} redirect to :15001\n }}\n}}\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    std::io::Write::write_all(child.stdin.as_mut().context("nft stdin")?, rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("nft refused the capture rules");
    }
    Ok(())
}

struct Setup<'a> {
    args: &'a Args,
    ns: &'a Namespaces,
    direct: Target,
    mesh: Target,
    duration: Duration,
}

/// Runs the four tests against `target` from the client namespace; `pair` are the
/// proxies whose CPU and memory are counted (none for direct).
fn run_tests(s: &Setup, target: &Target, pair: &[&ProxyProcess]) -> Result<Figures> {
    let a = s.args;
    let work = || -> Result<Work> {
        pair.iter()
            .map(|p| p.work())
            .try_fold(Work::default(), |sum, w| Ok(sum + w?))
    };
    let cpu = || -> Result<f64> {
        let w = work()?;
        Ok((w.user + w.system).as_secs_f64())
    };
    let run = |t: Test| a.tests.contains(&t);
    let mut f = Figures::not_measured();
    if run(Test::Single) {
        let before = cpu()?;
        let t = in_ns(&s.ns.client, || load::throughput(target, 1, s.duration))??;
        f.single_gbps = t.gbit_per_s();
        f.cpu_s_per_gb = (cpu()? - before) / (t.bytes as f64 / 1e9);
    }
    if run(Test::Multi) {
        let t = in_ns(&s.ns.client, || {
            load::throughput(target, a.streams, s.duration)
        })??;
        f.multi_gbps = t.gbit_per_s();
    }
    if run(Test::PingPong) {
        let before = work()?;
        let rtts = in_ns(&s.ns.client, || {
            load::ping_pong(target, load::WARMUP_PINGS, a.pings, s.duration)
        })??;
        f.per_rtt(work()?.since(before), load::WARMUP_PINGS + rtts.len());
        (f.p50_us, f.p99_us) = percentiles(rtts);
        // Again with everything on one CPU (this process's client and server included).
        let mut pids: Vec<u32> = pair.iter().map(|p| p.pid()).collect();
        pids.push(std::process::id());
        let pinned = Pinned::new(&pids, &[ONE_CPU])?;
        let rtts = in_ns(&s.ns.client, || {
            load::ping_pong(target, load::WARMUP_PINGS, a.pings, s.duration)
        })??;
        drop(pinned);
        (f.p50_one_cpu_us, f.p99_one_cpu_us) = percentiles(rtts);
    }
    if run(Test::ConnRate) {
        let before = work()?;
        let c = in_ns(&s.ns.client, || {
            load::conn_rate(target, a.conn_threads, s.duration)
        })?;
        f.per_conn(work()?.since(before), c.conns);
        if c.errors > 0 {
            bail!(
                "{} of {} connections failed; first: {}",
                c.errors,
                c.errors + c.conns,
                c.first_error.as_deref().unwrap_or("?")
            );
        }
        f.conns_per_s = c.per_sec();
        f.conn_p50_us = percentiles(c.latencies).0;
    }
    for (i, p) in pair.iter().enumerate() {
        let memory = p.memory()?;
        f.peak_rss_mb[i] = memory.hwm_kib as f64 * 1024.0 / 1e6;
        f.end_anon_mb[i] = memory.rss_anon_kib as f64 * 1024.0 / 1e6;
    }
    Ok(f)
}

/// The zmesh pair for one round: started, measured, stopped.
fn zmesh_round(s: &Setup, zmesh: &Path, dir: &Path) -> Result<Figures> {
    let ca = Ca::new()?;
    // Fresh keys and certificates every round (the directory of each is created anew).
    let round = tempfile::tempdir_in(dir)?;
    let (certs_a, certs_b) = (round.path().join("zmesh-a"), round.path().join("zmesh-b"));
    ca.write_cert_dir(&certs_a, "client")?;
    ca.write_cert_dir(&certs_b, "server")?;
    let table = dir.join("workloads.yaml");
    std::fs::write(
        &table,
        format!(
            "trustDomain: {TRUST_DOMAIN}\nnodes:\n  - name: bench-a\n  - name: bench-b\n\
             workloads:\n  - {{name: client, namespace: {NAMESPACE}, serviceAccount: client, \
             node: bench-a, ips: [\"{CLIENT_IP}\"]}}\n  - {{name: server, namespace: {NAMESPACE}, \
             serviceAccount: server, node: bench-b, ips: [\"{SERVER_IP}\"]}}\n"
        ),
    )?;
    let spawn = |name, ns: &str, node: &str, certs: &Path| {
        let args: Vec<String> = [
            "netns",
            "exec",
            ns,
            &zmesh.display().to_string(),
            "--log",
            "warn",
            "--worker-threads",
            &s.args.proxy_threads.to_string(),
            "proxy",
            "--node",
            node,
            "--workloads",
            &table.display().to_string(),
            "--cert-dir",
            &certs.display().to_string(),
            "--drain-seconds",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        ProxyProcess::spawn(
            name,
            Path::new("ip"),
            &args,
            dir.join(format!("{name}.log")),
        )
    };
    let mut b = spawn("zmesh B", &s.ns.server, "bench-b", &certs_b)?;
    let mut a = spawn("zmesh A", &s.ns.client, "bench-a", &certs_a)?;
    let ready = Duration::from_secs(15);
    in_ns(&s.ns.server, || {
        b.wait_ready(SocketAddr::new(SERVER_IP.into(), 15021), ready)
    })??;
    in_ns(&s.ns.client, || {
        a.wait_ready(SocketAddr::new(CLIENT_IP.into(), 15021), ready)
    })??;
    first_exchange(s)?;
    let f = run_tests(s, &s.mesh, &[&a, &b])?;
    a.check_alive()?;
    b.check_alive()?;
    Ok(f)
}

/// The ztunnel pair for one round.
fn ztunnel_round(s: &Setup, ztunnel: &Path, dir: &Path) -> Result<Figures> {
    let xds = dir.join("ztunnel-xds.yaml");
    let workload = |name: &str, ip: Ipv4Addr, node: &str| {
        format!(
            "- uid: {NAMESPACE}/{name}\n  name: {name}\n  namespace: {NAMESPACE}\n  \
             serviceAccount: {name}\n  trustDomain: {TRUST_DOMAIN}\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n"
        )
    };
    std::fs::write(
        &xds,
        format!(
            "workloads:\n{}{}",
            workload("client", CLIENT_IP, "bench-a"),
            workload("server", SERVER_IP, "bench-b")
        ),
    )?;
    let spawn = |name, ns: &str, node: &str, who: &str| {
        let args: Vec<String> = [
            "netns".to_string(),
            "exec".into(),
            ns.into(),
            "env".into(),
            "-i".into(),
            format!("PATH={}", std::env::var("PATH").unwrap_or_default()),
            "PROXY_MODE=dedicated".into(),
            format!("PROXY_WORKLOAD_INFO={NAMESPACE}/{who}/{who}"),
            format!("LOCAL_XDS_PATH={}", xds.display()),
            "FAKE_CA=true".into(),
            "XDS_ADDRESS=".into(),
            format!("NODE_NAME={node}"),
            format!("ZTUNNEL_WORKER_THREADS={}", s.args.proxy_threads),
            // Connect to the server from its own address, as zmesh does: the original
            // source would need routing back to the proxy that this topology lacks.
            "ENABLE_ORIG_SRC=false".into(),
            "RUST_LOG=warn".into(),
            ztunnel.display().to_string(),
        ]
        .to_vec();
        ProxyProcess::spawn(
            name,
            Path::new("ip"),
            &args,
            dir.join(format!("{name}.log")),
        )
    };
    let mut b = spawn("ztunnel B", &s.ns.server, "bench-b", "server")?;
    let mut a = spawn("ztunnel A", &s.ns.client, "bench-a", "client")?;
    let ready = Duration::from_secs(15);
    in_ns(&s.ns.server, || {
        b.wait_ready(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15021), ready)
    })??;
    in_ns(&s.ns.client, || {
        a.wait_ready(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15021), ready)
    })??;
    first_exchange(s)?;
    let f = run_tests(s, &s.mesh, &[&a, &b])?;
    a.check_alive()?;
    b.check_alive()?;
    Ok(f)
}

/// The relay pairs measured as floors.
#[derive(Clone, Copy, PartialEq)]
enum FloorPair {
    /// Plain TCP between the relays.
    Plain,
    /// Mutual TLS between them, one TLS connection per client connection.
    Tls,
    /// Mutual TLS with HTTP/2 CONNECT streams on one connection (HBONE's framing).
    Hbone,
}

/// The relays of a floor pair: A in the client's namespace on the capture's :15001, B on
/// the server's HBONE port; with TLS, SVIDs from a fresh throwaway CA.
fn relay_round(s: &Setup, bench: &Path, dir: &Path, pair: FloorPair) -> Result<Figures> {
    let round = tempfile::tempdir_in(dir)?;
    let hop = SocketAddr::new(SERVER_IP.into(), 15008);
    let mut extra_a = Vec::new();
    let mut extra_b = Vec::new();
    if pair != FloorPair::Plain {
        let ca = Ca::new()?;
        let (certs_a, certs_b) = (round.path().join("relay-a"), round.path().join("relay-b"));
        ca.write_cert_dir(&certs_a, "client")?;
        ca.write_cert_dir(&certs_b, "server")?;
        extra_a = vec!["--relay-tls-out".to_string(), certs_a.display().to_string()];
        extra_b = vec!["--relay-tls-in".to_string(), certs_b.display().to_string()];
    }
    if pair == FloorPair::Hbone {
        extra_a.push("--relay-hbone".into());
        extra_b.push("--relay-hbone".into());
    }
    let spawn = |name, ns: &str, listen: SocketAddr, to: SocketAddr, extra: &[String]| {
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            ns.into(),
            bench.display().to_string(),
            "--relay-listen".into(),
            listen.to_string(),
            "--relay-to".into(),
            to.to_string(),
        ];
        args.extend_from_slice(extra);
        ProxyProcess::spawn(
            name,
            Path::new("ip"),
            &args,
            dir.join(format!("{}.log", name.replace(' ', "-"))),
        )
    };
    let (name_a, name_b) = match pair {
        FloorPair::Plain => ("relay A", "relay B"),
        FloorPair::Tls => ("TLS relay A", "TLS relay B"),
        FloorPair::Hbone => ("HBONE relay A", "HBONE relay B"),
    };
    let mut b = spawn(name_b, &s.ns.server, hop, s.mesh.dst, &extra_b)?;
    let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 15001);
    let mut a = spawn(name_a, &s.ns.client, any, hop, &extra_a)?;
    let limit = Duration::from_secs(15);
    in_ns(&s.ns.server, || b.wait_listening(hop, limit))??;
    in_ns(&s.ns.client, || {
        a.wait_listening(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15001), limit)
    })??;
    first_exchange(s)?;
    let f = run_tests(s, &s.mesh, &[&a, &b])?;
    a.check_alive()?;
    b.check_alive()?;
    Ok(f)
}

/// One exchange through the pair: the pooled HBONE connection is open (as on a running
/// node) before anything is measured, and the path works.
fn first_exchange(s: &Setup) -> Result<()> {
    in_ns(&s.ns.client, || {
        load::ping_pong(&s.mesh, 0, 1, Duration::from_secs(10))
    })?
    .context("the first exchange through the proxies")?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(&Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if !((1..=20).contains(&args.rounds) && args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--rounds must be 1..=20 and --seconds in (0, 600]");
    }
    let zmesh = match &args.zmesh_datapath {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no parent directory")?
            .join("zmesh-datapath"),
    };
    if !zmesh.is_file() {
        bail!("{} not found: pass --zmesh-datapath", zmesh.display());
    }
    let bench = match &args.bench {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no parent directory")?
            .join("zmesh-bench"),
    };
    if !args.no_floors && !bench.is_file() {
        bail!(
            "{} not found: pass --bench, or --no-floors",
            bench.display()
        );
    }
    if let Some(z) = &args.ztunnel {
        if !z.is_file() {
            bail!("{} not found (--ztunnel / ZTUNNEL_BIN)", z.display());
        }
    } else {
        eprintln!("no --ztunnel / ZTUNNEL_BIN: measuring direct and zmesh only");
    }
    remove_leftovers();
    let ns = Namespaces::create()?;
    let dir = tempfile::Builder::new().prefix("zmesh-sbs").tempdir()?;
    let table = measure_all(args, &ns, &zmesh, &bench, dir.path())?;
    print!("{table}");
    Ok(())
}

/// Runs the measurements; the servers are stopped from inside their namespace (their
/// acceptors are woken by a connection, which only works from there), also on error.
fn measure_all(
    args: &Args,
    ns: &Namespaces,
    zmesh: &Path,
    bench: &Path,
    dir: &Path,
) -> Result<String> {
    let direct_server = in_ns(&ns.server, || Server::start(SERVER_IP.into(), 8))??;
    let mesh_server = in_ns(&ns.server, || Server::start(SERVER_IP.into(), 8))??;
    let result = (|| {
        capture(&ns.client, mesh_server.addr().port())?;
        let src = IpAddr::V4(CLIENT_IP);
        let setup = Setup {
            args,
            ns,
            direct: Target {
                src,
                dst: direct_server.addr(),
            },
            mesh: Target {
                src,
                dst: mesh_server.addr(),
            },
            duration: Duration::from_secs_f64(args.seconds),
        };
        let mut direct = Vec::new();
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        let mut hbone = Vec::new();
        let mut zm = Vec::new();
        let mut zt = Vec::new();
        for round in 1..=args.rounds {
            eprintln!("round {round}/{}: direct", args.rounds);
            direct.push(brief("direct", run_tests(&setup, &setup.direct, &[])?));
            if !args.no_floors {
                eprintln!("round {round}/{}: plain relays", args.rounds);
                plain.push(brief(
                    "relays",
                    relay_round(&setup, bench, dir, FloorPair::Plain)?,
                ));
                eprintln!("round {round}/{}: TLS relays", args.rounds);
                tls.push(brief(
                    "TLS relays",
                    relay_round(&setup, bench, dir, FloorPair::Tls)?,
                ));
                eprintln!("round {round}/{}: HBONE relays", args.rounds);
                hbone.push(brief(
                    "HBONE relays",
                    relay_round(&setup, bench, dir, FloorPair::Hbone)?,
                ));
            }
            eprintln!("round {round}/{}: zmesh", args.rounds);
            zm.push(brief("zmesh", zmesh_round(&setup, zmesh, dir)?));
            if let Some(z) = &args.ztunnel {
                eprintln!("round {round}/{}: ztunnel", args.rounds);
                zt.push(brief("ztunnel", ztunnel_round(&setup, z, dir)?));
            }
        }
        let title = format!(
            "zmesh and ztunnel side by side: netns + veth, nftables REDIRECT capture, {} s per \
             test, N = {} streams, {} connection threads, {} proxy thread(s), medians of {} \
             round(s)",
            args.seconds, args.streams, args.conn_threads, args.proxy_threads, args.rounds
        );
        Ok(table(
            &title,
            &Measured {
                direct,
                plain,
                tls,
                hbone,
                zm,
                zt,
            },
        ))
    })();
    in_ns(&ns.server, move || drop((direct_server, mesh_server)))?;
    result
}

/// Prints one round's latency and work figures (the table has only medians), so that a
/// bad round can be told from a bad run.
fn brief(path: &str, f: Figures) -> Figures {
    eprintln!(
        "  {path}: RTT p50 {:.1} us, one CPU {:.1} us; CPU per round trip {:.1} us ({:.1} in \
         user space), {:.2} switches; {:.0} connections/s, set-up p50 {:.1} us, {:.1} us CPU \
         each ({:.1} in user space)",
        f.p50_us,
        f.p50_one_cpu_us,
        f.cpu_us_per_rtt,
        f.user_us_per_rtt,
        f.switches_per_rtt,
        f.conns_per_s,
        f.conn_p50_us,
        f.cpu_us_per_conn,
        f.user_us_per_conn
    );
    f
}

/// Namespaces of earlier runs whose process is gone (killed before it could clean up).
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("zmesh-sbs-c-")
            .or_else(|| name.strip_prefix("zmesh-sbs-s-"))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}
