//! A real Kubernetes control plane on 127.0.0.1 for tests: etcd, one or more
//! kube-apiservers and, if asked, kube-controller-manager and kube-scheduler, from the binaries
//! `scripts/control-plane.sh` builds once per machine (Debian bookworm's Kubernetes 1.20.2
//! and etcd 3.4) into `/var/cache/zmesh/kubernetes-<version>/bin`.
//!
//! Each [`ControlPlane`] has its own temporary directory (certificates, keys, etcd data,
//! logs, kubeconfig) and free ports; it kills its processes and removes the directory when
//! dropped, also when the test panics (then the tail of each process's log is printed
//! first). Processes also get SIGKILL if the test process dies (`PR_SET_PDEATHSIG`), and
//! the next control plane removes the directories such a process left.
//!
//! Authentication: an admin token (group `system:masters`) in a token file; ServiceAccount
//! tokens come from the TokenRequest API and are signed with the control plane's own RSA
//! key, which [`ControlPlane::sign_service_account_token`] can also use to forge tokens the
//! API server would not issue (an expired one). Authorization is RBAC only.
//!
//! Missing binaries fail the test with the command that builds them, unless
//! `ZMESH_SKIP_KUBE_TESTS=1` says skipping is fine (see [`ControlPlane::start`]).

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SigningKey,
};

/// The Kubernetes version `scripts/control-plane.sh` builds (keep the two in step).
pub const KUBE_VERSION: &str = "1.20.2";
/// Set to `1` to let tests skip (pass with a message) when the binaries are missing.
pub const SKIP_ENV: &str = "ZMESH_SKIP_KUBE_TESTS";
/// Overrides where the binaries are (a directory holding all six).
pub const BIN_ENV: &str = "ZMESH_KUBE_BIN";
/// The issuer and the API audience of the test control plane's ServiceAccount tokens.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const BINARIES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
];
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const DIR_PREFIX: &str = "zmesh-kube-";
/// In each control plane's directory: the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "the Kubernetes control plane binaries are missing in {dir} ({missing}): build them \
         with `sudo bash scripts/control-plane.sh` (once per machine: ~6 min on 2 cores), or set \
         {SKIP_ENV}=1 to skip the tests that need them"
    )]
    Missing { dir: String, missing: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("{name} exited before it was ready ({status}); log {log}:\n{tail}")]
    Exited {
        name: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{name} was not ready after {timeout:?}: {last}; log {log}:\n{tail}")]
    NotReady {
        name: String,
        timeout: Duration,
        last: String,
        log: String,
        tail: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("no free port: {0}")]
    Port(std::io::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Where the binaries are expected.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        return PathBuf::from(dir);
    }
    let root = std::env::var_os("ZMESH_KUBE_CACHE").unwrap_or_else(|| "/var/cache/zmesh".into());
    PathBuf::from(root)
        .join(format!("kubernetes-{KUBE_VERSION}"))
        .join("bin")
}

/// The binaries' directory, or why they cannot be used.
pub fn binaries() -> Result<PathBuf, HarnessError> {
    let dir = bin_dir();
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        Ok(dir)
    } else {
        Err(HarnessError::Missing {
            dir: dir.display().to_string(),
            missing: missing.join(", "),
        })
    }
}

/// Ports handed out in this process, so that two control planes of one test binary never
/// get the same one between the probe and the bind.
fn taken_ports() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(Default::default)
}

