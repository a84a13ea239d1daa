//! Discovery on the real kernel: processes in real network namespaces and in cgroups named
//! the way kubelet names them (cgroupfs and systemd drivers), found through /proc.
//! Needs root (network namespaces, cgroup v2).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use zmesh_agent::discovery::{NetnsRegistry, PodNetnsDiscovery};
use zmesh_agent::netns_cookie;

/// The cgroup v2 mount (/sys/fs/cgroup on unified systems, /sys/fs/cgroup/unified on
/// hybrid ones), from mountinfo.
fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2").then(|| before.split(' ').nth(4))?
        })
        .map(PathBuf::from)
        .expect("a cgroup2 mount (this test needs cgroup v2, unified or hybrid)")
}

fn random_hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap())
        .collect()
}

fn random_uid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Everything one test made: killed and removed on drop, also when the test panics.
struct Scene {
    tag: String,
    /// The test's cgroup subtree, `<cgroup2>/zmd-test-<tag>`.
    root: PathBuf,
    /// Directories made below `root`, removed deepest first.
    dirs: Vec<PathBuf>,
    netns: Vec<String>,
    children: Vec<Child>,
}

impl Scene {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (network namespaces, cgroups)"
        );
        let tag = random_hex(8);
        let root = cgroup2_mount().join(format!("zmd-test-{tag}"));
        std::fs::create_dir(&root).expect("a cgroup for the test");
        Self {
            tag,
            root,
            dirs: Vec::new(),
            netns: Vec::new(),
            children: Vec::new(),
        }
    }

    /// A named network namespace, /run/netns/zmd-<tag>-<name>.
    fn netns(&mut self, name: &str) -> PathBuf {
        let name = format!("zmd-{}-{name}", self.tag);
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(status.success(), "ip netns add {name}");
        self.netns.push(name.clone());
        PathBuf::from("/run/netns").join(name)
    }

    /// Creates the cgroup directories of `relative` (below the test's root).
    fn cgroup(&mut self, relative: &str) -> PathBuf {
        let mut dir = self.root.clone();
        for component in relative.split('/') {
            dir.push(component);
            if !dir.exists() {
                std::fs::create_dir(&dir).expect("a cgroup directory");
                self.dirs.push(dir.clone());
            }
        }
        dir
    }

    /// Starts `sleep` already inside `netns` (or ours) and `cgroup`: both are entered
    /// between fork and exec, so the process is there once spawn returns.
    fn start(&mut self, netns: Option<&Path>, cgroup: &Path, seconds: &str) -> u32 {
        let netns = netns.map(|path| File::open(path).expect("the netns"));
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .expect("cgroup.procs");
        let mut command = Command::new("sleep");
        command
            .arg(seconds)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: only setns(2) and write(2) on descriptors opened before the fork run in
        // the child: async-signal-safe, no allocation.
        unsafe {
            command.pre_exec(move || {
                if let Some(netns) = &netns {
                    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                }
                // "0" moves the writing process itself.
                nix::unistd::write(procs.as_fd(), b"0")?;
                Ok(())
            });
        }
        let child = command.spawn().expect("sleep starts");
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A reaped process leaves its cgroup a moment later: rmdir says EBUSY until then.
        for dir in self.dirs.iter().rev().chain(std::iter::once(&self.root)) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("cannot remove {}: {e}", dir.display());
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for name in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[test]
fn finds_pods_by_kubelet_cgroups_of_both_drivers() {
    let mut scene = Scene::new();
    let (cgroupfs_uid, systemd_uid, host_uid, zombie_uid, absent_uid) = (
        random_uid(),
        random_uid(),
        random_uid(),
        random_uid(),
        random_uid(),
    );

    // cgroupfs driver, BestEffort: <root>/kubepods/besteffort/pod<uid>/<container>.
    let ns_a = scene.netns("a");
    let cgroup_a = scene.cgroup(&format!("kubepods/besteffort/pod{cgroupfs_uid}/ctr"));
    scene.start(Some(&ns_a), &cgroup_a, "600");

    // systemd driver, Burstable: kubepods-burstable-pod<uid with _>.slice/<scope>.
    let ns_b = scene.netns("b");
    let cgroup_b = scene.cgroup(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        systemd_uid.replace('-', "_"),
        random_hex(16)
    ));
    scene.start(Some(&ns_b), &cgroup_b, "600");

    // A hostNetwork pod: its process shares the node's (here: the test's) namespace.
    let cgroup_host = scene.cgroup(&format!("kubepods/pod{host_uid}/ctr"));
    scene.start(None, &cgroup_host, "600");

    // A pod whose only process has exited but is not reaped yet (a zombie).
    let ns_z = scene.netns("z");
    let cgroup_z = scene.cgroup(&format!("kubepods/burstable/pod{zombie_uid}/ctr"));
    let zombie = scene.start(Some(&ns_z), &cgroup_z, "0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{zombie}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, s)| s.trim_start().starts_with('Z'))
    }) {
        assert!(Instant::now() < deadline, "sleep 0 did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }

    let discovery = PodNetnsDiscovery::new("/proc", NetnsRegistry::default());
    let scan = discovery
        .scan([
            cgroupfs_uid.as_str(),
            systemd_uid.as_str(),
            host_uid.as_str(),
            zombie_uid.as_str(),
            absent_uid.as_str(),
        ])
        .expect("/proc can be listed");
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    let cookie = |path: &Path| netns_cookie(path).expect("a netns cookie");
    assert_eq!(
        cookie(&scan.found[&cgroupfs_uid]),
        cookie(&ns_a),
        "cgroupfs pod: found in its namespace ({})",
        scan.found[&cgroupfs_uid].display()
    );
    assert_eq!(
        cookie(&scan.found[&systemd_uid]),
        cookie(&ns_b),
        "systemd pod: found in its namespace"
    );
    assert!(
        !scan.found.contains_key(&host_uid),
        "a process in the node's namespace is not the pod's: {:?}",
        scan.found.get(&host_uid)
    );
    assert!(
        !scan.found.contains_key(&zombie_uid),
        "a zombie has no namespace to give"
    );
    assert!(!scan.found.contains_key(&absent_uid));
    assert_eq!(scan.found.len(), 2);
}
