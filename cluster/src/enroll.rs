//! `zmesh enroll` / `zmesh unenroll`: set or clear a namespace's enrollment label in a
//! manifest directory, as `kubectl label` does against a real cluster.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::state::{CILIUM_MTLS_LABEL, ISTIO_DATAPLANE_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML, not edited: {reason}")]
    Yaml { path: PathBuf, reason: String },
    #[error("namespace {0:?} is not defined in {1} (add a Namespace manifest first)")]
    NoSuchNamespace(String, PathBuf),
}

/// What an enrollment edit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Changed(PathBuf),
    AlreadyDone(PathBuf),
}

/// Enrolls (`true`) or un-enrolls (`false`) `namespace`. Enrolling sets Cilium's label;
/// un-enrolling removes both projects' enrolling labels. Only the file that defines the
/// namespace is rewritten (atomically); YAML comments in that file are not kept.
pub fn set_enrollment(dir: &Path, namespace: &str, enrolled: bool) -> Result<Outcome, EnrollError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| EnrollError::Read {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| EnrollError::Read {
            path: path.clone(),
            source,
        })?;
        let mut documents = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value =
                serde_yaml_ng::Value::deserialize(document).map_err(|e| EnrollError::Yaml {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if !value.is_null() {
                documents.push(value);
            }
        }
        let Some(ns) = documents.iter_mut().find(|d| {
            d["kind"].as_str() == Some("Namespace")
                && d["metadata"]["name"].as_str() == Some(namespace)
        }) else {
            continue;
        };
        if !edit_labels(ns, enrolled) {
            return Ok(Outcome::AlreadyDone(path));
        }
        let rendered: Vec<String> = documents
            .iter()
            .map(|d| serde_yaml_ng::to_string(d).unwrap_or_default())
            .collect();
        let tmp = path.with_extension("zmesh-tmp");
        let write_error = |source| EnrollError::Write {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, rendered.join("---\n")).map_err(write_error)?;
        std::fs::rename(&tmp, &path).map_err(|source| EnrollError::Write {
            path: path.clone(),
            source,
        })?;
        return Ok(Outcome::Changed(path));
    }
    Err(EnrollError::NoSuchNamespace(
        namespace.to_owned(),
        dir.to_owned(),
    ))
}

/// Returns whether anything changed.
fn edit_labels(ns: &mut serde_yaml_ng::Value, enrolled: bool) -> bool {
    use serde_yaml_ng::Value;
    let metadata = &mut ns["metadata"];
    if metadata.get("labels").is_none_or(Value::is_null) {
        metadata["labels"] = Value::Mapping(Default::default());
    }
    let Some(labels) = metadata["labels"].as_mapping_mut() else {
        return false;
    };
    let cilium = Value::from(CILIUM_MTLS_LABEL);
    let istio = Value::from(ISTIO_DATAPLANE_LABEL);
    let is_enrolled = labels.get(&cilium).and_then(Value::as_str) == Some("true")
        || labels.get(&istio).and_then(Value::as_str) == Some("ambient");
    match (enrolled, is_enrolled) {
        (true, true) | (false, false) => false,
        (true, false) => {
            labels.insert(cilium, Value::from("true"));
            true
        }
        (false, true) => {
            labels.remove(&cilium);
            if labels.get(&istio).and_then(Value::as_str) == Some("ambient") {
                labels.remove(&istio);
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::ManifestDir;

    fn enrolled(dir: &Path, ns: &str) -> bool {
        let (state, errors) = ManifestDir::new(dir).rescan();
        assert!(errors.is_empty(), "{errors:?}");
        state.unwrap().namespace(ns).unwrap().enrolls_pods()
    }

    #[test]
    fn enroll_and_unenroll_edit_only_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ambient\n  labels:\n    istio.io/dataplane-mode: ambient\n    team: a\n",
        )
        .unwrap();
        assert!(!enrolled(dir.path(), "shop"));
        let file = dir.path().join("ns.yaml");
        assert_eq!(
            set_enrollment(dir.path(), "shop", true).unwrap(),
            Outcome::Changed(file.clone())
        );
        assert!(enrolled(dir.path(), "shop"));
        assert_eq!(
            set_enrollment(dir.path(), "shop", true).unwrap(),
            Outcome::AlreadyDone(file.clone())
        );
        // Istio's label enrolls too; un-enrolling removes it but keeps other labels.
        assert!(enrolled(dir.path(), "ambient"));
        set_enrollment(dir.path(), "ambient", false).unwrap();
        assert!(!enrolled(dir.path(), "ambient"));
        assert!(std::fs::read_to_string(&file).unwrap().contains("team: a"));
        assert!(
            enrolled(dir.path(), "shop"),
            "other namespaces are untouched"
        );
    }

    #[test]
    fn unknown_namespace_and_bad_yaml_are_errors_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "kind: [unclosed").unwrap();
        assert!(matches!(
            set_enrollment(dir.path(), "shop", true),
            Err(EnrollError::Yaml { .. })
        ));
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), "kind: [unclosed");
        std::fs::remove_file(&bad).unwrap();
        assert!(matches!(
            set_enrollment(dir.path(), "shop", true),
            Err(EnrollError::NoSuchNamespace(..))
        ));
    }
}
