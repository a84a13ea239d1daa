//! The CNI plugin's installer on temporary directories (no root, no runtime).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use zmesh_agent::cni_install::{
    keep_installed, primary_config, uninstall, CniInstall, CniInstallError, ConfigOutcome,
    Installer, PluginEntry, PLUGIN_TYPE,
};
use zmesh_cni::config::FailurePolicy;

struct Node {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    plugin: PathBuf,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        fs::create_dir(&bin).unwrap();
        fs::create_dir(&conf).unwrap();
        let plugin = dir.path().join("zmesh-cni.build");
        fs::write(&plugin, b"\x7fELF plugin v1").unwrap();
        Node {
            _dir: dir,
            bin,
            conf,
            plugin,
        }
    }

    fn install(&self, failure_policy: FailurePolicy) -> CniInstall {
        CniInstall {
            bin_dir: self.bin.clone(),
            conf_dir: self.conf.clone(),
            plugin_binary: self.plugin.clone(),
            entry: PluginEntry {
                agent_socket: "/var/run/zmesh/cni.sock".into(),
                state_file: Some("/var/run/zmesh/enrolled-namespaces.json".into()),
                failure_policy,
                agent_timeout_seconds: 30,
            },
        }
    }

    fn installer(&self) -> Installer {
        Installer::new(self.install(FailurePolicy::Closed))
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.conf.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

fn ours() -> Value {
    json!({"type": "zmesh-cni", "agent_socket": "/var/run/zmesh/cni.sock",
           "state_file": "/var/run/zmesh/enrolled-namespaces.json",
           "failure_policy": "closed", "agent_timeout_seconds": 30})
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// The keys of every object, in file order (`Value` equality ignores order).
fn key_order(value: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    fn walk(value: &Value, keys: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    keys.push(k.clone());
                    walk(v, keys);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, keys)),
            _ => {}
        }
    }
    walk(value, &mut keys);
    keys
}

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes",
     "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

#[test]
fn fresh_install_appends_our_entry_last_and_keeps_the_rest() {
    let node = Node::new();
    let path = node.write("10-calico.conflist", CALICO);
    let installer = node.installer();
    assert_eq!(
        installer.install_config().unwrap(),
        ConfigOutcome::Written(path.clone())
    );
    let mut expected: Value = serde_json::from_str(CALICO).unwrap();
    expected["plugins"].as_array_mut().unwrap().push(ours());
    let written = read(&path);
    assert_eq!(written, expected);
    // Key order as the network plugin wrote it ("name" before "cniVersion"), then ours.
    assert_eq!(key_order(&written), key_order(&expected));
    assert_eq!(key_order(&written)[..2], ["name", "cniVersion"]);
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
    // No temporary file left behind.
    assert_eq!(fs::read_dir(&node.conf).unwrap().count(), 1);
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let node = Node::new();
    let conf = node.write(
        "10-bridge.conf",
        r#"{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0",
            "isGateway": true, "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#,
    );
    let outcome = node.installer().install_config().unwrap();
    let list = node.conf.join("10-bridge.conflist");
    assert_eq!(
        outcome,
        ConfigOutcome::Converted {
            from: conf.clone(),
            to: list.clone()
        }
    );
    assert!(
        !conf.exists(),
        "the .conf is removed once the list is in place"
    );
    let written = read(&list);
    assert_eq!(
        written,
        json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true,
             "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}},
            ours()
        ]})
    );
    assert_eq!(
        key_order(&written)[..5],
        ["cniVersion", "name", "plugins", "type", "bridge"]
    );
    assert_eq!(primary_config(&node.conf).unwrap(), Some(list.clone()));
    // The next pass finds it right.
    assert_eq!(
        node.installer().install_config().unwrap(),
        ConfigOutcome::Unchanged(list)
    );
}

#[test]
fn an_outdated_entry_of_ours_is_replaced_and_moved_last() {
    let node = Node::new();
    let path = node.write(
        "05-cilium.conflist",
        &json!({"cniVersion": "1.0.0", "name": "cilium", "plugins": [
            {"type": "zmesh-cni", "failure_policy": "open", "agent_socket": "/old.sock"},
            {"type": "cilium-cni", "enable-debug": false},
            {"type": "zmesh-cni", "agent_timeout_seconds": 5}
        ]})
        .to_string(),
    );
    assert_eq!(
        node.installer().install_config().unwrap(),
        ConfigOutcome::Written(path.clone())
    );
    assert_eq!(
        read(&path),
        json!({"cniVersion": "1.0.0", "name": "cilium", "plugins": [
            {"type": "cilium-cni", "enable-debug": false}, ours()
        ]})
    );
    // A changed setting (here the failure policy) is written over ours.
    let open = Installer::new(node.install(FailurePolicy::Open));
    assert_eq!(
        open.install_config().unwrap(),
        ConfigOutcome::Written(path.clone())
    );
    let plugins = read(&path)["plugins"].clone();
    assert_eq!(plugins.as_array().unwrap().len(), 2);
    assert_eq!(plugins[1]["failure_policy"], "open");
}

