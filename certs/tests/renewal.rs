//! Node certificate renewal over real gRPC + TLS: `Renew` authenticated by the current
//! node certificate, every refusal, and the renewal loop (half-life, root switch, expiry).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::*;
use tonic::Code;
use zmesh_certs::{
    new_key_and_csr, ClientCredential, ClientError, IstioCaClient, NodeCredentialRenewer,
    NodeCredentials, NodeName, Phase, Policy, RotationStep, StoreError,
};
use zmesh_identity::{SpiffeId, TrustDomain};

const NODE_A: &str = "spiffe://cluster.local/zmesh/node/node-a";

fn renewer(ca: &Ca, node: &str) -> NodeCredentialRenewer {
    NodeCredentialRenewer::open(
        &ca.addr,
        &ca.node_dir(node),
        &NodeName::new(node).unwrap(),
        &TrustDomain::default(),
    )
    .unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn renew_replaces_the_node_certificate_and_key() {
    let ca = Ca::start(Policy::default()).await;
    let joined = join_as(&ca, "node-a").await;
    let renewer = renewer(&ca, "node-a");
    let renewed = renewer.renew().await.unwrap();

    // A new certificate for the same node, with a new key.
    assert_ne!(
        serial_of(&renewed.cert_chain_pem),
        serial_of(&joined.cert_chain_pem)
    );
    assert_ne!(renewed.key_pem, joined.key_pem);
    assert_eq!(
        certs(&renewed.cert_chain_pem).len(),
        2,
        "leaf + intermediate"
    );
    assert!(chains_to(
        std::slice::from_ref(&renewed.cert_chain_pem),
        &ca.bundle_pem()
    )
    .is_some());
    assert_eq!(renewed.roots_pem, ca.bundle_pem());
    // The files on disk are the new set, the key still 0600.
    let dir = ca.node_dir("node-a");
    let on_disk = NodeCredentials::load(&dir).unwrap();
    assert_eq!(on_disk.cert_chain_pem, renewed.cert_chain_pem);
    assert_eq!(on_disk.key_pem, renewed.key_pem);
    assert_eq!(mode(&dir.join("node.key")), 0o600);
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".next")));
    assert_eq!(renewer.credentials().cert_chain_pem, renewed.cert_chain_pem);
    assert!(renewer.renew_at() < renewer.not_after());

    // The shared client presents the new certificate: it is accepted and audited as it.
    let client = renewer.client();
    client
        .create_certificate(&csr_for(WEB), Some(WEB), 0)
        .await
        .unwrap();
    let audit = ca.audit();
    let renew_line = &audit[1];
    assert_eq!(renew_line["rpc"], "Renew");
    assert_eq!(renew_line["decision"], "issued");
    assert_eq!(renew_line["auth"], "node-cert");
    assert_eq!(renew_line["caller_node"], "node-a");
    assert_eq!(renew_line["identity"], NODE_A);
    assert_eq!(audit[2]["caller_node"], "node-a");
    assert_eq!(ca.issued_count(), 3);

    // The renewed certificate renews again: no token is ever needed.
    let again = renewer.renew().await.unwrap();
    assert_ne!(
        serial_of(&again.cert_chain_pem),
        serial_of(&renewed.cert_chain_pem)
    );
    ca.stop().await;
}

