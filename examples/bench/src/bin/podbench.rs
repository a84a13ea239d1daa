//! zmesh-podbench: zmesh and a stock ztunnel measured in one run on the path each product
//! really runs (issue 17), not on a stand-in capture:
//!
//! - the lab's cluster of network namespaces: two nodes, each pod a network namespace with
//!   a veth to its node and a cgroup of its own, the nodes joined by a bridge;
//! - zmesh: `zmesh ca serve`, and per node a `zmesh agent` with its eBPF redirection (the
//!   pod's connect() goes to the node's proxy, inbound HBONE to the node's :15008) and its
//!   proxy in a `zmesh datapath` process (as the chart runs it), certificates from the CA;
//! - ztunnel: per node a stock ztunnel in in-pod mode (its listeners inside each pod's
//!   namespace, its fake CA, a static workload table), fed the pods over ZDS by
//!   `zmesh agent --data-plane ztunnel`, which also installs the in-pod capture;
//! - direct: the same two nodes, a client and a server pod in a namespace that is not
//!   enrolled (plain TCP over the same veths and bridge), measured while zmesh runs.
//!
//! The client and the server run as processes inside their pods (netns and cgroup: the
//! eBPF capture only sees pod processes): this binary re-executed with hidden arguments.
//! CPU is that of the two proxy processes (zmesh's data paths, the two ztunnels) and the
//! two node agents (zmesh's; for ztunnel the zmesh agents that feed it over ZDS); peak RSS
//! that of the proxies. Needs root; everything it makes is removed on exit, on error and on panic.
//! See BENCHMARKS.md, "The product's own path".

use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};

use zmesh_bench::compare::{percentiles, table, Figures, Measured};
use zmesh_bench::load::{self, Server, Target};
use zmesh_bench::procs;
use zmesh_bench::procs::Work;
use zmesh_lab::{access_lines, Lab, LabOptions};
use zmesh_testbed::{Cluster, ClusterSpec, Pod};

