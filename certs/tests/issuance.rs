//! Issuance over real gRPC + TLS on 127.0.0.1: join, CreateCertificate, and every
//! refusal with its exact status code, nothing issued and an audit line written.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME};
use x509_parser::prelude::{FromDer, X509Certificate};
use zmesh_certs::{
    join, new_key_and_csr, ClientCredential, IstioCaClient, NodeCredentials, NodeName, Policy,
};
use zmesh_identity::{CertificateAuthority, SpiffeId, TrustDomain, WorkloadId};

async fn join_node(ca: &Ca, node: &str) -> NodeCredentials {
    let name = NodeName::new(node).unwrap();
    let token = ca
        .store
        .create_join_token(&name, Duration::from_secs(600))
        .unwrap();
    join(
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

fn node_client(ca: &Ca, creds: NodeCredentials) -> IstioCaClient {
    IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::NodeCert(creds),
    )
    .unwrap()
}

fn csr_for(id: &str) -> String {
    new_key_and_csr(&SpiffeId::parse(id).unwrap()).unwrap().1
}

fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: &[rcgen::SanType]) -> String {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans.to_vec();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.to_string().try_into().unwrap())
}

struct LeafFacts {
    uris: Vec<String>,
    other_sans: usize,
    san_critical: bool,
    ku_critical: bool,
    digital_signature: bool,
    key_cert_sign: bool,
    server_auth: bool,
    client_auth: bool,
    is_ca: bool,
    subject_empty: bool,
    serial: Vec<u8>,
    lifetime: i64,
    aki: Option<Vec<u8>>,
    ski: Option<Vec<u8>>,
}

fn leaf_facts(pem: &str) -> LeafFacts {
    let der = certs(pem).remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let mut f = LeafFacts {
        uris: vec![],
        other_sans: 0,
        san_critical: false,
        ku_critical: false,
        digital_signature: false,
        key_cert_sign: false,
        server_auth: false,
        client_auth: false,
        is_ca: true,
        subject_empty: cert.subject().iter().count() == 0,
        serial: cert.raw_serial().to_vec(),
        lifetime: cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(),
        aki: None,
        ski: None,
    };
    for ext in cert.extensions() {
        if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME {
            f.san_critical = ext.critical;
        }
        if ext.oid == OID_X509_EXT_KEY_USAGE {
            f.ku_critical = ext.critical;
        }
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    match n {
                        GeneralName::URI(u) => f.uris.push(u.to_string()),
                        _ => f.other_sans += 1,
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                f.digital_signature = ku.digital_signature();
                f.key_cert_sign = ku.key_cert_sign();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                f.server_auth = eku.server_auth;
                f.client_auth = eku.client_auth;
            }
            ParsedExtension::BasicConstraints(bc) => f.is_ca = bc.ca,
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                f.aki = aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectKeyIdentifier(ski) => f.ski = Some(ski.0.to_vec()),
            _ => {}
        }
    }
    f
}

