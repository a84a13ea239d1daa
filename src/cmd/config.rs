//! `zmesh config workloads|services|policies|connections|certificates` (what a node agent
//! holds now, like `istioctl ztunnel-config`) and `zmesh log` (its log level at run time),
//! from the agent's admin API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::Serialize;
use zmesh_agent::admin::{AdminClient, CertInfo};
use zmesh_agent::config_api::{LogLevel, PoliciesConfig, ServiceConfig, WorkloadConfig};
use zmesh_proxy::connections::OpenConnection;
use zmesh_proxy::flows::FlowEndpoint;

const DEFAULT_SOCKET: &str = "/run/zmesh/agent.sock";

#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// The workload table: pods, their IPs, identities and protocol (hbone: enrolled).
    Workloads(Common),
    /// Services: VIPs, ports and the endpoints connections are balanced over.
    Services(Common),
    /// AuthorizationPolicies in force, and the invalid ones with their reason.
    Policies(Common),
    /// Connections open now through this node's proxy, with both identities.
    Connections(Common),
    /// Workload certificates held: identity, expiry, renewal state.
    Certificates(Common),
}

#[derive(clap::Args)]
struct Common {
    /// The node agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// Only this namespace (of the workload, Service or policy; of either end of a
    /// connection; of the certificate's identity).
    #[arg(short = 'n', long, value_name = "NS")]
    namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How results are printed: a table (more columns with `wide`), or the admin API's
/// documents as JSON or YAML (snake_case keys, RFC 3339 times).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(clap::Args)]
pub struct LogArgs {
    /// The node agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// The new log filter: a level (trace, debug, info, warn, error, off) or
    /// `target=level` pairs, e.g. `info,access=debug`. Without it, prints the current one.
    #[arg(long, value_name = "FILTER")]
    level: Option<String>,
}

pub async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Workloads(c) => {
            let mut all: Vec<WorkloadConfig> = get(&c, "/config/workloads").await?;
            all.retain(|w| c.namespace.as_deref().is_none_or(|ns| w.namespace == ns));
            print(&c, &all, |wide| workloads_table(&all, wide))
        }
        What::Services(c) => {
            let mut all: Vec<ServiceConfig> = get(&c, "/config/services").await?;
            all.retain(|s| c.namespace.as_deref().is_none_or(|ns| s.namespace == ns));
            print(&c, &all, |wide| services_table(&all, wide))
        }
        What::Policies(c) => {
            let mut all: PoliciesConfig = get(&c, "/config/policies").await?;
            if let Some(ns) = &c.namespace {
                all.policies.retain(|p| &p.namespace == ns);
                all.invalid.retain(|p| p.namespace.as_ref() == Some(ns));
            }
            print(&c, &all, |wide| policies_table(&all, wide))
        }
        What::Connections(c) => {
            let mut all: Vec<OpenConnection> = get(&c, "/config/connections").await?;
            all.retain(|conn| {
                c.namespace.as_deref().is_none_or(|ns| {
                    [&conn.source, &conn.destination]
                        .iter()
                        .any(|e| e.namespace.as_deref() == Some(ns))
                })
            });
            let now = SystemTime::now();
            print(&c, &all, |wide| connections_table(&all, wide, now))
        }
        What::Certificates(c) => {
            let mut all: Vec<CertInfo> = get(&c, "/certs").await?;
            all.retain(|cert| {
                c.namespace
                    .as_deref()
                    .is_none_or(|ns| cert.workload.contains(&format!("/ns/{ns}/")))
            });
            let now = SystemTime::now();
            print(&c, &all, |wide| certificates_table(&all, wide, now))
        }
    }
}

pub async fn log(args: LogArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin_socket);
    let answer: LogLevel = match &args.level {
        None => client.get_json("/log").await?,
        Some(level) => {
            zmesh_agent::config_api::check_filter(level)
                .map_err(|e| anyhow::anyhow!("invalid log level: {e}"))?;
            let path = format!("/log?level={}", crate::cmd::percent_encode(level));
            client.send_json(http::Method::PUT, &path).await?
        }
    };
    println!("{}", answer.level);
    Ok(ExitCode::SUCCESS)
}

async fn get<T: for<'de> serde::Deserialize<'de>>(c: &Common, path: &str) -> anyhow::Result<T> {
    AdminClient::new(&c.admin_socket)
        .get_json(path)
        .await
        .with_context(|| format!("GET {path}"))
}

