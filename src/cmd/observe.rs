//! `zmesh observe`: the node's flows (forwarded, denied, dropped, failed), like
//! `hubble observe`, from the agent's admin API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use futures::StreamExt;
use zmesh_agent::admin::AdminClient;
use zmesh_agent::flows_api::parse_since;
use zmesh_proxy::flows::{FlowEvent, FlowVerdict};

#[derive(clap::Args)]
pub struct ObserveArgs {
    /// The node agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = "/run/zmesh/agent.sock")]
    admin_socket: PathBuf,
    /// Flows from or to pods of this namespace. Repeatable.
    #[arg(long, value_name = "NS")]
    namespace: Vec<String>,
    /// Flows from or to this pod: NAME-PREFIX or NS/NAME-PREFIX. Repeatable.
    #[arg(long, value_name = "[NS/]NAME")]
    pod: Vec<String>,
    /// Flows from or to this SPIFFE ID (with or without spiffe://). Repeatable.
    #[arg(long, value_name = "ID")]
    identity: Vec<String>,
    /// Only flows with this verdict. Repeatable.
    #[arg(long, value_enum)]
    verdict: Vec<VerdictArg>,
    /// Only encrypted (mTLS) or only plaintext flows.
    #[arg(long, value_name = "BOOL")]
    encrypted: Option<bool>,
    /// Flows since this time: a duration back from now (5m, 2h) or RFC 3339.
    #[arg(long, value_name = "5m|RFC3339", value_parser = check_since)]
    since: Option<String>,
    /// Keep streaming new flows until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VerdictArg {
    Forwarded,
    Denied,
    Dropped,
    Error,
}

impl From<VerdictArg> for FlowVerdict {
    fn from(v: VerdictArg) -> Self {
        match v {
            VerdictArg::Forwarded => FlowVerdict::Forwarded,
            VerdictArg::Denied => FlowVerdict::Denied,
            VerdictArg::Dropped => FlowVerdict::Dropped,
            VerdictArg::Error => FlowVerdict::Error,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Human,
    Json,
}

/// Fails early on a `--since` the agent would refuse.
fn check_since(s: &str) -> Result<String, String> {
    parse_since(s, SystemTime::now()).map(|_| s.to_owned())
}

/// Percent-encodes a query value (SPIFFE IDs carry `:` and `/`, times carry `+`).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The admin API path for these arguments.
fn query(args: &ObserveArgs) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    pairs.extend(args.namespace.iter().map(|v| ("namespace", v.clone())));
    pairs.extend(args.pod.iter().map(|v| ("pod", v.clone())));
    pairs.extend(args.identity.iter().map(|v| ("identity", v.clone())));
    pairs.extend(
        args.verdict
            .iter()
            .map(|v| ("verdict", FlowVerdict::from(*v).as_str().to_owned())),
    );
    if let Some(e) = args.encrypted {
        pairs.push(("encrypted", e.to_string()));
    }
    if let Some(s) = &args.since {
        pairs.push(("since", s.clone()));
    }
    if args.follow {
        pairs.push(("follow", "true".into()));
    }
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    if q.is_empty() {
        "/flows".into()
    } else {
        format!("/flows?{}", q.join("&"))
    }
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin_socket);
    let mut lines = Box::pin(client.lines(http::Method::GET, &query(&args)).await?);
    while let Some(line) = lines.next().await {
        let line = line?;
        match args.output {
            Output::Json => println!("{line}"),
            Output::Human => {
                let event: FlowEvent = serde_json::from_str(&line)
                    .with_context(|| format!("malformed flow from the agent: {line}"))?;
                println!("{event}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ObserveArgs,
    }

    fn parse(argv: &[&str]) -> Result<ObserveArgs, String> {
        let mut full = vec!["observe"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn arguments_become_the_admin_query() {
        assert_eq!(query(&parse(&[]).unwrap()), "/flows");
        let args = parse(&[
            "--namespace",
            "prod",
            "--pod",
            "prod/db",
            "--identity",
            "spiffe://cluster.local/ns/web/sa/frontend",
            "--verdict",
            "denied",
            "--verdict",
            "dropped",
            "--encrypted",
            "false",
            "--since",
            "2023-11-14T22:13:20+01:00",
            "--follow",
        ])
        .unwrap();
        assert_eq!(
            query(&args),
            "/flows?namespace=prod&pod=prod%2Fdb&identity=spiffe%3A%2F%2Fcluster.local%2Fns%2Fweb%2Fsa%2Ffrontend\
             &verdict=denied&verdict=dropped&encrypted=false&since=2023-11-14T22%3A13%3A20%2B01%3A00&follow=true"
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_asking_the_agent() {
        for (argv, want) in [
            (&["--verdict", "lost"][..], "lost"),
            (&["--since", "yesterday"][..], "neither a duration"),
            (&["--encrypted", "maybe"][..], "maybe"),
        ] {
            let e = parse(argv).err().unwrap();
            assert!(e.contains(want), "{argv:?}: {e}");
        }
    }
}
