//! Installs the zmesh CNI plugin on this node and keeps it installed, as istio-cni's
//! installer does: the `zmesh-cni` binary in the runtime's plugin directory, and an entry
//! for it at the end of the `plugins` of the node's primary CNI configuration.
//!
//! The primary configuration is the one containerd, CRI-O and kubelet use: the
//! lexicographically first `*.conf`, `*.conflist` or `*.json` file of the configuration
//! directory. A single-plugin configuration is turned into a list (same base name,
//! `.conflist`) so that ours can be chained after it. Everything else in the file is kept
//! as it was, key order included.
//!
//! The cluster's network plugin may write its configuration after the agent starts, and
//! Cilium or Calico rewrite theirs when they restart: [`keep_installed`] looks again
//! every few seconds and puts the entry back. A file that is not valid JSON, or not a CNI
//! configuration, is never touched.
//!
//! Every function here blocks (file I/O, fsync); [`keep_installed`] runs them on tokio's
//! blocking pool.
//!
//! The entry is not removed when the agent stops: pods keep starting across agent
//! upgrades, and the plugin then follows its `failure_policy`. [`uninstall`] (`zmesh
//! uninstall`) removes it and the binary.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use zmesh_cni::config::{FailurePolicy, SUPPORTED_VERSIONS};

/// The plugin's `type` in the configuration, and its binary's name in the bin directory.
pub const PLUGIN_TYPE: &str = "zmesh-cni";

/// How long the plugin waits for the agent: longer than the agent itself takes at most to
/// answer an ADD ([`crate::cni_server::ADD_WAIT`]), so that the pod gets the agent's
/// answer (an error naming what is missing) rather than a bare timeout.
pub const AGENT_TIMEOUT_SECONDS: u64 = crate::cni_server::ADD_WAIT.as_secs() + 5;

/// How often [`keep_installed`] looks while the node has no CNI configuration yet.
pub const WAIT_INTERVAL: Duration = Duration::from_secs(1);

/// How often [`keep_installed`] checks that the entry and the binary are still there.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What to install, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInstall {
    /// The runtime's plugin directory (the host's /opt/cni/bin).
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory (the host's /etc/cni/net.d).
    pub conf_dir: PathBuf,
    /// The `zmesh-cni` binary to copy there.
    pub plugin_binary: PathBuf,
    /// Our entry's settings.
    pub entry: PluginEntry,
}

/// The settings written into our entry of the conflist (`cni/src/config.rs` reads them).
/// Paths are as the host sees them: the runtime runs the plugin on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    pub agent_socket: PathBuf,
    /// `None` when the agent writes no state file (the plugin then looks at its default
    /// path, which holds nothing).
    pub state_file: Option<PathBuf>,
    pub failure_policy: FailurePolicy,
    pub agent_timeout_seconds: u64,
}

impl PluginEntry {
    /// The entry as it goes into `plugins`.
    pub fn to_json(&self) -> Value {
        let mut entry = Map::new();
        entry.insert("type".into(), PLUGIN_TYPE.into());
        entry.insert(
            "agent_socket".into(),
            self.agent_socket.to_string_lossy().into(),
        );
        if let Some(state_file) = &self.state_file {
            entry.insert("state_file".into(), state_file.to_string_lossy().into());
        }
        let policy = match self.failure_policy {
            FailurePolicy::Closed => "closed",
            FailurePolicy::Open => "open",
        };
        entry.insert("failure_policy".into(), policy.into());
        entry.insert(
            "agent_timeout_seconds".into(),
            self.agent_timeout_seconds.into(),
        );
        Value::Object(entry)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniInstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not valid JSON; left as it is: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a CNI network configuration ({reason}); left as it is")]
    NotANetwork { path: PathBuf, reason: String },
    #[error("encoding {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} has cniVersion {version:?}, which zmesh-cni does not speak ({supported}); \
         not installed, as every pod start would fail"
    )]
    UnsupportedVersion {
        path: PathBuf,
        version: String,
        supported: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CniInstallError + '_ {
    move |source| CniInstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What one pass did to the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// The directory holds no configuration yet (the network plugin has not written it).
    NoConfig,
    /// Our entry was already there, last and as configured.
    Unchanged(PathBuf),
    /// Our entry was added or updated in this conflist.
    Written(PathBuf),
    /// The single-plugin `from` became the conflist `to`, with our entry.
    Converted { from: PathBuf, to: PathBuf },
}

/// Keeps the binary and the entry installed; remembers what it checked, so that the
/// binary is compared with ours only when the installed file changed.
#[derive(Debug)]
pub struct Installer {
    install: CniInstall,
    /// (device, inode, size, mtime) of the installed binary when it was last found equal
    /// to ours.
    binary_checked: Option<(u64, u64, u64, i64, i64)>,
}

impl Installer {
    pub fn new(install: CniInstall) -> Self {
        Self {
            install,
            binary_checked: None,
        }
    }

