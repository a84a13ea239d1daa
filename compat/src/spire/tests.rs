//! The provider against a Workload API server written here to the SPIFFE Workload API
//! specification (security header required, full-state streams), serving rcgen SVIDs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use super::*;
use crate::pb::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::pb::workload::{X509BundlesResponse, X509svid};

const TD: &str = "example.org";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- certificates

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn serial() -> SerialNumber {
    SerialNumber::from(rand::random::<u64>() >> 1)
}

impl Ca {
    fn root(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(86400);
        p.serial_number = Some(serial());
        let der = p.self_signed(&key).unwrap().der().to_vec();
        Ca {
            params: p,
            key,
            der,
        }
    }

    /// An X.509-SVID for `id` (leaf DER, PKCS#8 key DER).
    fn svid(&self, id: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_owned()).unwrap(),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(60);
        p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        p.serial_number = Some(serial());
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

fn svid_entry(id: &str, issuer: &Ca, bundle: &[&Ca]) -> X509svid {
    let (cert, key) = issuer.svid(id);
    entry(id, cert, key, bundle)
}

fn entry(id: &str, cert: Vec<u8>, key: Vec<u8>, bundle: &[&Ca]) -> X509svid {
    X509svid {
        spiffe_id: id.to_owned(),
        x509_svid: cert,
        x509_svid_key: key,
        bundle: bundle.iter().flat_map(|c| c.der.clone()).collect(),
        hint: String::new(),
    }
}

fn workload(ns: &str, sa: &str) -> WorkloadId {
    WorkloadId::new(&TrustDomain::new(TD).unwrap(), ns, sa).unwrap()
}

// ---------------------------------------------------------------- the test server

#[derive(Clone)]
struct Fake {
    svids: watch::Receiver<X509svidResponse>,
    bundles: watch::Receiver<X509BundlesResponse>,
    stop: watch::Receiver<bool>,
}

type RespStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Forwards every state of `src` (the full state each time) until `stop`.
fn full_state_stream<T: Clone + Send + Sync + 'static>(
    mut src: watch::Receiver<T>,
    mut stop: watch::Receiver<bool>,
) -> RespStream<T> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let msg = src.borrow_and_update().clone();
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            tokio::select! {
                r = src.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Fake {
    type FetchX509SVIDStream = RespStream<X509svidResponse>;
    type FetchX509BundlesStream = RespStream<X509BundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        if self.svids.borrow().svids.is_empty() {
            // The spec: no identity for the caller -> PermissionDenied.
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok(Response::new(full_state_stream(
            self.svids.clone(),
            self.stop.clone(),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Ok(Response::new(full_state_stream(
            self.bundles.clone(),
            self.stop.clone(),
        )))
    }
}

/// The spec: calls without `workload.spiffe.io: true` get InvalidArgument.
#[allow(clippy::result_large_err)] // tonic's interceptor signature
fn require_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

struct Server {
    path: PathBuf,
    svids: watch::Sender<X509svidResponse>,
    bundles: watch::Sender<X509BundlesResponse>,
    stop: Option<(watch::Sender<bool>, oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Server {
    fn new(path: &Path, svids: Vec<X509svid>, bundles: HashMap<String, Vec<u8>>) -> Server {
        let (svids, _) = watch::channel(X509svidResponse {
            svids,
            ..Default::default()
        });
        let (bundles, _) = watch::channel(X509BundlesResponse {
            bundles,
            ..Default::default()
        });
        let mut server = Server {
            path: path.to_owned(),
            svids,
            bundles,
            stop: None,
        };
        server.start();
        server
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let fake = Fake {
            svids: self.svids.subscribe(),
            bundles: self.bundles.subscribe(),
            stop: stop_rx,
        };
        let service = SpiffeWorkloadApiServer::with_interceptor(fake, require_security_header);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = shutdown_rx.await;
                })
                .await
                .unwrap();
        });
        self.stop = Some((stop_tx, shutdown_tx, task));
    }

    /// Ends every stream, stops accepting and removes the socket.
    async fn stop(&mut self) {
        let (stop, shutdown, task) = self.stop.take().unwrap();
        stop.send_replace(true);
        let _ = shutdown.send(());
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        let _ = std::fs::remove_file(&self.path);
    }

    fn set_svids(&self, svids: Vec<X509svid>) {
        self.svids.send_modify(|m| m.svids = svids);
    }

    fn set_bundles(&self, bundles: HashMap<String, Vec<u8>>) {
        self.bundles.send_modify(|m| m.bundles = bundles);
    }
}

fn bundle_map(entries: &[(&str, &[&Ca])]) -> HashMap<String, Vec<u8>> {
    entries
        .iter()
        .map(|(td, cas)| {
            (
                format!("spiffe://{td}"),
                cas.iter().flat_map(|c| c.der.clone()).collect(),
            )
        })
        .collect()
}

fn fast_config(path: &Path) -> SpireConfig {
    SpireConfig {
        socket: path.to_owned(),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
    }
}

/// Waits (bounded) until `cond` holds, re-checking on every change of the source.
async fn wait_until(source: &SpireSource, what: &str, mut cond: impl FnMut(&SpireSource) -> bool) {
    let mut rx = source.changes();
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            if cond(source) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "timed out waiting for: {what}; status: {:?}",
        source.status()
    );
}

fn leaf_der(key: &CertifiedKey) -> Vec<u8> {
    key.cert[0].to_vec()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn server_rejects_calls_without_the_security_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ca = Ca::root("spire");
    let id = workload("default", "web").to_string();
    let mut server = Server::new(
        &path,
        vec![svid_entry(&id, &ca, &[&ca])],
        bundle_map(&[(TD, &[&ca])]),
    );
    let mut client = SpiffeWorkloadApiClient::new(connect(&path).await.unwrap());
    let err = client
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // With the header (as the provider sends it) the same call succeeds.
    let mut stream = client
        .fetch_x509svid(request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, id);
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn serves_svids_and_follows_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ca = Ca::root("spire");
    let web = workload("default", "web");
    let (cert1, key1) = ca.svid(&web.to_string());
    let mut server = Server::new(
        &path,
        vec![entry(&web.to_string(), cert1.clone(), key1, &[&ca])],
        bundle_map(&[(TD, &[&ca])]),
    );
    let bundle = SharedBundle::default();
    let source = SpireSource::start(fast_config(&path), bundle.clone());

    // Not expected yet: held but not served.
    wait_until(&source, "first SVID held", |s| s.status().svids.len() == 1).await;
    assert!(!source.status().svids[0].served);
    assert!(source.current(&web).is_none());

    let key = tokio::time::timeout(WAIT, source.certificate(&web))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leaf_der(&key), cert1);
    assert!(source.status().svids[0].served);
    // The SVID's bundle was installed for its trust domain.
    let td = TrustDomain::new(TD).unwrap();
    assert_eq!(
        bundle.snapshot().roots(&td),
        vec![CertificateDer::from(ca.der.clone())]
    );

    // Rotation: SPIRE pushes a new SVID; the provider serves it.
    let (cert2, key2) = ca.svid(&web.to_string());
    server.set_svids(vec![entry(&web.to_string(), cert2.clone(), key2, &[&ca])]);
    wait_until(&source, "rotated SVID served", |s| {
        s.current(&web).is_some_and(|k| leaf_der(&k) == cert2)
    })
    .await;

    // Forgetting stops serving.
    assert!(source.forget(&web));
    assert!(source.current(&web).is_none());

    // Full state: an identity no longer announced is dropped.
    source.expect(&web);
    let api = workload("default", "api");
    server.set_svids(vec![svid_entry(&api.to_string(), &ca, &[&ca])]);
    wait_until(&source, "web SVID withdrawn", |s| s.current(&web).is_none()).await;
    assert_eq!(source.status().svids.len(), 1);
    assert_eq!(source.status().svids[0].id, *api.spiffe_id());
    server.stop().await;
}

