//! `zmesh check`: is this node ready for the mesh? Each check prints pass/fail and, on
//! failure, what to do (like `cilium status` / `linkerd check`). Exits non-zero if any
//! check fails.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use zmesh_agent::admin::{epoch_seconds, AdminClient, CertInfo};
use zmesh_certs::NodeCredentials;
use zmesh_identity::svid::{describe, fmt_time};
use zmesh_redirect::probe::{FLOOR, TCX_SINCE};
use zmesh_redirect::{KernelFeatures, Probe, TcAttach};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The node agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = "/run/zmesh/agent.sock")]
    admin_socket: PathBuf,
    /// The CA's address, HOST:PORT: checks that it answers TLS with a chain the node's
    /// bundle trusts. Without it the CA is not checked.
    #[arg(long, value_name = "HOST:PORT")]
    ca: Option<String>,
    /// The node's credentials from `zmesh ca join`.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/zmesh/node")]
    credentials: PathBuf,
    /// The ServiceAccount token the agent authenticates to the CA with (the agent's
    /// --ca-token-file; the CA runs with --bearer kubernetes): there is then no node
    /// credential, and the token and --ca-bundle are checked instead. Without it, token mode
    /// is assumed when --credentials does not exist and the DaemonSet's token
    /// (/var/run/secrets/zmesh/token) does.
    #[arg(long, value_name = "PATH", env = "ZMESH_CA_TOKEN_FILE")]
    ca_token_file: Option<PathBuf>,
    /// The CA's roots in token mode (the agent's --ca-bundle).
    #[arg(long, value_name = "FILE", default_value = "/etc/zmesh/ca/roots.pem")]
    ca_bundle: PathBuf,
    /// The agent's bpffs pin directory.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zmesh")]
    bpf_pin_dir: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Human,
    Json,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Not failing, but worth a look (or not measurable).
    Warn,
    Fail,
    /// Not run (e.g. no `--ca`).
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            hint: None,
        }
    }

    fn fail(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        write!(f, "[{mark}] {}: {}", self.name, self.detail)?;
        if let Some(h) = &self.hint {
            write!(f, "\n       hint: {h}")?;
        }
        Ok(())
    }
}

/// Where the README explains it: "; see README.md#<anchor>" (GitHub's section anchors).
fn see(anchor: &str) -> String {
    format!("; see README.md#{anchor}")
}

/// Where the agent's DaemonSet (examples/kubernetes/30-agent.yaml) mounts its CA token.
pub const POD_CA_TOKEN: &str = "/var/run/secrets/zmesh/token";

/// The kernels zmesh was tested on (README: Kernels).
pub const TESTED_KERNELS: &str =
    "6.18 with TCX and Debian 12's 6.1 with clsact filters (scripts/vm-test.sh)";

/// Every eBPF feature the programs need, as probed on the running kernel (never the
/// version string: distributions backport features). `release` only labels the result.
pub fn kernel_features(release: &str, features: &KernelFeatures) -> Check {
    let name = "kernel eBPF features";
    let release = release.trim();
    let missing = features.missing();
    let unknown: Vec<String> = features
        .required
        .iter()
        .filter_map(|f| match &f.probe {
            Probe::Unknown(e) => Some(format!("{} ({e})", f.name)),
            _ => None,
        })
        .collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Check::fail(
            name,
            format!("{release} lacks {}", list.join("; ")),
            format!(
                "zmesh needs the kernel features of Linux {FLOOR} (or a kernel with them \
                 backported); tested on {TESTED_KERNELS}: upgrade the node's kernel{}",
                see("kernels")
            ),
        );
    }
    if !unknown.is_empty() {
        return Check {
            name: name.into(),
            status: Status::Warn,
            detail: format!("cannot probe {}", unknown.join("; ")),
            hint: Some("run zmesh check as root (probing loads small eBPF programs)".into()),
        };
    }
    Check::pass(
        name,
        format!(
            "{release}: all {} present (Linux {FLOOR} has them all)",
            features.required.len()
        ),
    )
}

