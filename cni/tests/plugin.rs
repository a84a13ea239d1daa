//! The real `zmesh-cni` binary, run as a container runtime runs it (environment + config on
//! stdin), against a fake node agent serving the protocol on a unix socket.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use zmesh_cni::protocol::Request;

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-cni");
const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=ctr-1;K8S_POD_UID=2b5e6f3a-uid";
const NETNS: &str = "/var/run/netns/cni-5a1b";
/// How long a test waits for something that should be immediate before calling it a
/// failure (not a sleep: it ends as soon as the thing happens).
const PATIENCE: Duration = Duration::from_secs(10);

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// The CNI error object on stdout, checked for shape.
    fn error(&self) -> (u64, String) {
        assert_ne!(self.status, 0, "expected a failure: {self:?}");
        let error = self.json();
        assert!(error["cniVersion"].is_string(), "{error}");
        let code = error["code"].as_u64().expect("code");
        let msg = error["msg"].as_str().expect("msg").to_owned();
        (code, msg)
    }

    fn assert_ok_silent(&self) {
        assert_eq!(self.status, 0, "{self:?}");
        assert_eq!(self.stdout.trim(), "", "{self:?}");
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {}, stdout {:?}, stderr {:?}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn exec(env: &[(&str, &str)], stdin: &str) -> Run {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zmesh-cni");
    let mut input = child.stdin.take().expect("stdin");
    // The plugin reads all of stdin first; a write error would show as a failed run below.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let output = child.wait_with_output().expect("wait for zmesh-cni");
    Run {
        status: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": NETNS}
        ],
        "ips": [
            {"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 2},
            {"address": "fd00:22::5/64", "gateway": "fd00:22::1", "interface": 2}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["shop.svc.cluster.local"]},
        "someFutureField": {"kept": [1, 2, 3]}
    })
}

enum StateFile {
    Listing,
    NotListing,
    Absent,
    Garbage,
}

/// One node's paths: the agent's socket, its state file, a log file.
struct Node {
    dir: TempDir,
}

impl Node {
    fn new() -> Node {
        Node {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("enrolled-namespaces.json")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("zmesh-cni.log")
    }

    fn state(&self, state: StateFile) {
        let text = match state {
            StateFile::Listing => json!({"enrolled_namespaces": ["payments", "shop"],
                                         "written_at": "2026-05-01T10:00:00Z"})
            .to_string(),
            StateFile::NotListing => json!({"enrolled_namespaces": ["payments"],
                                            "written_at": "2026-05-01T10:00:00Z"})
            .to_string(),
            StateFile::Absent => return,
            StateFile::Garbage => "{\"enrolled_namesp".to_owned(),
        };
        std::fs::write(self.state_file(), text).expect("write state file");
    }

    /// The plugin's entry of a conflist as the runtime hands it over: our keys, `extra`
    /// merged in, and the previous plugin's result.
    fn config(&self, extra: Value) -> String {
        let mut config = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "zmesh-cni",
            "agent_socket": self.socket(),
            "state_file": self.state_file(),
            "agent_timeout_seconds": 5,
            "prevResult": prev_result(),
        });
        for (key, value) in extra.as_object().expect("extra is an object") {
            if value.is_null() {
                config.as_object_mut().expect("object").remove(key);
            } else {
                config[key] = value.clone();
            }
        }
        config.to_string()
    }

    fn agent(&self, answer: Answer) -> FakeAgent {
        FakeAgent::start(UnixListener::bind(self.socket()).expect("bind"), answer)
    }
}

fn env<'a>(command: &'a str, without: &[&str]) -> Vec<(&'static str, &'a str)> {
    let all: [(&'static str, &'a str); 6] = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "ctr-1"),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", POD_ARGS),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    all.into_iter()
        .filter(|(name, _)| !without.contains(name))
        .collect()
}

fn with_args<'a>(command: &'a str, args: &'a str) -> Vec<(&'static str, &'a str)> {
    let mut vars = env(command, &["CNI_ARGS"]);
    vars.push(("CNI_ARGS", args));
    vars
}