#[derive(Parser)]
#[command(name = "zmesh-podbench")]
struct Args {
    /// The zmesh binary (default: `zmesh` next to this binary).
    #[arg(long, value_name = "PATH")]
    zmesh: Option<PathBuf>,
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
    /// Internal: run one test as a client inside a pod and print its result as JSON.
    #[arg(long, hide = true, value_enum, requires_all = ["src", "dst"])]
    client: Option<ClientTest>,
    #[arg(long, hide = true)]
    src: Option<IpAddr>,
    #[arg(long, hide = true)]
    dst: Option<SocketAddr>,
    /// Internal: run the benchmark server inside a pod on this address until stdin closes.
    #[arg(long, hide = true, value_name = "ADDR")]
    serve: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum ClientTest {
    Single,
    Multi,
    PingPong,
    ConnRate,
}

/// What a client process reports.
#[derive(Serialize, Deserialize)]
enum ClientResult {
    Throughput {
        bytes: u64,
        secs: f64,
    },
    Rtts(Vec<u64>),
    Conns {
        per_sec: f64,
        /// None without a completed connection (JSON has no NaN).
        setup_p50_us: Option<f64>,
        conns: u64,
        errors: u64,
        first_error: Option<String>,
    },
}

const MESH_NS: &str = "bench";
const PLAIN_NS: &str = "plain";
const SERVER_PORT: u16 = 7000;
/// How long a fresh mesh may take until the first exchange works (certificates issued
/// and handed to the data path, ztunnel's in-pod listeners up).
const SETTLE: Duration = Duration::from_secs(60);

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  \
                          labels:\n    io.cilium/mtls-enabled: \"true\"\n---\n\
                          apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n";

/// (node, namespace, name/service account) of every pod.
const PODS: [(&str, &str, &str); 4] = [
    ("node1", MESH_NS, "client"),
    ("node1", PLAIN_NS, "client"),
    ("node2", MESH_NS, "server"),
    ("node2", PLAIN_NS, "server"),
];

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match (args.client, args.serve) {
        (Some(test), _) => client(&args, test),
        (None, Some(addr)) => serve(addr),
        (None, None) => run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The client process: one test, its result as one JSON line on stdout.
fn client(args: &Args, test: ClientTest) -> Result<()> {
    let (Some(src), Some(dst)) = (args.src, args.dst) else {
        bail!("--client needs --src and --dst");
    };
    let t = Target { src, dst };
    let duration = Duration::from_secs_f64(args.seconds);
    let result = match test {
        ClientTest::Single | ClientTest::Multi => {
            let streams = if test == ClientTest::Single {
                1
            } else {
                args.streams
            };
            let r = load::throughput(&t, streams, duration)?;
            ClientResult::Throughput {
                bytes: r.bytes,
                secs: r.secs,
            }
        }
        ClientTest::PingPong => ClientResult::Rtts(load::ping_pong(
            &t,
            load::WARMUP_PINGS,
            args.pings,
            duration,
        )?),
        ClientTest::ConnRate => {
            let c = load::conn_rate(&t, args.conn_threads, duration);
            ClientResult::Conns {
                per_sec: c.per_sec(),
                setup_p50_us: Some(percentiles(c.latencies).0).filter(|v| !v.is_nan()),
                conns: c.conns,
                errors: c.errors,
                first_error: c.first_error,
            }
        }
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The server process: says "listening" once bound, serves until stdin closes (the
/// harness holds the other end; it closes when the harness drops it or dies).
fn serve(addr: SocketAddr) -> Result<()> {
    let server = Server::start_on(addr, 8)?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
    drop(server);
    Ok(())
}

/// A process in a pod; killed on drop.
struct PodProcess(Child);

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the benchmark server in `pod` and waits until it listens.
fn start_server(pod: &Pod, me: &Path) -> Result<PodProcess> {
    let addr = SocketAddr::new(pod.ip().into(), SERVER_PORT);
    let mut command = pod.command(me)?;
    command
        .arg("--serve")
        .arg(addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = PodProcess(command.spawn().context("starting the server in its pod")?);
    let stdout = child.0.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "listening" {
        bail!(
            "the server in {}/{} did not start",
            pod.namespace(),
            pod.name()
        );
    }
    Ok(child)
}

/// One client test run inside `pod` against `dst`.
fn run_client(
    pod: &Pod,
    me: &Path,
    args: &Args,
    test: ClientTest,
    dst: SocketAddr,
) -> Result<ClientResult> {
    let mut command = pod.command(me)?;
    command
        .arg("--client")
        .arg(
            clap::ValueEnum::to_possible_value(&test)
                .context("every test has a name")?
                .get_name(),
        )
        .arg("--src")
        .arg(pod.ip().to_string())
        .arg("--dst")
        .arg(dst.to_string())
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--streams", &args.streams.to_string()])
        .args(["--pings", &args.pings.to_string()])
        .args(["--conn-threads", &args.conn_threads.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = command.output().context("running the client in its pod")?;
    if !out.status.success() {
        bail!(
            "the {test:?} client in {}/{} failed: {}",
            pod.namespace(),
            pod.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the client's result")
}

/// The four tests from `client` to `dst`; `proxies` are the processes whose CPU and memory
/// are counted (none for direct), `agents` those whose CPU is counted too (the node agents:
/// work they do per connection, such as flow events, is the mesh's).
fn run_tests(
    client: &Pod,
    me: &Path,
    args: &Args,
    dst: SocketAddr,
    proxies: &[u32],
    agents: &[u32],
) -> Result<Figures> {
    let work = || -> Result<Work> {
        proxies
            .iter()
            .chain(agents)
            .map(|&pid| procs::process_work(pid))
            .try_fold(Work::default(), |sum, w| Ok(sum + w?))
    };
    let cpu = || -> Result<f64> {
        let w = work()?;
        Ok((w.user + w.system).as_secs_f64())
    };
    let mut f = Figures::default();
    let before = cpu()?;
    let ClientResult::Throughput { bytes, secs } =
        run_client(client, me, args, ClientTest::Single, dst)?
    else {
        bail!("unexpected result of the single-stream test");
    };
    f.single_gbps = bytes as f64 * 8.0 / secs / 1e9;
    f.cpu_s_per_gb = (cpu()? - before) / (bytes as f64 / 1e9);
    // The proxies must have carried the bytes: without capture they would have done
    // (nearly) nothing, and the figures would be direct TCP's.
    if !proxies.is_empty() && f.cpu_s_per_gb < 0.05 {
        bail!(
            "the proxies used {:.3} CPU s/GB: the traffic did not go through them",
            f.cpu_s_per_gb
        );
    }
    let ClientResult::Throughput { bytes, secs } =
        run_client(client, me, args, ClientTest::Multi, dst)?
    else {
        bail!("unexpected result of the multi-stream test");
    };
    f.multi_gbps = bytes as f64 * 8.0 / secs / 1e9;
    let before = work()?;
    let ClientResult::Rtts(rtts) = run_client(client, me, args, ClientTest::PingPong, dst)? else {
        bail!("unexpected result of the ping-pong test");
    };
    f.per_rtt(work()?.since(before), load::WARMUP_PINGS + rtts.len());
    (f.p50_us, f.p99_us) = percentiles(rtts);
    // Not measured here: the pods' processes are not held to one CPU.
    (f.p50_one_cpu_us, f.p99_one_cpu_us) = (f64::NAN, f64::NAN);
    let before = work()?;
    let ClientResult::Conns {
        per_sec,
        setup_p50_us,
        conns,
        errors,
        first_error,
    } = run_client(client, me, args, ClientTest::ConnRate, dst)?
    else {
        bail!("unexpected result of the connection-rate test");
    };
    if errors > 0 {
        bail!(
            "{errors} connections failed; first: {}",
            first_error.as_deref().unwrap_or("?")
        );
    }
    f.conns_per_s = per_sec;
    f.conn_p50_us = setup_p50_us.unwrap_or(f64::NAN);
    f.per_conn(work()?.since(before), conns);
    for (i, &pid) in proxies.iter().enumerate().take(2) {
        let memory = procs::process_memory(pid)?;
        f.peak_rss_mb[i] = memory.hwm_kib as f64 * 1024.0 / 1e6;
        f.end_anon_mb[i] = memory.rss_anon_kib as f64 * 1024.0 / 1e6;
    }
    Ok(f)
}

/// Retries one exchange from `client` to `dst` until it works and `carried` says the
/// proxies carried it (the mesh settles after start: certificates issued, capture installed,
/// listeners up; until the capture is in place an exchange may go straight to the server in
/// plaintext), bounded by [`SETTLE`].
fn settle(
    client: &Pod,
    me: &Path,
    dst: SocketAddr,
    what: &str,
    carried: impl Fn() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    let quick = Args::parse_from(["zmesh-podbench", "--seconds", "5", "--pings", "1"]);
    loop {
        let exchanged = matches!(
            run_client(client, me, &quick, ClientTest::PingPong, dst),
            Ok(ClientResult::Rtts(r)) if !r.is_empty()
        );
        if exchanged && carried() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: no exchange through the proxies after {SETTLE:?} (last one {})",
                if exchanged {
                    "went around them"
                } else {
                    "failed"
                }
            );
        }
        // A fresh mesh has no event to wait on from here; retry a few times a second.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The SPIFFE ID of a pod of the benchmark (trust domain cluster.local).
fn spiffe_id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn write_manifests(dir: &Path, pods: &str) -> Result<PathBuf> {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("namespaces.yaml"), NAMESPACES)?;
    std::fs::write(manifests.join("pods.yaml"), pods)?;
    Ok(manifests)
}

/// The pods as the API would hold them once scheduled (the lab adds IPs and namespaces).
fn scheduled_pods() -> String {
    PODS.iter()
        .map(|(node, ns, name)| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
                 spec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  \
                 containers: [{{name: app, image: x}}]\n"
            )
        })
        .collect()
}

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new();
    for node in ["node1", "node2"] {
        spec = spec.node(node, |mut n| {
            for (_, ns, name) in PODS.iter().filter(|(n, _, _)| *n == node) {
                n = n.pod(name, ns, name);
            }
            n
        });
    }
    spec
}

fn pod<'a>(cluster: &'a Cluster, ns: &str, name: &str) -> Result<&'a Pod> {
    cluster
        .pod(ns, name)
        .with_context(|| format!("no pod {ns}/{name}"))
}

fn dst(server: &Pod) -> SocketAddr {
    SocketAddr::new(server.ip().into(), SERVER_PORT)
}

/// Direct (plain pods) and zmesh (enrolled pods) on one lab.
fn zmesh_round(args: &Args, zmesh: &Path, me: &Path, dir: &Path) -> Result<(Figures, Figures)> {
    let work = tempfile::tempdir_in(dir)?;
    let manifests = write_manifests(work.path(), &scheduled_pods())?;
    let options = LabOptions {
        datapath_process: true,
        ..LabOptions::new(manifests, zmesh.to_owned())
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let lab = runtime
        .block_on(Lab::start(options))
        .context("starting the zmesh lab")?;
    let cluster = lab.cluster();
    let (mesh_client, mesh_server) = (
        pod(cluster, MESH_NS, "client")?,
        pod(cluster, MESH_NS, "server")?,
    );
    let (plain_client, plain_server) = (
        pod(cluster, PLAIN_NS, "client")?,
        pod(cluster, PLAIN_NS, "server")?,
    );
    let _servers = (
        start_server(mesh_server, me)?,
        start_server(plain_server, me)?,
    );
    eprintln!("  direct");
    let direct = run_tests(plain_client, me, args, dst(plain_server), &[], &[])?;
    // node2's data path logs the tunnel from the client's identity once it carried one.
    let client_id = spiffe_id(MESH_NS, "client");
    settle(mesh_client, me, dst(mesh_server), "zmesh", || {
        access_lines(&lab.datapath_log("node2"))
            .iter()
            .any(|l| l.src_identity == client_id)
    })
    .with_context(|| {
        format!(
            "node2's data path log ends:\n{}",
            tail(&lab.datapath_log("node2"))
        )
    })?;
    let pids = ["node1", "node2"]
        .iter()
        .map(|n| {
            lab.datapath_pid(n)
                .with_context(|| format!("no data path on {n}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let agents = ["node1", "node2"]
        .iter()
        .map(|n| lab.agent_pid(n).with_context(|| format!("no agent on {n}")))
        .collect::<Result<Vec<_>>>()?;
    eprintln!("  zmesh");
    let mesh =
        run_tests(mesh_client, me, args, dst(mesh_server), &pids, &agents).with_context(|| {
            format!(
                "zmesh; node1's data path log ends:\n{}",
                tail(&lab.datapath_log("node1"))
            )
        })?;
    Ok((direct, mesh))
}

/// The ztunnel pair on a cluster of the same shape.
fn ztunnel_round(
    args: &Args,
    zmesh: &Path,
    ztunnel: &Path,
    me: &Path,
    dir: &Path,
) -> Result<Figures> {
    let cluster = Cluster::build(&spec())?;
    let work = tempfile::tempdir_in(dir)?;
    let manifests = write_manifests(work.path(), &zmesh_lab::ztunnel::annotated_pods(&cluster))?;
    let xds = work.path().join("xds.yaml");
    std::fs::write(&xds, zmesh_lab::ztunnel::local_xds(&cluster, MESH_NS))?;
    // Declared after the cluster: dropped (killed) before its namespaces go.
    let mut procs = Vec::new();
    let mut pids = Vec::new();
    let mut agents = Vec::new();
    for node in ["node1", "node2"] {
        let node_dir = work.path().join(node);
        std::fs::create_dir(&node_dir)?;
        let n = cluster.node(node).context("node")?;
        let mut agent = n.command(zmesh)?;
        agent
            .args([
                "agent",
                "--node",
                node,
                "--data-plane",
                "ztunnel",
                "--mode",
                "permissive",
            ])
            .arg("--manifests")
            .arg(&manifests)
            .arg("--zds-socket")
            .arg(node_dir.join("ztunnel.sock"))
            .arg("--admin-socket")
            .arg(node_dir.join("agent.sock"))
            .args(["--cni-socket", "none", "--cni-state-file", "none"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(node_dir.join("agent.log"))?);
        let agent = agent.spawn().context("starting the agent")?;
        agents.push(agent.id());
        procs.push(PodProcess(agent));
        let log = std::fs::File::create(node_dir.join("ztunnel.log"))?;
        let mut zt = n.command(ztunnel)?;
        zt.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("INPOD_UDS", node_dir.join("ztunnel.sock"))
            .env("LOCAL_XDS_PATH", &xds)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("NODE_NAME", node)
            .env("ZTUNNEL_WORKER_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = zt.spawn().context("starting ztunnel")?;
        pids.push(child.id());
        procs.push(PodProcess(child));
    }
    let (client, server) = (
        pod(&cluster, MESH_NS, "client")?,
        pod(&cluster, MESH_NS, "server")?,
    );
    let _server = start_server(server, me)?;
    // ztunnel's access log names both identities once it carried a connection.
    let ztunnel_log =
        || std::fs::read_to_string(work.path().join("node2/ztunnel.log")).unwrap_or_default();
    let (src_id, dst_id) = (spiffe_id(MESH_NS, "client"), spiffe_id(MESH_NS, "server"));
    settle(client, me, dst(server), "ztunnel", || {
        ztunnel_log()
            .lines()
            .any(|l| l.contains(&src_id) && l.contains(&dst_id))
    })
    .with_context(|| {
        format!(
            "node1's ztunnel log ends:\n{}",
            tail(
                &std::fs::read_to_string(work.path().join("node1/ztunnel.log")).unwrap_or_default()
            )
        )
    })?;
    eprintln!("  ztunnel");
    let f = run_tests(client, me, args, dst(server), &pids, &agents)?;
    drop(procs);
    Ok(f)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn run(args: &Args) -> Result<()> {
    if !((1..=20).contains(&args.rounds) && args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--rounds must be 1..=20 and --seconds in (0, 600]");
    }
    let me = std::env::current_exe()?;
    let zmesh = match &args.zmesh {
        Some(p) => p.clone(),
        None => me
            .parent()
            .context("this binary has no parent directory")?
            .join("zmesh"),
    };
    if !zmesh.is_file() {
        bail!("{} not found: pass --zmesh", zmesh.display());
    }
    if let Some(z) = &args.ztunnel {
        if !z.is_file() {
            bail!("{} not found (--ztunnel / ZTUNNEL_BIN)", z.display());
        }
    } else {
        eprintln!("no --ztunnel / ZTUNNEL_BIN: measuring direct and zmesh only");
    }
    let dir = tempfile::Builder::new()
        .prefix("zmesh-podbench")
        .tempdir()?;
    let mut m = Measured {
        direct: Vec::new(),
        plain: Vec::new(),
        tls: Vec::new(),
        hbone: Vec::new(),
        zm: Vec::new(),
        zt: Vec::new(),
    };
    for round in 1..=args.rounds {
        eprintln!("round {round}/{}", args.rounds);
        let (direct, mesh) = zmesh_round(args, &zmesh, &me, dir.path())?;
        m.direct.push(direct);
        m.zm.push(mesh);
        if let Some(z) = &args.ztunnel {
            m.zt.push(ztunnel_round(args, &zmesh, z, &me, dir.path())?);
        }
    }
    let title = format!(
        "zmesh and ztunnel on their own paths: lab cluster (pods as netns + veth, nodes on a \
         bridge); zmesh: agent with eBPF redirection, proxy in a zmesh datapath process per \
         node; ztunnel: in-pod mode, one per node; CPU rows: both proxies and both node \
         agents; {} s per test, N = {} streams, {} connection threads, 1 proxy thread each, \
         medians of {} round(s)",
        args.seconds, args.streams, args.conn_threads, args.rounds
    );
    print!("{}", table(&title, &m));
    Ok(())
}
