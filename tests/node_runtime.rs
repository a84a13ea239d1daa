//! The node substrate of the node tests: a real containerd + runc + CNI (bridge,
//! host-local) runtime, prepared by scripts/node-runtime.sh, with pods made through the
//! CRI API as kubelet makes them (tests/support/node_runtime.rs). There is no kubelet: the
//! test makes its CRI calls.

#[path = "support/node_runtime.rs"]
mod node_runtime;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use node_runtime::{NodeRuntime, NodeRuntimeOptions, Pod, PodSpec, Qos};

#[test]
fn pods_get_netns_cgroups_and_a_network_from_the_real_runtime() {
    // A chained plugin after bridge (where zmesh-cni will go): Debian's `tuning`, setting a
    // per-netns sysctl the pods can read back.
    let options = NodeRuntimeOptions {
        chained_plugins: vec![serde_json::json!({
            "type": "tuning",
            "sysctl": {"net.core.somaxconn": "1234"},
        })],
    };
    let runtime = NodeRuntime::start(options).expect("the node runtime starts");
    println!(
        "containerd ready, images imported in {:?} (dir {}, bridge {}, subnet {})",
        runtime.startup,
        runtime.dir().display(),
        runtime.bridge(),
        runtime.subnet()
    );
    let payload = format!("zmesh-node-{:016x}", rand::random::<u64>());
    // An echo server (one connection at a time, forever): `-e cat` answers with what the
    // client sends.
    let server = runtime
        .run_pod(PodSpec::new(
            "zmesh-test",
            "server",
            Qos::Guaranteed,
            &["nc", "-ll", "-p", "8080", "-e", "cat"],
        ))
        .expect("the server pod runs");
    let client = runtime
        .run_pod(PodSpec::new(
            "zmesh-test",
            "client",
            Qos::BestEffort,
            &["sleep", "3600"],
        ))
        .expect("the client pod runs");
    let burstable = runtime
        .run_pod(PodSpec::new(
            "other",
            "burstable",
            Qos::Burstable,
            &["sleep", "3600"],
        ))
        .expect("the burstable pod runs");
    for pod in [&server, &client, &burstable] {
        println!(
            "pod {}/{} ({:?}) ready in {:?}: ip {}, netns {}",
            pod.spec.namespace,
            pod.spec.name,
            pod.spec.qos,
            pod.startup,
            pod.ip,
            pod.netns.display()
        );
        check_pod(&runtime, pod);
    }
    assert_ne!(server.ip, client.ip);

    // Pod to pod over the bridge: the client sends the payload, the server echoes it. The
    // server may not be listening yet: retry until a deadline.
    let target = format!("echo {payload} | nc -w 5 {} 8080", server.ip);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = client
            .exec(&["sh", "-c", &target])
            .expect("exec in the client");
        if out.code == 0 && out.stdout.trim() == payload {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no echo from the server pod: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Stopping a pod removes its sandbox, network namespace and cgroup.
    let (netns, id, parent) = (
        client.netns.clone(),
        client.sandbox_id.clone(),
        client.cgroup_parent.clone(),
    );
    let stopped = Instant::now();
    client.stop().expect("the client pod stops");
    println!("pod stopped and removed in {:?}", stopped.elapsed());
    assert!(!netns.exists(), "{} still exists", netns.display());
    let sandboxes = runtime.sandboxes().expect("ListPodSandbox");
    assert!(
        sandboxes.iter().all(|s| s.id != id),
        "sandbox {id} still listed"
    );
    assert_eq!(sandboxes.len(), 2, "{sandboxes:?}");
    assert!(!cgroup_dirs(&parent).iter().any(|d| d.exists()));
}

/// Ready, running, in its subnet, with a network namespace and a cgroup the agent can find.
fn check_pod(runtime: &NodeRuntime, pod: &Pod) {
    let status = pod.sandbox_status().expect("PodSandboxStatus");
    assert!(status.ready, "{}: sandbox not ready", pod.spec.name);
    let (running, workload_pid) = pod.workload_status().expect("ContainerStatus");
    assert!(running, "{}: workload not running", pod.spec.name);
    assert!(
        runtime.subnet().contains(pod.ip),
        "{} not in {}",
        pod.ip,
        runtime.subnet()
    );
    assert!(
        pod.netns.starts_with("/var/run/netns") && pod.netns.exists(),
        "{}",
        pod.netns.display()
    );
    let netns_inode = std::fs::metadata(&pod.netns).expect("netns").ino();
    let wanted = format!("pod{}", pod.spec.uid);
    for pid in [pod.sandbox_pid, workload_pid] {
        assert_ne!(pid, 0, "{}: no PID in the verbose status", pod.spec.name);
        // What the agent's discovery scans: the process's cgroup names the pod's UID ...
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        if pid == pod.sandbox_pid {
            println!(
                "  /proc/{pid}/cgroup (pause):\n    {}",
                cgroup.trim().replace('\n', "\n    ")
            );
        }
        assert!(
            cgroup
                .lines()
                .any(|l| l.contains(&format!("{}/", pod.cgroup_parent))),
            "{}: /proc/{pid}/cgroup does not name {wanted}:\n{cgroup}",
            pod.spec.name
        );
        // ... and the process is in the sandbox's network namespace.
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .expect("ns/net")
            .ino();
        assert_eq!(
            ns, netns_inode,
            "{}: PID {pid} in another netns",
            pod.spec.name
        );
    }
    let somaxconn = pod
        .exec(&["cat", "/proc/sys/net/core/somaxconn"])
        .expect("exec");
    assert_eq!(
        somaxconn.stdout.trim(),
        "1234",
        "{}: the chained CNI plugin did not run: {somaxconn:?}",
        pod.spec.name
    );
    assert!(
        cgroup_dirs(&pod.cgroup_parent).iter().any(|d| d.is_dir()),
        "{}: no cgroup directory {}",
        pod.spec.name,
        pod.cgroup_parent
    );
}

/// The pod cgroup's directory in each cgroup hierarchy.
fn cgroup_dirs(parent: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2"))
                .then(|| std::path::Path::new(f[1]).join(parent.trim_start_matches('/')))
        })
        .collect()
}
