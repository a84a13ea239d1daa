//! X.509-SVID validation: a good chain and one fixture per violated rule.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use zmesh_identity::svid::describe;
use zmesh_identity::{lint_chain, verify_svid, SpiffeId, SpiffeIdError, SvidError, TrustBundle};

const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

fn now() -> SystemTime {
    SystemTime::now()
}

/// Signs `params` with a fresh root and verifies against that root's bundle.
fn verify_params(params: &rcgen::CertificateParams) -> Result<SpiffeId, SvidError> {
    let root = Ca::root("root");
    let leaf = sign_leaf(params, &root);
    verify_svid(&[leaf.der], &root.bundle("cluster.local"), now()).map(|v| v.id)
}

fn expect_rule(params: &rcgen::CertificateParams, want: SvidError, rule: &str) {
    let got = verify_params(params).expect_err("must be rejected");
    assert_eq!(got, want);
    assert_eq!(got.rule_name(), rule);
}

#[test]
fn accepts_root_intermediate_leaf_chain() {
    let root = Ca::root("root");
    let inter = root.intermediate("intermediate");
    let leaf = svid(ID, &inter);
    let bundle = root.bundle("cluster.local");
    let chain = [leaf.der.clone(), inter.der.clone()];
    let v = verify_svid(&chain, &bundle, now()).unwrap();
    assert_eq!(v.id.to_string(), ID);
    let info = describe(&leaf.der).unwrap();
    assert_eq!(v.not_after, info.not_after);
    assert!(lint_chain(&chain, Some(&bundle), now()).is_empty());
    // Without the intermediate there is no path.
    let err = verify_svid(&[leaf.der], &bundle, now()).unwrap_err();
    assert_eq!(err.rule_name(), "svid.untrusted-chain");
}

#[test]
fn rejects_expired() {
    let mut p = svid_params(ID);
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let err = verify_params(&p).unwrap_err();
    assert!(matches!(err, SvidError::Expired { .. }), "{err:?}");
    assert_eq!(err.rule_name(), "svid.expired");
}

#[test]
fn rejects_not_yet_valid() {
    let mut p = svid_params(ID);
    p.not_before = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(7200);
    let err = verify_params(&p).unwrap_err();
    assert!(matches!(err, SvidError::NotYetValid { .. }), "{err:?}");
    assert_eq!(err.rule_name(), "svid.not-yet-valid");
}

#[test]
fn rejects_ca_as_leaf() {
    let mut p = svid_params(ID);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    expect_rule(&p, SvidError::LeafIsCa, "svid.leaf-is-ca");
}

#[test]
fn rejects_key_cert_sign_and_crl_sign_on_leaf() {
    for extra in [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign] {
        let mut p = svid_params(ID);
        p.key_usages.push(extra);
        expect_rule(&p, SvidError::KeyUsageCertSign, "svid.key-usage-cert-sign");
    }
}

#[test]
fn rejects_missing_key_usage() {
    let mut p = svid_params(ID);
    p.key_usages.clear();
    expect_rule(&p, SvidError::KeyUsageMissing, "svid.key-usage-missing");
}

#[test]
fn rejects_non_critical_key_usage() {
    let mut p = svid_params(ID);
    p.key_usages.clear();
    p.custom_extensions.push(noncritical_key_usage());
    expect_rule(
        &p,
        SvidError::KeyUsageNotCritical,
        "svid.key-usage-critical",
    );
}

#[test]
fn rejects_key_usage_without_digital_signature() {
    let mut p = svid_params(ID);
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    expect_rule(
        &p,
        SvidError::KeyUsageNoDigitalSignature,
        "svid.key-usage-digital-signature",
    );
}

#[test]
fn rejects_two_uri_sans() {
    let mut p = svid_params(ID);
    p.subject_alt_names
        .push(uri("spiffe://cluster.local/ns/default/sa/other"));
    expect_rule(&p, SvidError::UriSanCount(2), "svid.uri-san-count");
}

#[test]
fn rejects_no_uri_san() {
    let mut p = svid_params(ID);
    p.subject_alt_names = vec![SanType::DnsName("web.default".try_into().unwrap())];
    expect_rule(&p, SvidError::UriSanCount(0), "svid.uri-san-count");
    // No SAN extension at all, with a subject so that only the URI rule fails.
    let mut p = svid_params(ID);
    p.subject_alt_names.clear();
    p.distinguished_name.push(rcgen::DnType::CommonName, "web");
    expect_rule(&p, SvidError::UriSanCount(0), "svid.uri-san-count");
}