fn print<T: Serialize>(
    c: &Common,
    value: &T,
    table: impl FnOnce(bool) -> String,
) -> anyhow::Result<ExitCode> {
    match c.output {
        Output::Table => print!("{}", table(false)),
        Output::Wide => print!("{}", table(true)),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Columns padded to their widest cell, two spaces apart; trailing spaces trimmed.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn workloads_table(all: &[WorkloadConfig], wide: bool) -> String {
    let mut headers = vec!["NAMESPACE", "NAME", "NODE", "IPS", "PROTOCOL", "IDENTITY"];
    if wide {
        headers.extend(["WORKLOAD", "SERVICE ACCOUNT"]);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|w| {
            let mut row = vec![
                w.namespace.clone(),
                w.name.clone(),
                w.node.clone(),
                join(&w.ips),
                w.protocol.to_uppercase(),
                w.identity.clone(),
            ];
            if wide {
                row.extend([w.workload_name.clone(), w.service_account.clone()]);
            }
            row
        })
        .collect();
    render_table(&headers, &rows)
}

fn services_table(all: &[ServiceConfig], wide: bool) -> String {
    let headers = ["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"];
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}->{}", p.port, p.target_port))
                .collect();
            let endpoints = if wide {
                let names: Vec<String> = s
                    .endpoints
                    .iter()
                    .map(|e| match &e.pod {
                        Some(pod) => format!("{pod}({})", e.ip),
                        None => e.ip.to_string(),
                    })
                    .collect();
                join(&names)
            } else {
                s.endpoints.len().to_string()
            };
            vec![
                s.namespace.clone(),
                s.name.clone(),
                join(&s.vips),
                join(&ports),
                endpoints,
            ]
        })
        .collect();
    render_table(&headers, &rows)
}

fn policies_table(all: &PoliciesConfig, wide: bool) -> String {
    let headers = ["NAMESPACE", "NAME", "ACTION", "SELECTOR", "RULES"];
    let rows: Vec<Vec<String>> = all
        .policies
        .iter()
        .map(|p| {
            let selector = match &p.selector {
                None if p.namespace == all.root_namespace => "(every namespace)".into(),
                None => "(whole namespace)".into(),
                Some(labels) => labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            };
            vec![
                p.namespace.clone(),
                p.name.clone(),
                p.action.clone(),
                selector,
                p.rules.to_string(),
            ]
        })
        .collect();
    let mut out = render_table(&headers, &rows);
    if !all.invalid.is_empty() {
        out.push_str(&format!("\nINVALID ({}):\n", all.invalid.len()));
        let mut headers = vec!["POLICY", "ENFORCED INSTEAD"];
        if wide {
            headers.push("REASON");
        }
        let rows: Vec<Vec<String>> = all
            .invalid
            .iter()
            .map(|p| {
                let mut row = vec![p.policy.clone(), p.enforced.clone()];
                if wide {
                    row.push(p.reason.clone());
                }
                row
            })
            .collect();
        out.push_str(&render_table(&headers, &rows));
        if !wide {
            out.push_str("(-o wide shows why each is invalid)\n");
        }
    }
    out
}

fn endpoint(e: &FlowEndpoint) -> String {
    match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}:{}", e.addr.port()),
        _ => e.addr.to_string(),
    }
}

fn identity(e: &FlowEndpoint) -> String {
    e.identity
        .as_deref()
        .map(|id| id.strip_prefix("spiffe://").unwrap_or(id).to_owned())
        .unwrap_or_else(|| "-".into())
}

/// `3s`, `4m10s`, `2h5m`, `3d4h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

fn connections_table(all: &[OpenConnection], wide: bool, now: SystemTime) -> String {
    let mut headers = vec![
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "SERVICE",
        "MTLS",
        "AGE",
        "SENT",
        "RECEIVED",
    ];
    if wide {
        headers.extend(["SOURCE IDENTITY", "DESTINATION IDENTITY"]);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            let mut row = vec![
                c.direction.as_str().to_owned(),
                endpoint(&c.source),
                endpoint(&c.destination),
                c.service.clone().unwrap_or_else(|| "-".into()),
                if c.encrypted { "yes" } else { "no" }.into(),
                age(now.duration_since(c.opened).unwrap_or_default()),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
            ];
            if wide {
                row.extend([identity(&c.source), identity(&c.destination)]);
            }
            row
        })
        .collect();
    render_table(&headers, &rows)
}

