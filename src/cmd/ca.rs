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
use zmesh_cluster::kube_source::{watch_placement, RetryPolicy};
use zmesh_cluster::manifests::watch_dir;
use zmesh_cluster::placement::ClusterPlacement;
use zmesh_cluster::token_review::{
    ServiceAccountRef, TokenReviewValidator, DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_AUDIENCE,
    DEFAULT_CACHE_TTL,
};

use super::parse_duration;
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
    Init(InitArgs),
    /// Serve Istio's CA API (and node join) over TLS.
    Serve(ServeArgs),
    /// Print the CA's trusted roots (PEM): the bundle node agents are given with
    /// `--ca-bundle` (in Kubernetes, the zmesh-ca-roots ConfigMap).
    Bundle(BundleArgs),
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
    RotateRoot(RotateRootArgs),
    /// Show the rotation phase, the roots, and leaves still depending on an old root.
    Status(StatusArgs),
    /// Enrol this node: trade a join token for a node certificate stored in --out.
    Join(JoinArgs),
    /// Renew this node's certificate now, authenticated by the current one (no token).
    /// The node agent does this by itself at half of the certificate's lifetime.
    Renew(RenewArgs),
}

#[derive(Args)]
struct InitArgs {
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
}

#[derive(Args)]
struct ServeArgs {
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
}

#[derive(Args)]
struct BundleArgs {
    #[command(flatten)]
    state: StateDir,
}

#[derive(Args)]
struct RotateRootArgs {
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
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    state: StateDir,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Args)]
struct JoinArgs {
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
}

#[derive(Args)]
struct RenewArgs {
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
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new one-time join token for a node (only its hash is stored).
    Create(TokenCreateArgs),
}

#[derive(Args)]
struct TokenCreateArgs {
    #[command(flatten)]
    state: StateDir,
    #[arg(long)]
    node: String,
    /// How long the token is valid, e.g. 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    ttl: Duration,
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
        agent_service_account: ServiceAccountRef,
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
        CaCommand::Init(args) => init(args)?,
        CaCommand::Serve(args) => serve(args).await?,
        CaCommand::Bundle(args) => bundle(args)?,
        CaCommand::Token {
            command: TokenCommand::Create(args),
        } => token_create(args)?,
        CaCommand::RotateRoot(args) => rotate_root(args)?,
        CaCommand::Status(args) => status(args)?,
        CaCommand::Join(args) => join(args).await?,
        CaCommand::Renew(args) => renew(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `zmesh ca init`.
fn init(args: InitArgs) -> anyhow::Result<()> {
    let InitArgs {
        state,
        trust_domain,
        max_leaf_lifetime,
        node_cert_lifetime,
        if_missing,
    } = args;
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
            return Ok(());
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
    Ok(())
}

/// `zmesh ca serve`: resolves the configuration (printed by `--dry-run`), then serves.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let dry_run = args.dry_run;
    let config = serve_config(args)?;
    if dry_run {
        println!("{config:#?}");
        return Ok(());
    }
    let store = CaStore::open(&config.state_dir)?;
    let authority = store.load()?;
    let needs_kube = matches!(config.placement, PlacementSource::Kubernetes)
        || matches!(config.bearer, Some(BearerSource::TokenReview { .. }));
    let kube = if needs_kube {
        let client = kube::Client::try_default()
            .await
            .context("cannot configure the Kubernetes client")?;
        let mut needed = Vec::new();
        if matches!(config.placement, PlacementSource::Kubernetes) {
            needed.extend_from_slice(zmesh_cluster::access::CA_PLACEMENT);
        }
        if matches!(config.bearer, Some(BearerSource::TokenReview { .. })) {
            needed.extend_from_slice(zmesh_cluster::access::CA_TOKEN_REVIEW);
        }
        super::check_kube_access(&client, &needed).await?;
        Some(client)
    } else {
        None
    };
    let bearer = bearer_validator(config.bearer, kube.clone())?;
    let placement = placement(config.placement, kube, &authority).await?;
    let server = CaServer::bind(
        store,
        ServerOptions {
            listen: config.listen,
            serving_names: config.serving_names.clone(),
            placement,
            bearer,
            cluster_id: config.cluster_id,
        },
    )
    .await?;
    tracing::info!(
        addr = %server.local_addr()?,
        trust_domain = %authority.trust_domain(),
        phase = authority.phase().name(),
        sans = ?config.serving_names,
        "CA serving"
    );
    server.serve(super::shutdown_signal()).await?;
    tracing::info!("CA stopped");
    Ok(())
}

/// What `ca serve`'s flags mean, checked.
fn serve_config(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let ServeArgs {
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
        dry_run: _,
    } = args;
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
            agent_service_account,
            cache_ttl: DEFAULT_CACHE_TTL,
        }),
        (None, None) => None,
    };
    Ok(ServeConfig {
        state_dir: state.state_dir,
        listen,
        serving_names: sans,
        placement,
        bearer,
        cluster_id,
    })
}