#[test]
fn a_second_pass_writes_nothing() {
    let node = Node::new();
    let path = node.write("10-calico.conflist", CALICO);
    let mut installer = node.installer();
    assert!(installer.install_binary().unwrap());
    assert!(matches!(
        installer.install_config().unwrap(),
        ConfigOutcome::Written(_)
    ));
    let before = (fs::metadata(&path).unwrap(), fs::read(&path).unwrap());
    let binary = node.bin.join(PLUGIN_TYPE);
    let binary_before = fs::metadata(&binary).unwrap();
    // A new installer (an agent restart) too: it compares, it does not trust memory.
    for mut installer in [installer, node.installer()] {
        assert!(!installer.install_binary().unwrap());
        assert_eq!(
            installer.install_config().unwrap(),
            ConfigOutcome::Unchanged(path.clone())
        );
    }
    let after = fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec()),
        (before.0.ino(), before.0.mtime(), before.0.mtime_nsec())
    );
    assert_eq!(fs::read(&path).unwrap(), before.1);
    let binary_after = fs::metadata(&binary).unwrap();
    assert_eq!(
        (binary_after.ino(), binary_after.mtime_nsec()),
        (binary_before.ino(), binary_before.mtime_nsec())
    );
}

#[test]
fn the_primary_configuration_is_the_first_by_name() {
    let node = Node::new();
    assert_eq!(primary_config(&node.conf).unwrap(), None);
    assert_eq!(
        node.installer().install_config().unwrap(),
        ConfigOutcome::NoConfig
    );
    // Not configurations: other extensions, hidden temporary files, directories.
    node.write("00-readme.txt", "not json");
    node.write(".00-x.conflist.tmp", "{");
    node.write("00-calico-kubeconfig", "apiVersion: v1");
    fs::create_dir(node.conf.join("00-dir.conflist")).unwrap();
    assert_eq!(primary_config(&node.conf).unwrap(), None);
    let later = node.write("20-b.conflist", CALICO);
    assert_eq!(primary_config(&node.conf).unwrap(), Some(later.clone()));
    let json = node.write("10-a.json", CALICO);
    assert_eq!(primary_config(&node.conf).unwrap(), Some(json.clone()));
    // By name, whatever the extension: "10-a.conf" < "10-a.json" < "20-b.conflist".
    let conf = node.write(
        "10-a.conf",
        r#"{"cniVersion": "1.0.0", "name": "a", "type": "ptp"}"#,
    );
    assert_eq!(primary_config(&node.conf).unwrap(), Some(conf));
    fs::remove_file(node.conf.join("10-a.conf")).unwrap();
    // Only the primary one gets our entry; a .json holding plugins stays a .json.
    assert_eq!(
        node.installer().install_config().unwrap(),
        ConfigOutcome::Written(json.clone())
    );
    assert_eq!(read(&later), serde_json::from_str::<Value>(CALICO).unwrap());
    // A missing directory is no configuration yet, not an error.
    let mut install = node.install(FailurePolicy::Closed);
    install.conf_dir = node.conf.join("absent");
    assert_eq!(
        Installer::new(install).install_config().unwrap(),
        ConfigOutcome::NoConfig
    );
}

#[test]
fn a_conflist_rewritten_by_the_network_plugin_gets_our_entry_back() {
    let node = Node::new();
    let path = node.write("10-calico.conflist", CALICO);
    let installer = node.installer();
    installer.install_config().unwrap();
    // Calico restarts and writes its own configuration again.
    node.write("10-calico.conflist", CALICO);
    assert_eq!(
        installer.install_config().unwrap(),
        ConfigOutcome::Written(path.clone())
    );
    assert_eq!(read(&path)["plugins"][3], ours());
}