#[tokio::test]
async fn bundle_updates_apply_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let old_root = Ca::root("old");
    let new_root = Ca::root("new");
    let other = Ca::root("federated");
    let web = workload("default", "web");
    let server = Server::new(
        &path,
        vec![svid_entry(&web.to_string(), &old_root, &[&old_root])],
        bundle_map(&[(TD, &[&old_root])]),
    );
    let bundle = SharedBundle::default();
    let source = SpireSource::start(fast_config(&path), bundle.clone());
    let td = TrustDomain::new(TD).unwrap();
    let fed = TrustDomain::new("other.org").unwrap();
    wait_until(&source, "connected", |s| s.status().connected).await;
    assert_eq!(bundle.snapshot().roots(&td).len(), 1);

    // Root rotation overlap: old and new root trusted side by side, plus a federated domain.
    server.set_bundles(bundle_map(&[
        (TD, &[&old_root, &new_root]),
        ("other.org", &[&other]),
    ]));
    wait_until(&source, "new roots installed", |_| {
        let b = bundle.snapshot();
        b.roots(&td).len() == 2 && b.roots(&fed).len() == 1
    })
    .await;
    let roots = bundle.snapshot().roots(&td);
    assert!(roots.contains(&CertificateDer::from(new_root.der.clone())));

    // An SVID signed by the new root is accepted now that the root is trusted.
    let (cert, key) = new_root.svid(&web.to_string());
    server.set_svids(vec![entry(
        &web.to_string(),
        cert.clone(),
        key,
        &[&old_root, &new_root],
    )]);
    source.expect(&web);
    wait_until(&source, "SVID from new root served", |s| {
        s.current(&web).is_some_and(|k| leaf_der(&k) == cert)
    })
    .await;

    // End of overlap, federation withdrawn: the full state replaces what was trusted.
    server.set_bundles(bundle_map(&[(TD, &[&new_root])]));
    wait_until(&source, "old root and federation retracted", |_| {
        let b = bundle.snapshot();
        b.roots(&td) == vec![CertificateDer::from(new_root.der.clone())] && b.roots(&fed).is_empty()
    })
    .await;

    // A bundle that is not a CA certificate is refused and changes nothing.
    let (leaf, _) = new_root.svid(&web.to_string());
    server.set_bundles(HashMap::from([(format!("spiffe://{TD}"), leaf)]));
    wait_until(&source, "bad bundle refused", |s| {
        s.status()
            .refused
            .iter()
            .any(|e| matches!(e, SpireError::BadBundle { .. }))
    })
    .await;
    assert_eq!(
        bundle.snapshot().roots(&td),
        vec![CertificateDer::from(new_root.der.clone())]
    );
}

