//! `zmesh version`: this binary's version and, when the node agent answers on its admin
//! socket, the agent's. Nothing is guessed: an agent that cannot be reached, or that does
//! not report its version (`GET /version` is not served), is said to be so.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use zmesh_agent::admin::{AdminClient, AdminError};

/// The crate version this binary was built as.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit it was built from (build.rs), when the build knew it.
pub const GIT_COMMIT: Option<&str> = option_env!("ZMESH_GIT_COMMIT");

#[derive(clap::Args)]
pub struct VersionArgs {
    /// The node agent's admin socket: the agent's version is asked for there.
    #[arg(
        long = "admin-socket",
        alias = "agent-socket",
        value_name = "PATH",
        default_value = "/run/zmesh/agent.sock"
    )]
    agent_socket: PathBuf,
    /// Only this binary's version: do not ask the agent.
    #[arg(long)]
    client: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Human,
    Json,
    Yaml,
}

/// A version as `GET /version` on the admin API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
    #[serde(default)]
    pub git_commit: Option<String>,
}

/// The agent's `GET /version`: its build, and the CA's version as the CA last named it to
/// the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentAnswer {
    #[serde(flatten)]
    pub build: BuildInfo,
    #[serde(default)]
    pub ca_version: Option<String>,
}

/// What is known of the agent's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// The agent answered with its version.
    Reported,
    /// The agent answered, but does not report a version (no `/version` endpoint).
    NotReported,
    /// Nothing answered on the socket.
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentVersion {
    pub socket: PathBuf,
    pub state: AgentState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// The zmesh CA's version, as the CA last named it to this agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_version: Option<String>,
    /// Why there is no version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub client: BuildInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentVersion>,
}

pub fn client() -> BuildInfo {
    BuildInfo {
        version: VERSION.to_owned(),
        git_commit: GIT_COMMIT.map(str::to_owned),
    }
}

/// The agent's answer to `GET /version`, classified, with the CA's version it passed on.
pub fn agent_report(socket: PathBuf, answer: Result<AgentAnswer, AdminError>) -> AgentVersion {
    let ca_version = answer.as_ref().ok().and_then(|a| a.ca_version.clone());
    let answer = answer.map(|a| a.build);
    let (state, info, reason) = match answer {
        Ok(info) => (AgentState::Reported, Some(info), None),
        Err(e @ AdminError::Connect { .. }) => {
            let reason = super::error_chain(&anyhow::Error::new(e));
            (AgentState::Unreachable, None, Some(reason))
        }
        Err(AdminError::Status { status: 404, .. }) => (
            AgentState::NotReported,
            None,
            Some("the agent has no version endpoint (GET /version): an older agent".to_owned()),
        ),
        Err(e) => (AgentState::NotReported, None, Some(e.to_string())),
    };
    let (version, git_commit) = match info {
        Some(i) => (Some(i.version), i.git_commit),
        None => (None, None),
    };
    AgentVersion {
        socket,
        state,
        version,
        git_commit,
        ca_version,
        reason,
    }
}

fn describe(info: &BuildInfo) -> String {
    match &info.git_commit {
        Some(c) => format!("zmesh {} (git {c})", info.version),
        None => format!("zmesh {} (git commit unknown)", info.version),
    }
}

/// The report for humans.
pub fn human(report: &Report) -> String {
    let mut out = format!("client: {}\n", describe(&report.client));
    if let Some(agent) = &report.agent {
        let reason = agent.reason.as_deref().unwrap_or("");
        let line = match agent.state {
            AgentState::Reported => describe(&BuildInfo {
                version: agent.version.clone().unwrap_or_default(),
                git_commit: agent.git_commit.clone(),
            }),
            AgentState::NotReported => format!("not reported ({reason})"),
            AgentState::Unreachable => format!("unreachable ({reason})"),
        };
        out.push_str(&format!("agent:  {line}\n"));
        if agent.state == AgentState::Reported {
            let ca = match &agent.ca_version {
                Some(v) => format!("zmesh {v} (as it last answered the agent)"),
                None => "not known (the agent has not heard from a zmesh CA)".into(),
            };
            out.push_str(&format!("ca:     {ca}\n"));
        }
    }
    out
}

pub async fn run(args: VersionArgs) -> anyhow::Result<ExitCode> {
    let agent = if args.client {
        None
    } else {
        let answer = AdminClient::new(&args.agent_socket)
            .get_json::<AgentAnswer>("/version")
            .await;
        Some(agent_report(args.agent_socket.clone(), answer))
    };
    let report = Report {
        client: client(),
        agent,
    };
    match args.output {
        Output::Human => print!("{}", human(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&report)?),
    }
    // The client's version was printed: an agent that cannot say its own is reported,
    // not an error (scripts read `agent.state`).
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_version(socket: PathBuf, answer: Result<BuildInfo, AdminError>) -> AgentVersion {
        agent_report(
            socket,
            answer.map(|build| AgentAnswer {
                build,
                ca_version: None,
            }),
        )
    }

    #[test]
    fn agent_answers_are_reported_as_they_are() {
        let sock = PathBuf::from("/run/zmesh/agent.sock");
        let ok = agent_version(
            sock.clone(),
            Ok(BuildInfo {
                version: "0.2.0".into(),
                git_commit: Some("abc".into()),
            }),
        );
        assert_eq!(ok.state, AgentState::Reported);
        let r = Report {
            client: client(),
            agent: Some(ok),
        };
        assert!(
            human(&r).contains("agent:  zmesh 0.2.0 (git abc)"),
            "{}",
            human(&r)
        );

        let old = agent_version(
            sock.clone(),
            Err(AdminError::Status {
                status: 404,
                message: "not found".into(),
            }),
        );
        assert_eq!(old.state, AgentState::NotReported);
        assert!(old.version.is_none());

        let down = agent_version(
            sock.clone(),
            Err(AdminError::Connect {
                path: sock.clone(),
                source: std::io::Error::from_raw_os_error(2), // ENOENT,
            }),
        );
        assert_eq!(down.state, AgentState::Unreachable);
        let reason = down.reason.unwrap();
        assert_eq!(
            reason.matches("os error 2").count(),
            1,
            "the OS error once: {reason}"
        );
    }
}
