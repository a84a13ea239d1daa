//! A CA server on 127.0.0.1 (ephemeral port) over a temporary state directory.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::oneshot;
use zmesh_certs::{
    CaServer, CaStore, FilePlacement, InitOptions, NodeName, Policy, ServerOptions, StaticTokens,
    DEFAULT_CLUSTER_ID,
};
use zmesh_identity::{TrustBundle, TrustDomain};

pub const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
pub const DB: &str = "spiffe://cluster.local/ns/default/sa/db";
/// The static bearer token of node-b.
pub const NODE_B_TOKEN: &str = "node-b-static-secret";

pub struct Ca {
    pub dir: tempfile::TempDir,
    pub store: CaStore,
    pub addr: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Ca {
    pub async fn start(policy: Policy) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = CaStore::init(
            &dir.path().join("ca"),
            &InitOptions {
                trust_domain: TrustDomain::default(),
                policy,
            },
        )
        .unwrap();
        let placement_path = dir.path().join("placement.yaml");
        std::fs::write(
            &placement_path,
            "node-a:\n  - default/web\nnode-b:\n  - spiffe://cluster.local/ns/default/sa/db\n",
        )
        .unwrap();
        let tokens_path = dir.path().join("bearer-tokens");
        std::fs::write(
            &tokens_path,
            StaticTokens::file_line(&NodeName::new("node-b").unwrap(), NODE_B_TOKEN) + "\n",
        )
        .unwrap();
        let server = CaServer::bind(
            store.clone(),
            ServerOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                serving_names: vec!["localhost".into(), "127.0.0.1".into()],
                placement: Arc::new(
                    FilePlacement::new(&placement_path, &TrustDomain::default()).unwrap(),
                ),
                bearer: Some(Arc::new(StaticTokens::new(&tokens_path).unwrap())),
                cluster_id: DEFAULT_CLUSTER_ID.into(),
            },
        )
        .await
        .unwrap();
        let addr: SocketAddr = server.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir,
            store,
            addr: addr.to_string(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn bundle_pem(&self) -> String {
        self.store.load().unwrap().bundle_pem().to_owned()
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("nodes").join(node)
    }

    /// Number of leaves in the ledger.
    pub fn issued_count(&self) -> usize {
        read_lines(&self.store.dir().join("issued.jsonl")).len()
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        read_lines(&self.store.dir().join("audit.jsonl"))
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server did not stop")
                .unwrap();
        }
    }
}

fn read_lines(path: &std::path::Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => t
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The identity crate's SVID validator, against `roots_pem`.
pub fn verify_with_identity(chain_pem: &[String], roots_pem: &str) -> Result<String, String> {
    let mut bundle = TrustBundle::new();
    bundle
        .add_pem(&TrustDomain::default(), roots_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    let chain: Vec<_> = chain_pem.iter().flat_map(|p| certs(p)).collect();
    zmesh_identity::verify_svid(&chain, &bundle, SystemTime::now())
        .map(|v| v.id.to_string())
        .map_err(|e| e.to_string())
}

/// The root a leaf chains to, by webpki path building against `roots_pem`.
pub fn chains_to(leaf_and_intermediates: &[String], roots_pem: &str) -> Option<Vec<u8>> {
    let chain: Vec<_> = leaf_and_intermediates
        .iter()
        .flat_map(|p| certs(p))
        .collect();
    let roots = certs(roots_pem);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).ok()?;
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .ok()?;
    Some(path.anchor().subject.as_ref().to_vec())
}

/// Joins `node` with a fresh token; its credentials land in `ca.node_dir(node)`.
pub async fn join_as(ca: &Ca, node: &str) -> zmesh_certs::NodeCredentials {
    let name = NodeName::new(node).unwrap();
    let token = ca
        .store
        .create_join_token(&name, Duration::from_secs(600))
        .unwrap();
    zmesh_certs::join(
        &ca.addr,
        &ca.bundle_pem(),
        &token,
        &name,
        &TrustDomain::default(),
        &ca.node_dir(node),
    )
    .await
    .unwrap()
}

/// A CSR (new key) for `id`.
pub fn csr_for(id: &str) -> String {
    zmesh_certs::new_key_and_csr(&zmesh_identity::SpiffeId::parse(id).unwrap())
        .unwrap()
        .1
}

/// The serial (hex) of the first certificate of a PEM text.
pub fn serial_of(pem: &str) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = certs(pem).remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.raw_serial_as_string()
}

/// Waits (bounded) until `cond` holds, re-checking every 20 ms.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