fn free_port() -> Result<u16, HarnessError> {
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(HarnessError::Port)?
            .port();
        let mut taken = taken_ports().lock().unwrap_or_else(|e| e.into_inner());
        if taken.insert(port) {
            return Ok(port);
        }
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Result<Self, HarnessError> {
        let out = File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().map_err(io(format!("starting {name}")))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// `Err` if the process has exited.
    fn check_running(&mut self) -> Result<(), HarnessError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HarnessError::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log: self.log.display().to_string(),
                tail: log_tail(&self.log, 40),
            }),
            Err(e) => Err(io(format!("waiting for {}", self.name))(e)),
        }
    }

    fn not_ready(&self, timeout: Duration, last: String) -> HarnessError {
        HarnessError::NotReady {
            name: self.name.clone(),
            timeout,
            last,
            log: self.log.display().to_string(),
            tail: log_tail(&self.log, 40),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file (for error messages).
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One kube-apiserver of the control plane (several can share its etcd).
struct ApiServer {
    port: u16,
    process: Option<Process>,
    /// How many times it was started (names its log files).
    starts: usize,
}

/// Options of [`ControlPlane::start`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Run kube-controller-manager too: ServiceAccounts of new namespaces, endpoints and
    /// EndpointSlices of Services, namespace deletion, garbage collection.
    pub controller_manager: bool,
    /// Run kube-scheduler too (pods without a nodeName are bound to a node), and let the
    /// controller manager run its node lifecycle controller: with real kubelets, nodes
    /// register tainted `not-ready` and only that controller lifts the taint. (Without
    /// kubelets it would evict the pods of hand-made Nodes, so it stays off then.)
    pub scheduler: bool,
}

/// A control plane on 127.0.0.1; see the module docs.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    bin: PathBuf,
    etcd: Option<Process>,
    etcd_port: u16,
    apiservers: Vec<ApiServer>,
    controller_manager: Option<Process>,
    scheduler: Option<Process>,
    ca_pem: String,
    admin_token: String,
    sa_key: KeyPair,
    /// How long the first API server took to answer /readyz.
    pub startup: Duration,
}

