//! The CA's state directory: chains, the rotation phase, join tokens, the ledger of
//! issued leaves and the audit log.
//!
//! Layout (directory 0700, every file 0600):
//! ```text
//! state.json                 trust domain, policy, rotation phase
//! chains/<n>/root.pem        root certificate of chain n
//! chains/<n>/root.key        its key (only needed to create the intermediate)
//! chains/<n>/intermediate.pem, intermediate.key
//! tokens.json                join tokens: sha256 of the token, node, expiry, used
//! issued.jsonl               ledger: serial, identity, not_after, root fingerprint
//! audit.jsonl                one JSON line per decision
//! .lock                      advisory lock for read-modify-write
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zmesh_identity::TrustDomain;

use crate::authority::{
    generate_chain, hex, sha256_hex, Authority, Chain, LeafKind, Phase, Policy,
};
use crate::error::{StoreError, TokenError};
use crate::files::{self, DirLock, FileStamp};
use crate::node::NodeName;

const STATE_FILE: &str = "state.json";
const TOKENS_FILE: &str = "tokens.json";
const LEDGER_FILE: &str = "issued.jsonl";
pub(crate) const AUDIT_FILE: &str = "audit.jsonl";
const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    trust_domain: String,
    /// Id for the next chain created by a rotation.
    next_chain: u32,
    #[serde(flatten)]
    phase: Phase,
    max_leaf_lifetime_secs: u64,
    node_cert_lifetime_secs: u64,
}

/// Options for `CaStore::init`.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub trust_domain: TrustDomain,
    pub policy: Policy,
}

/// One step of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// Create a new root and publish it in the bundle; keep signing with the old one.
    Add,
    /// Sign with the new root.
    Switch,
    /// Remove the old root from the bundle.
    Drop,
    /// Whichever of the three comes next.
    Next,
}

/// One issued leaf, as remembered for root rotation decisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafRecord {
    pub serial: String,
    pub identity: String,
    pub kind: LeafKind,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub chain: u32,
    pub root_fingerprint: String,
}

/// A root in `Status`.
#[derive(Debug, Clone, Serialize)]
pub struct RootInfo {
    pub chain: u32,
    pub fingerprint_sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// "active", "old" or "new".
    pub role: &'static str,
    pub signing: bool,
}

/// What `zmesh ca status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub trust_domain: String,
    pub phase: &'static str,
    pub roots: Vec<RootInfo>,
    /// Unexpired leaves issued under the root being retired (empty when stable).
    pub leaves_on_old_root: Vec<LeafRecord>,
    pub max_leaf_lifetime_secs: u64,
    pub node_cert_lifetime_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    sha256: String,
    node: NodeName,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    used_at: Option<OffsetDateTime>,
}

/// Handle on a CA state directory. Cheap; every operation reads what it needs.
#[derive(Debug, Clone)]
pub struct CaStore {
    dir: PathBuf,
}

impl CaStore {
    /// Creates a new CA (root + intermediate) in `dir`, which must not hold one already.
    pub fn init(dir: &Path, options: &InitOptions) -> Result<Self, StoreError> {
        files::create_private_dir(dir)?;
        let store = Self {
            dir: dir.to_owned(),
        };
        let _lock = DirLock::acquire(dir)?;
        if store.state_path().exists() {
            return Err(StoreError::AlreadyInitialized(dir.to_owned()));
        }
        if options.policy.max_leaf_lifetime.is_zero() || options.policy.node_cert_lifetime.is_zero()
        {
            return Err(StoreError::InvalidArgument(
                "certificate lifetimes must be positive".into(),
            ));
        }
        store.create_chain(1, &options.trust_domain)?;
        let state = StateFile {
            version: STATE_VERSION,
            trust_domain: options.trust_domain.to_string(),
            next_chain: 2,
            phase: Phase::Stable { active: 1 },
            max_leaf_lifetime_secs: options.policy.max_leaf_lifetime.as_secs(),
            node_cert_lifetime_secs: options.policy.node_cert_lifetime.as_secs(),
        };
        store.write_state(&state)?;
        // Prove the new CA loads before reporting success.
        store.load()?;
        Ok(store)
    }

