//! Discovery over fake /proc trees: directories with a `cgroup` file and an `ns/net`
//! symlink to a file standing for a network namespace (its content is the fake cookie).

use super::*;
use std::collections::BTreeSet;

const A: &str = "0b5f6a3e-91c2-4d7b-8e1f-2a3b4c5d6e7f";
/// A UID that starts with all of [`A`]: a substring match would mistake one for the other.
const A_LONGER: &str = "0b5f6a3e-91c2-4d7b-8e1f-2a3b4c5d6e7f0";
const B: &str = "7c1d2e3f-4a5b-4c6d-9e8f-0a1b2c3d4e5f";
const C: &str = "f00dcafe-0000-4111-8222-333344445555";

fn underscored(uid: &str) -> String {
    uid.replace('-', "_")
}

struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    /// A tree whose PID 1 (the host's init) is in the "host" namespace.
    fn new() -> Self {
        let fake = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(fake.dir.path().join("netns")).unwrap();
        fake.process(1, "0::/init.scope\n", Some("host"));
        // Entries of a real /proc that are not processes.
        std::fs::create_dir(fake.dir.path().join("sys")).unwrap();
        std::fs::write(fake.dir.path().join("meminfo"), "MemTotal: 1 kB\n").unwrap();
        fake
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The file standing for namespace `name`, its fake cookie derived from the name.
    fn netns(&self, name: &str) -> PathBuf {
        let path = self.root().join("netns").join(name);
        if !path.exists() {
            std::fs::write(&path, fake_cookie(name).to_string()).unwrap();
        }
        path
    }

    /// A process with this `cgroup` file, in namespace `netns` (none: like a zombie).
    fn process(&self, pid: u32, cgroup: &str, netns: Option<&str>) {
        let dir = self.root().join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        if let Some(name) = netns {
            std::os::unix::fs::symlink(self.netns(name), dir.join("ns/net")).unwrap();
        }
    }

    fn discovery(&self) -> PodNetnsDiscovery {
        PodNetnsDiscovery::new(self.root(), NetnsRegistry::default())
    }

    fn scan(&self, uids: &[&str]) -> Scan {
        self.discovery().scan(uids.iter().copied()).unwrap()
    }

    fn net(&self, pid: u32) -> PathBuf {
        self.root().join(pid.to_string()).join("ns/net")
    }
}

fn fake_cookie(name: &str) -> u64 {
    name.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1099511628211)
    })
}

fn read_fake_cookie(path: &Path) -> io::Result<u64> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(io::Error::other)
}

fn uids(file: &str) -> Vec<String> {
    pod_uids_in(file).collect()
}

#[test]
fn cgroupfs_names_of_every_qos_class() {
    for path in [
        format!("/kubepods/besteffort/pod{A}"),
        format!("/kubepods/burstable/pod{A}/0123abcd"),
        // Guaranteed pods sit directly under kubepods.
        format!("/kubepods/pod{A}/cri-containerd-0123abcd.scope"),
        // A custom cgroup root (kind: /kubelet) and a cgroup namespace's relative view.
        format!("/kubelet/kubepods/besteffort/pod{A}/crio-0123.scope"),
        format!("/../../kubepods/burstable/pod{A}/ctr"),
    ] {
        assert_eq!(uids(&format!("0::{path}\n")), [A], "{path}");
    }
}

#[test]
fn systemd_names_of_every_qos_class() {
    let u = underscored(A);
    for path in [
        format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-0a1b.scope"),
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
        format!("/kubepods.slice/kubepods-pod{u}.slice/crio-0a1b.scope"),
        // kind: kubelet's cgroup root is kubelet.slice.
        format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-1.scope"),
    ] {
        assert_eq!(uids(&format!("0::{path}\n")), [A], "{path}");
    }
    // UIDs in uppercase are matched without regard to case.
    let upper = A.to_uppercase();
    assert_eq!(uids(&format!("0::/kubepods/pod{upper}\n")), [A]);
}