#[test]
fn rejects_bad_spiffe_ids() {
    let long = format!("spiffe://cluster.local/{}", "a".repeat(2040));
    let cases = [
        (
            "spiffe://cluster.local/ns/../sa/web".to_owned(),
            SpiffeIdError::DotSegment,
        ),
        (
            "spiffe://cluster.local/ns/a%2Fb/sa/web".to_owned(),
            SpiffeIdError::BadPathChar('%'),
        ),
        (
            "spiffe://Cluster.local/ns/default/sa/web".to_owned(),
            SpiffeIdError::BadTrustDomainChar('C'),
        ),
        (long.clone(), SpiffeIdError::TooLong(long.len())),
        (
            "https://cluster.local/ns/default/sa/web".to_owned(),
            SpiffeIdError::WrongScheme,
        ),
    ];
    for (id, source) in cases {
        let mut p = svid_params(ID);
        p.subject_alt_names = vec![uri(&id)];
        let err = verify_params(&p).unwrap_err();
        assert_eq!(
            err,
            SvidError::InvalidSpiffeId {
                uri: id.clone(),
                source
            },
            "{id}"
        );
        assert_eq!(err.rule_name(), "svid.spiffe-id");
    }
}

#[test]
fn rejects_trust_domain_id_on_leaf() {
    let mut p = svid_params(ID);
    p.subject_alt_names = vec![uri("spiffe://cluster.local")];
    let err = verify_params(&p).unwrap_err();
    assert_eq!(err.rule_name(), "svid.spiffe-id-path");
}

