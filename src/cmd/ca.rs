//! `zmesh ca ...`: run and operate the zmesh CA, and enrol node agents with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use zmesh_certs::{
    BearerValidator, CaServer, CaStore, FilePlacement, InitOptions, NodeCredentialRenewer,
    NodeName, Phase, Policy, RotationStep, ServerOptions, StaticTokens, Status, WorkloadPlacement,
};
use zmesh_identity::TrustDomain;

const DEFAULT_STATE_DIR: &str = "/var/lib/zmesh/ca";

#[derive(Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Args, Clone)]
struct StateDir {
    /// CA state directory (keys, certificates, tokens, ledger, audit log).
    #[arg(long, env = "ZMESH_CA_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new CA (root + intermediate, ECDSA P-256) in the state directory.
    Init {
        #[command(flatten)]
        state: StateDir,
        #[arg(long, default_value = zmesh_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Longest workload certificate lifetime (also the default), e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        max_leaf_lifetime: Duration,
        /// Lifetime of node agent certificates, e.g. 30d.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        node_cert_lifetime: Duration,
    },
    /// Serve Istio's CA API (and node join) over TLS.
    Serve {
        #[command(flatten)]
        state: StateDir,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// YAML file mapping node names to the workloads scheduled there
        /// (`node-a: [default/web, spiffe://cluster.local/ns/prod/sa/db]`); re-read on change.
        #[arg(
            long,
            required_unless_present = "manifests",
            conflicts_with = "manifests"
        )]
        placement: Option<PathBuf>,
        /// Place workloads from a directory of Kubernetes Pod manifests (watched), the same
        /// cluster state the node agents read: a node gets only identities of its pods.
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// DNS name or IP for the CA's serving certificate (repeatable).
        /// Default: localhost, 127.0.0.1 and the listen address.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// File of `<node> <sha256-hex>` lines: static bearer tokens accepted in
        /// `authorization: Bearer` instead of a node certificate.
        #[arg(long)]
        bearer_tokens: Option<PathBuf>,
        /// This cluster's id; requests whose `clusterid` header names another are refused.
        #[arg(long, env = "ZMESH_CLUSTER_ID", default_value = zmesh_certs::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
    },
    /// Manage one-time node join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Rotate the root without breaking traffic, one phase at a time:
    /// `add` publishes a new root in every bundle (old one still signs), `switch` signs with
    /// the new root, `drop` removes the old root once no unexpired leaf depends on it.
    /// Wait at least one leaf renewal period between add and switch so every node
    /// trusts the new root. A running server picks each phase up immediately.
    RotateRoot {
        #[command(flatten)]
        state: StateDir,
        /// The phase to enter.
        #[arg(value_enum, required_unless_present = "next", conflicts_with = "next")]
        phase: Option<RotatePhase>,
        /// Advance to whichever phase comes next.
        #[arg(long)]
        next: bool,
        /// Drop the old root even though unexpired leaves still chain to it.
        #[arg(long)]
        force: bool,
    },
    /// Show the rotation phase, the roots, and leaves still depending on an old root.
    Status {
        #[command(flatten)]
        state: StateDir,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Enrol this node: trade a join token for a node certificate stored in --out.
    Join {
        /// CA address, host:port (the host must be on the CA's serving certificate).
        #[arg(long)]
        ca: String,
        /// The one-time token from `zmesh ca token create`.
        #[arg(long, env = "ZMESH_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long)]
        node: String,
        /// Directory for node.key (0600), node.pem and ca-bundle.pem.
        #[arg(long)]
        out: PathBuf,
        /// PEM file with the CA's root(s), obtained out of band.
        #[arg(long)]
        ca_bundle: PathBuf,
        #[arg(long, default_value = zmesh_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Renew this node's certificate now, authenticated by the current one (no token).
    /// The node agent does this by itself at half of the certificate's lifetime.
    Renew {
        /// CA address, host:port.
        #[arg(long)]
        ca: String,
        #[arg(long)]
        node: String,
        /// Directory holding node.key, node.pem and ca-bundle.pem from `zmesh ca join`.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = zmesh_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new one-time join token for a node (only its hash is stored).
    Create {
        #[command(flatten)]
        state: StateDir,
        #[arg(long)]
        node: String,
        /// How long the token is valid, e.g. 10m.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RotatePhase {
    Add,
    Switch,
    Drop,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub async fn run(args: CaArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CaCommand::Init {
            state,
            trust_domain,
            max_leaf_lifetime,
            node_cert_lifetime,
        } => {
            let options = InitOptions {
                trust_domain: TrustDomain::new(&trust_domain).context("--trust-domain")?,
                policy: Policy {
                    max_leaf_lifetime,
                    node_cert_lifetime,
                },
            };
            let store = CaStore::init(&state.state_dir, &options)?;
            let status = store.status()?;
            println!(
                "initialised CA for trust domain {} in {}",
                status.trust_domain,
                state.state_dir.display()
            );
            for root in &status.roots {
                println!("root {}: sha256 {}", root.chain, root.fingerprint_sha256);
            }
        }
        CaCommand::Serve {
            state,
            listen,
            placement,
            manifests,
            mut sans,
            bearer_tokens,
            cluster_id,
        } => {
            let store = CaStore::open(&state.state_dir)?;
            let authority = store.load()?;
            if sans.is_empty() {
                sans = vec!["localhost".into(), "127.0.0.1".into()];
                if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
                    sans.push(listen.ip().to_string());
                }
            }
            let placement: Arc<dyn WorkloadPlacement> = match (placement, manifests) {
                (Some(file), _) => Arc::new(FilePlacement::new(&file, authority.trust_domain())?),
                (None, Some(dir)) => {
                    let (state, _errors) =
                        zmesh::agent::manifests::watch_dir(dir, Duration::from_millis(200));
                    Arc::new(zmesh::agent::placement::ClusterPlacement::new(state))
                }
                (None, None) => anyhow::bail!("give --placement FILE or --manifests DIR"),
            };
            let bearer = match bearer_tokens {
                Some(path) => Some(Arc::new(StaticTokens::new(&path)?) as Arc<dyn BearerValidator>),
                None => None,
            };
            let server = CaServer::bind(
                store,
                ServerOptions {
                    listen,
                    serving_names: sans.clone(),
                    placement,
                    bearer,
                    cluster_id,
                },
            )
            .await?;
            tracing::info!(
                addr = %server.local_addr()?,
                trust_domain = %authority.trust_domain(),
                phase = authority.phase().name(),
                ?sans,
                "CA serving"
            );
            server.serve(shutdown_signal()).await?;
            tracing::info!("CA stopped");
        }
        CaCommand::Token {
            command: TokenCommand::Create { state, node, ttl },
        } => {
            let node = NodeName::new(&node)?;
            let store = CaStore::open(&state.state_dir)?;
            store.load()?;
            let token = store.create_join_token(&node, ttl)?;
            println!("{token}");
        }
        CaCommand::RotateRoot {
            state,
            phase,
            next,
            force,
        } => {
            let step = match (phase, next) {
                (_, true) => RotationStep::Next,
                (Some(RotatePhase::Add), false) => RotationStep::Add,
                (Some(RotatePhase::Switch), false) => RotationStep::Switch,
                (Some(RotatePhase::Drop), false) => RotationStep::Drop,
                (None, false) => anyhow::bail!("name a phase (add, switch, drop) or pass --next"),
            };
            let store = CaStore::open(&state.state_dir)?;
            let phase = store.rotate(step, force)?;
            println!("{}", describe_phase(phase));
        }
        CaCommand::Status { state, output } => {
            let status = CaStore::open(&state.state_dir)?.status()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Output::Text => print_status(&status),
            }
        }
        CaCommand::Join {
            ca,
            token,
            node,
            out,
            ca_bundle,
            trust_domain,
        } => {
            let node = NodeName::new(&node)?;
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            let roots = std::fs::read_to_string(&ca_bundle)
                .with_context(|| format!("reading {}", ca_bundle.display()))?;
            zmesh_certs::join(&ca, &roots, &token, &node, &td, &out).await?;
            println!(
                "node {node} joined; credentials in {} ({})",
                out.display(),
                node.spiffe_id(&td)
            );
        }
        CaCommand::Renew {
            ca,
            node,
            dir,
            trust_domain,
        } => {
            let node = NodeName::new(&node)?;
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            let renewer = NodeCredentialRenewer::open(&ca, &dir, &node, &td)?;
            renewer.renew().await?;
            println!(
                "node {node} renewed; credentials in {}; next renewal due {}",
                dir.display(),
                from_now(renewer.renew_at())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_phase(phase: Phase) -> String {
    match phase {
        Phase::Stable { active } => format!("stable: root {active} trusted and signing"),
        Phase::Added { old, new } => format!(
            "add: root {new} published in every bundle, root {old} still signing; \
             run `rotate-root switch` once every node has renewed"
        ),
        Phase::Switched { old, new } => format!(
            "switch: root {new} signing, root {old} still trusted; \
             run `rotate-root drop` once its leaves expired (see `zmesh ca status`)"
        ),
    }
}

fn print_status(status: &Status) {
    println!("trust domain: {}", status.trust_domain);
    println!("phase:        {}", status.phase);
    println!(
        "lifetimes:    workload max {}s, node {}s",
        status.max_leaf_lifetime_secs, status.node_cert_lifetime_secs
    );
    for root in &status.roots {
        println!(
            "root {} [{}{}] sha256:{} expires {}",
            root.chain,
            root.role,
            if root.signing { ", signing" } else { "" },
            root.fingerprint_sha256,
            root.not_after
        );
    }
    if status.phase != "stable" {
        println!(
            "unexpired leaves on the old root: {}",
            status.leaves_on_old_root.len()
        );
        for leaf in &status.leaves_on_old_root {
            println!(
                "  {} serial {} expires {}",
                leaf.identity, leaf.serial, leaf.not_after
            );
        }
    }
}

/// How long until `t`, roughly, for humans (`in 14d 23h`, `in 5m`, `now`).
fn from_now(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        0 => "now".into(),
        s if s < 3600 => format!("in {}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("in {}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("in {}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Durations like `90s`, `10m`, `24h`, `30d` (or plain seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10m or 24h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use s, m, h or d")),
    };
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if secs == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "0", "0s", "m", "10x", "-5m", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