    /// Opens an existing state directory (checking it is private); `load` validates it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let store = Self {
            dir: dir.to_owned(),
        };
        if !store.state_path().exists() {
            return Err(StoreError::NotInitialized(dir.to_owned()));
        }
        files::check_private(dir)?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub(crate) fn state_stamp(&self) -> std::io::Result<FileStamp> {
        FileStamp::of(&self.state_path())
    }

    fn chain_dir(&self, id: u32) -> PathBuf {
        self.dir.join("chains").join(id.to_string())
    }

    fn create_chain(&self, id: u32, td: &TrustDomain) -> Result<(), StoreError> {
        let dir = self.chain_dir(id);
        files::create_private_dir(&self.dir.join("chains"))?;
        files::create_private_dir(&dir)?;
        let generated = generate_chain(id, td)?;
        files::write_new_secret(&dir.join("root.key"), generated.root_key_pem.as_bytes())?;
        files::write_new_secret(
            &dir.join("intermediate.key"),
            generated.intermediate_key_pem.as_bytes(),
        )?;
        files::write_atomic(&dir.join("root.pem"), generated.root_pem.as_bytes(), 0o600)?;
        files::write_atomic(
            &dir.join("intermediate.pem"),
            generated.intermediate_pem.as_bytes(),
            0o600,
        )?;
        Ok(())
    }

    fn read_state(&self) -> Result<StateFile, StoreError> {
        let path = self.state_path();
        let text = files::read_secret(&path)?;
        let state: StateFile =
            serde_json::from_str(&text).map_err(|e| StoreError::BadStateFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if state.version != STATE_VERSION {
            return Err(StoreError::BadStateFile {
                path,
                reason: format!(
                    "version {} is not supported (expected {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    fn write_state(&self, state: &StateFile) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(state).map_err(|e| StoreError::BadStateFile {
            path: self.state_path(),
            reason: e.to_string(),
        })?;
        files::write_atomic(&self.state_path(), &json, 0o600)
    }

    /// Loads and validates the CA: every chain in the bundle, key file permissions, and
    /// the trust domain.
    pub fn load(&self) -> Result<Authority, StoreError> {
        files::check_private(&self.dir)?;
        let state = self.read_state()?;
        let td = TrustDomain::new(&state.trust_domain)?;
        let mut chains = BTreeMap::new();
        for id in state.phase.bundle() {
            let dir = self.chain_dir(id);
            // The root key is not used to sign leaves, but a readable one is as bad.
            files::check_private(&dir.join("root.key"))?;
            let key = files::read_secret(&dir.join("intermediate.key"))?;
            let root = files::read_string(&dir.join("root.pem"))?;
            let int = files::read_string(&dir.join("intermediate.pem"))?;
            chains.insert(id, Chain::load(id, &td, &root, &int, &key)?);
        }
        let policy = Policy {
            max_leaf_lifetime: Duration::from_secs(state.max_leaf_lifetime_secs),
            node_cert_lifetime: Duration::from_secs(state.node_cert_lifetime_secs),
        };
        Authority::new(td, state.phase, policy, chains)
    }

    /// Advances the root rotation by one step and returns the new phase.
    ///
    /// `Drop` is refused while a leaf issued under the old root is unexpired, unless
    /// `force` is set (those leaves stop validating everywhere the new bundle lands).
    pub fn rotate(&self, step: RotationStep, force: bool) -> Result<Phase, StoreError> {
        let _lock = DirLock::acquire(&self.dir)?;
        let mut state = self.read_state()?;
        let step = match (step, state.phase) {
            (RotationStep::Next, Phase::Stable { .. }) => RotationStep::Add,
            (RotationStep::Next, Phase::Added { .. }) => RotationStep::Switch,
            (RotationStep::Next, Phase::Switched { .. }) => RotationStep::Drop,
            (step, _) => step,
        };
        let new_phase = match (step, state.phase) {
            (RotationStep::Add, Phase::Stable { active }) => {
                let td = TrustDomain::new(&state.trust_domain)?;
                let new = state.next_chain;
                self.create_chain(new, &td)?;
                state.next_chain += 1;
                Phase::Added { old: active, new }
            }
            (RotationStep::Switch, Phase::Added { old, new }) => Phase::Switched { old, new },
            (RotationStep::Drop, Phase::Switched { old, new }) => {
                let remaining = self.unexpired_leaves_of(old)?;
                if !remaining.is_empty() && !force {
                    let latest = remaining.iter().map(|r| r.not_after).max();
                    return Err(StoreError::Rotation(format!(
                        "{} unexpired leaf certificate(s) still chain to the old root (last expires {}); \
                         wait until then, or pass --force to break them",
                        remaining.len(),
                        latest.map(|t| t.to_string()).unwrap_or_default()
                    )));
                }
                Phase::Stable { active: new }
            }
            (step, phase) => {
                return Err(StoreError::Rotation(format!(
                    "cannot {} in phase {:?}; the order is add, switch, drop",
                    match step {
                        RotationStep::Add => "add a root",
                        RotationStep::Switch => "switch to the new root",
                        RotationStep::Drop => "drop the old root",
                        RotationStep::Next => "advance",
                    },
                    phase.name()
                )))
            }
        };
        let previous = state.phase;
        state.phase = new_phase;
        self.write_state(&state)?;
        // Validate what we wrote; on failure restore the previous phase.
        if let Err(e) = self.load() {
            state.phase = previous;
            self.write_state(&state)?;
            return Err(e);
        }
        if matches!(new_phase, Phase::Stable { .. }) {
            self.compact_ledger()?;
        }
        Ok(new_phase)
    }

    /// The phase, roots and leaves still depending on a retiring root.
    pub fn status(&self) -> Result<Status, StoreError> {
        let authority = self.load()?;
        let phase = authority.phase();
        let roots = phase
            .bundle()
            .into_iter()
            .map(|id| {
                let chain = authority.chain(id);
                RootInfo {
                    chain: id,
                    fingerprint_sha256: chain.root_fingerprint.clone(),
                    not_after: chain.root_not_after,
                    role: match phase.retiring() {
                        None => "active",
                        Some(old) if old == id => "old",
                        Some(_) => "new",
                    },
                    signing: phase.signing() == id,
                }
            })
            .collect();
        let leaves_on_old_root = match phase.retiring() {
            Some(old) => self.unexpired_leaves_of(old)?,
            None => Vec::new(),
        };
        let policy = authority.policy();
        Ok(Status {
            trust_domain: authority.trust_domain().to_string(),
            phase: phase.name(),
            roots,
            leaves_on_old_root,
            max_leaf_lifetime_secs: policy.max_leaf_lifetime.as_secs(),
            node_cert_lifetime_secs: policy.node_cert_lifetime.as_secs(),
        })
    }

    /// Records an issued leaf in the ledger.
    pub(crate) fn record_leaf(&self, record: &LeafRecord) -> Result<(), StoreError> {
        let line = serde_json::to_string(record)
            .map_err(|e| StoreError::io(self.dir.join(LEDGER_FILE), std::io::Error::other(e)))?;
        let _lock = DirLock::acquire(&self.dir)?;
        files::append_line(&self.dir.join(LEDGER_FILE), &line)
    }

    fn read_ledger(&self) -> Result<Vec<LeafRecord>, StoreError> {
        let path = self.dir.join(LEDGER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(path, e)),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| StoreError::BadStateFile {
                    path: path.clone(),
                    reason: format!("line {}: {e}", i + 1),
                })
            })
            .collect()
    }

    /// Unexpired leaves of `chain` that something may still use. A node certificate
    /// followed by a newer one for the same node (a renewal or re-join) is not counted:
    /// a node agent only ever presents its latest certificate, and only to this CA.
    fn unexpired_leaves_of(&self, chain: u32) -> Result<Vec<LeafRecord>, StoreError> {
        let now = OffsetDateTime::now_utc();
        let ledger = self.read_ledger()?;
        // The ledger is appended in issuance order, so the last entry per node is current.
        let mut latest_node_cert = std::collections::HashMap::new();
        for (i, r) in ledger.iter().enumerate() {
            if r.kind == LeafKind::Node {
                latest_node_cert.insert(r.identity.as_str(), i);
            }
        }
        let mut leaves: Vec<LeafRecord> = ledger
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                r.chain == chain
                    && r.not_after > now
                    && (r.kind != LeafKind::Node
                        || latest_node_cert.get(r.identity.as_str()) == Some(i))
            })
            .map(|(_, r)| r.clone())
            .collect();
        leaves.sort_by_key(|r| r.not_after);
        Ok(leaves)
    }

    /// Drops expired entries from the ledger (called with the lock held).
    fn compact_ledger(&self) -> Result<(), StoreError> {
        let now = OffsetDateTime::now_utc();
        let mut out = String::new();
        for record in self
            .read_ledger()?
            .into_iter()
            .filter(|r| r.not_after > now)
        {
            if let Ok(line) = serde_json::to_string(&record) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        files::write_atomic(&self.dir.join(LEDGER_FILE), out.as_bytes(), 0o600)
    }

    /// Creates a one-time join token for `node`, valid for `ttl`. Only its SHA-256 is
    /// stored; the token itself is returned once, to be handed to the node agent.
    pub fn create_join_token(&self, node: &NodeName, ttl: Duration) -> Result<String, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument(
                "token lifetime must be positive".into(),
            ));
        }
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| StoreError::io(&self.dir, std::io::Error::other("system RNG failed")))?;
        let token = format!("zmj_{}", hex(&raw));
        let _lock = DirLock::acquire(&self.dir)?;
        let now = OffsetDateTime::now_utc();
        let mut tokens = self.read_tokens()?;
        // Forget tokens that expired more than a day ago.
        tokens.retain(|t| t.expires_at + Duration::from_secs(86400) > now);
        tokens.push(TokenRecord {
            sha256: sha256_hex(token.as_bytes()),
            node: node.clone(),
            expires_at: now + ttl,
            used_at: None,
        });
        self.write_tokens(&tokens)?;
        Ok(token)
    }

    /// Spends a join token: checks it, runs `check` with its node (e.g. validating the
    /// CSR), and only if that succeeds marks the token used. Returns `check`'s value.
    pub(crate) fn consume_join_token<T, E>(
        &self,
        token: &str,
        check: impl FnOnce(&NodeName) -> Result<T, E>,
    ) -> Result<Result<(NodeName, T), E>, JoinTokenFailure> {
        let _lock = DirLock::acquire(&self.dir).map_err(JoinTokenFailure::Store)?;
        let mut tokens = self.read_tokens().map_err(JoinTokenFailure::Store)?;
        let hash = sha256_hex(token.as_bytes());
        let now = OffsetDateTime::now_utc();
        let record = tokens
            .iter_mut()
            .find(|t| constant_time_eq(t.sha256.as_bytes(), hash.as_bytes()))
            .ok_or(JoinTokenFailure::Token(TokenError::Unknown, None))?;
        if record.used_at.is_some() {
            let node = Some(record.node.clone());
            return Err(JoinTokenFailure::Token(TokenError::AlreadyUsed, node));
        }
        if record.expires_at <= now {
            let node = Some(record.node.clone());
            return Err(JoinTokenFailure::Token(TokenError::Expired, node));
        }
        let node = record.node.clone();
        let value = match check(&node) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        record.used_at = Some(now);
        self.write_tokens(&tokens)
            .map_err(JoinTokenFailure::Store)?;
        Ok(Ok((node, value)))
    }

    fn read_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let path = self.dir.join(TOKENS_FILE);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = files::read_secret(&path)?;
        serde_json::from_str(&text).map_err(|e| StoreError::BadStateFile {
            path,
            reason: e.to_string(),
        })
    }

    fn write_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StoreError> {
        let path = self.dir.join(TOKENS_FILE);
        let json = serde_json::to_vec_pretty(tokens).map_err(|e| StoreError::BadStateFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        files::write_atomic(&path, &json, 0o600)
    }
}

