//! `zmesh certs`: operator tools for workload certificates.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::Serialize;
use zmesh_agent::admin::{epoch_seconds, AdminClient, CertInfo as AgentCert, RotateResult};
use zmesh_identity::svid::{describe, fmt_time, CertInfo};
use zmesh_identity::{lint_chain, SpiffeId, TrustBundle};

#[derive(clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(clap::Subcommand)]
enum CertsCommand {
    /// Show a certificate chain and check it against every X.509-SVID rule.
    ///
    /// Exits non-zero when the leaf breaks a rule or (with --bundle) does not chain to
    /// the given roots.
    Inspect(InspectArgs),
    /// Every workload certificate a running node agent holds: identity, serial, expiry,
    /// time to renewal and the last error.
    Status(StatusArgs),
    /// Renew workload certificates now, reporting each workload's result (or the CA's error).
    Rotate(RotateArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The node agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = "/run/zmesh/agent.sock")]
    admin_socket: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["workload", "all"])))]
struct RotateArgs {
    /// The workload to renew, NAMESPACE/SERVICEACCOUNT.
    #[arg(long, value_name = "NS/SA")]
    workload: Option<String>,
    /// Renew every workload certificate of the node.
    #[arg(long)]
    all: bool,
    #[arg(long, value_name = "PATH", default_value = "/run/zmesh/agent.sock")]
    admin_socket: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// PEM file holding the chain, leaf first ("-" reads standard input).
    input: PathBuf,
    /// PEM roots to validate the chain against (as roots of the leaf's trust domain).
    #[arg(long, value_name = "ROOTS.pem")]
    bundle: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Human,
    Json,
}

