//! The manifest directory source (zmesh_cluster::manifests): Namespace, Pod, Service,
//! EndpointSlice and AuthorizationPolicy objects read from YAML files, merged into a
//! ClusterState, then the state queries the agent makes.
//!
//! Only the directory API is public, so each input is written to a scratch directory (on
//! /dev/shm when there is one) and read by a fresh ManifestDir. A NUL byte splits the input
//! into two files (a.yaml, b.yaml), to reach the merge across files.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use zmesh_cluster::manifests::ManifestDir;

static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let shm = std::path::Path::new("/dev/shm");
    let mut builder = tempfile::Builder::new();
    builder.prefix("zmesh-fuzz-manifests");
    let dir = if shm.is_dir() {
        builder.tempdir_in(shm)
    } else {
        builder.tempdir()
    };
    dir.expect("scratch dir").keep()
});

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&c| c == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let dir = &*DIR;
    std::fs::write(dir.join("a.yaml"), a).unwrap();
    match b {
        Some(b) => std::fs::write(dir.join("b.yaml"), b).unwrap(),
        None => {
            let _ = std::fs::remove_file(dir.join("b.yaml"));
        }
    }
    let mut source = ManifestDir::new(dir.clone());
    let (state, errors) = source.rescan();
    for e in &errors {
        let _ = e.to_string();
    }
    let Some(state) = state else {
        return;
    };
    for pod in state.pods() {
        assert_eq!(state.pod(&pod.key()), Some(pod));
        let _ = state.is_enrolled(pod);
        for ip in &pod.ips {
            assert!(state.pod_by_ip(*ip).is_some());
        }
        if let Some(node) = &pod.node {
            let _ = state.enrolled_on(node).count();
        }
    }
    for service in state.services() {
        for e in state.service_endpoints(service) {
            assert!(!e.ports.is_empty());
        }
    }
    for ns in state.namespaces() {
        let _ = ns.enrolls_pods();
    }
    let _ = state.endpoint_slices().count();
    let _ = state.policies().policies().len();
    // Nothing changed: a second scan reports no new state.
    assert!(source.rescan().0.is_none());
});