/// Why a join token could not be spent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinTokenFailure {
    /// With the token's node when the token is known (for the audit line).
    #[error("{0}")]
    Token(TokenError, Option<NodeName>),
    #[error(transparent)]
    Store(StoreError),
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn new_store() -> (tempfile::TempDir, CaStore) {
        let base = tempfile::tempdir().unwrap();
        let store = CaStore::init(&base.path().join("ca"), &InitOptions::default()).unwrap();
        (base, store)
    }

    #[test]
    fn init_creates_private_files_and_refuses_twice() {
        let (_base, store) = new_store();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        for f in [
            "state.json",
            "chains/1/root.key",
            "chains/1/intermediate.key",
            "chains/1/root.pem",
        ] {
            assert_eq!(mode(&store.dir().join(f)), 0o600, "{f}");
        }
        assert!(matches!(
            CaStore::init(store.dir(), &InitOptions::default()),
            Err(StoreError::AlreadyInitialized(_))
        ));
        let authority = store.load().unwrap();
        assert_eq!(authority.phase(), Phase::Stable { active: 1 });
    }

    #[test]
    fn load_refuses_readable_keys() {
        let (_base, store) = new_store();
        for key in ["chains/1/intermediate.key", "chains/1/root.key"] {
            let path = store.dir().join(key);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            match store.load() {
                Err(StoreError::InsecurePermissions { path: p, mode, .. }) => {
                    assert_eq!(p, path);
                    assert_eq!(mode, 0o644);
                }
                Err(e) => panic!("wrong error for {key}: {e}"),
                Ok(_) => panic!("loaded a CA with a world-readable {key}"),
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        store.load().unwrap();
    }

    #[test]
    fn load_refuses_a_mismatched_key() {
        let (_base, store) = new_store();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        files::write_atomic(
            &store.dir().join("chains/1/intermediate.key"),
            other.serialize_pem().as_bytes(),
            0o600,
        )
        .unwrap();
        match store.load() {
            Err(StoreError::BadChain { reason, .. }) => {
                assert!(reason.contains("does not match"), "{reason}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("loaded a mismatched key"),
        }
    }

    #[test]
    fn join_tokens_are_single_use_and_hashed() {
        let (_base, store) = new_store();
        let node = NodeName::new("node-a").unwrap();
        let token = store
            .create_join_token(&node, Duration::from_secs(600))
            .unwrap();
        let stored = std::fs::read_to_string(store.dir().join(TOKENS_FILE)).unwrap();
        assert!(!stored.contains(&token), "token stored in clear");
        assert!(stored.contains(&sha256_hex(token.as_bytes())));

        // A failing check does not spend the token.
        let r = store
            .consume_join_token(&token, |_| Err::<(), _>("bad csr"))
            .unwrap();
        assert_eq!(r, Err("bad csr"));
        let (got, ()) = store
            .consume_join_token(&token, |_| Ok::<_, ()>(()))
            .unwrap()
            .unwrap();
        assert_eq!(got, node);
        assert!(matches!(
            store.consume_join_token(&token, |_| Ok::<_, ()>(())),
            Err(JoinTokenFailure::Token(TokenError::AlreadyUsed, Some(n))) if n == node
        ));
        assert!(matches!(
            store.consume_join_token("zmj_nope", |_| Ok::<_, ()>(())),
            Err(JoinTokenFailure::Token(TokenError::Unknown, None))
        ));
    }

    #[test]
    fn rotation_phases_advance_in_order() {
        let (_base, store) = new_store();
        assert!(matches!(
            store.rotate(RotationStep::Switch, false),
            Err(StoreError::Rotation(_))
        ));
        assert!(matches!(
            store.rotate(RotationStep::Drop, false),
            Err(StoreError::Rotation(_))
        ));
        assert_eq!(
            store.rotate(RotationStep::Next, false).unwrap(),
            Phase::Added { old: 1, new: 2 }
        );
        assert!(matches!(
            store.rotate(RotationStep::Add, false),
            Err(StoreError::Rotation(_))
        ));
        assert_eq!(
            store.rotate(RotationStep::Switch, false).unwrap(),
            Phase::Switched { old: 1, new: 2 }
        );
        let record = LeafRecord {
            serial: "01".into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            kind: LeafKind::Workload,
            not_after: OffsetDateTime::now_utc() + Duration::from_secs(3600),
            chain: 1,
            root_fingerprint: "x".into(),
        };
        store.record_leaf(&record).unwrap();
        let status = store.status().unwrap();
        assert_eq!(status.phase, "switch");
        assert_eq!(status.leaves_on_old_root, vec![record]);
        assert!(matches!(
            store.rotate(RotationStep::Next, false),
            Err(StoreError::Rotation(_))
        ));
        assert_eq!(
            store.rotate(RotationStep::Drop, true).unwrap(),
            Phase::Stable { active: 2 }
        );
        let status = store.status().unwrap();
        assert_eq!(status.roots.len(), 1);
        assert_eq!(status.roots[0].chain, 2);
    }

    #[test]
    fn a_renewed_node_certificate_no_longer_holds_the_old_root() {
        let (_base, store) = new_store();
        store.rotate(RotationStep::Add, false).unwrap();
        store.rotate(RotationStep::Switch, false).unwrap();
        let later = OffsetDateTime::now_utc() + Duration::from_secs(30 * 86400);
        let node = |serial: &str, identity: &str, chain: u32| LeafRecord {
            serial: serial.into(),
            identity: identity.into(),
            kind: LeafKind::Node,
            not_after: later,
            chain,
            root_fingerprint: "x".into(),
        };
        let a = "spiffe://cluster.local/zmesh/node/node-a";
        let b = "spiffe://cluster.local/zmesh/node/node-b";
        for r in [node("01", a, 1), node("02", b, 1)] {
            store.record_leaf(&r).unwrap();
        }
        assert_eq!(store.status().unwrap().leaves_on_old_root.len(), 2);
        // node-a renews under the new root: only node-b still holds the old one.
        store.record_leaf(&node("03", a, 2)).unwrap();
        let left = store.status().unwrap().leaves_on_old_root;
        assert_eq!(left, vec![node("02", b, 1)]);
        assert!(matches!(
            store.rotate(RotationStep::Drop, false),
            Err(StoreError::Rotation(_))
        ));
        store.record_leaf(&node("04", b, 2)).unwrap();
        assert!(store.status().unwrap().leaves_on_old_root.is_empty());
        assert_eq!(
            store.rotate(RotationStep::Drop, false).unwrap(),
            Phase::Stable { active: 2 }
        );
    }
}
