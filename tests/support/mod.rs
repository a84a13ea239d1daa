//! Shared by the end-to-end tests: a lab on the demo's manifests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zmesh::lab::{Lab, LabOptions, ReservedPod};

pub fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo")
}

pub async fn lab(strict_nodes: &[&str]) -> Lab {
    lab_from(manifests(), strict_nodes, vec![]).await
}

pub async fn lab_from(
    manifests: PathBuf,
    strict_nodes: &[&str],
    reserved_pods: Vec<ReservedPod>,
) -> Lab {
    Lab::start(LabOptions {
        manifests,
        zmesh_bin: PathBuf::from(env!("CARGO_BIN_EXE_zmesh")),
        cert_lifetime: Duration::from_secs(3600),
        strict_nodes: strict_nodes.iter().map(|s| s.to_string()).collect(),
        reserved_pods,
    })
    .await
    .expect("the lab starts")
}

pub fn addr(lab: &Lab, ns: &str, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(lab.cluster().pod(ns, pod).expect("pod").ip().into(), port)
}

/// A payload unique to this run, so captures of other runs cannot match it.
pub fn secret(label: &str) -> Vec<u8> {
    format!("zmesh-e2e-{label}-{:016x}", rand::random::<u64>()).into_bytes()
}