#[tokio::test]
async fn refuses_mismatched_untrusted_and_foreign_svids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ca = Ca::root("spire");
    let rogue = Ca::root("rogue");
    let web = workload("default", "web");
    let db = workload("default", "db");
    let api = workload("default", "api");
    // web is announced with db's certificate; api's SVID chains to an untrusted root;
    // a Cilium-style numeric identity is valid but no workload here has it.
    let (db_cert, db_key) = ca.svid(&db.to_string());
    let cilium_id = "spiffe://example.org/identity/1234";
    let server = Server::new(
        &path,
        vec![
            entry(&web.to_string(), db_cert, db_key, &[&ca]),
            svid_entry(&api.to_string(), &rogue, &[&ca]),
            svid_entry(cilium_id, &ca, &[&ca]),
            entry("not a spiffe id", vec![0x30, 0x00], vec![], &[&ca]),
        ],
        bundle_map(&[(TD, &[&ca])]),
    );
    let source = SpireSource::start(fast_config(&path), SharedBundle::default());
    source.expect(&web);
    source.expect(&api);
    wait_until(&source, "message processed", |s| {
        s.status().svids.len() == 1
    })
    .await;

    let status = source.status();
    assert_eq!(status.svids[0].id.to_string(), cilium_id);
    assert!(!status.svids[0].served, "no workload here has this ID");
    assert!(source.current(&web).is_none(), "mismatched identity served");
    assert!(source.current(&api).is_none(), "untrusted SVID served");
    assert!(status.refused.iter().any(|e| matches!(
        e,
        SpireError::IdMismatch { announced, actual }
            if announced == web.spiffe_id() && actual == db.spiffe_id()
    )));
    assert!(status.refused.iter().any(|e| matches!(
        e,
        SpireError::InvalidSvid { id, source: SvidError::Untrusted { .. } } if *id == api.to_string()
    )));
    assert!(status
        .refused
        .iter()
        .any(|e| matches!(e, SpireError::BadSpiffeId { .. })));

    // A later good SVID for web is served: refusal is per message, not permanent.
    server.set_svids(vec![svid_entry(&web.to_string(), &ca, &[&ca])]);
    wait_until(&source, "good SVID served", |s| s.current(&web).is_some()).await;
    assert!(source.status().refused.is_empty());
}

