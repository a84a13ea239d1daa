//! `zmesh ca ...`: run and operate the zmesh CA, and enrol node agents with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use zmesh_certs::{
    BearerValidator, CaServer, CaStore, CachedBearer, FilePlacement, InitOptions,
    NodeCredentialRenewer, NodeName, Phase, Policy, RotationStep, ServerOptions, StaticTokens,
    Status, StoreError, WorkloadPlacement,
};
use zmesh_cluster::token_review::{
    ServiceAccountRef, TokenReviewValidator, DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_AUDIENCE,
    DEFAULT_CACHE_TTL,
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
        /// Succeed without changes if the directory already holds a CA (for an init
        /// container that runs on every start).
        #[arg(long)]
        if_missing: bool,
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
            required_unless_present_any = ["manifests", "kubernetes"],
            conflicts_with_all = ["manifests", "kubernetes"]
        )]
        placement: Option<PathBuf>,
        /// Place workloads from a directory of Kubernetes Pod manifests (watched), the same
        /// cluster state the node agents read: a node gets only identities of its pods.
        #[arg(long, value_name = "DIR", conflicts_with = "kubernetes")]
        manifests: Option<PathBuf>,
        /// Place workloads from the cluster's pods, watched through the Kubernetes API
        /// (in-cluster config or KUBECONFIG): a node gets only identities of its pods.
        #[arg(long)]
        kubernetes: bool,
        /// DNS name or IP for the CA's serving certificate (repeatable).
        /// Default: localhost, 127.0.0.1 and the listen address.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// File of `<node> <sha256-hex>` lines: static bearer tokens accepted in
        /// `authorization: Bearer` instead of a node certificate.
        #[arg(long, conflicts_with = "bearer")]
        bearer_tokens: Option<PathBuf>,
        /// Accept bearer tokens checked this way: `kubernetes` sends node agents'
        /// ServiceAccount tokens to the TokenReview API and takes the node from the token.
        #[arg(long, value_enum)]
        bearer: Option<BearerKind>,
        /// The audience node agents' tokens must be issued for (--bearer kubernetes).
        #[arg(long, default_value = DEFAULT_AUDIENCE)]
        token_audience: String,
        /// The node agents' service account, NAMESPACE/NAME (--bearer kubernetes).
        #[arg(long, default_value = DEFAULT_AGENT_SERVICE_ACCOUNT, value_name = "NAMESPACE/NAME")]
        agent_service_account: ServiceAccountRef,
        /// This cluster's id; requests whose `clusterid` header names another are refused.
        #[arg(long, env = "ZMESH_CLUSTER_ID", default_value = zmesh_certs::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        /// Print the effective configuration and exit, touching nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the CA's trusted roots (PEM): the bundle node agents are given with
    /// `--ca-bundle` (in Kubernetes, the zmesh-ca-roots ConfigMap).
    Bundle {
        #[command(flatten)]
        state: StateDir,
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BearerKind {
    /// Kubernetes TokenReview of the node agents' projected ServiceAccount tokens.
    Kubernetes,
}

/// What `ca serve` will do, as printed by `--dry-run`.
#[derive(Debug)]
#[allow(dead_code)] // Read through Debug only.
struct ServeConfig {
    state_dir: PathBuf,
    listen: SocketAddr,
    serving_names: Vec<String>,
    placement: PlacementSource,
    bearer: Option<BearerSource>,
    cluster_id: String,
}

#[derive(Debug)]
enum PlacementSource {
    File(PathBuf),
    Manifests(PathBuf),
    Kubernetes,
}

#[derive(Debug)]
enum BearerSource {
    StaticTokens(PathBuf),
    #[allow(dead_code)] // Read through Debug only.
    TokenReview {
        audience: String,
        agent_service_account: String,
        cache_ttl: Duration,
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
            if_missing,
        } => {
            let options = InitOptions {
                trust_domain: TrustDomain::new(&trust_domain).context("--trust-domain")?,
                policy: Policy {
                    max_leaf_lifetime,
                    node_cert_lifetime,
                },
            };
            let store = match CaStore::init(&state.state_dir, &options) {
                Ok(store) => store,
                Err(StoreError::AlreadyInitialized(_)) if if_missing => {
                    // Check it loads: a broken CA must not pass for an existing one.
                    let status = CaStore::open(&state.state_dir)?.status()?;
                    if status.trust_domain != options.trust_domain.to_string() {
                        anyhow::bail!(
                            "{} holds the CA for trust domain {}, not {}",
                            state.state_dir.display(),
                            status.trust_domain,
                            options.trust_domain
                        );
                    }
                    println!(
                        "{} already holds the CA for trust domain {}; unchanged",
                        state.state_dir.display(),
                        status.trust_domain
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e.into()),
            };
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
            kubernetes,
            mut sans,
            bearer_tokens,
            bearer,
            token_audience,
            agent_service_account,
            cluster_id,
            dry_run,
        } => {
            if sans.is_empty() {
                sans = vec!["localhost".into(), "127.0.0.1".into()];
                if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
                    sans.push(listen.ip().to_string());
                }
            }
            let placement = match (placement, manifests, kubernetes) {
                (Some(file), _, _) => PlacementSource::File(file),
                (None, Some(dir), _) => PlacementSource::Manifests(dir),
                (None, None, true) => PlacementSource::Kubernetes,
                (None, None, false) => {
                    anyhow::bail!("give --placement FILE, --manifests DIR or --kubernetes")
                }
            };
            if token_audience.trim().is_empty() {
                anyhow::bail!("--token-audience must not be empty");
            }
            let bearer = match (bearer_tokens, bearer) {
                (Some(path), _) => Some(BearerSource::StaticTokens(path)),
                (None, Some(BearerKind::Kubernetes)) => Some(BearerSource::TokenReview {
                    audience: token_audience,
                    agent_service_account: agent_service_account.to_string(),
                    cache_ttl: DEFAULT_CACHE_TTL,
                }),
                (None, None) => None,
            };
            let config = ServeConfig {
                state_dir: state.state_dir,
                listen,
                serving_names: sans.clone(),
                placement,
                bearer,
                cluster_id,
            };
            if dry_run {
                println!("{config:#?}");
                return Ok(ExitCode::SUCCESS);
            }
            let store = CaStore::open(&config.state_dir)?;
            let authority = store.load()?;
            let needs_kube = matches!(config.placement, PlacementSource::Kubernetes)
                || matches!(config.bearer, Some(BearerSource::TokenReview { .. }));
            let kube = if needs_kube {
                Some(
                    kube::Client::try_default()
                        .await
                        .context("cannot configure the Kubernetes client")?,
                )
            } else {
                None
            };
            let bearer = match config.bearer {
                Some(BearerSource::StaticTokens(path)) => {
                    Some(Arc::new(StaticTokens::new(&path)?) as Arc<dyn BearerValidator>)
                }
                Some(BearerSource::TokenReview {
                    audience,
                    cache_ttl,
                    ..
                }) => {
                    let client = kube.clone().context("no Kubernetes client")?;
                    let review =
                        TokenReviewValidator::new(client, &audience, agent_service_account);
                    Some(Arc::new(CachedBearer::new(review, cache_ttl)) as Arc<dyn BearerValidator>)
                }
                None => None,
            };
            let placement: Arc<dyn WorkloadPlacement> = match config.placement {
                PlacementSource::File(file) => {
                    Arc::new(FilePlacement::new(&file, authority.trust_domain())?)
                }
                PlacementSource::Manifests(dir) => {
                    let (state, _errors) =
                        zmesh_cluster::manifests::watch_dir(dir, Duration::from_millis(200));
                    Arc::new(zmesh_cluster::placement::ClusterPlacement::new(state))
                }
                PlacementSource::Kubernetes => {
                    let client = kube.context("no Kubernetes client")?;
                    tracing::info!("waiting for the first complete listing of pods");
                    // No node of its own: the CA keeps the compact form of every pod.
                    let state = zmesh_cluster::kube_source::watch_placement(
                        client,
                        String::new(),
                        zmesh_cluster::kube_source::RetryPolicy::default(),
                    )
                    .await;
                    Arc::new(zmesh_cluster::placement::ClusterPlacement::new(state))
                }
            };
            let cluster_id = config.cluster_id;
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
        CaCommand::Bundle { state } => {
            let authority = CaStore::open(&state.state_dir)?.load()?;
            print!("{}", authority.bundle_pem());
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
