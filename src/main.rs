//! The `zmesh` binary: one CLI for the node agent, the CA, the proxy and operator tools.

mod cmd;

use clap::{Parser, Subcommand};

/// zmesh: sidecar-free mutual TLS with SPIFFE identities for Kubernetes pods.
#[derive(Parser)]
#[command(name = "zmesh", version = env!("ZMESH_VERSION_LINE"), about, long_about = None)]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. "info" or "zmesh_proxy=debug".
    #[arg(long, global = true, env = "ZMESH_LOG", default_value = "info")]
    log: String,

    /// Threads serving the data path (`proxy`, and the proxy inside `agent`): 1 runs it on
    /// one thread (the default: no hand-offs between threads on each hop, less latency and
    /// CPU per byte, see BENCHMARKS.md), 0 one per CPU. Other work uses one per CPU.
    #[arg(long, global = true, env = "ZMESH_WORKER_THREADS", value_name = "N")]
    worker_threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Remove zmesh's eBPF programs, maps, pins, policy rule and route from this node.
    Uninstall(cmd::uninstall::UninstallArgs),
    /// Enroll a namespace in the mesh (sets io.cilium/mtls-enabled=true in a manifest
    /// directory; against Kubernetes use kubectl label).
    Enroll(cmd::enroll::EnrollArgs),
    /// Take a namespace out of the mesh (removes its enrollment labels in a manifest
    /// directory).
    Unenroll(cmd::enroll::EnrollArgs),
    /// Run the node agent: enrollment from cluster state, certificates, eBPF redirection
    /// and the HBONE proxy.
    // Boxed: by far the largest variant (its many flags), parsed once.
    Agent(Box<cmd::agent::AgentArgs>),
    /// Run and operate the zmesh CA (Istio CA API), and enrol node agents with it.
    Ca(cmd::ca::CaArgs),
    /// Build a local cluster in network namespaces and run the mesh on it (the demo).
    #[cfg(feature = "demo")]
    Demo(cmd::demo::DemoArgs),
    /// Deploy test pods into the cluster (or a local lab) and run a connectivity matrix
    /// (same node, cross node, Service, permissive and strict plaintext, policy allow and
    /// deny), like cilium connectivity test; --junit writes JUnit XML.
    Connectivity(cmd::connectivity::ConnectivityArgs),
    /// Inspect and manage workload certificates (X.509-SVIDs).
    Certs(cmd::certs::CertsArgs),
    /// Run the node proxy (HBONE on 15008, outbound 15001, plaintext inbound 15006).
    Proxy(cmd::proxy::ProxyArgs),
    /// Run the node proxy in a process of its own, configured by the node agent (zmesh
    /// agent --datapath-socket): its connections outlive the agent.
    Datapath(cmd::datapath::DatapathArgs),
    /// Move to zmesh from other meshes (e.g. migrate Cilium mutual-auth policies).
    Compat(cmd::compat::CompatArgs),
    /// Show this node's flows (forwarded, denied, dropped, failed), like hubble observe.
    Observe(cmd::observe::ObserveArgs),
    /// Check that this node is ready for the mesh: kernel, eBPF, CA, certificates.
    Check(cmd::check::CheckArgs),
    /// What a node agent holds now: workloads, services, policies (and the invalid ones),
    /// open connections, certificates (like istioctl ztunnel-config).
    Config(cmd::config::ConfigArgs),
    /// Show or change a node agent's log level at run time.
    Log(cmd::config::LogArgs),
    /// The mesh across the cluster: CA roots and issuance, every node agent, enrolled
    /// namespaces (like cilium status). Exit 1 when anything is unhealthy.
    Status(cmd::status::StatusArgs),
    /// Show the version of this binary and of the node agent (its admin socket).
    Version(cmd::version::VersionArgs),
    /// Print a shell completion script (bash, zsh, fish) to standard output.
    Completion(cmd::docs::CompletionArgs),
    /// Write man pages for zmesh and every subcommand into a directory.
    #[command(hide = true)]
    Man(cmd::docs::ManArgs),
}

/// Logs to stderr through a filter that the agent's admin API can change at run time
/// (`zmesh log --level`).
fn init_logging(filter: &str) -> zmesh_agent::config_api::LogControl {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(EnvFilter::new(filter));
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    zmesh_agent::config_api::LogControl::new(filter, move |spec| {
        zmesh_agent::config_api::check_filter(spec)?;
        let parsed = EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
        handle.reload(parsed).map_err(|e| e.to_string())
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log = init_logging(&cli.log);
    // The data path's threads: `zmesh proxy` serves on the main runtime; the agent runs its
    // proxy on a runtime of its own, configured the same way, next to its control work.
    let proxy_threads = cli
        .worker_threads
        .unwrap_or(zmesh_proxy::runtime::DEFAULT_WORKER_THREADS);
    let threads = match cli.command {
        Command::Proxy(_) | Command::Datapath(_) => proxy_threads,
        _ => 0,
    };
    let runtime = match zmesh_proxy::runtime::build(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Uninstall(args) => cmd::uninstall::run(args),
            Command::Enroll(args) => cmd::enroll::run(args, true),
            Command::Unenroll(args) => cmd::enroll::run(args, false),
            Command::Agent(args) => cmd::agent::run_agent(*args, proxy_threads, log).await,
            Command::Ca(args) => cmd::ca::run(args).await,
            #[cfg(feature = "demo")]
            Command::Demo(args) => cmd::demo::run(args).await,
            Command::Connectivity(args) => cmd::connectivity::run(args).await,
            Command::Certs(args) => cmd::certs::run(args).await,
            Command::Proxy(args) => cmd::proxy::run(args).await,
            Command::Datapath(args) => cmd::datapath::run(args).await,
            Command::Compat(args) => cmd::compat::run(args).await,
            Command::Observe(args) => cmd::observe::run(args).await,
            Command::Config(args) => cmd::config::run(args).await,
            Command::Log(args) => cmd::config::log(args).await,
            Command::Status(args) => cmd::status::run(args).await,
            Command::Check(args) => cmd::check::run(args).await,
            Command::Version(args) => cmd::version::run(args).await,
            Command::Completion(args) => {
                cmd::docs::completion(args, <Cli as clap::CommandFactory>::command())
            }
            Command::Man(args) => cmd::docs::man(args, <Cli as clap::CommandFactory>::command()),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cmd::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
