//! Limits on inbound HBONE tunnels, against peers that open streams faster than they use
//! them (HTTP/2 "rapid reset" after accept, stream floods): concurrent tunnels per
//! connection and per peer identity, and client resets per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use zmesh_identity::SpiffeId;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain counter updates: a panic while holding the lock leaves consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open inbound tunnels per peer identity, across all of its connections.
#[derive(Debug)]
pub(crate) struct IdentityLimit {
    max: usize,
    open: Mutex<HashMap<SpiffeId, usize>>,
}

/// One open tunnel of an identity; returns the slot when dropped.
#[derive(Debug)]
pub(crate) struct IdentityPermit {
    limit: Arc<IdentityLimit>,
    id: SpiffeId,
}

impl IdentityLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::default(),
        })
    }

    /// A slot for one more tunnel of `id`, or `None` if it has `max` open.
    pub fn try_acquire(self: &Arc<Self>, id: &SpiffeId) -> Option<IdentityPermit> {
        let mut open = lock(&self.open);
        let n = open.entry(id.clone()).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                open.remove(id);
            }
            return None;
        }
        *n += 1;
        Some(IdentityPermit {
            limit: self.clone(),
            id: id.clone(),
        })
    }

    #[cfg(test)]
    fn open(&self, id: &SpiffeId) -> usize {
        lock(&self.open).get(id).copied().unwrap_or(0)
    }
}

impl Drop for IdentityPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.limit.open);
        if let Some(n) = open.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.id);
            }
        }
    }
}

/// One inbound HBONE connection's limits.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    tunnels: Arc<Semaphore>,
    max_resets: usize,
    /// Tunnels the client reset before sending a byte through them.
    resets: AtomicUsize,
    /// Tunnels that carried bytes from the client.
    used: AtomicUsize,
    /// Cancelled when the client reset too many tunnels: the connection gets GOAWAY.
    calm: CancellationToken,
}

impl ConnLimits {
    pub fn new(max_tunnels: usize, max_resets: usize) -> Arc<Self> {
        Arc::new(Self {
            tunnels: Arc::new(Semaphore::new(max_tunnels)),
            max_resets,
            resets: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
            calm: CancellationToken::new(),
        })
    }

    /// A slot for one more tunnel on this connection, or `None` if it has the maximum.
    pub fn try_tunnel(&self) -> Option<OwnedSemaphorePermit> {
        self.tunnels.clone().try_acquire_owned().ok()
    }

    /// The client reset a tunnel it never sent a byte through. Past `max_resets` (and past
    /// the number of tunnels it did use, so a long-lived connection's occasional cancel is
    /// no offence) the connection must be closed.
    pub fn client_reset(&self) {
        let resets = self.resets.fetch_add(1, Ordering::AcqRel) + 1;
        if resets > self.max_resets && resets > self.used.load(Ordering::Acquire) {
            self.calm.cancel();
        }
    }

    /// A tunnel carried bytes from the client.
    pub fn used(&self) {
        self.used.fetch_add(1, Ordering::AcqRel);
    }

    /// Completes once the client reset too many tunnels.
    pub async fn too_many_resets(&self) {
        self.calm.cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zmesh_identity::{TrustDomain, WorkloadId};

    fn id(sa: &str) -> SpiffeId {
        WorkloadId::new(&TrustDomain::default(), "default", sa)
            .unwrap()
            .spiffe_id()
            .clone()
    }

    #[test]
    fn identity_slots_are_counted_per_identity_and_returned() {
        let limit = IdentityLimit::new(2);
        let (a, b) = (id("a"), id("b"));
        let a1 = limit.try_acquire(&a).unwrap();
        let a2 = limit.try_acquire(&a).unwrap();
        assert!(limit.try_acquire(&a).is_none());
        let b1 = limit.try_acquire(&b).unwrap();
        drop(a1);
        let a3 = limit.try_acquire(&a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(limit.open(&a), 0);
        assert!(lock(&limit.open).is_empty());
        let none = IdentityLimit::new(0);
        assert!(none.try_acquire(&a).is_none());
        assert!(lock(&none.open).is_empty());
    }

    #[test]
    fn resets_past_the_threshold_and_past_the_used_tunnels_trip() {
        let limits = ConnLimits::new(2, 3);
        let (p1, p2) = (limits.try_tunnel().unwrap(), limits.try_tunnel().unwrap());
        assert!(limits.try_tunnel().is_none());
        drop((p1, p2));
        assert!(limits.try_tunnel().is_some());
        for _ in 0..5 {
            limits.used();
        }
        for _ in 0..5 {
            limits.client_reset();
        }
        assert!(!limits.calm.is_cancelled(), "5 resets, 5 used tunnels");
        limits.client_reset();
        assert!(limits.calm.is_cancelled());
    }
}
