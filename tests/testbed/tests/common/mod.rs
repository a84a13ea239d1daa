//! Helpers shared by the end-to-end tests (all need root).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use zmesh_testbed::{Cluster, ClusterSpec};

/// Two nodes, two pods on the first, one on the second.
pub fn two_node_spec() -> ClusterSpec {
    ClusterSpec::new()
        .node("node1", |n| {
            n.pod("web", "default", "web").pod("db", "data", "postgres")
        })
        .node("node2", |n| n.pod("client", "default", "sleep"))
}

pub fn build() -> Cluster {
    Cluster::build(&two_node_spec()).expect("building the cluster")
}

/// The cgroup2 mount point, found independently of the library.
pub fn cgroup2() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("cgroup2 is mounted")
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Everything of run `id` still visible from the root namespace: namespaces, root links,
/// root routes, cgroups and the owner record. Empty means fully cleaned up.
pub fn remnants(id: &str) -> Vec<String> {
    assert!(id.starts_with("zt") && id.len() == 7, "bad run id {id:?}");
    let mut left = Vec::new();
    for line in run("ip", &["netns", "list"]).lines() {
        if line.contains(id) {
            left.push(format!("netns {line}"));
        }
    }
    for line in run("ip", &["-o", "link", "show"]).lines() {
        if line.contains(id) {
            left.push(format!("link {line}"));
        }
    }
    for line in run("ip", &["route", "show", "table", "all"]).lines() {
        if line.contains(id) {
            left.push(format!("route {line}"));
        }
    }
    let cgroup = cgroup2().join("zmesh-testbed").join(id);
    if cgroup.exists() {
        left.push(format!("cgroup {}", cgroup.display()));
    }
    let record = PathBuf::from("/run/zmesh-testbed").join(id);
    if record.exists() {
        left.push(format!("owner record {}", record.display()));
    }
    left
}

/// Namespaces of run `id` (to check a live run's resources are still there).
pub fn netns_of(id: &str) -> Vec<String> {
    run("ip", &["netns", "list"])
        .lines()
        .filter(|l| l.contains(id))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect()
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: it runs no code any more).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            state.starts_with('Z') || state.starts_with('X')
        }
    }
}