#[tokio::test]
async fn join_then_issue_a_workload_svid() {
    let ca = Ca::start(Policy::default()).await;
    let creds = join_node(&ca, "node-a").await;

    // The node's key is private; the node certificate is a clientAuth-only node SVID.
    let key_mode = std::fs::metadata(ca.node_dir("node-a").join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let reloaded = NodeCredentials::load(&ca.node_dir("node-a")).unwrap();
    assert_eq!(reloaded.cert_chain_pem, creds.cert_chain_pem);
    let node_leaf = leaf_facts(&creds.cert_chain_pem);
    assert_eq!(node_leaf.uris, ["spiffe://cluster.local/zmesh/node/node-a"]);
    assert!(node_leaf.client_auth && !node_leaf.server_auth);
    assert!((30 * 86400..=30 * 86400 + 60).contains(&node_leaf.lifetime));

    let client = node_client(&ca, creds);
    // Ask for two days: clamped to the 24 h maximum (+60 s of back-dating).
    let chain = client
        .create_certificate(&csr_for(WEB), Some(WEB), 2 * 86400)
        .await
        .unwrap();
    assert_eq!(chain.len(), 3, "[leaf, intermediate, roots]");
    assert_eq!(chain[2], ca.bundle_pem());
    let leaf = leaf_facts(&chain[0]);
    assert_eq!(leaf.uris, [WEB]);
    assert_eq!(leaf.other_sans, 0);
    assert!(leaf.subject_empty);
    assert!(
        leaf.san_critical,
        "SAN must be critical with an empty subject"
    );
    assert!(leaf.ku_critical);
    assert!(leaf.digital_signature && !leaf.key_cert_sign);
    assert!(leaf.server_auth && leaf.client_auth);
    assert!(!leaf.is_ca);
    assert_eq!(leaf.lifetime, 86400 + 60);
    assert_eq!(leaf.serial.len(), 16);
    let intermediate = leaf_facts(&chain[1]);
    assert_eq!(leaf.aki, intermediate.ski, "AKI names the intermediate");
    assert!(leaf.ski.is_some());
    assert_eq!(
        verify_with_identity(&chain[..2], &chain[2]),
        Ok(WEB.to_string())
    );

    // Shorter requests are honoured; zero or negative gets the default.
    let short = client
        .create_certificate(&csr_for(WEB), Some(WEB), 600)
        .await
        .unwrap();
    assert_eq!(leaf_facts(&short[0]).lifetime, 600 + 60);
    assert_ne!(
        leaf_facts(&short[0]).serial,
        leaf.serial,
        "serials are random"
    );
    for asked in [0, -5] {
        let c = client
            .create_certificate(&csr_for(WEB), None, asked)
            .await
            .unwrap();
        assert_eq!(leaf_facts(&c[0]).lifetime, 86400 + 60);
    }

    // Through the identity crate's trait, as the node's certificate manager calls it.
    let web: WorkloadId = WEB.parse().unwrap();
    let issued = client
        .sign(&csr_for(WEB), &web, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(issued.chain_pem.len(), 2);
    assert_eq!(issued.roots_pem.len(), 1);
    assert_eq!(
        verify_with_identity(&issued.chain_pem, &issued.roots_pem.concat()),
        Ok(WEB.to_string())
    );

    // Ledger and audit: one join + five workload certificates, each audited as issued.
    assert_eq!(ca.issued_count(), 6);
    let audit = ca.audit();
    assert_eq!(audit.len(), 6);
    assert!(audit
        .iter()
        .all(|a| a["decision"] == "issued" && a["serial"].is_string()));
    assert_eq!(audit[1]["caller_node"], "node-a");
    assert_eq!(audit[1]["auth"], "node-cert");
    assert_eq!(audit[1]["identity"], WEB);
    ca.stop().await;
}

#[tokio::test]
async fn bearer_tokens_authenticate_nodes() {
    let ca = Ca::start(Policy::default()).await;
    let bearer = |t: &str| {
        IstioCaClient::new(
            &ca.addr,
            &ca.bundle_pem(),
            ClientCredential::Bearer(t.into()),
        )
        .unwrap()
    };
    let good = bearer(NODE_B_TOKEN);
    let chain = good
        .create_certificate(&csr_for(DB), Some(DB), 0)
        .await
        .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [DB]);
    let audit = ca.audit();
    assert_eq!(audit.last().unwrap()["auth"], "bearer");
    assert_eq!(audit.last().unwrap()["caller_node"], "node-b");
    // The token itself never reaches the audit log.
    let text = std::fs::read_to_string(ca.store.dir().join("audit.jsonl")).unwrap();
    assert!(!text.contains(NODE_B_TOKEN));
    ca.stop().await;
}

#[tokio::test]
async fn every_refusal_has_its_code_and_issues_nothing() {
    let ca = Ca::start(Policy::default()).await;
    let node_a = node_client(&ca, join_node(&ca, "node-a").await);
    let anonymous = IstioCaClient::new(&ca.addr, &ca.bundle_pem(), ClientCredential::None).unwrap();
    let wrong_bearer = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::Bearer("guess".into()),
    )
    .unwrap();
    let node_b_bearer = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::Bearer(NODE_B_TOKEN.into()),
    )
    .unwrap();
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;

    let cases: Vec<(&str, &IstioCaClient, String, Option<&str>, Code)> = vec![
        (
            "malformed CSR",
            &node_a,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            None,
            Code::InvalidArgument,
        ),
        (
            "not PEM",
            &node_a,
            "hello".into(),
            None,
            Code::InvalidArgument,
        ),
        (
            "P-384 key",
            &node_a,
            csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, &[uri(WEB)]),
            None,
            Code::InvalidArgument,
        ),
        (
            "Ed25519 key",
            &node_a,
            csr_with(&rcgen::PKCS_ED25519, &[uri(WEB)]),
            None,
            Code::InvalidArgument,
        ),
        (
            "two URI SANs",
            &node_a,
            csr_with(p256, &[uri(WEB), uri(DB)]),
            None,
            Code::InvalidArgument,
        ),
        (
            "DNS SAN",
            &node_a,
            csr_with(
                p256,
                &[
                    uri(WEB),
                    rcgen::SanType::DnsName("web.default".try_into().unwrap()),
                ],
            ),
            None,
            Code::InvalidArgument,
        ),
        (
            "wrong trust domain",
            &node_a,
            csr_for("spiffe://evil.org/ns/default/sa/web"),
            None,
            Code::InvalidArgument,
        ),
        (
            "not a workload ID",
            &node_a,
            csr_for("spiffe://cluster.local/zmesh/node/node-a"),
            None,
            Code::InvalidArgument,
        ),
        (
            "identity not on the node",
            &node_a,
            csr_for(DB),
            Some(DB),
            Code::PermissionDenied,
        ),
        (
            "ImpersonatedIdentity differs",
            &node_a,
            csr_for(WEB),
            Some(DB),
            Code::InvalidArgument,
        ),
        (
            "no credential",
            &anonymous,
            csr_for(WEB),
            Some(WEB),
            Code::Unauthenticated,
        ),
        (
            "wrong bearer token",
            &wrong_bearer,
            csr_for(WEB),
            Some(WEB),
            Code::Unauthenticated,
        ),
        (
            "bearer for another node",
            &node_b_bearer,
            csr_for(WEB),
            Some(WEB),
            Code::PermissionDenied,
        ),
    ];
    let issued_before = ca.issued_count();
    for (i, (what, client, csr, impersonate, want)) in cases.into_iter().enumerate() {
        let err = client
            .create_certificate(&csr, impersonate, 3600)
            .await
            .expect_err(what);
        assert_eq!(err.code(), want, "{what}: {}", err.message());
        assert_eq!(
            ca.issued_count(),
            issued_before,
            "{what}: something was issued"
        );
        let audit = ca.audit();
        let last = audit.last().unwrap();
        assert_eq!(
            audit.len(),
            1 + i + 1,
            "{what}: one audit line per decision"
        );
        assert_eq!(last["decision"], "refused", "{what}");
        assert_eq!(last["code"], format!("{want:?}"), "{what}");
    }
    let audit = ca.audit();
    let not_on_node = audit
        .iter()
        .find(|a| a["code"] == "PermissionDenied")
        .unwrap();
    assert_eq!(not_on_node["caller_node"], "node-a");
    assert_eq!(not_on_node["identity"], DB);
    assert!(not_on_node["reason"]
        .as_str()
        .unwrap()
        .contains("not scheduled on node node-a"));
    ca.stop().await;
}