/// How tc ingress will attach: TCX, or a clsact filter whose qdisc and classifier may be
/// modules (`module_available` says whether a module is built in, loaded or installed).
pub fn tc_attach(features: &KernelFeatures, module_available: impl Fn(&str) -> bool) -> Check {
    let name = "tc ingress attach";
    match &features.tcx.probe {
        Probe::Present => return Check::pass(name, "TCX links"),
        Probe::Unknown(e) => {
            return Check {
                name: name.into(),
                status: Status::Warn,
                detail: format!("cannot probe TCX ({e})"),
                hint: Some("run zmesh check as root".into()),
            }
        }
        Probe::Absent => {}
    }
    let missing: Vec<&str> = ["sch_ingress", "cls_bpf"]
        .into_iter()
        .filter(|m| !module_available(m))
        .collect();
    if missing.is_empty() {
        Check::pass(
            name,
            format!("clsact qdisc + bpf filter through netlink (no TCX: Linux {TCX_SINCE} has it)"),
        )
    } else {
        Check::fail(
            name,
            format!(
                "no TCX (Linux {TCX_SINCE} has it), and no {} module for the clsact filter",
                missing.join(" or ")
            ),
            format!(
                "install the kernel's modules package (the clsact qdisc is sch_ingress, the \
                 bpf classifier cls_bpf){}",
                see("kernels")
            ),
        )
    }
}

/// Whether a kernel module is built in, loaded, or installed for the running kernel.
fn module_available(release: &str, module: &str) -> bool {
    if Path::new("/sys/module").join(module).exists() {
        return true;
    }
    let dir = Path::new("/lib/modules").join(release.trim());
    let listed = |file: &str| {
        std::fs::read_to_string(dir.join(file)).is_ok_and(|text| {
            text.lines().any(|l| {
                let base = l.split(':').next().unwrap_or(l);
                let file = base.rsplit('/').next().unwrap_or(base);
                file.split('.').next() == Some(module)
            })
        })
    };
    listed("modules.builtin") || listed("modules.dep")
}

/// BTF (`/sys/kernel/btf/vmlinux`) present.
pub fn btf(path: &Path) -> Check {
    let name = "kernel BTF";
    if path.exists() {
        Check::pass(name, format!("{} present", path.display()))
    } else {
        Check::fail(
            name,
            format!("{} is missing", path.display()),
            format!("the kernel needs CONFIG_DEBUG_INFO_BTF=y{}", see("kernels")),
        )
    }
}

/// bpffs and cgroup v2 mounts, from the text of /proc/self/mounts.
pub fn mounts(text: &str) -> Vec<Check> {
    let of_type = |fs: &str| -> Vec<&str> {
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, point, ty) = (f.next()?, f.next()?, f.next()?);
                (ty == fs).then_some(point)
            })
            .collect()
    };
    let bpf = of_type("bpf");
    let cg2 = of_type("cgroup2");
    vec![
        match bpf.first() {
            Some(p) => Check::pass("bpffs", format!("mounted at {p}")),
            None => Check::fail(
                "bpffs",
                "no bpf filesystem is mounted",
                format!(
                    "mount -t bpf bpf /sys/fs/bpf (the agent also mounts it when it starts){}",
                    see("what-a-node-needs")
                ),
            ),
        },
        match cg2.first() {
            Some(p) => Check::pass("cgroup v2", format!("mounted at {p}")),
            None => Check::fail(
                "cgroup v2",
                "no cgroup2 filesystem is mounted",
                format!(
                    "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount \
                     cgroup2{}",
                    see("what-a-node-needs")
                ),
            ),
        },
    ]
}

/// The maps every installation pins.
pub const EXPECTED_MAPS: [&str; 11] = [
    "zm_config",
    "zm_enrolled_netns",
    "zm_enrolled_cgroups",
    "zm_excluded_netns",
    "zm_excluded_cgroups",
    "zm_orig_by_peer",
    "zm_enrolled_ips",
    "zm_mesh_sources",
    "zm_bridge_ports",
    "zm_drops",
    "zm_events",
];
/// The program links every installation pins (plus, per interface, `tc_ingress_<if>` and
/// `tx_tcx_<if>`: TCX links, or `tc_clsact_<if>` and `tx_clsact_<if>`: the programs of
/// clsact filters; ingress and egress).
pub const EXPECTED_LINKS: [&str; 4] = ["connect4", "connect6", "sockops", "getsockopt"];