#[tokio::test]
async fn every_renew_refusal_has_its_code_and_issues_nothing() {
    let ca = Ca::start(Policy::default()).await;
    let creds = join_as(&ca, "node-a").await;
    let node_a = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::NodeCert(creds.clone()),
    )
    .unwrap();
    let anonymous = IstioCaClient::new(&ca.addr, &ca.bundle_pem(), ClientCredential::None).unwrap();
    let bearer = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::Bearer(NODE_B_TOKEN.into()),
    )
    .unwrap();
    // A workload certificate of this CA presented as a node certificate.
    let (wl_key, wl_csr) = new_key_and_csr(&SpiffeId::parse(WEB).unwrap()).unwrap();
    let wl_chain = node_a
        .create_certificate(&wl_csr, Some(WEB), 600)
        .await
        .unwrap();
    let workload_cert = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::NodeCert(NodeCredentials {
            cert_chain_pem: wl_chain[..2].concat(),
            key_pem: wl_key,
            roots_pem: wl_chain[2].clone(),
        }),
    )
    .unwrap();
    // A node certificate for node-a from a CA nobody trusts.
    let foreign = {
        let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root = rcgen::CertificateParams::default();
        root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root, &root_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = rcgen::CertificateParams::default();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(NODE_A.try_into().unwrap())];
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        IstioCaClient::new(
            &ca.addr,
            &ca.bundle_pem(),
            ClientCredential::NodeCert(NodeCredentials {
                cert_chain_pem: cert.pem() + &root_cert.pem(),
                key_pem: key.serialize_pem(),
                roots_pem: ca.bundle_pem(),
            }),
        )
        .unwrap()
    };
    // A CSR for node-a's current key.
    let same_key_csr = {
        let key = rcgen::KeyPair::from_pem(&creds.key_pem).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(NODE_A.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    };

    let cases: Vec<(&str, &IstioCaClient, String, Code, Option<&str>)> = vec![
        (
            "no credential",
            &anonymous,
            csr_for(NODE_A),
            Code::Unauthenticated,
            None,
        ),
        (
            "bearer token",
            &bearer,
            csr_for(NODE_A),
            Code::Unauthenticated,
            None,
        ),
        (
            "workload certificate",
            &workload_cert,
            csr_for(NODE_A),
            Code::Unauthenticated,
            None,
        ),
        (
            "untrusted CA",
            &foreign,
            csr_for(NODE_A),
            Code::Unauthenticated,
            None,
        ),
        (
            "another node's identity",
            &node_a,
            csr_for("spiffe://cluster.local/zmesh/node/node-b"),
            Code::PermissionDenied,
            Some("node-a"),
        ),
        (
            "a workload identity",
            &node_a,
            csr_for(WEB),
            Code::PermissionDenied,
            Some("node-a"),
        ),
        (
            "the current key",
            &node_a,
            same_key_csr,
            Code::InvalidArgument,
            Some("node-a"),
        ),
        (
            "not a CSR",
            &node_a,
            "hello".into(),
            Code::InvalidArgument,
            Some("node-a"),
        ),
    ];
    let issued = ca.issued_count();
    for (what, client, csr, want, caller) in cases {
        let before = ca.audit().len();
        let err = client.renew_raw(&csr).await.expect_err(what);
        assert_eq!(err.code(), want, "{what}: {}", err.message());
        assert_eq!(ca.issued_count(), issued, "{what}: something was issued");
        let audit = ca.audit();
        assert_eq!(audit.len(), before + 1, "{what}: one audit line");
        let line = audit.last().unwrap();
        assert_eq!(line["rpc"], "Renew", "{what}");
        assert_eq!(line["decision"], "refused", "{what}");
        assert_eq!(line["code"], format!("{want:?}"), "{what}");
        match caller {
            Some(node) => assert_eq!(line["caller_node"], node, "{what}"),
            None => assert!(line["caller_node"].is_null(), "{what}"),
        }
    }
    let audit = ca.audit();
    let reason = |i: usize| {
        audit[audit.len() - 8 + i]["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason(0).contains("join with a token"), "{}", reason(0));
    assert!(
        reason(1).contains("bearer token cannot renew"),
        "{}",
        reason(1)
    );
    assert_eq!(audit[audit.len() - 7]["auth"], "bearer");
    assert!(
        reason(2).contains("not a zmesh node identity"),
        "{}",
        reason(2)
    );
    assert!(
        reason(3).contains("does not chain to the CA bundle"),
        "{}",
        reason(3)
    );
    assert!(
        reason(3).contains(NODE_A),
        "claimed identity named: {}",
        reason(3)
    );
    assert!(reason(6).contains("new key"), "{}", reason(6));
    ca.stop().await;
}

#[tokio::test]
async fn the_renewal_loop_renews_at_half_life() {
    let ca = Ca::start(Policy {
        max_leaf_lifetime: Duration::from_secs(3600),
        node_cert_lifetime: Duration::from_secs(6),
    })
    .await;
    let joined = join_as(&ca, "node-a").await;
    let renewer = std::sync::Arc::new(renewer(&ca, "node-a"));
    // Half of what is left (the 60 s back-dating does not make it due at once).
    let left = renewer
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap();
    let due_in = renewer
        .renew_at()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        due_in <= left / 2 && due_in > Duration::ZERO,
        "{due_in:?} of {left:?}"
    );

    let mut changes = renewer.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let renewer = renewer.clone();
        tokio::spawn(async move {
            renewer
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(30), changes.changed())
            .await
            .expect("no renewal")
            .unwrap();
    }
    let now = renewer.credentials();
    assert_ne!(
        serial_of(&now.cert_chain_pem),
        serial_of(&joined.cert_chain_pem)
    );
    assert_eq!(
        NodeCredentials::load(&ca.node_dir("node-a"))
            .unwrap()
            .cert_chain_pem,
        now.cert_chain_pem
    );
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    ca.stop().await;
}

#[tokio::test]
async fn the_renewal_loop_moves_the_node_to_the_new_root_at_switch() {
    let ca = Ca::start(Policy::default()).await;
    join_as(&ca, "node-a").await;
    let renewer = std::sync::Arc::new(renewer(&ca, "node-a"));
    let client = renewer.client();
    let mut changes = renewer.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let renewer = renewer.clone();
        tokio::spawn(async move {
            renewer
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    let old_root = ca.bundle_pem();

    // add: the old chain still signs; workload issuance does not trigger a renewal.
    ca.store.rotate(RotationStep::Add, false).unwrap();
    client
        .create_certificate(&csr_for(WEB), Some(WEB), 0)
        .await
        .unwrap();
    // switch: the next workload chain shows the new intermediate; the node renews.
    ca.store.rotate(RotationStep::Switch, false).unwrap();
    let new_chain = client
        .create_certificate(&csr_for(WEB), Some(WEB), 0)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), changes.changed())
        .await
        .expect("the node did not renew after the switch")
        .unwrap();
    let renewed = renewer.credentials();
    let node_chain = [renewed.cert_chain_pem.clone()];
    let new_root = new_chain[2][old_root.len()..].to_string();
    assert!(chains_to(&node_chain, &new_root).is_some());
    assert!(chains_to(&node_chain, &old_root).is_none());
    assert_eq!(
        certs(&renewed.roots_pem).len(),
        2,
        "the node learned both roots"
    );
    // Exactly one renewal: join + renewal on the node side of the ledger.
    let node_entries = std::fs::read_to_string(ca.store.dir().join("issued.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"node\""))
        .count();
    assert_eq!(node_entries, 2);

    // The old node certificate no longer holds up the drop; the workload leaf issued
    // before the switch does.
    let status = ca.store.status().unwrap();
    assert_eq!(
        status.leaves_on_old_root.len(),
        1,
        "{:?}",
        status.leaves_on_old_root
    );
    assert_eq!(status.leaves_on_old_root[0].identity, WEB);
    match ca.store.rotate(RotationStep::Drop, false) {
        Err(StoreError::Rotation(msg)) => assert!(msg.contains("1 unexpired"), "{msg}"),
        other => panic!("drop allowed with live old leaves: {other:?}"),
    }
    assert_eq!(
        ca.store.rotate(RotationStep::Drop, true).unwrap(),
        Phase::Stable { active: 2 }
    );
    // After the drop the renewed node keeps working, with no new token.
    client
        .create_certificate(&csr_for(WEB), Some(WEB), 0)
        .await
        .unwrap();
    renewer.renew().await.unwrap();
    assert_eq!(renewer.credentials().roots_pem, new_root);

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    ca.stop().await;
}

#[tokio::test]
async fn an_expired_node_certificate_cannot_renew() {
    let ca = Ca::start(Policy {
        max_leaf_lifetime: Duration::from_secs(3600),
        node_cert_lifetime: Duration::from_secs(1),
    })
    .await;
    join_as(&ca, "node-a").await;
    let renewer = renewer(&ca, "node-a");
    let not_after = renewer.not_after();
    // Wait for the expiry itself (plus the second webpki's clock resolution needs).
    wait_until("the node certificate expires", || {
        SystemTime::now() > not_after + Duration::from_secs(1)
    })
    .await;
    match renewer.renew().await {
        Err(ClientError::Rpc(s)) => assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message()),
        other => panic!("an expired certificate renewed: {other:?}"),
    }
    let result = tokio::time::timeout(Duration::from_secs(10), renewer.run(std::future::pending()))
        .await
        .expect("the loop kept retrying an expired certificate");
    assert!(
        matches!(result, Err(ClientError::NodeCertExpired(_))),
        "{result:?}"
    );
    let audit = ca.audit();
    let last = audit.last().unwrap();
    assert_eq!(last["rpc"], "Renew");
    assert_eq!(last["code"], "Unauthenticated");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("expired"),
        "{}",
        last["reason"]
    );
    assert_eq!(ca.issued_count(), 1, "only the join");
    ca.stop().await;
}

#[tokio::test]
async fn open_refuses_credentials_of_another_node() {
    let ca = Ca::start(Policy::default()).await;
    join_as(&ca, "node-a").await;
    let err = NodeCredentialRenewer::open(
        &ca.addr,
        &ca.node_dir("node-a"),
        &NodeName::new("node-b").unwrap(),
        &TrustDomain::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ClientError::WrongNode { .. }), "{err}");
    // A key that others can read is refused before anything is sent.
    let key = ca.node_dir("node-a").join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = NodeCredentialRenewer::open(
        &ca.addr,
        &ca.node_dir("node-a"),
        &NodeName::new("node-a").unwrap(),
        &TrustDomain::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Store(StoreError::InsecurePermissions { .. })
        ),
        "{err}"
    );
    ca.stop().await;
}
