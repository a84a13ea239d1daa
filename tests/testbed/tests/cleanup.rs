//! Dropping a cluster removes everything of its run, even on panic (needs root).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

#[test]
fn drop_removes_every_resource_of_the_run() {
    let cluster = common::build();
    let id = cluster.run_id().to_owned();
    let before = common::remnants(&id);
    // Sanity: the check can see a live run (4 pods + 2 nodes + underlay, cgroup, record).
    assert_eq!(common::netns_of(&id).len(), 6, "{before:?}");
    assert!(before.iter().any(|r| r.starts_with("cgroup")), "{before:?}");
    assert!(
        before.iter().any(|r| r.starts_with("owner record")),
        "{before:?}"
    );
    drop(cluster);
    assert_eq!(common::remnants(&id), Vec::<String>::new());
}

#[test]
fn explicit_teardown_reports_success() {
    let cluster = common::build();
    let id = cluster.run_id().to_owned();
    cluster.teardown().unwrap();
    assert_eq!(common::remnants(&id), Vec::<String>::new());
}

#[test]
fn panic_in_a_test_body_still_cleans_up() {
    let id = Mutex::new(String::new());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let cluster = common::build();
        *id.lock().unwrap() = cluster.run_id().to_owned();
        let pod = cluster.pod("default", "web").unwrap();
        let _server = pod.serve_echo(8080).unwrap();
        panic!("test body failed");
    }));
    assert!(result.is_err());
    let id = id.into_inner().unwrap();
    assert!(!id.is_empty());
    assert_eq!(common::remnants(&id), Vec::<String>::new());
}

#[test]
fn processes_started_in_pods_and_nodes_are_killed_on_drop() {
    let cluster = common::build();
    let id = cluster.run_id().to_owned();
    let mut in_pod = cluster
        .pod("default", "web")
        .unwrap()
        .command("sleep")
        .unwrap()
        .arg("1000")
        .spawn()
        .unwrap();
    let mut in_node = cluster
        .node("node2")
        .unwrap()
        .command("sleep")
        .unwrap()
        .arg("1000")
        .spawn()
        .unwrap();
    // A grandchild that detached into its own session is still in the pod's cgroup.
    let out = cluster
        .pod("data", "db")
        .unwrap()
        .command("sh")
        .unwrap()
        .args(["-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!"])
        .output()
        .unwrap();
    let orphan: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!common::process_gone(orphan));
    drop(cluster);
    assert_eq!(in_pod.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!(in_node.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(common::process_gone(orphan));
    assert_eq!(common::remnants(&id), Vec::<String>::new());
}

#[test]
fn invalid_spec_creates_nothing() {
    let err = zmesh_testbed::Cluster::build(&zmesh_testbed::ClusterSpec::new()).unwrap_err();
    assert!(matches!(err, zmesh_testbed::Error::InvalidSpec(_)), "{err}");
}