/// Who may present a bearer token instead of a node certificate.
fn bearer_validator(
    source: Option<BearerSource>,
    kube: Option<kube::Client>,
) -> anyhow::Result<Option<Arc<dyn BearerValidator>>> {
    Ok(match source {
        Some(BearerSource::StaticTokens(path)) => {
            Some(Arc::new(StaticTokens::new(&path)?) as Arc<dyn BearerValidator>)
        }
        Some(BearerSource::TokenReview {
            audience,
            agent_service_account,
            cache_ttl,
        }) => {
            let client = kube.context("no Kubernetes client")?;
            let review = TokenReviewValidator::new(client, &audience, agent_service_account);
            Some(Arc::new(CachedBearer::new(review, cache_ttl)) as Arc<dyn BearerValidator>)
        }
        None => None,
    })
}

/// Which workloads run on which node, from the configured source.
async fn placement(
    source: PlacementSource,
    kube: Option<kube::Client>,
    authority: &zmesh_certs::Authority,
) -> anyhow::Result<Arc<dyn WorkloadPlacement>> {
    Ok(match source {
        PlacementSource::File(file) => {
            Arc::new(FilePlacement::new(&file, authority.trust_domain())?)
        }
        PlacementSource::Manifests(dir) => {
            let (state, _errors) = watch_dir(dir, Duration::from_millis(200));
            Arc::new(ClusterPlacement::new(state))
        }
        PlacementSource::Kubernetes => {
            let client = kube.context("no Kubernetes client")?;
            tracing::info!("waiting for the first complete listing of pods");
            // No node of its own: the CA keeps the compact form of every pod.
            let state = watch_placement(client, String::new(), RetryPolicy::default()).await;
            Arc::new(ClusterPlacement::new(state))
        }
    })
}

/// `zmesh ca bundle`.
fn bundle(args: BundleArgs) -> anyhow::Result<()> {
    let authority = CaStore::open(&args.state.state_dir)?.load()?;
    print!("{}", authority.bundle_pem());
    Ok(())
}

/// `zmesh ca token create`.
fn token_create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let node = NodeName::new(&args.node)?;
    let store = CaStore::open(&args.state.state_dir)?;
    store.load()?;
    let token = store.create_join_token(&node, args.ttl)?;
    println!("{token}");
    Ok(())
}

/// `zmesh ca rotate-root`.
fn rotate_root(args: RotateRootArgs) -> anyhow::Result<()> {
    let step = match (args.phase, args.next) {
        (_, true) => RotationStep::Next,
        (Some(RotatePhase::Add), false) => RotationStep::Add,
        (Some(RotatePhase::Switch), false) => RotationStep::Switch,
        (Some(RotatePhase::Drop), false) => RotationStep::Drop,
        (None, false) => anyhow::bail!("name a phase (add, switch, drop) or pass --next"),
    };
    let store = CaStore::open(&args.state.state_dir)?;
    let phase = store.rotate(step, args.force)?;
    println!("{}", describe_phase(phase));
    Ok(())
}

/// `zmesh ca status`.
fn status(args: StatusArgs) -> anyhow::Result<()> {
    let status = CaStore::open(&args.state.state_dir)?.status()?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Text => print_status(&status),
    }
    Ok(())
}

/// `zmesh ca join`.
async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let node = NodeName::new(&args.node)?;
    let td = TrustDomain::new(&args.trust_domain).context("--trust-domain")?;
    let roots = std::fs::read_to_string(&args.ca_bundle)
        .with_context(|| format!("reading {}", args.ca_bundle.display()))?;
    zmesh_certs::join(&args.ca, &roots, &args.token, &node, &td, &args.out).await?;
    println!(
        "node {node} joined; credentials in {} ({})",
        args.out.display(),
        node.spiffe_id(&td)
    );
    Ok(())
}

/// `zmesh ca renew`.
async fn renew(args: RenewArgs) -> anyhow::Result<()> {
    let node = NodeName::new(&args.node)?;
    let td = TrustDomain::new(&args.trust_domain).context("--trust-domain")?;
    let renewer = NodeCredentialRenewer::open(&args.ca, &args.dir, &node, &td)?;
    renewer.renew().await?;
    println!(
        "node {node} renewed; credentials in {}; next renewal due {}",
        args.dir.display(),
        from_now(renewer.renew_at())
    );
    Ok(())
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