#[test]
fn cgroup_v1_v2_and_hybrid_lines() {
    let u = underscored(A);
    let v1 = format!(
        "12:pids:/kubepods/besteffort/pod{A}/ctr\n\
         11:cpu,cpuacct:/kubepods/besteffort/pod{A}/ctr\n\
         1:name=systemd:/kubepods/besteffort/pod{A}/ctr\n"
    );
    assert!(uids(&v1).iter().all(|uid| uid == A) && !uids(&v1).is_empty());
    let v2 = format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/x.scope\n"
    );
    assert_eq!(uids(&v2), [A]);
    // Hybrid: v1 hierarchies name the pod, the unified one may not (or the other way).
    let hybrid = format!("9:name=systemd:/\n4:memory:/kubepods/burstable/pod{A}/ctr\n0::/\n");
    assert_eq!(uids(&hybrid), [A]);
    let hybrid = format!("4:memory:/\n0::/kubepods/burstable/pod{B}/ctr\n");
    assert_eq!(uids(&hybrid), [B]);
}

#[test]
fn names_that_only_look_like_pods_are_not_pods() {
    let u = underscored(A);
    for path in [
        // Not under kubepods or a QoS directory.
        format!("/system.slice/pod{A}"),
        format!("/kubepods/besteffort/ctr/pod{A}"),
        format!("/pod{A}"),
        // The slice name must be exactly kubepods[-qos]-pod<uid>.slice.
        format!("/kubepods.slice/kubepods-besteffort-pod{u}.slice.bak"),
        format!("/kubepods.slice/xkubepods-pod{u}.slice"),
        format!("/kubepods.slice/kubepods-guaranteed-pod{u}.slice"),
        format!("/kubepods.slice/kubepods-besteffort-pod{A}.slice"), // dashes: not escaped
        "/kubepods.slice/kubepods-besteffort-pod.slice".into(),
        "/kubepods/besteffort/pod".into(),
        format!("/kubepods/besteffort/pod{A}!"),
    ] {
        assert_eq!(
            uids(&format!("0::{path}\n")),
            Vec::<String>::new(),
            "{path}"
        );
    }
}

#[test]
fn malformed_cgroup_files_name_no_pod() {
    for file in [
        String::new(),
        "\n\n".into(),
        format!("kubepods/besteffort/pod{A}\n"), // no hierarchy fields
        format!("0:/kubepods/besteffort/pod{A}\n"), // one colon: no path field
        format!("0::kubepods/besteffort/pod{A}\n"), // relative path
        "\u{0}\u{1}garbage:::\n".into(),
    ] {
        assert_eq!(uids(&file), Vec::<String>::new(), "{file:?}");
    }
    // A bad line does not hide a good one.
    assert_eq!(uids(&format!("junk\n0::/kubepods/pod{A}\n")), [A]);
}

#[test]
fn one_scan_finds_many_pods_of_both_drivers() {
    let proc = FakeProc::new();
    proc.process(
        100,
        &format!("0::/kubepods/besteffort/pod{A}/pause\n"),
        Some("a"),
    );
    proc.process(
        200,
        &format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope\n",
            underscored(B)
        ),
        Some("b"),
    );
    // A second process of pod A (same namespace) and an unrelated one.
    proc.process(
        101,
        &format!("0::/kubepods/besteffort/pod{A}/app\n"),
        Some("a"),
    );
    proc.process(300, "0::/system.slice/sshd.service\n", Some("host"));
    let scan = proc.scan(&[A, B, C]);
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert_eq!(scan.found.len(), 2, "{:?}", scan.found);
    assert_eq!(read_fake_cookie(&scan.found[A]).unwrap(), fake_cookie("a"));
    assert_eq!(scan.found[B], proc.net(200));
    assert!(!scan.found.contains_key(C), "C has no process");
}

#[test]
fn a_uid_that_starts_with_another_is_another_pod() {
    let proc = FakeProc::new();
    proc.process(
        100,
        &format!("0::/kubepods/besteffort/pod{A_LONGER}/c\n"),
        Some("longer"),
    );
    proc.process(
        101,
        &format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/c.scope\n",
            underscored(A_LONGER)
        ),
        Some("longer"),
    );
    assert!(proc.scan(&[A]).found.is_empty(), "A has no process");
    let scan = proc.scan(&[A_LONGER]);
    assert_eq!(scan.found[A_LONGER], proc.net(100));

    // And the other way round: a process of A is not one of A_LONGER.
    let proc = FakeProc::new();
    proc.process(
        100,
        &format!("0::/kubepods/besteffort/pod{A}/c\n"),
        Some("a"),
    );
    let scan = proc.scan(&[A_LONGER, A]);
    assert_eq!(scan.found.keys().collect::<Vec<_>>(), [A]);
}

