//! The provider against the Workload API server of [`super::test_server`] (written to the
//! SPIFFE Workload API specification: security header required, full-state streams),
//! serving rcgen SVIDs.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::test_server::{bundle_map, entry, svid_entry, Ca, WorkloadApi};
use super::*;

const TD: &str = "example.org";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn workload(ns: &str, sa: &str) -> WorkloadId {
    WorkloadId::new(&TrustDomain::new(TD).unwrap(), ns, sa).unwrap()
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
    let mut server = WorkloadApi::start(
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
    let mut server = WorkloadApi::start(
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
    let server = WorkloadApi::start(
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
    let server = WorkloadApi::start(
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
    let mut server = WorkloadApi::start(
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
    server.restart();
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