    pub fn settings(&self) -> &CniInstall {
        &self.install
    }

    /// Copies the binary if the installed one differs from ours. Returns whether it wrote.
    pub fn install_binary(&mut self) -> Result<bool, CniInstallError> {
        let target = self.install.bin_dir.join(PLUGIN_TYPE);
        let stamp = |meta: &fs::Metadata| {
            (
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
            )
        };
        if let Ok(meta) = fs::metadata(&target) {
            if self.binary_checked == Some(stamp(&meta)) {
                return Ok(false);
            }
        }
        let ours =
            fs::read(&self.install.plugin_binary).map_err(io_error(&self.install.plugin_binary))?;
        let written = match fs::read(&target) {
            Ok(installed) if installed == ours => false,
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(io_error(&target)(e)),
        };
        if written {
            write_atomically(&target, &ours, 0o755)?;
        }
        let meta = fs::metadata(&target).map_err(io_error(&target))?;
        self.binary_checked = Some(stamp(&meta));
        Ok(written)
    }

    /// Puts our entry last in the primary configuration, if it is not already there.
    pub fn install_config(&self) -> Result<ConfigOutcome, CniInstallError> {
        let conf_dir = &self.install.conf_dir;
        let Some(path) = primary_config(conf_dir)? else {
            return Ok(ConfigOutcome::NoConfig);
        };
        let (mut list, single) = read_network(&path)?;
        let version = list.get("cniVersion").and_then(Value::as_str).unwrap_or("");
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(CniInstallError::UnsupportedVersion {
                path,
                version: version.to_owned(),
                supported: SUPPORTED_VERSIONS.join(", "),
            });
        }
        let plugins = plugins_mut(&mut list, &path)?;
        let entry = self.install.entry.to_json();
        let ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE);
        let already =
            plugins.last() == Some(&entry) && plugins.iter().filter(|p| ours(p)).count() == 1;
        if already && !single {
            return Ok(ConfigOutcome::Unchanged(path));
        }
        plugins.retain(|p| !ours(p));
        plugins.push(entry);
        let json = to_json_bytes(&list, &path)?;
        if !single {
            write_atomically(&path, &json, 0o644)?;
            return Ok(ConfigOutcome::Written(path));
        }
        // The list is in place before the single configuration goes: at no moment does
        // the directory lack a network (the runtime would fail pods meanwhile).
        let to = path.with_extension("conflist");
        write_atomically(&to, &json, 0o644)?;
        fs::remove_file(&path).map_err(io_error(&path))?;
        sync_dir(conf_dir)?;
        Ok(ConfigOutcome::Converted { from: path, to })
    }
}

/// The node's primary CNI configuration: the lexicographically first regular file named
/// `*.conf`, `*.conflist` or `*.json` (libcni's `ConfFiles`, which containerd and CRI-O
/// use); `None` if there is none.
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, CniInstallError> {
    Ok(config_files(conf_dir)?.into_iter().next())
}

/// Every CNI configuration file of `conf_dir`, sorted by name.
fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, CniInstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        // The network plugin may create the directory itself, later.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(conf_dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error(conf_dir))?.path();
        let is_config = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conf" | "conflist" | "json")
        );
        // Follows symlinks, as the runtime does; a dangling one is no configuration.
        if is_config && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    // Byte order, as Go's sort.Strings.
    files.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(files)
}

/// Reads a configuration as a list: a conflist as it is, a single-plugin configuration
/// converted (`true` then). Decided by content, whatever the file's extension, so that a
/// list is never nested in a list.
fn read_network(path: &Path) -> Result<(Map<String, Value>, bool), CniInstallError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|source| CniInstallError::Malformed {
            path: path.to_owned(),
            source,
        })?;
    let not_a_network = |reason: &str| CniInstallError::NotANetwork {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let Value::Object(mut conf) = value else {
        return Err(not_a_network("not a JSON object"));
    };
    if conf.contains_key("plugins") {
        return Ok((conf, false));
    }
    if !conf.get("type").is_some_and(Value::is_string) {
        return Err(not_a_network("neither plugins nor type"));
    }
    // `{"cniVersion", "name", "plugins": [the rest]}`, as libcni's ConfListFromConf.
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = conf.shift_remove(key) {
            list.insert(key.into(), value);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    Ok((list, true))
}

fn plugins_mut<'a>(
    list: &'a mut Map<String, Value>,
    path: &Path,
) -> Result<&'a mut Vec<Value>, CniInstallError> {
    match list.get_mut("plugins") {
        Some(Value::Array(plugins)) => Ok(plugins),
        _ => Err(CniInstallError::NotANetwork {
            path: path.to_owned(),
            reason: "plugins is not a list".into(),
        }),
    }
}

fn to_json_bytes(value: &Map<String, Value>, path: &Path) -> Result<Vec<u8>, CniInstallError> {
    let mut json = serde_json::to_vec_pretty(value).map_err(|source| CniInstallError::Encode {
        path: path.to_owned(),
        source,
    })?;
    json.push(b'\n');
    Ok(json)
}