#[test]
fn rejects_eku_without_client_auth_or_server_auth() {
    let mut p = svid_params(ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    expect_rule(
        &p,
        SvidError::ExtKeyUsageMissing("clientAuth"),
        "svid.ext-key-usage",
    );
    let mut p = svid_params(ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    expect_rule(
        &p,
        SvidError::ExtKeyUsageMissing("serverAuth"),
        "svid.ext-key-usage",
    );
    // No EKU at all is allowed.
    let mut p = svid_params(ID);
    p.extended_key_usages.clear();
    assert_eq!(verify_params(&p).unwrap().to_string(), ID);
}

#[test]
fn rejects_non_critical_san_with_empty_subject() {
    let mut p = svid_params(ID);
    p.subject_alt_names.clear();
    p.custom_extensions.push(noncritical_uri_san(ID));
    expect_rule(&p, SvidError::SanNotCritical, "svid.san-critical");
    // With a subject, a non-critical SAN is fine.
    p.distinguished_name.push(rcgen::DnType::CommonName, "web");
    assert_eq!(verify_params(&p).unwrap().to_string(), ID);
}

#[test]
fn rejects_wrong_trust_domain() {
    let root = Ca::root("root");
    let leaf = svid("spiffe://other.org/ns/default/sa/web", &root);
    // The bundle trusts this root only for cluster.local.
    let err = verify_svid(
        std::slice::from_ref(&leaf.der),
        &root.bundle("cluster.local"),
        now(),
    )
    .unwrap_err();
    assert_eq!(err, SvidError::UnknownTrustDomain(td("other.org")));
    assert_eq!(err.rule_name(), "svid.trust-domain-unknown");
    // other.org has roots, but not the one that signed this leaf.
    let mut bundle = root.bundle("cluster.local");
    bundle
        .add_root(&td("other.org"), Ca::root("other").der)
        .unwrap();
    let err = verify_svid(&[leaf.der], &bundle, now()).unwrap_err();
    assert!(
        matches!(&err, SvidError::Untrusted { trust_domain, .. } if trust_domain.as_str() == "other.org"),
        "{err:?}"
    );
}

#[test]
fn rejects_untrusted_root() {
    let trusted = Ca::root("trusted");
    let rogue = Ca::root("rogue");
    let leaf = svid(ID, &rogue);
    let err = verify_svid(&[leaf.der], &trusted.bundle("cluster.local"), now()).unwrap_err();
    assert!(matches!(err, SvidError::Untrusted { .. }), "{err:?}");
    assert_eq!(err.rule_name(), "svid.untrusted-chain");
}

#[test]
fn rejects_signing_cert_with_path_id() {
    let root = Ca::root("root");
    let mut inter_params = root.intermediate("x").params;
    inter_params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/x")];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let inter_cert = inter_params.signed_by(&key, &root.issuer()).unwrap();
    let inter = Ca {
        der: inter_cert.der().clone(),
        pem: inter_cert.pem(),
        params: inter_params,
        key,
    };
    let leaf = svid(ID, &inter);
    let err =
        verify_svid(&[leaf.der, inter.der], &root.bundle("cluster.local"), now()).unwrap_err();
    assert_eq!(err.rule_name(), "svid.signing-cert-id-path");
}

#[test]
fn rejects_empty_and_garbage_chains() {
    let bundle = TrustBundle::new();
    assert_eq!(verify_svid(&[], &bundle, now()), Err(SvidError::EmptyChain));
    let err = verify_svid(&[CertificateDer::from(vec![1, 2, 3])], &bundle, now()).unwrap_err();
    assert_eq!(err.rule_name(), "svid.malformed");
}

#[test]
fn bundle_with_two_roots_accepts_leaves_of_both() {
    let old = Ca::root("old");
    let new = Ca::root("new");
    let mut bundle = old.bundle("cluster.local");
    bundle
        .add_pem(&td("cluster.local"), new.pem.as_bytes())
        .unwrap();
    assert_eq!(bundle.fingerprints().len(), 2);
    let from_old = svid(ID, &old);
    let from_new = svid(ID, &new);
    assert!(verify_svid(std::slice::from_ref(&from_old.der), &bundle, now()).is_ok());
    assert!(verify_svid(std::slice::from_ref(&from_new.der), &bundle, now()).is_ok());
    // Retiring the old root rejects its leaves and keeps the new ones.
    let old_fp = zmesh_identity::Fingerprint::of(&old.der);
    assert!(bundle.remove_root(&td("cluster.local"), &old_fp));
    assert!(!bundle.remove_root(&td("cluster.local"), &old_fp));
    assert!(verify_svid(&[from_old.der], &bundle, now()).is_err());
    assert!(verify_svid(&[from_new.der], &bundle, now()).is_ok());
}

#[test]
fn lint_reports_every_violation() {
    let root = Ca::root("root");
    let mut p = svid_params(ID);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.subject_alt_names
        .push(uri("spiffe://cluster.local/ns/a/sa/b"));
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let leaf = sign_leaf(&p, &root);
    let rules: Vec<&str> = lint_chain(&[leaf.der], Some(&root.bundle("cluster.local")), now())
        .iter()
        .map(SvidError::rule_name)
        .collect();
    assert_eq!(
        rules,
        [
            "svid.uri-san-count",
            "svid.leaf-is-ca",
            "svid.key-usage-digital-signature",
            "svid.key-usage-cert-sign",
            "svid.ext-key-usage",
            "svid.expired",
        ]
    );
}

#[test]
fn lint_reports_untrusted_chain_separately_from_expiry() {
    let rogue = Ca::root("rogue");
    let mut p = svid_params(ID);
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let leaf = sign_leaf(&p, &rogue);
    let rules: Vec<&str> = lint_chain(
        std::slice::from_ref(&leaf.der),
        Some(&Ca::root("t").bundle("cluster.local")),
        now(),
    )
    .iter()
    .map(SvidError::rule_name)
    .collect();
    assert_eq!(rules, ["svid.expired", "svid.untrusted-chain"]);
    // Against its own root, only the expiry remains.
    let rules: Vec<&str> = lint_chain(&[leaf.der], Some(&rogue.bundle("cluster.local")), now())
        .iter()
        .map(SvidError::rule_name)
        .collect();
    assert_eq!(rules, ["svid.expired"]);
}

#[test]
fn bundle_rejects_bad_roots() {
    let root = Ca::root("root");
    let leaf = svid(ID, &root);
    let mut bundle = TrustBundle::new();
    let err = bundle.add_root(&td("cluster.local"), leaf.der).unwrap_err();
    assert!(
        matches!(err, zmesh_identity::bundle::BundleError::NotCa(_)),
        "{err}"
    );
    let err = bundle
        .add_pem(&td("cluster.local"), b"not pem")
        .unwrap_err();
    assert!(
        matches!(err, zmesh_identity::bundle::BundleError::Pem(_)),
        "{err}"
    );
    // A root naming another trust domain is refused for this one.
    let mut params = root.params.clone();
    params.subject_alt_names = vec![uri("spiffe://other.org")];
    let cert = params.self_signed(&root.key).unwrap();
    let err = bundle
        .add_root(&td("cluster.local"), cert.der().clone())
        .unwrap_err();
    assert!(
        matches!(
            err,
            zmesh_identity::bundle::BundleError::ForeignTrustDomain { .. }
        ),
        "{err}"
    );
    assert!(bundle
        .add_root(&td("other.org"), cert.der().clone())
        .unwrap());
    assert!(!bundle
        .add_root(&td("other.org"), cert.der().clone())
        .unwrap());
    assert!(bundle.set_roots(&td("other.org"), Vec::new()).is_err());
    assert_eq!(bundle.roots(&td("other.org")).len(), 1);
}

#[test]
fn lint_does_not_repeat_leaf_rules_as_path_errors() {
    let root = Ca::root("root");
    let bundle = root.bundle("cluster.local");
    let mut p = svid_params(ID);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let leaf = sign_leaf(&p, &root);
    let rules: Vec<&str> = lint_chain(&[leaf.der], Some(&bundle), now())
        .iter()
        .map(SvidError::rule_name)
        .collect();
    assert_eq!(rules, ["svid.leaf-is-ca"]);
    let mut p = svid_params(ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = sign_leaf(&p, &root);
    let rules: Vec<&str> = lint_chain(&[leaf.der], Some(&bundle), now())
        .iter()
        .map(SvidError::rule_name)
        .collect();
    assert_eq!(rules, ["svid.ext-key-usage"]);
}