#[test]
fn processes_in_the_node_namespace_and_gone_processes_are_skipped() {
    let proc = FakeProc::new();
    // A hostNetwork container of pod A shares the node's namespace (PID 1's).
    proc.process(
        100,
        &format!("0::/kubepods/besteffort/pod{A}/c\n"),
        Some("host"),
    );
    // Pod B's only process is a zombie: no namespaces left.
    proc.process(200, &format!("0::/kubepods/besteffort/pod{B}/c\n"), None);
    // Pod C's process has a directory but vanished before its files were read.
    std::fs::create_dir(proc.root().join("300")).unwrap();
    let scan = proc.scan(&[A, B, C]);
    assert!(scan.found.is_empty(), "{:?}", scan.found);
    assert!(
        scan.problems.is_empty(),
        "races are not problems: {:?}",
        scan.problems
    );

    // A later process of pod A in a namespace of its own is the pod's.
    proc.process(
        101,
        &format!("0::/kubepods/besteffort/pod{A}/c\n"),
        Some("a"),
    );
    assert_eq!(proc.scan(&[A]).found[A], proc.net(101));
}

#[test]
fn the_agents_own_namespace_is_the_nodes() {
    let proc = FakeProc::new();
    let dir = proc.root().join("100");
    std::fs::create_dir_all(dir.join("ns")).unwrap();
    std::fs::write(dir.join("cgroup"), format!("0::/kubepods/pod{A}\n")).unwrap();
    std::os::unix::fs::symlink("/proc/self/ns/net", dir.join("ns/net")).unwrap();
    assert!(proc.scan(&[A]).found.is_empty());
}

#[test]
fn unreadable_processes_are_reported_and_do_not_stop_the_scan() {
    let proc = FakeProc::new();
    // A `cgroup` that cannot be read as a file (root reads anything, so no permissions).
    std::fs::create_dir_all(proc.root().join("100/cgroup")).unwrap();
    proc.process(200, &format!("0::/kubepods/pod{A}\n"), Some("a"));
    let scan = proc.scan(&[A]);
    assert_eq!(scan.found[A], proc.net(200));
    assert_eq!(scan.problems.len(), 1, "{:?}", scan.problems);
    assert!(
        scan.problems[0].to_string().contains("100/cgroup"),
        "{}",
        scan.problems[0]
    );
    // A /proc that is not there at all.
    let missing = PodNetnsDiscovery::new(proc.root().join("nope"), NetnsRegistry::default());
    assert!(matches!(
        missing.scan([A]),
        Err(DiscoveryError::ListProcesses { .. })
    ));
}

fn pod(name: &str, uid: Option<&str>, annotation: Option<&Path>) -> PodInfo {
    PodInfo {
        namespace: "shop".into(),
        name: name.into(),
        workload_name: name.into(),
        uid: uid.map(str::to_owned),
        node: Some("node1".into()),
        ips: vec![],
        service_account: name.into(),
        host_network: false,
        labels: Default::default(),
        netns_path: annotation.map(Path::to_owned),
        cgroup_path: None,
        ready: true,
        ports: Default::default(),
    }
}

#[test]
fn annotation_then_registry_then_proc() {
    let proc = FakeProc::new();
    for (pid, uid) in [(100, A), (200, B), (300, C)] {
        proc.process(
            pid,
            &format!("0::/kubepods/besteffort/pod{uid}/c\n"),
            Some(uid),
        );
    }
    let discovery = proc.discovery();
    let registered = proc.netns("registered");
    discovery.registry().register(B, &registered);
    discovery.registry().register(A, proc.netns("ignored"));
    let annotated = proc.netns("annotated");
    let pods = [
        pod("a", Some(A), Some(&annotated)),
        pod("b", Some(B), None),
        pod("c", Some(C), None),
        pod("d", None, None),
    ];
    let resolution = discovery.resolve(&pods);
    let found: BTreeMap<&str, (PathBuf, NetnsSource)> = resolution
        .found
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    assert_eq!(
        found,
        BTreeMap::from([
            ("shop/a", (annotated, NetnsSource::Annotation)),
            ("shop/b", (registered, NetnsSource::Registry)),
            ("shop/c", (proc.net(300), NetnsSource::Proc)),
        ])
    );
    // Forgotten: back to the scan.
    discovery.registry().forget(B);
    assert_eq!(
        discovery.resolve(&pods[1..2]).found["shop/b"],
        (proc.net(200), NetnsSource::Proc)
    );
    // Clones share the registry (the CNI plugin's side holds one).
    let handle = discovery.registry().clone();
    handle.register(B.to_uppercase(), "/run/netns/cni-1");
    assert_eq!(
        discovery.registry().get(B),
        Some(PathBuf::from("/run/netns/cni-1"))
    );
}