#[tokio::test]
async fn join_tokens_are_one_time_and_expire() {
    let ca = Ca::start(Policy::default()).await;
    let node = NodeName::new("node-a").unwrap();
    let td = TrustDomain::default();
    let anonymous = IstioCaClient::new(&ca.addr, &ca.bundle_pem(), ClientCredential::None).unwrap();
    let node_csr = csr_for("spiffe://cluster.local/zmesh/node/node-a");

    // A CSR for another node is refused and does not spend the token.
    let token = ca
        .store
        .create_join_token(&node, Duration::from_secs(600))
        .unwrap();
    let err = anonymous
        .join_raw(&token, &csr_for("spiffe://cluster.local/zmesh/node/node-b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    join(
        &ca.addr,
        &ca.bundle_pem(),
        &token,
        &node,
        &td,
        &ca.node_dir("node-a"),
    )
    .await
    .unwrap();
    let issued = ca.issued_count();

    // Reuse.
    let err = anonymous.join_raw(&token, &node_csr).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());
    // Unknown.
    let err = anonymous
        .join_raw("zmj_made_up", &node_csr)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Expired: move the stored expiry into the past.
    let token = ca
        .store
        .create_join_token(&node, Duration::from_secs(600))
        .unwrap();
    let path = ca.store.dir().join("tokens.json");
    let mut tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for t in tokens.as_array_mut().unwrap() {
        t["expires_at"] = "2020-01-01T00:00:00Z".into();
    }
    std::fs::write(&path, serde_json::to_vec(&tokens).unwrap()).unwrap();
    let err = anonymous.join_raw(&token, &node_csr).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    assert_eq!(
        ca.issued_count(),
        issued,
        "nothing issued for refused joins"
    );
    let audit = ca.audit();
    let refused: Vec<_> = audit
        .iter()
        .filter(|a| a["decision"] == "refused")
        .collect();
    assert_eq!(refused.len(), 4);
    assert!(refused
        .iter()
        .all(|a| a["rpc"] == "Join" && a["auth"] == "join-token"));
    // A known token names its node (wrong CSR, reuse, expiry); an unknown one cannot.
    let nodes: Vec<_> = refused.iter().map(|a| a["caller_node"].clone()).collect();
    assert_eq!(
        nodes,
        [
            serde_json::json!("node-a"),
            serde_json::json!("node-a"),
            serde_json::Value::Null,
            serde_json::json!("node-a"),
        ]
    );
    let text = std::fs::read_to_string(ca.store.dir().join("audit.jsonl")).unwrap();
    assert!(
        !text.contains(&token),
        "join token leaked into the audit log"
    );
    ca.stop().await;
}

