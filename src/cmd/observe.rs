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
    #[arg(short = 'n', long, value_name = "NS")]
    namespace: Vec<String>,
    /// Flows from or to this pod: NAME-PREFIX or NS/NAME-PREFIX. Repeatable.
    #[arg(long, value_name = "[NS/]NAME")]
    pod: Vec<String>,
    /// Flows from or to this SPIFFE ID (with or without spiffe://). Repeatable.
    #[arg(long, value_name = "ID")]
    identity: Vec<String>,
    /// Flows from or to this port. Repeatable.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    port: Vec<u16>,
    /// Flows from pods of this namespace. Repeatable.
    #[arg(long, value_name = "NS")]
    from_namespace: Vec<String>,
    /// Flows to pods of this namespace. Repeatable.
    #[arg(long, value_name = "NS")]
    to_namespace: Vec<String>,
    /// Flows from this pod ([NS/]NAME-PREFIX). Repeatable.
    #[arg(long, value_name = "[NS/]NAME")]
    from_pod: Vec<String>,
    /// Flows to this pod ([NS/]NAME-PREFIX). Repeatable.
    #[arg(long, value_name = "[NS/]NAME")]
    to_pod: Vec<String>,
    /// Flows from this SPIFFE ID. Repeatable.
    #[arg(long, value_name = "ID")]
    from_identity: Vec<String>,
    /// Flows to this SPIFFE ID. Repeatable.
    #[arg(long, value_name = "ID")]
    to_identity: Vec<String>,
    /// Flows from this source port. Repeatable.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    from_port: Vec<u16>,
    /// Flows to this destination port. Repeatable.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    to_port: Vec<u16>,
    /// Only flows with this verdict. Repeatable.
    #[arg(long, value_enum)]
    verdict: Vec<VerdictArg>,
    /// Only encrypted (mTLS) or only plaintext flows.
    #[arg(long, value_name = "BOOL")]
    encrypted: Option<bool>,
    /// Only flows the node saw leaving (outbound) or arriving at (inbound) its pods.
    #[arg(long, value_enum)]
    direction: Option<DirectionArg>,
    /// Only connections opening (established) or closing (ended, refused, dropped).
    #[arg(long, value_enum)]
    phase: Option<PhaseArg>,
    /// Flows since this time: a duration back from now (5m, 2h) or RFC 3339.
    #[arg(long, value_name = "5m|RFC3339", value_parser = check_since)]
    since: Option<String>,
    /// Flows before this time: a duration back from now (1m) or RFC 3339.
    #[arg(long, value_name = "1m|RFC3339", value_parser = check_since)]
    until: Option<String>,
    /// Only the last N matching flows of the history (then live ones with --follow).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    last: Option<u64>,
    /// Keep streaming new flows until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// table: aligned columns, coloured on a terminal; compact: one hubble-like line per
    /// flow; json: one JSON object per line (snake_case keys, RFC 3339 times).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PhaseArg {
    Open,
    Close,
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    /// One line per flow (`human` is an older name for it).
    #[value(alias = "human")]
    Compact,
    Json,
}

/// Fails early on a `--since` the agent would refuse.
fn check_since(s: &str) -> Result<String, String> {
    parse_since(s, SystemTime::now()).map(|_| s.to_owned())
}