#[test]
fn cookies_are_resolved_once_per_uid_and_retried_until_found() {
    let proc = FakeProc::new();
    let mut cookies = NetnsCookies::new(proc.discovery());
    let t0 = Instant::now();
    let a = pod("a", Some(A), None);
    let nameless = pod("nameless", None, None);

    // Not started yet: pending, worth a retry; a pod nothing can find is not.
    let got = cookies.cookies(&[&a, &nameless], t0, &read_fake_cookie);
    assert_eq!(
        got,
        BTreeMap::from([("shop/a".into(), None), ("shop/nameless".into(), None)])
    );
    assert_eq!(cookies.pending(), 1);

    // Its sandbox starts: found.
    proc.process(
        100,
        &format!("0::/kubepods/besteffort/pod{A}/pause\n"),
        Some("a1"),
    );
    let got = cookies.cookies(&[&a], t0 + Duration::from_secs(1), &read_fake_cookie);
    assert_eq!(got["shop/a"], Some(fake_cookie("a1")));
    assert_eq!(cookies.pending(), 0);

    // Kept without looking again, even if its process is gone (a restart of the app
    // container does not change the pod's namespace).
    std::fs::remove_file(proc.net(100)).unwrap();
    let got = cookies.cookies(&[&a], t0 + Duration::from_secs(2), &read_fake_cookie);
    assert_eq!(got["shop/a"], Some(fake_cookie("a1")));

    // Recreated under the same name, with a new UID: resolved again.
    let recreated = pod("a", Some(B), None);
    proc.process(
        200,
        &format!("0::/kubepods/besteffort/pod{B}/pause\n"),
        Some("a2"),
    );
    let got = cookies.cookies(
        &[&recreated],
        t0 + Duration::from_secs(3),
        &read_fake_cookie,
    );
    assert_eq!(got["shop/a"], Some(fake_cookie("a2")));

    // A pod that leaves is forgotten.
    let got = cookies.cookies(&[], t0 + Duration::from_secs(4), &read_fake_cookie);
    assert!(got.is_empty());
    assert_eq!(cookies.pending(), 0);
}

#[test]
fn a_new_sandbox_registered_for_the_same_uid_is_resolved_again() {
    let proc = FakeProc::new();
    let discovery = proc.discovery();
    let registry = discovery.registry().clone();
    let mut cookies = NetnsCookies::new(discovery);
    let t0 = Instant::now();
    let a = pod("a", Some(A), None);
    registry.register(A, proc.netns("sandbox-1"));
    let got = cookies.cookies(&[&a], t0, &read_fake_cookie);
    assert_eq!(got["shop/a"], Some(fake_cookie("sandbox-1")));
    // Unchanged registration: kept.
    let got = cookies.cookies(&[&a], t0 + Duration::from_secs(1), &read_fake_cookie);
    assert_eq!(got["shop/a"], Some(fake_cookie("sandbox-1")));
    // The runtime made the pod a new sandbox (same UID): the CNI ADD registers its
    // namespace, which replaces the old one.
    registry.register(A, proc.netns("sandbox-2"));
    let got = cookies.cookies(&[&a], t0 + Duration::from_secs(2), &read_fake_cookie);
    assert_eq!(got["shop/a"], Some(fake_cookie("sandbox-2")));
}

#[test]
fn a_namespace_that_cannot_be_read_is_retried() {
    let proc = FakeProc::new();
    let mut cookies = NetnsCookies::new(proc.discovery());
    let bad = proc.root().join("no-such-netns");
    let a = pod("a", None, Some(&bad));
    let t0 = Instant::now();
    assert_eq!(
        cookies.cookies(&[&a], t0, &read_fake_cookie)["shop/a"],
        None
    );
    assert_eq!(cookies.pending(), 1);
    // Past the warning: still pending (warned once), and found once it appears.
    let later = t0 + UNRESOLVED_WARNING_AFTER + Duration::from_secs(1);
    assert_eq!(
        cookies.cookies(&[&a], later, &read_fake_cookie)["shop/a"],
        None
    );
    std::fs::write(&bad, "42").unwrap();
    assert_eq!(
        cookies.cookies(&[&a], later, &read_fake_cookie)["shop/a"],
        Some(42)
    );
    let seen: BTreeSet<_> = cookies.pods.keys().cloned().collect();
    assert_eq!(seen, BTreeSet::from(["shop/a".to_string()]));
}