#[tokio::test]
async fn keeps_last_good_svid_while_disconnected_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ca = Ca::root("spire");
    let web = workload("default", "web");
    let (cert1, key1) = ca.svid(&web.to_string());
    let mut server = Server::new(
        &path,
        vec![entry(&web.to_string(), cert1.clone(), key1, &[&ca])],
        bundle_map(&[(TD, &[&ca])]),
    );
    let bundle = SharedBundle::default();
    let source = SpireSource::start(fast_config(&path), bundle.clone());
    source.expect(&web);
    wait_until(&source, "first SVID", |s| s.current(&web).is_some()).await;

    server.stop().await;
    wait_until(&source, "disconnect noticed", |s| {
        let st = s.status();
        !st.connected && st.last_error.is_some()
    })
    .await;
    let kept = source
        .current(&web)
        .expect("last good SVID kept while SPIRE is away");
    assert_eq!(leaf_der(&kept), cert1);
    assert_eq!(
        bundle
            .snapshot()
            .roots(&TrustDomain::new(TD).unwrap())
            .len(),
        1
    );

    // SPIRE comes back (same socket path) with a new SVID.
    let (cert2, key2) = ca.svid(&web.to_string());
    server.set_svids(vec![entry(&web.to_string(), cert2.clone(), key2, &[&ca])]);
    server.start();
    wait_until(&source, "reconnected with new SVID", |s| {
        s.status().connected && s.current(&web).is_some_and(|k| leaf_der(&k) == cert2)
    })
    .await;
    assert!(source.status().last_error.is_none());
    server.stop().await;
}

#[test]
fn splits_concatenated_der_and_rejects_garbage() {
    let a = Ca::root("a");
    let b = Ca::root("b");
    let both: Vec<u8> = a.der.iter().chain(b.der.iter()).copied().collect();
    let split = split_der(&both).unwrap();
    assert_eq!(split.len(), 2);
    assert_eq!(split[0].as_ref(), a.der.as_slice());
    assert_eq!(split[1].as_ref(), b.der.as_slice());
    assert!(split_der(&[]).is_err());
    assert!(split_der(&both[..both.len() - 1]).is_err(), "truncated");
    assert!(split_der(&[0x04, 0x01, 0x00]).is_err(), "not a SEQUENCE");
    assert!(
        split_der(&[0x30, 0x85, 1, 2, 3, 4, 5]).is_err(),
        "length too long"
    );
    assert!(split_der(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
}

#[test]
fn backoff_doubles_and_caps() {
    let c = fast_config(Path::new("/x"));
    assert_eq!(backoff(&c, 1, 1.0), Duration::from_millis(20));
    assert_eq!(backoff(&c, 2, 1.0), Duration::from_millis(40));
    assert_eq!(backoff(&c, 10, 1.0), Duration::from_millis(200));
    assert_eq!(backoff(&c, 1000, 0.5), Duration::from_millis(100));
}