#[tokio::test]
async fn a_workload_certificate_is_not_a_node_credential() {
    let ca = Ca::start(Policy::default()).await;
    let node_a = node_client(&ca, join_node(&ca, "node-a").await);
    let (key_pem, csr) = new_key_and_csr(&SpiffeId::parse(WEB).unwrap()).unwrap();
    let chain = node_a
        .create_certificate(&csr, Some(WEB), 600)
        .await
        .unwrap();
    let impostor = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::NodeCert(NodeCredentials {
            cert_chain_pem: chain[..2].concat(),
            key_pem,
            roots_pem: chain[2].clone(),
        }),
    )
    .unwrap();
    let issued = ca.issued_count();
    // TLS lets the certificate through (the handshake proves the key); the request is
    // refused and audited with the reason.
    let err = impostor
        .create_certificate(&csr_for(WEB), Some(WEB), 600)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert_eq!(ca.issued_count(), issued);
    let audit = ca.audit();
    let last = audit.last().unwrap();
    assert_eq!(last["rpc"], "CreateCertificate");
    assert_eq!(last["decision"], "refused");
    assert_eq!(last["auth"], "node-cert");
    assert_eq!(last["code"], "Unauthenticated");
    let reason = last["reason"].as_str().unwrap();
    assert!(reason.contains("not a zmesh node identity"), "{reason}");
    assert!(reason.contains(WEB), "{reason}");
    ca.stop().await;
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_and_audited() {
    let ca = Ca::start(Policy::default()).await;
    // A node certificate for node-a that chains to a root nobody trusts.
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root = rcgen::CertificateParams::default();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, &root_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![uri("spiffe://cluster.local/zmesh/node/node-a")];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let forged = IstioCaClient::new(
        &ca.addr,
        &ca.bundle_pem(),
        ClientCredential::NodeCert(NodeCredentials {
            cert_chain_pem: cert.pem() + &root_cert.pem(),
            key_pem: key.serialize_pem(),
            roots_pem: ca.bundle_pem(),
        }),
    )
    .unwrap();
    let err = forged
        .create_certificate(&csr_for(WEB), Some(WEB), 600)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert_eq!(ca.issued_count(), 0);
    let audit = ca.audit();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["decision"], "refused");
    assert_eq!(audit[0]["auth"], "node-cert");
    // Nobody was authenticated, so no caller node; the claim is in the reason.
    assert!(audit[0]["caller_node"].is_null());
    let reason = audit[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not chain to the CA bundle"),
        "{reason}"
    );
    assert!(reason.contains("zmesh/node/node-a"), "{reason}");
    ca.stop().await;
}

