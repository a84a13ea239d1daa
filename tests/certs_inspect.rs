//! `zmesh certs inspect` on certificate files built at test time.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

struct Root {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn root(name: &str) -> Root {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    Root { params, key, pem }
}

fn leaf_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(60);
    p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(86400);
    p
}

fn sign(params: &CertificateParams, root: &Root) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = Issuer::from_params(&root.params, &root.key);
    params.signed_by(&key, &issuer).unwrap().pem()
}

fn inspect(dir: &Path, leaf_pem: &str, bundle: Option<&str>, json: bool) -> Output {
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zmesh"));
    cmd.args(["certs", "inspect"]).arg(&leaf);
    if let Some(roots) = bundle {
        let path = dir.join("roots.pem");
        std::fs::write(&path, roots).unwrap();
        cmd.arg("--bundle").arg(path);
    }
    if json {
        cmd.args(["--output", "json"]);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn good_svid_passes_with_its_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root("root");
    let out = inspect(
        dir.path(),
        &sign(&leaf_params(ID), &ca),
        Some(&ca.pem),
        false,
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(ID), "{text}");
    assert!(text.contains("chains to the given bundle"), "{text}");
    assert!(text.contains("issuer:  O=root"), "{text}");
    assert!(text.contains("expires in 23h"), "{text}");
}

#[test]
fn json_output_lists_violations_by_rule() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root("root");
    let mut p = leaf_params(ID);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    let out = inspect(dir.path(), &sign(&p, &ca), Some(&ca.pem), true);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules: Vec<&str> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["svid.leaf-is-ca", "svid.key-usage-cert-sign"]);
    assert_eq!(report["spiffe_id"], ID);
    assert_eq!(report["ok"], false);
    assert!(report["seconds_left"].as_i64().unwrap() > 86000);
    assert_eq!(report["chain"].as_array().unwrap().len(), 1);
}

#[test]
fn each_broken_rule_is_named_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root("root");
    let mut expired = leaf_params(ID);
    expired.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    expired.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let mut two_uris = leaf_params(ID);
    two_uris.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
    ));
    let mut no_eku_client = leaf_params(ID);
    no_eku_client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cases = [
        (expired, "svid.expired"),
        (two_uris, "svid.uri-san-count"),
        (no_eku_client, "svid.ext-key-usage"),
        (
            leaf_params("spiffe://cluster.local/ns/../sa/web"),
            "svid.spiffe-id",
        ),
    ];
    for (params, rule) in cases {
        let out = inspect(dir.path(), &sign(&params, &ca), Some(&ca.pem), false);
        let text = stdout(&out);
        assert!(!out.status.success(), "{rule}: {text}");
        assert!(text.contains(rule), "{rule}: {text}");
    }
}

#[test]
fn untrusted_root_fails_only_with_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let signer = root("signer");
    let other = root("other");
    let leaf = sign(&leaf_params(ID), &signer);
    let out = inspect(dir.path(), &leaf, Some(&other.pem), false);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("svid.untrusted-chain"), "{text}");
    assert!(text.contains("does NOT chain"), "{text}");
    // Without a bundle only the leaf rules are judged.
    let out = inspect(dir.path(), &leaf, None, false);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("not checked (no --bundle)"));
}

#[test]
fn unreadable_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = inspect(dir.path(), "not a certificate", None, false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no PEM CERTIFICATE block"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["certs", "inspect", "/nonexistent/leaf.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
