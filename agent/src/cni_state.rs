//! The node-local file naming the namespaces whose pods are enrolled, for the CNI plugin:
//! it runs when the agent may be down, and must then refuse (fail closed) to start a pod of
//! such a namespace rather than let its first connections out unencrypted.
//!
//! `{"enrolled_namespaces": ["a", "b"], "written_at": "<RFC 3339>"}`, replaced atomically
//! (a temporary file in the same directory, fsync, rename), mode 0644, and only when the
//! set changes.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use zmesh_cluster::ClusterState;

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CniState {
    /// Sorted, no duplicates.
    pub enrolled_namespaces: Vec<String>,
    /// When the agent wrote this set (RFC 3339, UTC).
    pub written_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CniStateError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("formatting the time: {0}")]
    Time(#[from] time::error::Format),
}

/// Keeps the file at `path` equal to the enrolled namespaces of the cluster state.
#[derive(Debug)]
pub struct CniStateFile {
    path: PathBuf,
    /// The set last written; `None` until the first write succeeds (then a failed write
    /// is tried again on the next state).
    written: Option<BTreeSet<String>>,
}

impl CniStateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            written: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the file if the set of namespaces that enroll pods differs from the one last
    /// written. Returns whether it wrote. Blocking (fsync).
    pub fn update(&mut self, state: &ClusterState) -> Result<bool, CniStateError> {
        let namespaces: BTreeSet<String> = state
            .namespaces()
            .filter(|ns| ns.enrolls_pods())
            .map(|ns| ns.name.clone())
            .collect();
        if self.written.as_ref() == Some(&namespaces) {
            return Ok(false);
        }
        let contents = CniState {
            enrolled_namespaces: namespaces.iter().cloned().collect(),
            written_at: time::OffsetDateTime::from(SystemTime::now())
                .format(&time::format_description::well_known::Rfc3339)?,
        };
        write_atomically(&self.path, &contents)?;
        tracing::info!(path = %self.path.display(), namespaces = ?contents.enrolled_namespaces, "wrote the enrolled namespaces for the CNI plugin");
        self.written = Some(namespaces);
        Ok(true)
    }
}

fn write_atomically(path: &Path, contents: &CniState) -> Result<(), CniStateError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CniStateError::Io { path, source }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut json = serde_json::to_vec(contents).map_err(|e| CniStateError::Io {
        path: path.to_owned(),
        source: e.into(),
    })?;
    json.push(b'\n');
    // In the same directory, so the rename is atomic: readers see the old file or the new.
    let mut tmp = tempfile::Builder::new()
        .prefix(".enrolled-namespaces.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(&json).map_err(io(tmp.path()))?;
    // tempfile creates 0600; the CNI plugin may run as another user.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    tmp.persist(path).map_err(|e| CniStateError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    // The rename itself survives a crash only once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use zmesh_cluster::state::{NamespaceInfo, CILIUM_MTLS_LABEL, ISTIO_DATAPLANE_LABEL};

    fn ns(name: &str, label: Option<(&str, &str)>) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: label
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    fn read(path: &Path) -> CniState {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn written_atomically_and_only_when_the_set_changes() {
        let dir = tempfile::tempdir().unwrap();
        // The directory does not exist yet (/var/run/zmesh on a fresh node).
        let path = dir.path().join("zmesh/enrolled-namespaces.json");
        let mut file = CniStateFile::new(&path);
        let state = ClusterState::new(
            [
                ns("shop", Some((CILIUM_MTLS_LABEL, "true"))),
                ns("billing", Some((ISTIO_DATAPLANE_LABEL, "ambient"))),
                ns("legacy", None),
                ns("off", Some((CILIUM_MTLS_LABEL, "false"))),
            ],
            [],
        );
        assert!(file.update(&state).unwrap());
        let written = read(&path);
        assert_eq!(written.enrolled_namespaces, ["billing", "shop"]);
        time::OffsetDateTime::parse(
            &written.written_at,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o644);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(r#"{"enrolled_namespaces":["billing","shop"],"written_at":""#),
            "{text}"
        );

        // Same set (other changes in the cluster): not rewritten.
        let inode = meta.ino();
        let same = ClusterState::new(
            [
                ns("shop", Some((CILIUM_MTLS_LABEL, "true"))),
                ns("billing", Some((ISTIO_DATAPLANE_LABEL, "ambient"))),
                ns("new-plain", None),
            ],
            [],
        );
        assert!(!file.update(&same).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);

        // A namespace leaves: replaced by rename (a new inode), no temporary files left.
        let fewer = ClusterState::new([ns("shop", Some((CILIUM_MTLS_LABEL, "true")))], []);
        assert!(file.update(&fewer).unwrap());
        assert_eq!(read(&path).enrolled_namespaces, ["shop"]);
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["enrolled-namespaces.json"]);

        // None enrolled: an empty list, not a missing file.
        assert!(file.update(&ClusterState::default()).unwrap());
        assert!(read(&path).enrolled_namespaces.is_empty());
    }

    #[test]
    fn a_failed_write_is_an_error_and_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        // The parent "directory" is a file: nothing can be written below it.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("state.json");
        let mut file = CniStateFile::new(&path);
        let state = ClusterState::new([ns("shop", Some((CILIUM_MTLS_LABEL, "true")))], []);
        let error = file.update(&state).unwrap_err();
        assert!(error.to_string().contains("blocker"), "{error}");
        std::fs::remove_file(&blocker).unwrap();
        assert!(file.update(&state).unwrap(), "retried with the same set");
        assert_eq!(read(&path).enrolled_namespaces, ["shop"]);
    }
}
