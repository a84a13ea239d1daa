//! Containers' arguments as the kubelet and the real `zmesh` binary see them, shared by
//! tests/kubernetes_manifests.rs and tests/helm_chart.rs (each includes this file with
//! `#[path]`).

#![allow(dead_code)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;

/// `--name=value` arguments of a container (the form the manifests use).
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    let mut values = args.iter().filter_map(|a| a.strip_prefix(&prefix));
    let value = values.next();
    assert!(values.next().is_none(), "--{name} given twice: {args:?}");
    value
}

/// The container's arguments with `$(VAR)` references expanded as the kubelet would,
/// from the container's env, with sample values for downward-API fields. Every reference
/// must be defined (the kubelet leaves an undefined one as literal text).
pub fn expand_args(container: &Container) -> Vec<String> {
    let mut values = BTreeMap::new();
    for env in container.env.iter().flatten() {
        let value = match (&env.value, &env.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let field = &from.field_ref.as_ref().expect("a fieldRef").field_path;
                match field.as_str() {
                    "spec.nodeName" => "node-1".to_owned(),
                    "status.hostIP" => "10.0.0.5".to_owned(),
                    "status.podIP" => "10.244.1.9".to_owned(),
                    other => panic!("{}: no sample value for {other}", container.name),
                }
            }
            (None, None) => String::new(),
        };
        values.insert(env.name.clone(), value);
    }
    container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            let mut out = String::new();
            let mut rest = arg.as_str();
            while let Some(start) = rest.find("$(") {
                out.push_str(&rest[..start]);
                let end = rest[start..]
                    .find(')')
                    .unwrap_or_else(|| panic!("unterminated $( in {arg}"));
                let var = &rest[start + 2..start + end];
                let value = values.get(var).unwrap_or_else(|| {
                    panic!("{}: {arg} refers to undefined ${var}", container.name)
                });
                out.push_str(value);
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// Runs the real binary with `args`; returns stdout, failing with its stderr.
pub fn zmesh(args: &[String]) -> String {
    run(env!("CARGO_BIN_EXE_zmesh"), args)
}

/// As [`zmesh`], for the data path's own binary.
pub fn zmesh_datapath(args: &[String]) -> String {
    run(env!("CARGO_BIN_EXE_zmesh-datapath"), args)
}

fn run(binary: &str, args: &[String]) -> String {
    let output = std::process::Command::new(binary)
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("ZMESH_CA_STATE_DIR")
        .env_remove("ZMESH_CLUSTER_ID")
        .env_remove("ZMESH_JOIN_TOKEN")
        .output()
        .expect("run zmesh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{binary} {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