#[derive(Clone, Copy)]
enum Answer {
    /// A reply line, as the agent would write it.
    Reply(&'static str),
    /// Reads the request and never answers (keeps the connection open).
    Silent,
    /// Reads the request and closes the connection.
    HangUp,
}

/// A node agent on a thread: records each request (the raw JSON line) and answers as told.
struct FakeAgent {
    requests: mpsc::Receiver<Value>,
}

impl FakeAgent {
    fn start(listener: UnixListener, answer: Answer) -> FakeAgent {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                // Recorded before answering, so it is there once the plugin has exited.
                let request = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(request).is_err() {
                    return;
                }
                match answer {
                    Answer::Reply(reply) => {
                        let _ = writeln!(&stream, "{reply}");
                    }
                    Answer::Silent => held.push(stream),
                    Answer::HangUp => drop(stream),
                }
            }
        });
        FakeAgent { requests: rx }
    }

    fn request(&self) -> Value {
        self.requests
            .recv_timeout(PATIENCE)
            .expect("the agent received no request")
    }

    /// No request came. Race-free: the plugin waits for the agent's answer, and the agent
    /// records a request before answering, so any request is recorded once the plugin exited.
    fn assert_no_request(&self) {
        if let Ok(request) = self.requests.try_recv() {
            panic!("the agent was asked: {request}");
        }
    }
}

