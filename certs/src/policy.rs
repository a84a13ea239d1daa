//! Who may ask for what: bearer-token authentication of node agents and the placement
//! of workloads on nodes. Both are traits so a Kubernetes-backed implementation
//! (TokenReview for bearer tokens, a pod informer for placement) plugs in beside the
//! file-backed ones shipped here.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use zmesh_identity::{TrustDomain, WorkloadId};

use crate::authority::sha256_hex;
use crate::files::FileStamp;
use crate::node::NodeName;

/// A file-backed source could not be read or parsed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {reason}", path = .path.display())]
pub struct SourceError {
    pub path: PathBuf,
    pub reason: String,
}

/// Why a bearer token did not authenticate a node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BearerError {
    /// The token is not valid; the caller gets UNAUTHENTICATED. The reason goes to the
    /// audit log and the caller, so it must never contain the token.
    #[error("bearer token rejected: {0}")]
    Rejected(String),
    /// The validator could not decide (e.g. the API server is down); UNAVAILABLE.
    #[error("cannot validate bearer tokens: {0}")]
    Unavailable(String),
}

pub type BearerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<NodeName, BearerError>> + Send + 'a>>;

/// Maps an `authorization: Bearer <token>` credential to the node it belongs to.
///
/// `StaticTokens` ships here; the Kubernetes validator (TokenReview of the agent's
/// audience-bound ServiceAccount token) lives with the Kubernetes code in the `zmesh`
/// package. Wrap a validator that calls a remote service in [`CachedBearer`].
pub trait BearerValidator: Send + Sync + 'static {
    fn validate<'a>(&'a self, token: &'a str) -> BearerFuture<'a>;
}

/// Static per-node tokens from a file of lines `<node-name> <sha256-hex-of-token>`
/// (`#` starts a comment). The file holds only hashes; it is re-read when it changes.
pub struct StaticTokens {
    file: ReloadingFile<HashMap<String, NodeName>>,
}

impl StaticTokens {
    pub fn new(path: &Path) -> Result<Self, SourceError> {
        let file = ReloadingFile::new(path, parse_static_tokens);
        file.get()?;
        Ok(Self { file })
    }

    /// The line to add to the tokens file for `token` on `node`.
    pub fn file_line(node: &NodeName, token: &str) -> String {
        format!("{node} {}", sha256_hex(token.as_bytes()))
    }
}

fn parse_static_tokens(text: &str) -> Result<HashMap<String, NodeName>, String> {
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(node), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected \"<node> <sha256-hex>\"", i + 1));
        };
        let node = NodeName::new(node).map_err(|e| format!("line {}: {e}", i + 1))?;
        let hash = hash.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {}: the hash must be 64 hex digits", i + 1));
        }
        map.insert(hash, node);
    }
    Ok(map)
}

impl BearerValidator for StaticTokens {
    fn validate<'a>(&'a self, token: &'a str) -> BearerFuture<'a> {
        Box::pin(async move {
            let map = self
                .file
                .get()
                .map_err(|e| BearerError::Unavailable(e.to_string()))?;
            map.get(&sha256_hex(token.as_bytes()))
                .cloned()
                .ok_or_else(|| BearerError::Rejected("not a known static token".into()))
        })
    }
}

/// Where workloads run: the CA issues an identity to a node only if a workload with that
/// identity is scheduled there.
pub trait WorkloadPlacement: Send + Sync + 'static {
    fn is_scheduled(&self, node: &NodeName, workload: &WorkloadId) -> Result<bool, SourceError>;
}

/// Placement from a YAML file mapping node names to workloads, each either a full
/// SPIFFE ID or `namespace/serviceaccount`:
/// ```yaml
/// node-a:
///   - default/web
///   - spiffe://cluster.local/ns/prod/sa/db
/// node-b: []
/// ```
/// The file is re-read whenever it changes. If it becomes unreadable or invalid, every
/// request is refused until it is fixed (fail closed).
pub struct FilePlacement {
    file: ReloadingFile<HashMap<NodeName, HashSet<WorkloadId>>>,
}

impl FilePlacement {
    pub fn new(path: &Path, trust_domain: &TrustDomain) -> Result<Self, SourceError> {
        let td = trust_domain.clone();
        let file = ReloadingFile::new(path, move |text| parse_placement(text, &td));
        file.get()?;
        Ok(Self { file })
    }
}