/// What [`uninstall`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// The configurations our entry was removed from.
    pub configs: Vec<PathBuf>,
    pub binary: bool,
}

/// Removes our entry from every configuration of `conf_dir` that has one (not only the
/// primary: it may have changed since), then the binary from `bin_dir`. The entry goes
/// first, so that no pod start finds an entry whose binary is gone. Files that are not
/// valid configurations are left alone; the first error is returned after the rest is
/// done.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Uninstalled, CniInstallError> {
    let mut done = Uninstalled::default();
    let mut first_error = None;
    for path in config_files(conf_dir)? {
        match remove_entry(&path) {
            Ok(true) => done.configs.push(path),
            Ok(false) => {}
            // Not ours to judge: a file that never had our entry may be anything.
            Err(CniInstallError::Malformed { .. } | CniInstallError::NotANetwork { .. }) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if first_error.is_none() {
        let binary = bin_dir.join(PLUGIN_TYPE);
        match fs::remove_file(&binary) {
            Ok(()) => done.binary = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(io_error(&binary)(e));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Removes our entries from one conflist; whether there was one. A single-plugin
/// configuration cannot hold ours.
fn remove_entry(path: &Path) -> Result<bool, CniInstallError> {
    let (mut list, single) = read_network(path)?;
    if single {
        return Ok(false);
    }
    let plugins = plugins_mut(&mut list, path)?;
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.len() == before {
        return Ok(false);
    }
    write_atomically(path, &to_json_bytes(&list, path)?, 0o644)?;
    Ok(true)
}

/// Replaces `path` with `contents`: a temporary file in the same directory (named so that
/// no runtime takes it for a configuration), fsync, `mode`, rename, directory fsync.
/// Readers (the runtime, a running plugin's exec) see the old file or the new one.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CniInstallError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".zmesh-cni.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    tmp.write_all(contents).map_err(io_error(tmp.path()))?;
    // tempfile creates 0600; the runtime may run as another user and execs the binary.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_error(tmp.path()))?;
    tmp.persist(path).map_err(|e| io_error(path)(e.error))?;
    sync_dir(dir)
}

/// Makes renames and removals in `dir` survive a crash.
fn sync_dir(dir: &Path) -> Result<(), CniInstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Installs the plugin, then keeps it installed until the task is aborted: every
/// [`WAIT_INTERVAL`] while the node has no configuration, every [`CHECK_INTERVAL`] after.
/// Errors are logged (once while they stay the same) and the next pass tries again; the
/// agent runs on meanwhile, as pods are still found through /proc without the plugin.
pub fn keep_installed(install: CniInstall) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut installer = Some(Installer::new(install));
        let mut last_error: Option<String> = None;
        let mut waiting_logged = false;
        loop {
            let Some(mut current) = installer.take() else {
                return;
            };
            let pass = tokio::task::spawn_blocking(move || {
                let outcome = current
                    .install_binary()
                    // No entry without the binary: the runtime would fail every pod start.
                    .and_then(|copied| Ok((copied, current.install_config()?)));
                (current, outcome)
            })
            .await;
            let (current, outcome) = match pass {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!("the CNI plugin installer stopped: {e}");
                    return;
                }
            };
            let settings = current.settings().clone();
            installer = Some(current);
            let wait = match outcome {
                Ok((copied, config)) => {
                    if copied {
                        tracing::info!(
                            path = %settings.bin_dir.join(PLUGIN_TYPE).display(),
                            "installed the CNI plugin's binary"
                        );
                    }
                    if last_error.take().is_some() {
                        tracing::info!("the CNI plugin installer works again");
                    }
                    log_config(&config, &settings.conf_dir, &mut waiting_logged);
                    match config {
                        ConfigOutcome::NoConfig => WAIT_INTERVAL,
                        _ => CHECK_INTERVAL,
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    if last_error.as_deref() != Some(&message) {
                        tracing::error!("installing the CNI plugin: {message}");
                        last_error = Some(message);
                    }
                    CHECK_INTERVAL
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}

fn log_config(outcome: &ConfigOutcome, conf_dir: &Path, waiting_logged: &mut bool) {
    match outcome {
        ConfigOutcome::NoConfig => {
            if !*waiting_logged {
                tracing::info!(
                    dir = %conf_dir.display(),
                    "no CNI configuration yet: waiting for the network plugin to write one"
                );
                *waiting_logged = true;
            }
            return;
        }
        ConfigOutcome::Unchanged(_) => {}
        ConfigOutcome::Written(path) => tracing::info!(
            path = %path.display(),
            "added the zmesh CNI plugin to the node's CNI configuration"
        ),
        ConfigOutcome::Converted { from, to } => tracing::info!(
            from = %from.display(),
            to = %to.display(),
            "converted the node's CNI configuration to a list with the zmesh CNI plugin"
        ),
    }
    *waiting_logged = false;
}