/// Programs attached and maps pinned, read from the pin directory (no bpftool needed).
pub fn pins(pin_dir: &Path) -> Check {
    let name = "eBPF programs and maps";
    let hint = format!(
        "start the agent with --redirect-cgroup (it installs and pins the programs), or pass \
         --bpf-pin-dir if it uses another directory{}",
        see("the-cli")
    );
    if !pin_dir.is_dir() {
        return Check::fail(name, format!("{} does not exist", pin_dir.display()), &hint);
    }
    let mut missing: Vec<String> = Vec::new();
    for m in EXPECTED_MAPS {
        if !pin_dir.join("maps").join(m).exists() {
            missing.push(format!("maps/{m}"));
        }
    }
    for l in EXPECTED_LINKS {
        if !pin_dir.join("links").join(l).exists() {
            missing.push(format!("links/{l}"));
        }
    }
    let tc: Vec<String> = zmesh_redirect::Redirector::ingress_attachments(pin_dir)
        .unwrap_or_default()
        .into_iter()
        .map(|a| match a.mode {
            TcAttach::Tcx => format!("{} (TCX)", a.interface),
            _ => format!("{} (clsact filter)", a.interface),
        })
        .collect();
    if tc.is_empty() {
        missing.push("links/tc_ingress_<interface> or links/tc_clsact_<interface>".into());
    }
    if missing.is_empty() {
        Check::pass(
            name,
            format!(
                "{} maps and {} links pinned; tc ingress on {}",
                EXPECTED_MAPS.len(),
                EXPECTED_LINKS.len() + tc.len(),
                tc.join(", ")
            ),
        )
    } else {
        Check::fail(
            name,
            format!(
                "missing under {}: {}",
                pin_dir.display(),
                missing.join(", ")
            ),
            hint,
        )
    }
}

/// The roots of a PEM bundle as a rustls store.
fn root_store(roots_pem: &str) -> Result<rustls::RootCertStore, String> {
    let certs =
        zmesh_identity::pem::parse_certs(roots_pem.as_bytes()).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("the bundle holds no certificate".into());
    }
    let mut store = rustls::RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|e| e.to_string())?;
    }
    Ok(store)
}

/// This node's credential: readable, not expired, and chaining to its bundle.
pub fn node_credential(creds: Result<&NodeCredentials, String>, now: SystemTime) -> Check {
    let name = "node credential";
    let rejoin = "join again: zmesh ca join --token ... (or check --credentials)";
    let creds = match creds {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                name,
                e,
                format!(
                    "join the node: zmesh ca join --token ... (or pass --credentials DIR); an \
                     agent that authenticates with a ServiceAccount token (--ca-token-file, \
                     the CA with --bearer kubernetes) has no node credential: pass \
                     --ca-token-file and --ca-bundle{}",
                    see("kubernetes")
                ),
            )
        }
    };
    let chain = match zmesh_identity::pem::parse_certs(creds.cert_chain_pem.as_bytes()) {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return Check::fail(name, "node.pem holds no certificate", rejoin),
        Err(e) => return Check::fail(name, format!("node.pem: {e}"), rejoin),
    };
    let info = match describe(&chain[0]) {
        Ok(i) => i,
        Err(e) => return Check::fail(name, format!("node.pem: {e}"), rejoin),
    };
    if info.not_after <= now {
        return Check::fail(
            name,
            format!("expired at {}", fmt_time(info.not_after)),
            rejoin,
        );
    }
    if info.not_before > now {
        return Check::fail(
            name,
            format!("not valid before {}", fmt_time(info.not_before)),
            "this node's clock is behind the CA's: fix time synchronization",
        );
    }
    let roots = match root_store(&creds.roots_pem) {
        Ok(r) => r,
        Err(e) => return Check::fail(name, format!("ca-bundle.pem: {e}"), rejoin),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verified =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())
            .and_then(|v| {
                v.verify_client_cert(
                    &chain[0],
                    &chain[1..],
                    UnixTime::since_unix_epoch(
                        now.duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default(),
                    ),
                )
                .map_err(|e| e.to_string())
            });
    match verified {
        Ok(_) => Check::pass(
            name,
            format!(
                "{} valid until {} ({} left), chains to the bundle",
                info.subject,
                fmt_time(info.not_after),
                human(info.not_after.duration_since(now).unwrap_or_default())
            ),
        ),
        Err(e) => Check::fail(
            name,
            format!("does not chain to ca-bundle.pem: {e}"),
            "the CA's roots changed without this node learning them: join again",
        ),
    }
}

