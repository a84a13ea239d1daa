//! `zmesh proxy`: runs the node proxy alone, from a static workload table and certificates
//! read from a directory (see zmesh_proxy::workloads and zmesh_proxy::StaticCredentials for
//! the formats) or issued by the zmesh CA.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::static_proxy::{serve, StaticProxyArgs};
use zmesh_agent::ca::{zmesh_ca_certificates, CaSettings};
use zmesh_agent::credentials::ManagedCredentials;
use zmesh_proxy::{StaticCredentials, TlsCredentials};

#[derive(clap::Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub table: StaticProxyArgs,
    /// Directory with roots.pem and <namespace>/<service-account>.pem + .key.
    #[arg(long, value_name = "DIR", required_unless_present = "ca")]
    pub cert_dir: Option<PathBuf>,
    /// Get the local workloads' certificates from the zmesh CA at HOST:PORT instead,
    /// authenticated with the node credential in --credentials (from `zmesh ca join`).
    #[arg(
        long,
        value_name = "HOST:PORT",
        conflicts_with = "cert_dir",
        requires = "credentials"
    )]
    pub ca: Option<String>,
    /// Directory with this node's credential (node.pem, node.key, ca-bundle.pem), with --ca.
    #[arg(long, value_name = "DIR")]
    pub credentials: Option<PathBuf>,
    /// Lifetime asked of the CA for workload certificates, with --ca.
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    pub cert_lifetime: std::time::Duration,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    zmesh_proxy::runtime::tune_malloc();
    let table = args.table.load_table()?;
    let node = &args.table.node;
    let credentials: Arc<dyn TlsCredentials> = match (&args.cert_dir, &args.ca) {
        (Some(cert_dir), _) => Arc::new(
            StaticCredentials::load_dir(cert_dir, table.trust_domain())
                .with_context(|| format!("loading certificates from {}", cert_dir.display()))?,
        ),
        (None, Some(ca)) => {
            let settings = CaSettings {
                node: node.clone(),
                trust_domain: table.trust_domain().clone(),
                ca_addr: ca.clone(),
                credentials_dir: args.credentials.clone().unwrap_or_default(),
                ca_token: None,
                cert_validity: args.cert_lifetime,
            };
            let ca = zmesh_ca_certificates(&settings)?;
            let (certs, bundle) = (ca.certs, ca.bundle);
            for w in table.workloads_on(node) {
                certs.ensure(&w.identity);
            }
            // Serve once the first certificates are in (or the CA said why not).
            for w in table.workloads_on(node) {
                let issued =
                    tokio::time::timeout(Duration::from_secs(30), certs.certificate(&w.identity));
                match issued.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(identity = %w.identity, "no certificate yet: {e}"),
                    Err(_) => {
                        tracing::warn!(identity = %w.identity, "no certificate after 30 s; still trying")
                    }
                }
            }
            Arc::new(ManagedCredentials::new(
                certs,
                bundle,
                table.trust_domain().clone(),
            ))
        }
        (None, None) => bail!("give certificates with --cert-dir or --ca"),
    };
    serve(args.table, table, credentials).await
}