/// The admin API path for these arguments.
fn query(args: &ObserveArgs) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    pairs.extend(args.namespace.iter().map(|v| ("namespace", v.clone())));
    pairs.extend(args.pod.iter().map(|v| ("pod", v.clone())));
    pairs.extend(args.identity.iter().map(|v| ("identity", v.clone())));
    pairs.extend(args.port.iter().map(|v| ("port", v.to_string())));
    let ends = [
        ("from_namespace", &args.from_namespace),
        ("to_namespace", &args.to_namespace),
        ("from_pod", &args.from_pod),
        ("to_pod", &args.to_pod),
        ("from_identity", &args.from_identity),
        ("to_identity", &args.to_identity),
    ];
    for (key, values) in ends {
        pairs.extend(values.iter().map(|v| (key, v.clone())));
    }
    pairs.extend(args.from_port.iter().map(|v| ("from_port", v.to_string())));
    pairs.extend(args.to_port.iter().map(|v| ("to_port", v.to_string())));
    pairs.extend(
        args.verdict
            .iter()
            .map(|v| ("verdict", FlowVerdict::from(*v).as_str().to_owned())),
    );
    if let Some(e) = args.encrypted {
        pairs.push(("encrypted", e.to_string()));
    }
    if let Some(d) = args.direction {
        let d = match d {
            DirectionArg::Inbound => "inbound",
            DirectionArg::Outbound => "outbound",
        };
        pairs.push(("direction", d.into()));
    }
    if let Some(p) = args.phase {
        let p = match p {
            PhaseArg::Open => "open",
            PhaseArg::Close => "close",
        };
        pairs.push(("phase", p.into()));
    }
    if let Some(s) = &args.since {
        pairs.push(("since", s.clone()));
    }
    if let Some(u) = &args.until {
        pairs.push(("until", u.clone()));
    }
    if let Some(n) = args.last {
        pairs.push(("last", n.to_string()));
    }
    if args.follow {
        pairs.push(("follow", "true".into()));
    }
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", crate::cmd::percent_encode(v)))
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
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    if args.output == Output::Table {
        println!("{}", table_header());
    }
    while let Some(line) = lines.next().await {
        let line = line?;
        if args.output == Output::Json {
            println!("{line}");
            continue;
        }
        let event: FlowEvent = serde_json::from_str(&line)
            .with_context(|| format!("malformed flow from the agent: {line}"))?;
        match args.output {
            Output::Table => println!("{}", table_row(&event, colour)),
            _ => println!("{event}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

const TABLE_COLUMNS: [(&str, usize); 7] = [
    ("TIME", 24),
    ("DIR", 4),
    ("SOURCE", 34),
    ("DESTINATION", 34),
    ("MTLS", 4),
    ("EVENT", 9),
    ("DETAILS", 0),
];

fn table_header() -> String {
    let cells: Vec<String> = TABLE_COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
    pad_row(&cells)
}

/// Cells padded to the fixed column widths (flows stream: no width is known in advance).
fn pad_row(cells: &[String]) -> String {
    let mut line = String::new();
    for (cell, (_, width)) in cells.iter().zip(TABLE_COLUMNS) {
        line.push_str(cell);
        let shown = cell.chars().count();
        if width > 0 {
            line.push_str(&" ".repeat(width.saturating_sub(shown) + 2));
        }
    }
    line.trim_end().to_owned()
}

fn end(e: &zmesh_proxy::flows::FlowEndpoint) -> String {
    match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}:{}", e.addr.port()),
        _ => e.addr.to_string(),
    }
}

/// One flow as a table row; the event in colour on a terminal (green forwarded, red
/// denied or dropped, yellow error).
fn table_row(e: &FlowEvent, colour: bool) -> String {
    use zmesh_proxy::flows::{FlowDirection, FlowPhase};
    let event = match (e.phase, e.verdict) {
        (FlowPhase::Open, _) => "OPEN",
        (FlowPhase::Close, FlowVerdict::Forwarded) => "CLOSED",
        (FlowPhase::Close, FlowVerdict::Denied) => "DENIED",
        (FlowPhase::Close, FlowVerdict::Dropped) => "DROPPED",
        (FlowPhase::Close, FlowVerdict::Error) => "ERROR",
    };
    let mut details = Vec::new();
    if let Some(id) = &e.source.identity {
        details.push(format!(
            "from {}",
            id.strip_prefix("spiffe://").unwrap_or(id)
        ));
    }
    if let Some(service) = &e.service {
        details.push(format!("service {service}"));
    }
    match (e.denial(), &e.reason) {
        (Some(d), _) => details.push(d.to_string()),
        (None, Some(r)) => details.push(r.clone()),
        _ => {}
    }
    if e.phase == FlowPhase::Close
        && (e.bytes_sent + e.bytes_received > 0 || e.verdict == FlowVerdict::Forwarded)
    {
        details.push(format!(
            "sent={}B recv={}B {}ms",
            e.bytes_sent,
            e.bytes_received,
            e.duration().as_millis()
        ));
    }
    let cells = [
        FlowEvent::format_time(e.time),
        match e.direction {
            Some(FlowDirection::Inbound) => "in".into(),
            Some(FlowDirection::Outbound) => "out".into(),
            None => "-".into(),
        },
        end(&e.source),
        end(&e.destination),
        if e.encrypted { "yes" } else { "no" }.into(),
        event.to_owned(),
        details.join(", "),
    ];
    let row = pad_row(&cells);
    if !colour {
        return row;
    }
    let code = match (e.phase, e.verdict) {
        (FlowPhase::Open, _) => "36",
        (_, FlowVerdict::Forwarded) => "32",
        (_, FlowVerdict::Denied | FlowVerdict::Dropped) => "31",
        (_, FlowVerdict::Error) => "33",
    };
    // Colour the event cell only: the row stays readable when copied.
    row.replacen(
        &format!(" {event}"),
        &format!(" \x1b[{code}m{event}\x1b[0m"),
        1,
    )
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
    fn end_and_event_filters_become_the_admin_query() {
        let args = parse(&[
            "-n",
            "shop",
            "--from-pod",
            "shop/frontend",
            "--to-identity",
            "cluster.local/ns/shop/sa/web",
            "--to-port",
            "8080",
            "--port",
            "443",
            "--direction",
            "inbound",
            "--phase",
            "open",
            "--until",
            "1m",
            "--last",
            "20",
        ])
        .unwrap();
        assert_eq!(
            query(&args),
            "/flows?namespace=shop&port=443&from_pod=shop%2Ffrontend\
             &to_identity=cluster.local%2Fns%2Fshop%2Fsa%2Fweb&to_port=8080&direction=inbound\
             &phase=open&until=1m&last=20"
        );
    }

    fn flow(json: serde_json::Value) -> FlowEvent {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn table_rows_are_golden() {
        let open = flow(serde_json::json!({
            "time": "2026-12-06T10:00:00.123456Z", "phase": "open", "direction": "inbound",
            "source": {"namespace": "shop", "pod": "frontend", "identity": "spiffe://cluster.local/ns/shop/sa/frontend", "addr": "10.0.2.3:40000"},
            "destination": {"namespace": "shop", "pod": "web", "identity": "spiffe://cluster.local/ns/shop/sa/web", "addr": "10.0.1.2:8080"},
            "bytes_sent": 0, "bytes_received": 0, "duration_us": 0, "verdict": "forwarded", "encrypted": true
        }));
        assert_eq!(
            table_row(&open, false),
            "2026-12-06T10:00:00.123Z  in    shop/frontend:40000                 shop/web:8080                       yes   OPEN       from cluster.local/ns/shop/sa/frontend"
        );
        let dropped = flow(serde_json::json!({
            "time": "2026-12-06T10:00:01Z", "direction": "inbound",
            "source": {"addr": "10.0.2.9:5555"},
            "destination": {"namespace": "shop", "pod": "web", "addr": "10.0.1.2:8080"},
            "bytes_sent": 0, "bytes_received": 0, "duration_us": 0, "verdict": "dropped",
            "encrypted": false, "reason": "plaintext_strict"
        }));
        assert_eq!(
            table_row(&dropped, false),
            "2026-12-06T10:00:01Z      in    10.0.2.9:5555                       shop/web:8080                       no    DROPPED    plaintext_strict"
        );
        // On a terminal only the event is coloured.
        assert!(table_row(&dropped, true).contains(" \x1b[31mDROPPED\x1b[0m"));
        assert_eq!(
            table_header(),
            "TIME                      DIR   SOURCE                              DESTINATION                         MTLS  EVENT      DETAILS"
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_asking_the_agent() {
        for (argv, want) in [
            (&["--verdict", "lost"][..], "lost"),
            (&["--since", "yesterday"][..], "neither a duration"),
            (&["--encrypted", "maybe"][..], "maybe"),
            (&["--to-port", "0"][..], "0"),
            (&["--last", "0"][..], "0"),
            (&["--phase", "middle"][..], "middle"),
            (&["--until", "later"][..], "neither a duration"),
        ] {
            let e = parse(argv).err().unwrap();
            assert!(e.contains(want), "{argv:?}: {e}");
        }
    }
}