/// The agent's CA credential in token mode: the projected ServiceAccount token (readable,
/// a JWT, not expired) and the CA's roots it verifies the CA with.
pub fn ca_token(
    token_file: &Path,
    token: Result<String, String>,
    bundle_file: &Path,
    bundle: Result<String, String>,
    now: SystemTime,
) -> Check {
    let name = "CA credential (ServiceAccount token)";
    let mount = format!(
        "the agent's DaemonSet mounts a projected token (audience zmesh-ca) at {POD_CA_TOKEN}; \
         pass --ca-token-file if it is elsewhere{}",
        see("kubernetes")
    );
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot read {}: {e}", token_file.display()),
                mount,
            )
        }
    };
    let claims = match jwt_claims(token.trim()) {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                name,
                format!(
                    "{} is not a ServiceAccount token: {e}",
                    token_file.display()
                ),
                mount,
            )
        }
    };
    let now_s = epoch_seconds(now);
    let expiry = match claims.get("exp").and_then(serde_json::Value::as_u64) {
        Some(exp) if exp <= now_s => {
            return Check::fail(
                name,
                format!(
                    "{} expired {} ago",
                    token_file.display(),
                    human(Duration::from_secs(now_s - exp))
                ),
                format!(
                    "the kubelet renews projected tokens: is the token volume a projected \
                     serviceAccountToken (not a copy)?{}",
                    see("kubernetes")
                ),
            )
        }
        Some(exp) => format!("expires in {}", human(Duration::from_secs(exp - now_s))),
        None => "no expiry".to_owned(),
    };
    let audience = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a.clone(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(serde_json::Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        _ => "none".to_owned(),
    };
    let roots = bundle
        .map_err(|e| format!("cannot read {}: {e}", bundle_file.display()))
        .and_then(|pem| {
            root_store(&pem)
                .map(|r| r.len())
                .map_err(|e| format!("{}: {e}", bundle_file.display()))
        });
    match roots {
        Ok(n) => Check::pass(
            name,
            format!(
                "{} (audience {audience}, {expiry}); {n} CA root(s) in {}",
                token_file.display(),
                bundle_file.display()
            ),
        ),
        Err(e) => Check::fail(
            name,
            e,
            format!(
                "fill the zmesh-ca-roots ConfigMap with `zmesh ca bundle` (or pass \
                 --ca-bundle){}",
                see("kubernetes")
            ),
        ),
    }
}

/// The claims of a JWT, unverified (only the CA can verify it: TokenReview).
fn jwt_claims(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        return Err(format!("{} part(s), a JWT has 3", parts.len()));
    };
    let bytes = base64url(payload).ok_or("its claims are not base64url")?;
    serde_json::from_slice(&bytes).map_err(|e| format!("its claims are not JSON: {e}"))
}

/// Decodes unpadded base64url (RFC 4648 section 5).
fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Every enrolled workload holds a valid certificate.
pub fn workload_certs(certs: Result<Vec<CertInfo>, String>, now: SystemTime) -> Vec<Check> {
    let certs = match certs {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::fail(
                "agent admin API",
                e,
                format!(
                    "is the agent running on this node? (kubectl -n zmesh-system get pods -l \
                 app.kubernetes.io/name=zmesh-agent -o wide; outside Kubernetes, its \
                 service), or pass --admin-socket{}",
                    see("kubernetes")
                ),
            )]
        }
    };
    let mut out = vec![Check::pass(
        "agent admin API",
        format!("reachable; {} workload certificate(s)", certs.len()),
    )];
    let now_s = epoch_seconds(now);
    for c in certs {
        let name = format!("certificate {}", c.workload);
        let check = match c.not_after {
            Some(t) if t > now_s => {
                let left = Duration::from_secs(t - now_s);
                let detail = format!("valid, expires in {}", human(left));
                match &c.last_error {
                    Some(e) => Check {
                        name,
                        status: Status::Warn,
                        detail: format!("{detail}; last renewal failed: {e}"),
                        hint: Some("check that the CA is reachable: zmesh certs status".into()),
                    },
                    None => Check::pass(&name, detail),
                }
            }
            Some(t) => Check::fail(
                &name,
                format!("expired {} ago", human(Duration::from_secs(now_s - t))),
                format!(
                    "renewals failing{}; zmesh certs rotate --workload <ns/sa>",
                    c.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                ),
            ),
            None => Check::fail(
                &name,
                format!(
                    "no certificate yet{}",
                    c.last_error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
                "the CA must issue it: check the CA address and that the pod is scheduled here",
            ),
        };
        out.push(check);
    }
    out
}

/// What the CA's serving certificate says about clocks: a NotBefore in our future means
/// this node's clock is behind. The CA API has no time source, so skew is otherwise not
/// measurable.
pub fn clock_skew(serving_not_before: Option<SystemTime>, now: SystemTime) -> Check {
    let name = "clock skew";
    match serving_not_before {
        Some(nb) if nb > now => Check::fail(
            name,
            format!(
                "the CA's certificate is valid only from {} but it is {} here",
                fmt_time(nb),
                fmt_time(now)
            ),
            "this node's clock is behind: fix time synchronization (chrony/ntp)",
        ),
        Some(_) => Check {
            name: name.into(),
            status: Status::Warn,
            detail:
                "not measurable (the CA API carries no time); no skew visible in its certificate"
                    .into(),
            hint: None,
        },
        None => Check {
            name: name.into(),
            status: Status::Skip,
            detail: "not measurable without reaching the CA".into(),
            hint: None,
        },
    }
}