#[test]
fn malformed_configurations_are_left_untouched() {
    let node = Node::new();
    for (contents, malformed) in [
        (
            r#"{"cniVersion": "1.0.0", "plugins": [{"type": "calico"},"#,
            true,
        ),
        ("", true),
        (r#"["calico"]"#, false),
        (r#"{"cniVersion": "1.0.0", "name": "x"}"#, false),
        (
            r#"{"cniVersion": "1.0.0", "name": "x", "plugins": {"type": "calico"}}"#,
            false,
        ),
    ] {
        let path = node.write("10-calico.conflist", contents);
        let before = fs::metadata(&path).unwrap();
        let error = node.installer().install_config().unwrap_err();
        match (&error, malformed) {
            (CniInstallError::Malformed { path: p, .. }, true)
            | (CniInstallError::NotANetwork { path: p, .. }, false) => assert_eq!(p, &path),
            _ => panic!("{contents:?}: {error:?}"),
        }
        assert!(error.to_string().contains("10-calico.conflist"), "{error}");
        assert_eq!(fs::read_to_string(&path).unwrap(), contents);
        assert_eq!(fs::metadata(&path).unwrap().ino(), before.ino());
    }
    // A version the plugin does not speak: installing would fail every pod start.
    let path = node.write(
        "10-calico.conflist",
        &CALICO.replace("\"1.0.0\"", "\"0.2.0\""),
    );
    let error = node.installer().install_config().unwrap_err();
    assert!(
        matches!(&error, CniInstallError::UnsupportedVersion { version, .. } if version == "0.2.0"),
        "{error:?}"
    );
    assert!(!fs::read_to_string(&path).unwrap().contains("zmesh"));
    // Once fixed, the next pass installs.
    node.write("10-calico.conflist", CALICO);
    assert!(matches!(
        node.installer().install_config().unwrap(),
        ConfigOutcome::Written(_)
    ));
}

#[test]
fn the_binary_is_copied_only_when_it_differs() {
    let node = Node::new();
    let mut installer = node.installer();
    let target = node.bin.join(PLUGIN_TYPE);
    assert!(installer.install_binary().unwrap());
    assert_eq!(fs::read(&target).unwrap(), b"\x7fELF plugin v1");
    assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o755);
    let first = fs::metadata(&target).unwrap().ino();
    assert!(!installer.install_binary().unwrap());
    assert!(!node.installer().install_binary().unwrap());
    assert_eq!(fs::metadata(&target).unwrap().ino(), first);
    // An upgrade brings a new binary: replaced by rename (a new inode; a running plugin
    // keeps its old one).
    fs::write(&node.plugin, b"\x7fELF plugin v2").unwrap();
    assert!(node.installer().install_binary().unwrap());
    assert_eq!(fs::read(&target).unwrap(), b"\x7fELF plugin v2");
    assert_ne!(fs::metadata(&target).unwrap().ino(), first);
    // Someone changed the installed file: ours again.
    fs::write(&target, b"tampered").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(installer.install_binary().unwrap());
    assert_eq!(fs::read(&target).unwrap(), b"\x7fELF plugin v2");
    assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o755);
    // Removed: copied again.
    fs::remove_file(&target).unwrap();
    assert!(installer.install_binary().unwrap());
    // A missing source is an error naming it.
    fs::remove_file(&node.plugin).unwrap();
    fs::remove_file(&target).unwrap();
    let error = node.installer().install_binary().unwrap_err();
    assert!(error.to_string().contains("zmesh-cni.build"), "{error}");
    assert_eq!(fs::read_dir(&node.bin).unwrap().count(), 0);
}

#[test]
fn uninstall_removes_our_entry_and_binary_and_nothing_else() {
    let node = Node::new();
    let calico = node.write("10-calico.conflist", CALICO);
    let bridge = node.write(
        "20-bridge.conf",
        r#"{"cniVersion": "1.0.0", "name": "b", "type": "bridge"}"#,
    );
    let broken = node.write("30-broken.conflist", "{");
    let mut installer = node.installer();
    installer.install_binary().unwrap();
    installer.install_config().unwrap();
    // An entry left in a file that is no longer the primary one goes as well.
    let old = node.write(
        "40-old.conflist",
        &json!({"cniVersion": "1.0.0", "name": "old",
                "plugins": [{"type": "flannel"}, ours()]})
        .to_string(),
    );
    let removed = uninstall(&node.bin, &node.conf).unwrap();
    assert_eq!(removed.configs, vec![calico.clone(), old.clone()]);
    assert!(removed.binary);
    assert!(!node.bin.join(PLUGIN_TYPE).exists());
    let calico_after = read(&calico);
    assert_eq!(calico_after, serde_json::from_str::<Value>(CALICO).unwrap());
    assert_eq!(
        key_order(&calico_after),
        key_order(&serde_json::from_str(CALICO).unwrap())
    );
    assert_eq!(
        read(&old),
        json!({"cniVersion": "1.0.0", "name": "old", "plugins": [{"type": "flannel"}]})
    );
    assert_eq!(
        fs::read_to_string(&bridge).unwrap(),
        r#"{"cniVersion": "1.0.0", "name": "b", "type": "bridge"}"#
    );
    assert_eq!(fs::read_to_string(&broken).unwrap(), "{");
    // Twice: nothing left to do.
    assert_eq!(
        uninstall(&node.bin, &node.conf).unwrap(),
        Default::default()
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_agent_waits_for_a_configuration_and_keeps_the_entry() {
    let node = Node::new();
    let task = keep_installed(node.install(FailurePolicy::Closed));
    let path = node.conf.join("10-calico.conflist");
    // The blocking passes run on real threads; paused time only skips the waits between.
    let has_entry = |path: &Path| {
        fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["plugins"].as_array().and_then(|p| p.last()) == Some(&ours()))
    };
    // Started before the network plugin wrote anything: no error, the binary is there.
    for _ in 0..100 {
        if node.bin.join(PLUGIN_TYPE).exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(node.bin.join(PLUGIN_TYPE).exists());
    node.write("10-calico.conflist", CALICO);
    for _ in 0..100 {
        if has_entry(&path) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        has_entry(&path),
        "installed once the configuration appeared"
    );
    node.write("10-calico.conflist", CALICO);
    for _ in 0..100 {
        if has_entry(&path) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(has_entry(&path), "put back after the rewrite");
    task.abort();
}
