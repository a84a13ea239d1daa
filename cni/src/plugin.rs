//! One invocation of the plugin, from environment and stdin to stdout and exit status.

use crate::client::{self, AgentError};
use crate::config::{result_ips, Config, FailurePolicy, SUPPORTED_VERSIONS};
use crate::env::{self, CniCommand, CniEnv};
use crate::error::{CniError, NamespaceKnowledge, Unreachable};
use crate::log::{Level, Logger};
use crate::protocol::{Command, EnrolledNamespaces, Outcome, Pod, Reply, Request};
use serde_json::json;
use std::ffi::OsString;
use std::io;
use std::net::IpAddr;
use std::path::Path;

/// What the process prints and how it exits.
#[derive(Debug)]
pub struct Output {
    pub stdout: Option<String>,
    pub exit_code: u8,
}

/// Runs the command named by `CNI_COMMAND`. `get` reads the environment; `stdin` is what
/// the runtime wrote (the network configuration).
pub fn run(get: impl Fn(&str) -> Option<OsString>, stdin: io::Result<Vec<u8>>) -> Output {
    // Errors are written in the configuration's version when it has a usable one.
    let version = match &stdin {
        Ok(bytes) => Config::version_of(bytes),
        Err(_) => Config::version_of(b""),
    };
    let mut logger = Logger::stderr("zmesh-cni".into());
    match run_command(&get, stdin, &version, &mut logger) {
        Ok(stdout) => Output {
            stdout,
            exit_code: 0,
        },
        Err(error) => {
            logger.log(Level::Error, &error.to_string());
            Output {
                stdout: Some(error.to_json(&version).to_string()),
                exit_code: 1,
            }
        }
    }
}

fn run_command(
    get: &impl Fn(&str) -> Option<OsString>,
    stdin: io::Result<Vec<u8>>,
    version: &str,
    logger: &mut Logger,
) -> Result<Option<String>, CniError> {
    let command = env::command(get)?;
    if command == CniCommand::Version {
        let info = json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS});
        return Ok(Some(info.to_string()));
    }
    let env = CniEnv::read(command, get)?;
    let context = match env.pod() {
        Some(pod) => format!(
            "{} {}/{} (container {})",
            command.name(),
            pod.namespace,
            pod.name,
            env.container_id()
        ),
        None => format!("{} (container {})", command.name(), env.container_id()),
    };
    logger.set_context(context.clone());
    let config = Config::parse(&stdin.map_err(CniError::Stdin)?)?;
    if let Some(path) = &config.log_file {
        *logger = Logger::to_file(path, context);
    }
    match command {
        // Nothing to check before an ADD (each ADD decides on its own, whatever the agent's
        // state) and no resources of our own to collect: the agent holds the enrollments.
        CniCommand::Status | CniCommand::Gc | CniCommand::Version => Ok(None),
        CniCommand::Add => {
            let ips = result_ips(config.require_prev_result()?)?;
            enroll(Command::Add, &env, &config, ips, logger)?;
            Ok(Some(config.add_result()?.to_string()))
        }
        CniCommand::Check => {
            let ips = result_ips(config.require_prev_result()?)?;
            enroll(Command::Check, &env, &config, ips, logger)?;
            Ok(None)
        }
        CniCommand::Del => {
            del(&env, &config, logger);
            Ok(None)
        }
    }
}

fn request(command: Command, env: &CniEnv, pod: Pod, ips: Vec<IpAddr>) -> Request {
    Request {
        command,
        container_id: env.container_id().to_owned(),
        netns: env.netns.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
        pod,
        ips,
    }
}