/// TLS handshake to the CA with the node's bundle (and credential, if any). Returns the
/// check and the serving certificate's NotBefore.
fn ca_reachable(addr: &str, creds: Option<&NodeCredentials>) -> (Check, Option<SystemTime>) {
    let name = "CA reachable";
    let Some(creds) = creds else {
        return (
            Check::fail(
                name,
                "no CA bundle to verify it with",
                "fix the credential check above first",
            ),
            None,
        );
    };
    let fail = |detail: String, hint: &str| (Check::fail(name, detail, hint), None);
    let roots = match root_store(&creds.roots_pem) {
        Ok(r) => r,
        Err(e) => return fail(format!("ca-bundle.pem: {e}"), "join again"),
    };
    let Some((host, _)) = addr.rsplit_once(':') else {
        return fail(format!("{addr:?} is not HOST:PORT"), "pass --ca HOST:PORT");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(server_name) = ServerName::try_from(host.to_owned()) else {
        return fail(
            format!("{host:?} is not a host name or IP"),
            "pass --ca HOST:PORT",
        );
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = match rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(b) => b.with_root_certificates(roots),
        Err(e) => return fail(e.to_string(), "internal error"),
    };
    let chain =
        zmesh_identity::pem::parse_certs(creds.cert_chain_pem.as_bytes()).unwrap_or_default();
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes());
    let mut config = if creds.cert_chain_pem.trim().is_empty() && creds.key_pem.is_empty() {
        // Token mode: the agent shows the CA a token, not a certificate.
        builder.with_no_client_auth()
    } else {
        match key {
            Ok(key) if !chain.is_empty() => match builder.with_client_auth_cert(chain, key) {
                Ok(c) => c,
                Err(e) => return fail(format!("node credential unusable: {e}"), "join again"),
            },
            _ => return fail("node credential unusable".into(), "join again"),
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let result = (|| -> Result<Vec<CertificateDer<'static>>, String> {
        use std::net::ToSocketAddrs;
        let target = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to nothing"))?;
        let timeout = Duration::from_secs(5);
        let mut tcp = std::net::TcpStream::connect_timeout(&target, timeout)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        tcp.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name)
            .map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
        }
        Ok(conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default())
    })();
    match result {
        Ok(peer) => {
            let nb = peer
                .first()
                .and_then(|c| describe(c).ok())
                .map(|i| i.not_before);
            (
                Check::pass(
                    name,
                    format!(
                        "{addr}: TLS 1.3 handshake done, chain verified against the node's bundle"
                    ),
                ),
                nb,
            )
        }
        Err(e) => fail(
            e,
            "check the address, that the CA runs, and that its roots are in ca-bundle.pem",
        ),
    }
}

