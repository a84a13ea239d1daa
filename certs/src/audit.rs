//! The audit trail: one JSON line per CA decision (issued or refused), appended to
//! `audit.jsonl` in the state directory and emitted to tracing. Never holds token values.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::StoreError;
use crate::files;

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    NodeCert,
    Bearer,
    JoinToken,
}

/// One decision, as written to the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub rpc: &'static str,
    pub peer: Option<String>,
    pub caller_node: Option<String>,
    pub auth: Option<AuthMethod>,
    pub identity: Option<String>,
    /// "issued" or "refused".
    pub decision: &'static str,
    pub serial: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    /// gRPC status code name of a refusal.
    pub code: Option<String>,
    pub reason: Option<String>,
}

pub(crate) struct AuditLog {
    path: PathBuf,
    // Serialises writers in this process; O_APPEND keeps lines whole across processes.
    lock: Mutex<()>,
}

impl AuditLog {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(crate::store::AUDIT_FILE),
            lock: Mutex::new(()),
        }
    }

    /// Writes the record; an error means the decision must not take effect.
    pub(crate) fn write(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let line = serde_json::to_string(record)
            .map_err(|e| StoreError::io(&self.path, std::io::Error::other(e)))?;
        if record.decision == "issued" {
            tracing::info!(target: "zmesh_certs::audit", "{line}");
        } else {
            tracing::warn!(target: "zmesh_certs::audit", "{line}");
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        files::append_line(&self.path, &line)
    }
}