/// ADD and CHECK: asks the agent, and decides by the failure policy if it cannot.
fn enroll(
    command: Command,
    env: &CniEnv,
    config: &Config,
    ips: Vec<IpAddr>,
    logger: &Logger,
) -> Result<(), CniError> {
    let Some(pod) = env.pod() else {
        logger.log(
            Level::Info,
            "not a Kubernetes pod (no K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS): passed through",
        );
        return Ok(());
    };
    if config.exclude_namespaces.contains(&pod.namespace) {
        logger.log(Level::Info, "namespace excluded: passed through");
        return Ok(());
    }
    let request = request(command, env, pod.clone(), ips);
    match client::call(&config.agent_socket, &request, config.agent_timeout) {
        Ok(Reply {
            outcome: outcome @ (Outcome::Enrolled | Outcome::NotEnrolled),
            message,
        }) => {
            let outcome = if outcome == Outcome::Enrolled {
                "enrolled"
            } else {
                "not enrolled"
            };
            logger.log(Level::Info, &format!("agent: {outcome}: {message}"));
            Ok(())
        }
        Ok(Reply {
            outcome: Outcome::Error,
            message,
        }) => Err(CniError::AgentRefused {
            command,
            pod,
            message,
        }),
        Err(reason) => agent_unreachable(command, config, pod, reason, logger),
    }
}

/// The agent gave no answer: `closed` lets the pod through only if its namespace is known
/// not to be enrolled; `open` lets every pod through.
fn agent_unreachable(
    command: Command,
    config: &Config,
    pod: Pod,
    reason: AgentError,
    logger: &Logger,
) -> Result<(), CniError> {
    let socket = config.agent_socket.display();
    match config.failure_policy {
        FailurePolicy::Open => {
            logger.log(
                Level::Warn,
                &format!(
                    "zmesh agent not reachable at {socket}: {reason}; pod {}/{} passed through \
                     without enrollment (failure_policy open): if its namespace is enrolled, its \
                     connections are not protected until the agent enrolls it",
                    pod.namespace, pod.name
                ),
            );
            Ok(())
        }
        FailurePolicy::Closed => {
            let namespace = match read_state(&config.state_file) {
                Ok(state) if state.enrolled_namespaces.contains(&pod.namespace) => {
                    NamespaceKnowledge::Enrolled
                }
                Ok(state) => {
                    logger.log(
                        Level::Info,
                        &format!(
                            "zmesh agent not reachable at {socket}: {reason}; namespace {} is not \
                             enrolled (state file {}, written at {}): passed through",
                            pod.namespace,
                            config.state_file.display(),
                            state.written_at
                        ),
                    );
                    return Ok(());
                }
                Err(error) => NamespaceKnowledge::Unknown {
                    state_file: config.state_file.clone(),
                    reason: error,
                },
            };
            Err(CniError::AgentUnreachable(Box::new(Unreachable {
                command,
                socket: config.agent_socket.clone(),
                reason,
                pod,
                namespace,
            })))
        }
    }
}

/// The agent's enrolled-namespaces file; any failure (absent, unreadable, half-written) is
/// "we cannot know".
fn read_state(path: &Path) -> Result<EnrolledNamespaces, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not valid: {e}"))
}

/// DEL: tells the agent, best effort, and always succeeds (the spec asks DEL to tolerate
/// whatever is already gone; a failing DEL would also hold up the pod's removal).
fn del(env: &CniEnv, config: &Config, logger: &Logger) {
    let Some(pod) = env.pod() else {
        return;
    };
    if config.exclude_namespaces.contains(&pod.namespace) {
        return;
    }
    // The cached ADD result, when the runtime has one, helps the agent find the pod.
    let ips = match config.prev_result.as_ref().and_then(|r| r.as_object()) {
        Some(result) => result_ips(result).unwrap_or_default(),
        None => Vec::new(),
    };
    let request = request(Command::Del, env, pod, ips);
    match client::call(&config.agent_socket, &request, config.del_timeout()) {
        Ok(reply) => logger.log(
            Level::Info,
            &format!("agent: {:?}: {}", reply.outcome, reply.message),
        ),
        Err(reason) => logger.log(
            Level::Warn,
            &format!(
                "zmesh agent not reachable at {}: {reason}; DEL succeeds anyway",
                config.agent_socket.display()
            ),
        ),
    }
}
