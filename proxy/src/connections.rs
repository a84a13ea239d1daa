//! The connections open now, as the admin API shows them (`zmesh config connections`):
//! both ends with their identities, the Service addressed, and the bytes so far.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::access::ByteCounts;
use crate::flows::{rfc3339, FlowDirection, FlowEndpoint};

/// One open connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenConnection {
    pub direction: FlowDirection,
    /// When it was established.
    #[serde(with = "rfc3339")]
    pub opened: SystemTime,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Whether it crosses the network inside mTLS.
    pub encrypted: bool,
    /// From source to destination, so far.
    pub bytes_sent: u64,
    /// From destination back to source, so far.
    pub bytes_received: u64,
}

struct Entry {
    shown: OpenConnection,
    bytes: Arc<ByteCounts>,
}

/// Every established connection of one proxy, until it ends.
#[derive(Default)]
pub struct OpenConnections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConnections")
            .field("open", &self.lock().len())
            .finish()
    }
}

impl OpenConnections {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Single map operations: the map stays consistent even after a panic.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `shown` until the returned guard is dropped; `bytes` are read at each
    /// snapshot (`shown`'s byte fields are ignored).
    pub(crate) fn add(
        self: &Arc<Self>,
        shown: OpenConnection,
        bytes: Arc<ByteCounts>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Entry { shown, bytes });
        Registration {
            id,
            connections: self.clone(),
        }
    }

    /// The connections open now, oldest first.
    pub fn snapshot(&self) -> Vec<OpenConnection> {
        let mut out: Vec<(u64, OpenConnection)> = self
            .lock()
            .iter()
            .map(|(id, e)| {
                let mut c = e.shown.clone();
                // The flow's direction is source -> destination: what the client sent.
                c.bytes_sent = e.bytes.received.get();
                c.bytes_received = e.bytes.sent.get();
                (*id, c)
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, c)| c).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes its connection from [`OpenConnections`] when dropped.
pub(crate) struct Registration {
    id: u64,
    connections: Arc<OpenConnections>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}