const ENROLLED: Answer = Answer::Reply(r#"{"outcome":"enrolled","message":"netns cookie 4099"}"#);
const NOT_ENROLLED: Answer =
    Answer::Reply(r#"{"outcome":"not_enrolled","message":"namespace shop is not enrolled"}"#);
const REFUSED: Answer =
    Answer::Reply(r#"{"outcome":"error","message":"cannot open the pod's netns"}"#);

/// What ADD must print: the previous result, in the configuration's version.
fn passed_through(run: &Run, cni_version: &str) {
    assert_eq!(run.status, 0, "{run:?}");
    let mut expected = prev_result();
    expected["cniVersion"] = json!(cni_version);
    assert_eq!(run.json(), expected);
}

#[test]
fn version_lists_supported_versions() {
    for stdin in [r#"{"cniVersion":"0.4.0"}"#, ""] {
        let run = exec(&[("CNI_COMMAND", "VERSION")], stdin);
        assert_eq!(run.status, 0, "{run:?}");
        let info = run.json();
        let expected = if stdin.is_empty() { "1.0.0" } else { "0.4.0" };
        assert_eq!(info["cniVersion"], expected);
        assert_eq!(
            info["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}

#[test]
fn add_enrolled_passes_the_result_through_and_tells_the_agent_the_pod() {
    let node = Node::new();
    let agent = node.agent(ENROLLED);
    let run = exec(&env("ADD", &[]), &node.config(json!({})));
    passed_through(&run, "1.0.0");
    let request = agent.request();
    assert_eq!(
        request,
        json!({
            "command": "add", "container_id": "ctr-1", "netns": NETNS, "ifname": "eth0",
            "pod": {"namespace": "shop", "name": "web-0", "uid": "2b5e6f3a-uid"},
            "ips": ["10.22.0.5", "fd00:22::5"]
        })
    );
    // What the agent side will parse it with.
    let request: Request = serde_json::from_value(request).expect("a protocol Request");
    assert_eq!(request.ips.len(), 2);
    agent.assert_no_request();
}

#[test]
fn add_result_is_in_the_configured_version() {
    for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let node = Node::new();
        let _agent = node.agent(ENROLLED);
        let run = exec(
            &env("ADD", &[]),
            &node.config(json!({"cniVersion": version})),
        );
        passed_through(&run, version);
    }
}

#[test]
fn add_not_enrolled_passes_through() {
    let node = Node::new();
    let agent = node.agent(NOT_ENROLLED);
    let run = exec(&env("ADD", &[]), &node.config(json!({})));
    passed_through(&run, "1.0.0");
    assert_eq!(agent.request()["command"], "add");
}

#[test]
fn add_agent_error_fails_naming_the_pod_and_the_reason() {
    let node = Node::new();
    let _agent = node.agent(REFUSED);
    let run = exec(&env("ADD", &[]), &node.config(json!({})));
    let (code, msg) = run.error();
    assert_eq!(code, 100);
    assert_eq!(
        msg,
        "zmesh agent could not enroll pod shop/web-0: cannot open the pod's netns"
    );
}

#[test]
fn add_agent_never_answering_times_out() {
    let node = Node::new();
    node.state(StateFile::Listing);
    let _agent = node.agent(Answer::Silent);
    let config = node.config(json!({"agent_timeout_seconds": 0.5}));
    let run = exec(&env("ADD", &[]), &config);
    let (code, msg) = run.error();
    assert_eq!(code, 11);
    assert!(msg.contains("no answer within 500ms"), "{msg}");
    assert!(msg.contains("is in an enrolled namespace"), "{msg}");
    assert!(run.elapsed >= Duration::from_millis(500), "{run:?}");
    assert!(run.elapsed < PATIENCE, "{:?}", run.elapsed);

    let config = node.config(json!({"agent_timeout_seconds": 0.5, "failure_policy": "open"}));
    passed_through(&exec(&env("ADD", &[]), &config), "1.0.0");
}

#[test]
fn add_agent_hanging_up_counts_as_unreachable() {
    let node = Node::new();
    node.state(StateFile::Listing);
    let agent = node.agent(Answer::HangUp);
    let (code, msg) = exec(&env("ADD", &[]), &node.config(json!({}))).error();
    assert_eq!(code, 11);
    assert!(
        msg.contains("it closed the connection without answering"),
        "{msg}"
    );
    agent.request();
}

#[test]
fn add_agent_answering_nonsense_counts_as_unreachable() {
    let node = Node::new();
    node.state(StateFile::Listing);
    let _agent = node.agent(Answer::Reply(r#"{"outcome":"perhaps"}"#));
    let (code, msg) = exec(&env("ADD", &[]), &node.config(json!({}))).error();
    assert_eq!(code, 11);
    assert!(msg.contains("invalid answer"), "{msg}");
}

#[test]
fn add_agent_down_follows_the_failure_policy() {
    // (policy, state file, fails?)
    let cases = [
        ("closed", StateFile::Listing, true),
        ("closed", StateFile::NotListing, false),
        ("closed", StateFile::Absent, true),
        ("closed", StateFile::Garbage, true),
        ("open", StateFile::Listing, false),
        ("open", StateFile::NotListing, false),
        ("open", StateFile::Absent, false),
        ("open", StateFile::Garbage, false),
    ];
    for (policy, state, fails) in cases {
        let node = Node::new();
        node.state(state);
        let run = exec(
            &env("ADD", &[]),
            &node.config(json!({"failure_policy": policy})),
        );
        if !fails {
            passed_through(&run, "1.0.0");
            continue;
        }
        let (code, msg) = run.error();
        assert_eq!(code, 11, "{policy}: {msg}");
        let reached = format!(
            "zmesh agent not reachable at {}: cannot connect: No such file or directory (os error 2); pod shop/web-0 ",
            node.socket().display()
        );
        assert!(msg.starts_with(&reached), "{msg}");
        assert!(
            msg.ends_with("and is not started without mTLS (failure_policy closed)"),
            "{msg}"
        );
        if msg.contains("is in an enrolled namespace") {
            assert_eq!(
                msg,
                format!("{reached}is in an enrolled namespace and is not started without mTLS (failure_policy closed)")
            );
        } else {
            let unknown = format!(
                "may be in an enrolled namespace (no readable state file {}: ",
                node.state_file().display()
            );
            assert!(msg.contains(&unknown), "{msg}");
        }
    }
}

#[test]
fn add_agent_refusing_connections_follows_the_failure_policy() {
    let node = Node::new();
    node.state(StateFile::Listing);
    // A socket file nobody listens on: what a crashed agent leaves behind.
    drop(UnixListener::bind(node.socket()).expect("bind"));
    let (code, msg) = exec(&env("ADD", &[]), &node.config(json!({}))).error();
    assert_eq!(code, 11);
    assert!(msg.contains("Connection refused"), "{msg}");
    node.state(StateFile::NotListing);
    passed_through(&exec(&env("ADD", &[]), &node.config(json!({}))), "1.0.0");
}

#[test]
fn add_open_policy_logs_a_warning_to_the_log_file() {
    let node = Node::new();
    let run = exec(
        &env("ADD", &[]),
        &node.config(json!({"failure_policy": "open", "log_file": node.log_file()})),
    );
    passed_through(&run, "1.0.0");
    assert_eq!(run.stderr, "");
    let log = std::fs::read_to_string(node.log_file()).expect("log file");
    assert!(
        log.contains(" warn ADD shop/web-0 (container ctr-1): zmesh agent not reachable"),
        "{log}"
    );
    assert!(log.contains("failure_policy open"), "{log}");
}

#[test]
fn add_of_a_non_kubernetes_container_passes_through_without_the_agent() {
    let node = Node::new();
    let agent = node.agent(REFUSED);
    for args in ["IgnoreUnknown=1", ""] {
        let run = exec(&with_args("ADD", args), &node.config(json!({})));
        passed_through(&run, "1.0.0");
    }
    let run = exec(&env("ADD", &["CNI_ARGS"]), &node.config(json!({})));
    passed_through(&run, "1.0.0");
    agent.assert_no_request();
}

#[test]
fn add_in_an_excluded_namespace_passes_through_without_the_agent() {
    let node = Node::new();
    let agent = node.agent(REFUSED);
    let system = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0;K8S_POD_UID=u";
    passed_through(
        &exec(&with_args("ADD", system), &node.config(json!({}))),
        "1.0.0",
    );
    let config = node.config(json!({"exclude_namespaces": ["shop"]}));
    passed_through(&exec(&env("ADD", &[]), &config), "1.0.0");
    agent.assert_no_request();
    // An explicit list replaces the default: kube-system is asked about now.
    let (code, _) = exec(&with_args("ADD", system), &config).error();
    assert_eq!(code, 100);
    assert_eq!(agent.request()["pod"]["namespace"], "kube-system");
}

#[test]
fn bad_json_is_a_decode_failure() {
    let node = Node::new();
    for command in ["ADD", "DEL", "CHECK"] {
        let (code, _) = exec(&env(command, &[]), "{\"cniVersion\": ").error();
        assert_eq!(code, 6, "{command}");
        let (code, _) = exec(&env(command, &[]), "").error();
        assert_eq!(code, 6, "{command}");
    }
    // JSON, but not a configuration.
    let (code, _) = exec(&env("ADD", &[]), "[1, 2]").error();
    assert_eq!(code, 7);
    drop(node);
}

#[test]
fn missing_environment_is_invalid_env() {
    let node = Node::new();
    let config = node.config(json!({}));
    let (code, msg) = exec(&env("ADD", &["CNI_COMMAND"]), &config).error();
    assert_eq!((code, msg.contains("CNI_COMMAND")), (4, true), "{msg}");
    let (code, _) = exec(&env("DESTROY", &[]), &config).error();
    assert_eq!(code, 4);
    let required = [
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_IFNAME"),
        ("ADD", "CNI_NETNS"),
        ("CHECK", "CNI_CONTAINERID"),
        ("CHECK", "CNI_IFNAME"),
        ("CHECK", "CNI_NETNS"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
    ];
    for (command, var) in required {
        let (code, msg) = exec(&env(command, &[var]), &config).error();
        assert_eq!(code, 4, "{command} without {var}: {msg}");
        assert_eq!(msg, format!("{var} is required for {command}"));
    }
    let (code, msg) = exec(&with_args("ADD", "K8S_POD_NAME"), &config).error();
    assert_eq!(code, 4, "{msg}");
}

#[test]
fn add_and_check_need_a_previous_result() {
    let node = Node::new();
    let agent = node.agent(ENROLLED);
    for command in ["ADD", "CHECK"] {
        let (code, msg) = exec(
            &env(command, &[]),
            &node.config(json!({"prevResult": null})),
        )
        .error();
        assert_eq!(code, 7, "{command}");
        assert!(msg.contains("prevResult is missing"), "{msg}");
        for bad in [json!("x"), json!({"ips": [{"address": "10.22.0.5"}]})] {
            let (code, _) =
                exec(&env(command, &[]), &node.config(json!({"prevResult": bad}))).error();
            assert_eq!(code, 7, "{command} {bad}");
        }
    }
    agent.assert_no_request();
}

#[test]
fn invalid_plugin_configuration() {
    let node = Node::new();
    let (code, msg) = exec(
        &env("ADD", &[]),
        &node.config(json!({"failure_policy": "ajar"})),
    )
    .error();
    assert_eq!(code, 7);
    assert!(msg.contains("ajar"), "{msg}");
    let (code, _) = exec(
        &env("ADD", &[]),
        &node.config(json!({"agent_timeout_seconds": -1})),
    )
    .error();
    assert_eq!(code, 7);
    let run = exec(
        &env("ADD", &[]),
        &node.config(json!({"cniVersion": "0.2.0"})),
    );
    let (code, _) = run.error();
    assert_eq!(code, 1);
    // Errors speak the configuration's version when it is one of ours.
    let run = exec(
        &env("ADD", &[]),
        &node.config(json!({"cniVersion": "0.4.0", "failure_policy": "ajar"})),
    );
    assert_eq!(run.json()["cniVersion"], "0.4.0");
}

#[test]
fn del_tells_the_agent_and_succeeds() {
    let node = Node::new();
    let agent = node.agent(ENROLLED);
    exec(&env("DEL", &[]), &node.config(json!({}))).assert_ok_silent();
    let request = agent.request();
    assert_eq!(request["command"], "del");
    assert_eq!(request["netns"], NETNS);
    assert_eq!(request["pod"]["uid"], "2b5e6f3a-uid");
    assert_eq!(request["ips"], json!(["10.22.0.5", "fd00:22::5"]));
    // The netns may be gone, and the runtime may have no cached result.
    exec(
        &env("DEL", &["CNI_NETNS"]),
        &node.config(json!({"prevResult": null})),
    )
    .assert_ok_silent();
    let request = agent.request();
    assert_eq!(request["netns"], "");
    assert_eq!(request["ips"], json!([]));
}

#[test]
fn del_succeeds_whatever_the_agent_does() {
    let node = Node::new();
    node.state(StateFile::Listing);
    // Down.
    exec(&env("DEL", &[]), &node.config(json!({}))).assert_ok_silent();
    // Refusing.
    let agent = node.agent(REFUSED);
    exec(&env("DEL", &[]), &node.config(json!({}))).assert_ok_silent();
    agent.request();
    drop(agent);
    // Never answering: DEL waits at most the (short) timeout.
    let node = Node::new();
    let agent = node.agent(Answer::Silent);
    let run = exec(
        &env("DEL", &[]),
        &node.config(json!({"agent_timeout_seconds": 0.3})),
    );
    run.assert_ok_silent();
    assert!(run.elapsed < PATIENCE, "{:?}", run.elapsed);
    agent.request();
}

#[test]
fn check_asks_the_agent() {
    let node = Node::new();
    let agent = node.agent(ENROLLED);
    exec(&env("CHECK", &[]), &node.config(json!({}))).assert_ok_silent();
    let request = agent.request();
    assert_eq!(request["command"], "check");
    assert_eq!(request["netns"], NETNS);
    assert_eq!(request["ips"], json!(["10.22.0.5", "fd00:22::5"]));

    let node = Node::new();
    let _agent = node.agent(Answer::Reply(
        r#"{"outcome":"error","message":"namespace shop is enrolled but the pod is not"}"#,
    ));
    let (code, msg) = exec(&env("CHECK", &[]), &node.config(json!({}))).error();
    assert_eq!(code, 100);
    assert_eq!(
        msg,
        "zmesh agent: pod shop/web-0 is not as it should be: namespace shop is enrolled but the pod is not"
    );
}

#[test]
fn check_with_the_agent_down_follows_the_failure_policy() {
    let node = Node::new();
    node.state(StateFile::Listing);
    let (code, msg) = exec(&env("CHECK", &[]), &node.config(json!({}))).error();
    assert_eq!(code, 11);
    assert!(
        msg.ends_with("is in an enrolled namespace and its enrollment cannot be checked (failure_policy closed)"),
        "{msg}"
    );
    exec(
        &env("CHECK", &[]),
        &node.config(json!({"failure_policy": "open"})),
    )
    .assert_ok_silent();
    node.state(StateFile::NotListing);
    exec(&env("CHECK", &[]), &node.config(json!({}))).assert_ok_silent();
}

#[test]
fn status_and_gc_succeed_without_output() {
    let node = Node::new();
    let gc = node.config(json!({"cniVersion": "1.1.0", "prevResult": null,
        "cni.dev/valid-attachments": [{"containerID": "ctr-1", "ifname": "eth0"}]}));
    for command in ["STATUS", "GC"] {
        exec(&[("CNI_COMMAND", command)], &gc).assert_ok_silent();
    }
    // Still a configuration to check.
    let (code, _) = exec(
        &[("CNI_COMMAND", "STATUS")],
        &node.config(json!({"failure_policy": 3})),
    )
    .error();
    assert_eq!(code, 7);
}
