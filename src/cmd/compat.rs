//! `zmesh compat`: tools for moving to zmesh from other meshes.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use zmesh_compat::cilium::{self, Format, MigrateOptions};
use zmesh_identity::TrustDomain;

#[derive(clap::Args)]
pub struct CompatArgs {
    #[command(subcommand)]
    command: CompatCommand,
}

#[derive(clap::Subcommand)]
enum CompatCommand {
    /// Translate Cilium mutual-auth policies (CiliumNetworkPolicy and
    /// CiliumClusterwideNetworkPolicy rules with `authentication.mode: required`) into
    /// namespace enrollments and Istio AuthorizationPolicies.
    ///
    /// The objects go to standard output, ready for `kubectl apply -f -`; the report of
    /// what could not be carried over goes to standard error. Untranslatable peers and
    /// ports are left out, so the generated policies never allow more than Cilium did.
    ///
    /// Exit status: 0 when everything was carried over; 3 when something was not (an
    /// item of the report, e.g. a dropped L7 rule, or a generated policy that allows
    /// nothing), unless --allow-partial; 1 on an error (unreadable input, no Cilium policy
    /// in it).
    MigrateMutualAuth(MigrateArgs),
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// YAML files holding Cilium policies (several documents per file; "-" reads stdin).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Encoding of the generated objects.
    #[arg(long, value_enum, default_value_t = OutputFormat::Yaml)]
    output: OutputFormat,
    /// Encoding of the report.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    report: ReportFormat,
    /// Trust domain of the generated principals.
    #[arg(long, default_value = zmesh_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Namespace for policies of cluster-wide scope (Istio's root namespace).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Exit 0 even when something was not carried over (the report still lists it).
    #[arg(long)]
    allow_partial: bool,
}

/// The exit status of a migration that left something out (without --allow-partial).
pub const EXIT_PARTIAL: u8 = 3;

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Yaml,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

pub async fn run(args: CompatArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CompatCommand::MigrateMutualAuth(args) => migrate(args),
    }
}

fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    let mut inputs = Vec::new();
    for file in &args.files {
        let text = if file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        inputs.push((file.display().to_string(), text));
    }
    let options = MigrateOptions {
        trust_domain,
        root_namespace: args.root_namespace,
    };
    let migration = cilium::migrate(&inputs, &options)?;
    let format = match args.output {
        OutputFormat::Yaml => Format::Yaml,
        OutputFormat::Json => Format::Json,
    };
    let objects = migration.render(format)?;
    std::io::stdout()
        .write_all(objects.as_bytes())
        .context("writing the objects")?;
    let report = match args.report {
        ReportFormat::Text => migration.report_text(),
        ReportFormat::Json => {
            let value = serde_json::json!({
                "policiesRead": migration.policies_read,
                "policiesWithAuthentication": migration.policies_with_auth,
                "authorizationPolicies": migration.policies.len(),
                "namespaces": migration.namespaces,
                "notCarriedOver": migration.findings,
                "complete": migration.is_complete(),
            });
            serde_json::to_string_pretty(&value)? + "\n"
        }
    };
    std::io::stderr()
        .write_all(report.as_bytes())
        .context("writing the report")?;
    if migration.is_complete() || args.allow_partial {
        return Ok(ExitCode::SUCCESS);
    }
    if let ReportFormat::Text = args.report {
        eprintln!(
            "partial migration (exit status {EXIT_PARTIAL}): review the items above, or pass --allow-partial to accept them"
        );
    }
    Ok(ExitCode::from(EXIT_PARTIAL))
}