#[tokio::test]
async fn a_foreign_cluster_id_is_refused_on_every_rpc() {
    let ca = Ca::start(Policy::default()).await;
    let creds = join_node(&ca, "node-a").await;
    let node = NodeName::new("node-a").unwrap();
    let node_csr = csr_for("spiffe://cluster.local/zmesh/node/node-a");

    // The configured id (Istio's default) is accepted.
    let ours = node_client(&ca, creds.clone());
    ours.set_cluster_id("Kubernetes").unwrap();
    ours.create_certificate(&csr_for(WEB), Some(WEB), 0)
        .await
        .unwrap();
    ours.renew_raw(&node_csr).await.unwrap();
    let issued = ca.issued_count();

    let theirs = node_client(&ca, creds);
    theirs.set_cluster_id("other-cluster").unwrap();
    let token = ca
        .store
        .create_join_token(&node, Duration::from_secs(600))
        .unwrap();
    let results = [
        (
            "CreateCertificate",
            theirs
                .create_certificate(&csr_for(WEB), Some(WEB), 0)
                .await
                .map(drop),
        ),
        ("Join", theirs.join_raw(&token, &node_csr).await.map(drop)),
        ("Renew", theirs.renew_raw(&node_csr).await.map(drop)),
    ];
    for (rpc, result) in results {
        let err = result.expect_err(rpc);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{rpc}: {}",
            err.message()
        );
        assert!(err.message().contains("other-cluster"), "{}", err.message());
        assert!(err.message().contains("Kubernetes"), "{}", err.message());
    }
    assert_eq!(ca.issued_count(), issued, "nothing issued");
    let audit = ca.audit();
    let refused: Vec<_> = audit.iter().rev().take(3).collect();
    assert!(refused
        .iter()
        .all(|a| a["decision"] == "refused" && a["code"] == "InvalidArgument"));
    // The token was not spent by the refused join.
    join(
        &ca.addr,
        &ca.bundle_pem(),
        &token,
        &node,
        &TrustDomain::default(),
        &ca.node_dir("node-a-again"),
    )
    .await
    .unwrap();
    assert!(matches!(
        ours.set_cluster_id("bad\nvalue"),
        Err(zmesh_certs::ClientError::InvalidClusterId(_))
    ));
    ca.stop().await;
}

#[tokio::test]
async fn the_server_refuses_a_world_readable_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = zmesh_certs::CaStore::init(&dir.path().join("ca"), &Default::default()).unwrap();
    let key = store.dir().join("chains/1/intermediate.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let placement = dir.path().join("p.yaml");
    std::fs::write(&placement, "").unwrap();
    let result = zmesh_certs::CaServer::bind(
        store,
        zmesh_certs::ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            serving_names: vec!["127.0.0.1".into()],
            placement: std::sync::Arc::new(
                zmesh_certs::FilePlacement::new(&placement, &TrustDomain::default()).unwrap(),
            ),
            bearer: None,
            cluster_id: zmesh_certs::DEFAULT_CLUSTER_ID.into(),
        },
    )
    .await;
    match result {
        Err(zmesh_certs::ServerError::Store(zmesh_certs::StoreError::InsecurePermissions {
            mode,
            ..
        })) => {
            assert_eq!(mode, 0o644)
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("served with a world-readable key"),
    }
}