pub async fn run(args: CertsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CertsCommand::Inspect(args) => inspect(args),
        CertsCommand::Status(args) => status(args).await,
        CertsCommand::Rotate(args) => rotate(args).await,
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin_socket);
    let certs: Vec<AgentCert> = client.get_json("/certs").await?;
    if let Output::Json = args.output {
        println!("{}", serde_json::to_string_pretty(&certs)?);
        return Ok(ExitCode::SUCCESS);
    }
    if certs.is_empty() {
        println!("no workload certificates on this node");
        return Ok(ExitCode::SUCCESS);
    }
    let now = epoch_seconds(SystemTime::now());
    println!(
        "{:<52} {:<20} {:<22} {:>12} {:>12}  ERROR",
        "WORKLOAD", "SERIAL", "EXPIRES", "EXPIRES IN", "RENEWS IN"
    );
    let mut healthy = true;
    for c in &certs {
        let serial = c.serial.as_deref().map(short_serial).unwrap_or("-".into());
        let expires = c
            .not_after
            .map(|t| fmt_time(SystemTime::UNIX_EPOCH + Duration::from_secs(t)))
            .unwrap_or_else(|| "-".into());
        let left = c.not_after.map(|t| human_seconds(t as i64 - now as i64));
        let renew = c.next_attempt.map(|t| human_seconds(t as i64 - now as i64));
        healthy &= c.not_after.is_some_and(|t| t > now);
        println!(
            "{:<52} {:<20} {:<22} {:>12} {:>12}  {}",
            c.workload,
            serial,
            expires,
            left.unwrap_or_else(|| "-".into()),
            renew.unwrap_or_else(|| "-".into()),
            c.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin_socket);
    let query = match &args.workload {
        Some(w) => format!("/certs/rotate?workload={w}"),
        None => "/certs/rotate?all=true".to_owned(),
    };
    let mut lines = Box::pin(client.lines(http::Method::POST, &query).await?);
    let mut failed = 0;
    let mut total = 0;
    while let Some(line) = futures::StreamExt::next(&mut lines).await {
        let line = line?;
        let result: RotateResult = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("malformed answer from the agent: {e}"))?;
        total += 1;
        if !result.ok {
            failed += 1;
        }
        match args.output {
            Output::Json => println!("{line}"),
            Output::Human if result.ok => println!(
                "renewed {}: serial {}, expires {}",
                result.workload,
                result
                    .serial
                    .as_deref()
                    .map(short_serial)
                    .unwrap_or("-".into()),
                result
                    .not_after
                    .map(|t| fmt_time(SystemTime::UNIX_EPOCH + Duration::from_secs(t)))
                    .unwrap_or_else(|| "-".into())
            ),
            Output::Human => println!(
                "FAILED  {}: {}",
                result.workload,
                result.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
    if let Output::Human = args.output {
        println!("{} of {total} renewed", total - failed);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn short_serial(serial: &str) -> String {
    if serial.len() > 20 {
        format!("{}…", &serial[..19])
    } else {
        serial.to_owned()
    }
}

/// `1h02m`, `45s`, `-3m10s` (negative: in the past).
fn human_seconds(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    match s {
        0..=59 => format!("{sign}{s}s"),
        60..=3599 => format!("{sign}{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{sign}{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{sign}{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[derive(Serialize)]
struct Report {
    spiffe_id: Option<String>,
    not_before: String,
    not_after: String,
    /// Negative once expired.
    seconds_left: i64,
    chain: Vec<CertReport>,
    bundle_checked: bool,
    violations: Vec<Violation>,
    ok: bool,
}

#[derive(Serialize)]
struct CertReport {
    subject: String,
    issuer: String,
    serial: String,
    not_before: String,
    not_after: String,
    is_ca: bool,
    uri_sans: Vec<String>,
}

#[derive(Serialize)]
struct Violation {
    rule: &'static str,
    message: String,
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let pem = read_input(&args.input)?;
    let chain = zmesh_identity::pem::parse_certs(&pem)
        .with_context(|| format!("reading certificates from {}", args.input.display()))?;
    let infos = chain
        .iter()
        .enumerate()
        .map(|(i, der)| describe(der).with_context(|| format!("certificate #{i}")))
        .collect::<anyhow::Result<Vec<CertInfo>>>()?;
    let leaf = &infos[0];
    let spiffe_id = match leaf.uri_sans.as_slice() {
        [one] => SpiffeId::parse(one).ok(),
        _ => None,
    };

    let bundle = match &args.bundle {
        None => None,
        Some(path) => {
            let roots = std::fs::read(path)
                .with_context(|| format!("reading the bundle {}", path.display()))?;
            let mut bundle = TrustBundle::new();
            // Roots are trusted for the leaf's own trust domain; a leaf without a usable ID
            // fails its ID rule anyway.
            if let Some(id) = &spiffe_id {
                bundle
                    .add_pem(id.trust_domain(), &roots)
                    .with_context(|| format!("loading the bundle {}", path.display()))?;
            }
            Some(bundle)
        }
    };

    let now = SystemTime::now();
    let violations: Vec<Violation> = lint_chain(&chain, bundle.as_ref(), now)
        .into_iter()
        .map(|e| Violation {
            rule: e.rule_name(),
            message: e.to_string(),
        })
        .collect();
    let report = Report {
        spiffe_id: spiffe_id.map(|id| id.to_string()),
        not_before: fmt_time(leaf.not_before),
        not_after: fmt_time(leaf.not_after),
        seconds_left: seconds_between(now, leaf.not_after),
        chain: infos
            .iter()
            .map(|c| CertReport {
                subject: c.subject.clone(),
                issuer: c.issuer.clone(),
                serial: c.serial.clone(),
                not_before: fmt_time(c.not_before),
                not_after: fmt_time(c.not_after),
                is_ca: c.is_ca,
                uri_sans: c.uri_sans.clone(),
            })
            .collect(),
        bundle_checked: bundle.is_some(),
        ok: violations.is_empty(),
        violations,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print!("{}", human(&report)),
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn read_input(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        Ok(buf)
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn seconds_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn human(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let id = r.spiffe_id.as_deref().unwrap_or("(none)");
    let left = if r.seconds_left >= 0 {
        format!("expires in {}", span(r.seconds_left.unsigned_abs()))
    } else {
        format!("expired {} ago", span(r.seconds_left.unsigned_abs()))
    };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "SPIFFE ID:  {id}");
    let _ = writeln!(
        out,
        "Validity:   {} .. {} ({left})",
        r.not_before, r.not_after
    );
    let _ = writeln!(out, "Chain:");
    for (i, c) in r.chain.iter().enumerate() {
        let subject = if c.subject.is_empty() {
            "(empty)"
        } else {
            &c.subject
        };
        let kind = if i == 0 {
            "leaf"
        } else if c.is_ca {
            "CA"
        } else {
            "cert"
        };
        let _ = writeln!(out, "  [{i}] {kind}");
        let _ = writeln!(out, "      subject: {subject}");
        let _ = writeln!(out, "      issuer:  {}", c.issuer);
        let _ = writeln!(out, "      serial:  {}", c.serial);
        let _ = writeln!(out, "      valid:   {} .. {}", c.not_before, c.not_after);
        for uri in &c.uri_sans {
            let _ = writeln!(out, "      uri:     {uri}");
        }
    }
    let untrusted = r
        .violations
        .iter()
        .any(|v| matches!(v.rule, "svid.untrusted-chain" | "svid.trust-domain-unknown"));
    let trust = match (r.bundle_checked, r.spiffe_id.is_some(), untrusted) {
        (false, _, _) => "not checked (no --bundle)",
        (true, false, _) => "not checked (the leaf has no usable SPIFFE ID)",
        (true, true, true) => "does NOT chain to the given bundle",
        (true, true, false) => "chains to the given bundle",
    };
    let _ = writeln!(out, "Trust:      {trust}");
    if r.ok {
        let _ = writeln!(out, "Result:     OK, a valid X.509-SVID");
    } else {
        let _ = writeln!(out, "Result:     {} violation(s)", r.violations.len());
        for v in &r.violations {
            let _ = writeln!(out, "  {}: {}", v.rule, v.message);
        }
    }
    out
}

/// "3d 4h", "5h 2m", "42s": coarse on purpose, it is for eyes.
fn span(secs: u64) -> String {
    let d = Duration::from_secs(secs);
    let (days, hours, mins) = (secs / 86400, (secs % 86400) / 3600, (secs % 3600) / 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins}m")
    } else if mins > 0 {
        format!("{mins}m {}s", secs % 60)
    } else {
        format!("{}s", d.as_secs())
    }
}