fn certificates_table(all: &[CertInfo], wide: bool, now: SystemTime) -> String {
    let mut headers = vec!["IDENTITY", "EXPIRES", "STATE"];
    if wide {
        headers.extend(["SERIAL", "LAST ERROR"]);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            let (expires, state) = match c.not_after {
                None => ("-".to_owned(), "missing".to_owned()),
                Some(secs) => {
                    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                    let shown = zmesh_proxy::flows::FlowEvent::format_time(at);
                    match at.duration_since(now) {
                        Ok(left) => (shown, format!("valid ({} left)", age(left))),
                        Err(_) => (shown, "expired".to_owned()),
                    }
                }
            };
            let mut row = vec![
                c.workload
                    .strip_prefix("spiffe://")
                    .unwrap_or(&c.workload)
                    .to_owned(),
                expires,
                state,
            ];
            if wide {
                row.extend([
                    c.serial.clone().unwrap_or_else(|| "-".into()),
                    c.last_error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            row
        })
        .collect();
    render_table(&headers, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim() {
        let t = render_table(
            &["A", "LONGER"],
            &[
                vec!["x".into(), "1".into()],
                vec!["wide cell".into(), "".into()],
            ],
        );
        assert_eq!(t, "A          LONGER\nx          1\nwide cell\n");
    }

    fn doc<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn workload_and_policy_tables_are_golden() {
        let workloads: Vec<WorkloadConfig> = doc(serde_json::json!([
            {"namespace": "shop", "name": "web-5d8f-x1", "workload_name": "web", "node": "node1",
             "ips": ["10.0.1.2", "fd00::2"], "protocol": "hbone",
             "identity": "spiffe://cluster.local/ns/shop/sa/web", "service_account": "web"},
            {"namespace": "legacy", "name": "batch", "workload_name": "batch", "node": "node2",
             "ips": ["10.0.2.5"], "protocol": "tcp",
             "identity": "spiffe://cluster.local/ns/legacy/sa/batch", "service_account": "batch"}
        ]));
        assert_eq!(
            workloads_table(&workloads, false),
            "NAMESPACE  NAME         NODE   IPS               PROTOCOL  IDENTITY\n\
             shop       web-5d8f-x1  node1  10.0.1.2,fd00::2  HBONE     spiffe://cluster.local/ns/shop/sa/web\n\
             legacy     batch        node2  10.0.2.5          TCP       spiffe://cluster.local/ns/legacy/sa/batch\n"
        );
        assert!(workloads_table(&workloads, true).starts_with(
            "NAMESPACE  NAME         NODE   IPS               PROTOCOL  IDENTITY                                   WORKLOAD  SERVICE ACCOUNT\n"
        ));
        let policies: PoliciesConfig = doc(serde_json::json!({
            "root_namespace": "istio-system",
            "policies": [
                {"namespace": "istio-system", "name": "deny-legacy", "action": "DENY", "rules": 1},
                {"namespace": "shop", "name": "allow-frontend", "action": "ALLOW",
                 "selector": {"app": "web"}, "rules": 2}
            ],
            "invalid": [{"policy": "shop/bad", "reason": "spec.rules[0].to[0].operation.methods: HTTP fields are not supported (L4 only)",
                         "enforced": "fail-closed: ALLOW nothing for what it selects"}]
        }));
        assert_eq!(
            policies_table(&policies, false),
            "NAMESPACE     NAME            ACTION  SELECTOR           RULES\n\
             istio-system  deny-legacy     DENY    (every namespace)  1\n\
             shop          allow-frontend  ALLOW   app=web            2\n\
             \n\
             INVALID (1):\n\
             POLICY    ENFORCED INSTEAD\n\
             shop/bad  fail-closed: ALLOW nothing for what it selects\n\
             (-o wide shows why each is invalid)\n"
        );
        assert!(policies_table(&policies, true).contains("HTTP fields are not supported"));
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age(Duration::from_secs(5)), "5s");
        assert_eq!(age(Duration::from_secs(250)), "4m10s");
        assert_eq!(age(Duration::from_secs(7500)), "2h5m");
        assert_eq!(age(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d4h");
    }
}