impl ControlPlane {
    /// Starts etcd and one kube-apiserver (and the controller manager if asked) and waits
    /// until they are ready. `Ok(None)` when the binaries are missing and
    /// `ZMESH_SKIP_KUBE_TESTS=1` allows skipping (a message says so); missing binaries are
    /// an error otherwise.
    pub async fn start(options: Options) -> Result<Option<Self>, HarnessError> {
        let bin = match binaries() {
            Ok(bin) => bin,
            Err(e) if std::env::var(SKIP_ENV).as_deref() == Ok("1") => {
                eprintln!("SKIPPED ({SKIP_ENV}=1): {e}");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(io("creating the temporary directory"))?;
        write(
            &dir.path().join(OWNER_FILE),
            &std::process::id().to_string(),
        )?;
        let ca_pem = write_certificates(dir.path())?;
        let sa_key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?;
        write(&dir.path().join("sa.key"), &sa_key.serialize_pem())?;
        write(&dir.path().join("sa.pub"), &sa_key.public_key_pem())?;
        let admin_token = random_token();
        write(
            &dir.path().join("tokens.csv"),
            &format!("{admin_token},admin,admin,system:masters\n"),
        )?;
        let mut plane = Self {
            bin,
            etcd: None,
            etcd_port: 0,
            apiservers: Vec::new(),
            controller_manager: None,
            scheduler: None,
            ca_pem,
            admin_token,
            sa_key,
            startup: Duration::ZERO,
            dir,
        };
        plane.start_etcd()?;
        let started = Instant::now();
        plane.add_apiserver().await?;
        plane.startup = started.elapsed();
        write(
            &plane.dir.path().join("admin.kubeconfig"),
            &plane.kubeconfig_yaml(0, &plane.admin_token.clone()),
        )?;
        if options.controller_manager {
            plane.start_controller_manager(options.scheduler).await?;
        }
        if options.scheduler {
            plane.start_scheduler()?;
        }
        Ok(Some(plane))
    }

    /// Where the Kubernetes binaries are.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The temporary directory (logs are there too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PEM of the CA the API servers' serving certificates chain to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The admin kubeconfig (for kubectl).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.bin.join("kubectl"));
        command.arg("--kubeconfig").arg(self.admin_kubeconfig());
        command
    }

    pub fn apiserver_port(&self, index: usize) -> u16 {
        self.apiservers[index].port
    }

    fn start_etcd(&mut self) -> Result<(), HarnessError> {
        // A port taken by another program between probe and bind: try other ports.
        let mut last = None;
        for _ in 0..3 {
            let (client, peer) = (free_port()?, free_port()?);
            let data = self.dir.path().join("etcd");
            let mut command = Command::new(self.bin.join("etcd"));
            command
                .arg("--name=zmesh-test")
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!(
                    "--initial-cluster=zmesh-test=http://127.0.0.1:{peer}"
                ))
                .arg("--logger=zap")
                .arg("--log-level=warn");
            let mut process =
                Process::spawn("etcd", &mut command, self.dir.path().join("etcd.log"))?;
            match wait_tcp(&mut process, client) {
                Ok(()) => {
                    self.etcd = Some(process);
                    self.etcd_port = client;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Port(std::io::Error::other("no attempt"))))
    }

    /// Starts one more kube-apiserver on the same etcd; returns its index.
    pub async fn add_apiserver(&mut self) -> Result<usize, HarnessError> {
        let index = self.apiservers.len();
        self.apiservers.push(ApiServer {
            port: free_port()?,
            process: None,
            starts: 0,
        });
        self.start_apiserver(index).await?;
        Ok(index)
    }

    /// Kills API server `index` (SIGKILL: its clients see connections cut, as in a crash).
    pub fn stop_apiserver(&mut self, index: usize) {
        self.apiservers[index].process = None;
    }

    /// (Re)starts API server `index` on its port and waits for /readyz.
    pub async fn start_apiserver(&mut self, index: usize) -> Result<(), HarnessError> {
        let d = self.dir.path();
        let server = &mut self.apiservers[index];
        server.starts += 1;
        let port = server.port;
        let mut command = Command::new(self.bin.join("kube-apiserver"));
        command
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg("--insecure-port=0")
            .arg(format!(
                "--cert-dir={}",
                d.join("apiserver-certs").display()
            ))
            .arg(format!(
                "--tls-cert-file={}",
                d.join("apiserver.pem").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("apiserver.key").display()
            ))
            .arg(format!("--client-ca-file={}", d.join("ca.pem").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={ISSUER}"))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!("--api-audiences={ISSUER}"))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--endpoint-reconciler-type=none")
            // As kubeadm sets it: node names need not resolve, their InternalIP does.
            .arg("--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname")
            .arg("--profiling=false")
            .arg("--v=1");
        let log = d.join(format!("apiserver-{index}.{}.log", server.starts));
        let mut process = Process::spawn(&format!("kube-apiserver {index}"), &mut command, log)?;
        let client = self.client_on(index, &self.admin_token.clone()).await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            process.check_running()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| HarnessError::Io {
                    what: "building /readyz".into(),
                    source: std::io::Error::other(e),
                })?;
            let last = match client.request_text(request).await {
                Ok(text) if text.trim() == "ok" => break,
                Ok(text) => text,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(process.not_ready(READY_TIMEOUT, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.apiservers[index].process = Some(process);
        Ok(())
    }

    async fn start_controller_manager(&mut self, node_lifecycle: bool) -> Result<(), HarnessError> {
        let d = self.dir.path();
        let mut command = Command::new(self.bin.join("kube-controller-manager"));
        command
            .arg(format!(
                "--kubeconfig={}",
                d.join("admin.kubeconfig").display()
            ))
            .arg(format!(
                "--service-account-private-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!("--root-ca-file={}", d.join("ca.pem").display()))
            .arg(if node_lifecycle {
                "--controllers=*,-nodeipam,-cloud-node-lifecycle"
            } else {
                "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle"
            })
            .arg("--leader-elect=false")
            .arg("--port=0")
            .arg("--secure-port=0")
            .arg("--v=1");
        let mut process = Process::spawn(
            "kube-controller-manager",
            &mut command,
            d.join("controller-manager.log"),
        )?;
        // Ready once its ServiceAccount controller has given `default` its account.
        let client = self.client().await?;
        let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client, "default");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            process.check_running()?;
            let last = match accounts.get_opt("default").await {
                Ok(Some(_)) => break,
                Ok(None) => "no default ServiceAccount yet".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(process.not_ready(READY_TIMEOUT, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.controller_manager = Some(process);
        Ok(())
    }

    /// kube-scheduler binds pods as they come (it has no readiness of its own to wait for:
    /// a pod it has not bound yet is simply pending).
    fn start_scheduler(&mut self) -> Result<(), HarnessError> {
        let d = self.dir.path();
        let mut command = Command::new(self.bin.join("kube-scheduler"));
        command
            .arg(format!(
                "--kubeconfig={}",
                d.join("admin.kubeconfig").display()
            ))
            .arg("--leader-elect=false")
            .arg("--port=0")
            .arg("--secure-port=0")
            .arg("--v=1");
        let mut process = Process::spawn("kube-scheduler", &mut command, d.join("scheduler.log"))?;
        process.check_running()?;
        self.scheduler = Some(process);
        Ok(())
    }

    /// A kubeconfig for API server `index` that authenticates with `token`.
    pub fn kubeconfig_yaml(&self, index: usize, token: &str) -> String {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let port = self.apiservers[index].port;
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority-data: {ca}
users:
- name: user
  user:
    token: {token}
contexts:
- name: test
  context:
    cluster: test
    user: user
    namespace: default
current-context: test
"
        )
    }

    /// A client of API server `index` presenting `token`.
    pub async fn client_on(&self, index: usize, token: &str) -> Result<kube::Client, HarnessError> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml(index, token))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// An admin client (system:masters) of the first API server.
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        self.client_on(0, &self.admin_token.clone()).await
    }

    /// An admin client of API server `index`.
    pub async fn admin_client_on(&self, index: usize) -> Result<kube::Client, HarnessError> {
        self.client_on(index, &self.admin_token.clone()).await
    }

    /// A client of the first API server presenting `token`.
    pub async fn client_with_token(&self, token: &str) -> Result<kube::Client, HarnessError> {
        self.client_on(0, token).await
    }

    /// A JWT signed with the control plane's ServiceAccount key (RS256), with `claims`
    /// as given: what the API server would issue, or something it never would.
    pub fn sign_service_account_token(
        &self,
        claims: &serde_json::Value,
    ) -> Result<String, HarnessError> {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = b64(claims.to_string().as_bytes());
        let signed = format!("{header}.{payload}");
        let signature = self.sa_key.sign(signed.as_bytes())?;
        Ok(format!("{signed}.{}", b64(&signature)))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the test cannot show: the control plane's side of the failure.
            let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for log in logs {
                eprintln!(
                    "--- last lines of {}:\n{}",
                    log.display(),
                    log_tail(&log, 15)
                );
            }
        }
        // Clients first, then the store.
        self.scheduler = None;
        self.controller_manager = None;
        for server in &mut self.apiservers {
            server.process = None;
        }
        self.etcd = None;
        let mut taken = taken_ports().lock().unwrap_or_else(|e| e.into_inner());
        taken.remove(&self.etcd_port);
        for server in &self.apiservers {
            taken.remove(&server.port);
        }
    }
}

/// Removes the directories of control planes whose test process died without dropping
/// them (killed by a timeout): their processes died with it (`PR_SET_PDEATHSIG`).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok());
        if let (true, Some(pid)) = (ours, owner) {
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if !alive {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

fn write(path: &Path, text: &str) -> Result<(), HarnessError> {
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Writes ca.pem, apiserver.pem and apiserver.key; returns the CA's PEM.
fn write_certificates(dir: &Path) -> Result<String, HarnessError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "zmesh test control plane CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])?;
    serving
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    serving
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(
            10, 96, 0, 1,
        ))));
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = serving.signed_by(&key, &issuer)?;
    write(&dir.join("ca.pem"), &ca_cert.pem())?;
    write(&dir.join("apiserver.pem"), &cert.pem())?;
    write(&dir.join("apiserver.key"), &key.serialize_pem())?;
    Ok(ca_cert.pem())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` (etcd has no TLS or
/// auth here; the API server's readiness checks the rest).
fn wait_tcp(process: &mut Process, port: u16) -> Result<(), HarnessError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        process.check_running()?;
        match std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(process.not_ready(READY_TIMEOUT, e.to_string()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