fn parse_placement(
    text: &str,
    td: &TrustDomain,
) -> Result<HashMap<NodeName, HashSet<WorkloadId>>, String> {
    let raw: HashMap<String, Option<Vec<String>>> = if text.trim().is_empty() {
        HashMap::new()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?
    };
    let mut out = HashMap::new();
    for (node, workloads) in raw {
        let node = NodeName::new(&node).map_err(|e| e.to_string())?;
        let mut set = HashSet::new();
        for w in workloads.unwrap_or_default() {
            let id = if w.starts_with("spiffe://") {
                w.parse::<WorkloadId>()
            } else {
                match w.split_once('/') {
                    Some((ns, sa)) => WorkloadId::new(td, ns, sa),
                    None => {
                        return Err(format!(
                        "node {node}: {w:?} is neither a SPIFFE ID nor namespace/serviceaccount"
                    ))
                    }
                }
            }
            .map_err(|e| format!("node {node}: {w:?}: {e}"))?;
            if id.trust_domain() != td {
                return Err(format!("node {node}: {id} is outside trust domain {td}"));
            }
            set.insert(id);
        }
        out.insert(node, set);
    }
    Ok(out)
}

impl WorkloadPlacement for FilePlacement {
    fn is_scheduled(&self, node: &NodeName, workload: &WorkloadId) -> Result<bool, SourceError> {
        let map = self.file.get()?;
        Ok(map.get(node).is_some_and(|set| set.contains(workload)))
    }
}

type Parser<T> = Box<dyn Fn(&str) -> Result<T, String> + Send + Sync>;

/// A parsed file, re-parsed when its inode, size or times change (one `stat` per use).
struct ReloadingFile<T> {
    path: PathBuf,
    parse: Parser<T>,
    cache: Mutex<Option<(FileStamp, Arc<T>)>>,
}

impl<T> ReloadingFile<T> {
    fn new(path: &Path, parse: impl Fn(&str) -> Result<T, String> + Send + Sync + 'static) -> Self {
        Self {
            path: path.to_owned(),
            parse: Box::new(parse),
            cache: Mutex::new(None),
        }
    }

    fn get(&self) -> Result<Arc<T>, SourceError> {
        let err = |reason: String| SourceError {
            path: self.path.clone(),
            reason,
        };
        let stamp = FileStamp::of(&self.path).map_err(|e| err(e.to_string()))?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, value)) = cache.as_ref() {
            if *seen == stamp {
                return Ok(value.clone());
            }
        }
        // Drop the stale value first: if the new version is bad we refuse, not serve old data.
        *cache = None;
        let text = std::fs::read_to_string(&self.path).map_err(|e| err(e.to_string()))?;
        let value = Arc::new((self.parse)(&text).map_err(err)?);
        *cache = Some((stamp, value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wid(s: &str) -> WorkloadId {
        s.parse().unwrap()
    }

    #[test]
    fn placement_file_is_parsed_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placement.yaml");
        std::fs::write(
            &path,
            "node-a:\n  - default/web\n  - spiffe://cluster.local/ns/prod/sa/db\nnode-b:\n",
        )
        .unwrap();
        let p = FilePlacement::new(&path, &TrustDomain::default()).unwrap();
        let a = NodeName::new("node-a").unwrap();
        let b = NodeName::new("node-b").unwrap();
        let web = wid("spiffe://cluster.local/ns/default/sa/web");
        assert!(p.is_scheduled(&a, &web).unwrap());
        assert!(p
            .is_scheduled(&a, &wid("spiffe://cluster.local/ns/prod/sa/db"))
            .unwrap());
        assert!(!p.is_scheduled(&b, &web).unwrap());
        assert!(!p
            .is_scheduled(&NodeName::new("node-c").unwrap(), &web)
            .unwrap());

        // Move web to node-b: the next lookup sees it.
        std::fs::write(&path, "node-b:\n  - default/web\n").unwrap();
        assert!(!p.is_scheduled(&a, &web).unwrap());
        assert!(p.is_scheduled(&b, &web).unwrap());

        // A broken file fails closed.
        std::fs::write(&path, "node-b: [\n").unwrap();
        assert!(p.is_scheduled(&b, &web).is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(p.is_scheduled(&b, &web).is_err());
    }

    #[test]
    fn placement_rejects_bad_entries() {
        let td = TrustDomain::default();
        for bad in [
            "node-a: [web]\n",
            "node-a: [spiffe://other.org/ns/a/sa/b]\n",
            "Node_A: [default/web]\n",
            "node-a: [a/b/c]\n",
        ] {
            assert!(parse_placement(bad, &td).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn static_tokens_map_hashes_to_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let node = NodeName::new("node-a").unwrap();
        std::fs::write(
            &path,
            format!("# comment\n{}\n", StaticTokens::file_line(&node, "s3cret")),
        )
        .unwrap();
        let v = StaticTokens::new(&path).unwrap();
        assert_eq!(v.validate("s3cret").await.unwrap(), node);
        assert!(matches!(
            v.validate("wrong").await,
            Err(BearerError::Rejected(_))
        ));
        std::fs::write(&path, "node-a nothex\n").unwrap();
        assert!(matches!(
            v.validate("s3cret").await,
            Err(BearerError::Unavailable(_))
        ));
    }
}