pub async fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let now = SystemTime::now();
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_else(|_| "the running kernel".into());
    let features = zmesh_redirect::kernel_features();
    checks.push(kernel_features(&release, features));
    checks.push(tc_attach(features, |m| module_available(&release, m)));
    checks.push(btf(Path::new("/sys/kernel/btf/vmlinux")));
    match std::fs::read_to_string("/proc/self/mounts") {
        Ok(m) => checks.extend(mounts(&m)),
        Err(e) => checks.push(Check::fail("mounts", e.to_string(), "is /proc mounted?")),
    }
    checks.push(pins(&args.bpf_pin_dir));
    // Token mode (the DaemonSet's): no node credential, a token and the CA's roots instead.
    let token_file = args.ca_token_file.clone().or_else(|| {
        (!args.credentials.exists() && Path::new(POD_CA_TOKEN).exists())
            .then(|| PathBuf::from(POD_CA_TOKEN))
    });
    let creds = match &token_file {
        Some(token_file) => {
            let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| e.to_string());
            let bundle = read(&args.ca_bundle);
            checks.push(ca_token(
                token_file,
                read(token_file),
                &args.ca_bundle,
                bundle.clone(),
                now,
            ));
            bundle
                .map(|roots_pem| NodeCredentials {
                    cert_chain_pem: String::new(),
                    key_pem: String::new(),
                    roots_pem,
                })
                .map_err(|e| format!("cannot read {}: {e}", args.ca_bundle.display()))
        }
        None => {
            let creds = NodeCredentials::load(&args.credentials)
                .map_err(|e| format!("cannot load from {}: {e}", args.credentials.display()));
            checks.push(node_credential(creds.as_ref().map_err(Clone::clone), now));
            creds
        }
    };
    let serving_not_before = match &args.ca {
        Some(addr) => {
            let addr = addr.clone();
            let creds = creds.as_ref().ok().cloned();
            let (check, nb) =
                tokio::task::spawn_blocking(move || ca_reachable(&addr, creds.as_ref())).await?;
            checks.push(check);
            nb
        }
        None => {
            checks.push(
                Check::pass("CA reachable", "not checked (no --ca)").with_status(Status::Skip),
            );
            None
        }
    };
    checks.push(clock_skew(serving_not_before, now));
    let certs = AdminClient::new(&args.admin_socket)
        .get_json::<Vec<CertInfo>>("/certs")
        .await
        .map_err(|e| e.to_string());
    checks.extend(workload_certs(certs, now));

    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Output::Human => {
            for c in &checks {
                println!("{c}");
            }
            if failed == 0 {
                println!("\nall checks passed");
            } else {
                println!("\n{failed} check(s) failed");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use zmesh_redirect::Feature;

    const NOW_S: u64 = 1_700_000_000;
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_S)
    }

    fn feature(name: &'static str, since: &'static str, probe: Probe) -> Feature {
        Feature {
            name,
            needed_for: "testing",
            since,
            probe,
        }
    }

    fn features(required: Vec<Feature>, tcx: Probe) -> KernelFeatures {
        KernelFeatures {
            required,
            tcx: feature("TCX links", "6.6", tcx),
        }
    }

    #[test]
    fn kernel_check_names_each_missing_feature_and_the_kernel_that_has_it() {
        let all = features(
            vec![
                feature("ring buffer maps", "5.8", Probe::Present),
                feature("bpf_sk_assign()", "5.7", Probe::Present),
            ],
            Probe::Absent,
        );
        let ok = kernel_features("6.1.0-57-amd64\n", &all);
        assert_eq!(ok.status, Status::Pass, "{ok}");
        assert!(ok.detail.contains("6.1.0-57-amd64: all 2 present"), "{ok}");

        // the release string plays no part: an old number with the features passes
        let backported = kernel_features("5.14.0-427.el9.x86_64", &all);
        assert_eq!(backported.status, Status::Pass);

        let lacking = features(
            vec![
                feature("ring buffer maps", "5.8", Probe::Absent),
                feature("bpf_sk_assign()", "5.7", Probe::Absent),
                feature("LRU hash maps", "4.10", Probe::Present),
            ],
            Probe::Absent,
        );
        let fail = kernel_features("5.4.0", &lacking);
        assert_eq!(fail.status, Status::Fail);
        assert!(
            fail.detail
                .contains("ring buffer maps (testing; Linux 5.8 has it)")
                && fail
                    .detail
                    .contains("bpf_sk_assign() (testing; Linux 5.7 has it)")
                && !fail.detail.contains("LRU"),
            "{fail}"
        );
        assert!(fail.hint.unwrap().contains(FLOOR));

        let unprobed = features(
            vec![feature(
                "ring buffer maps",
                "5.8",
                Probe::Unknown("EPERM".into()),
            )],
            Probe::Absent,
        );
        let warn = kernel_features("6.1", &unprobed);
        assert_eq!(warn.status, Status::Warn);
        assert!(warn.hint.unwrap().contains("root"));
    }

    #[test]
    fn tc_attach_is_tcx_or_a_clsact_filter_whose_modules_must_exist() {
        let tcx = features(vec![], Probe::Present);
        let c = tc_attach(&tcx, |_| false);
        assert_eq!((c.status, c.detail.as_str()), (Status::Pass, "TCX links"));

        let no_tcx = features(vec![], Probe::Absent);
        let c = tc_attach(&no_tcx, |_| true);
        assert_eq!(c.status, Status::Pass);
        assert!(
            c.detail.contains("clsact") && c.detail.contains("6.6"),
            "{c}"
        );

        let c = tc_attach(&no_tcx, |m| m != "cls_bpf");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.contains("cls_bpf") && !c.detail.contains("sch_ingress"),
            "{c}"
        );

        let c = tc_attach(&features(vec![], Probe::Unknown("EPERM".into())), |_| true);
        assert_eq!(c.status, Status::Warn);
    }

    #[test]
    fn mounts_find_bpffs_and_cgroup2() {
        let both = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let got = mounts(both);
        assert!(got.iter().all(|c| c.status == Status::Pass), "{got:?}");
        assert!(got[1].detail.contains("/sys/fs/cgroup"));
        // cgroup v1 only and no bpffs: both fail, with hints.
        let none = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n";
        let got = mounts(none);
        assert!(
            got.iter()
                .all(|c| c.status == Status::Fail && c.hint.is_some()),
            "{got:?}"
        );
    }

    #[test]
    fn pins_need_every_map_and_link() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("zmesh");
        assert_eq!(pins(&pin).status, Status::Fail, "absent dir");
        std::fs::create_dir_all(pin.join("maps")).unwrap();
        std::fs::create_dir_all(pin.join("links")).unwrap();
        for m in EXPECTED_MAPS {
            std::fs::write(pin.join("maps").join(m), "").unwrap();
        }
        for l in EXPECTED_LINKS {
            std::fs::write(pin.join("links").join(l), "").unwrap();
        }
        let no_tc = pins(&pin);
        assert_eq!(no_tc.status, Status::Fail);
        assert!(no_tc.detail.contains("tc_ingress"), "{}", no_tc.detail);
        std::fs::write(pin.join("links/tc_ingress_eth0"), "").unwrap();
        std::fs::write(pin.join("links/tc_clsact_veth1"), "").unwrap();
        let ok = pins(&pin);
        assert_eq!(ok.status, Status::Pass, "{}", ok.detail);
        assert!(
            ok.detail.contains("eth0 (TCX)") && ok.detail.contains("veth1 (clsact filter)"),
            "{}",
            ok.detail
        );
        std::fs::remove_file(pin.join("maps/zm_events")).unwrap();
        let missing = pins(&pin);
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.detail.contains("maps/zm_events"),
            "{}",
            missing.detail
        );
    }

    fn cert(workload: &str, not_after: Option<u64>, last_error: Option<&str>) -> CertInfo {
        CertInfo {
            workload: workload.into(),
            serial: Some("01".into()),
            not_after,
            next_attempt: None,
            last_error: last_error.map(Into::into),
            consecutive_failures: 0,
        }
    }

    #[test]
    fn workload_certificates_must_be_valid() {
        let got = workload_certs(
            Ok(vec![
                cert(
                    "spiffe://cluster.local/ns/a/sa/ok",
                    Some(NOW_S + 7200),
                    None,
                ),
                cert(
                    "spiffe://cluster.local/ns/a/sa/flaky",
                    Some(NOW_S + 60),
                    Some("CA down"),
                ),
                cert(
                    "spiffe://cluster.local/ns/a/sa/old",
                    Some(NOW_S - 60),
                    Some("CA down"),
                ),
                cert("spiffe://cluster.local/ns/a/sa/none", None, None),
            ]),
            now(),
        );
        let statuses: Vec<Status> = got.iter().map(|c| c.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Pass,
                Status::Pass,
                Status::Warn,
                Status::Fail,
                Status::Fail
            ]
        );
        assert!(
            got[1].detail.contains("expires in 2h00m"),
            "{}",
            got[1].detail
        );
        assert!(
            got[3].detail.contains("expired 1m ago"),
            "{}",
            got[3].detail
        );
        assert!(got[3].hint.as_deref().unwrap().contains("CA down"));
        let down = workload_certs(Err("cannot reach the agent".into()), now());
        assert_eq!(down.len(), 1);
        assert_eq!(down[0].status, Status::Fail);
        assert!(down[0].hint.as_deref().unwrap().contains("agent running"));
    }

    #[test]
    fn clock_skew_is_reported_only_when_visible() {
        let ahead = clock_skew(Some(now() + Duration::from_secs(600)), now());
        assert_eq!(ahead.status, Status::Fail);
        assert!(ahead.hint.unwrap().contains("time synchronization"));
        let fine = clock_skew(Some(now() - Duration::from_secs(600)), now());
        assert_eq!(fine.status, Status::Warn);
        assert!(fine.detail.contains("not measurable"));
        assert_eq!(clock_skew(None, now()).status, Status::Skip);
    }

    /// A CA and a node credential it issued, valid over [nb, na] (seconds since epoch).
    fn credential(nb: u64, na: u64) -> (NodeCredentials, String) {
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::new(vec![]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "node-1");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let t = |s: u64| time::OffsetDateTime::from_unix_timestamp(s as i64).unwrap();
        leaf.not_before = t(nb);
        leaf.not_after = t(na);
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let creds = NodeCredentials {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            roots_pem: issuer.pem(),
        };
        (creds, issuer.pem())
    }

    #[test]
    fn node_credential_must_be_current_and_chain_to_the_bundle() {
        let (good, _) = credential(NOW_S - 3600, NOW_S + 86400);
        let ok = node_credential(Ok(&good), now());
        assert_eq!(ok.status, Status::Pass, "{ok}");
        assert!(ok.detail.contains("chains to the bundle"), "{ok}");

        let (expired, _) = credential(NOW_S - 7200, NOW_S - 3600);
        let e = node_credential(Ok(&expired), now());
        assert_eq!(e.status, Status::Fail);
        assert!(e.detail.contains("expired"), "{e}");

        let (future, _) = credential(NOW_S + 3600, NOW_S + 7200);
        let f = node_credential(Ok(&future), now());
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.hint.unwrap().contains("clock"),
            "future NotBefore points at the clock"
        );

        // Another CA's bundle: does not chain.
        let (_, other_root) = credential(NOW_S - 3600, NOW_S + 86400);
        let foreign = NodeCredentials {
            roots_pem: other_root,
            ..good.clone()
        };
        let c = node_credential(Ok(&foreign), now());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("does not chain"), "{c}");

        let missing = node_credential(Err("cannot load from /x".into()), now());
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.hint.unwrap().contains("zmesh ca join"));
    }

    /// base64url without padding, for test tokens.
    fn b64(data: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn token_mode_checks_the_token_and_the_bundle_not_a_node_credential() {
        let (_, roots) = credential(NOW_S - 3600, NOW_S + 86400);
        let (tf, bf) = (Path::new("/t/token"), Path::new("/t/roots.pem"));
        let token = jwt(serde_json::json!({"aud": ["zmesh-ca"], "exp": NOW_S + 3600}));
        assert_eq!(
            jwt_claims(&token).unwrap()["aud"],
            serde_json::json!(["zmesh-ca"])
        );
        let ok = ca_token(tf, Ok(token.clone()), bf, Ok(roots.clone()), now());
        assert_eq!(ok.status, Status::Pass, "{ok}");
        assert!(
            ok.detail.contains("audience zmesh-ca, expires in 1h00m")
                && ok.detail.contains("1 CA root(s)"),
            "{ok}"
        );
        let expired = jwt(serde_json::json!({"aud": "zmesh-ca", "exp": NOW_S - 60}));
        let c = ca_token(tf, Ok(expired), bf, Ok(roots.clone()), now());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("expired 1m ago"), "{c}");
        let c = ca_token(tf, Ok("not-a-jwt".into()), bf, Ok(roots.clone()), now());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("not a ServiceAccount token"), "{c}");
        let c = ca_token(tf, Err("No such file".into()), bf, Ok(roots), now());
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.unwrap().contains(POD_CA_TOKEN));
        let c = ca_token(tf, Ok(token), bf, Err("No such file".into()), now());
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.hint.as_deref().unwrap().contains("zmesh ca bundle"),
            "{c}"
        );
        assert!(c.hint.unwrap().contains("README.md#kubernetes"));
    }

    #[test]
    fn hints_name_the_manifests_namespace_and_link_the_readme() {
        let down = workload_certs(Err("cannot reach the agent".into()), now());
        let hint = down[0].hint.as_deref().unwrap();
        // examples/kubernetes deploys into zmesh-system
        assert!(hint.contains("kubectl -n zmesh-system get pods"), "{hint}");
        let manifests = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/kubernetes/30-agent.yaml"
        ))
        .unwrap();
        assert!(manifests.contains("namespace: zmesh-system"));
        assert!(manifests.contains("app.kubernetes.io/name: zmesh-agent"));
        assert!(manifests.contains(&format!("--ca-token-file={POD_CA_TOKEN}")));
        assert!(hint.contains("README.md#kubernetes"), "{hint}");
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        // every anchor a hint links to is a section of the README
        let missing = node_credential(Err("cannot load".into()), now());
        assert!(missing.hint.as_deref().unwrap().contains("--ca-token-file"));
        for c in [
            &down[0],
            &missing,
            &btf(Path::new("/nonexistent")),
            &pins(Path::new("/nonexistent")),
        ]
        .into_iter()
        .chain(mounts("").iter())
        {
            let hint = c.hint.as_deref().unwrap();
            let anchor = hint
                .split("README.md#")
                .nth(1)
                .unwrap_or_else(|| panic!("no README link in {hint}"));
            let found = readme.lines().any(|l| {
                l.starts_with('#')
                    && l.trim_start_matches('#')
                        .trim()
                        .to_lowercase()
                        .replace(|c: char| !c.is_alphanumeric() && c != ' ' && c != '-', "")
                        .replace(' ', "-")
                        == anchor
            });
            assert!(found, "no README section for #{anchor}");
        }
    }
}
