//! A short-lived cache of accepted bearer tokens in front of a validator that asks a
//! remote service (the Kubernetes TokenReview API), so that a node's burst of requests
//! (one per workload on the node) costs the API server one review, not one per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::node::NodeName;
use crate::policy::{BearerFuture, BearerValidator};

/// More entries than this and expired ones are swept; if that is not enough the cache
/// starts over, so memory stays bounded whatever callers send.
const MAX_ENTRIES: usize = 4096;

/// Remembers, for `ttl`, which node a token was accepted for. Only acceptances are
/// cached: a rejected or undecided token is asked about again next time. Entries are
/// keyed by the token's SHA-256, so the cache never holds a usable token.
pub struct CachedBearer<V> {
    inner: V,
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (NodeName, Instant)>>,
}

impl<V: BearerValidator> CachedBearer<V> {
    pub fn new(inner: V, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lookup(&self, key: &[u8; 32]) -> Option<NodeName> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some((node, expires)) if Instant::now() < *expires => Some(node.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], node: NodeName) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, expires)| now < *expires);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (node, now + self.ttl));
    }
}

fn token_key(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

impl<V: BearerValidator> BearerValidator for CachedBearer<V> {
    fn validate<'a>(&'a self, token: &'a str) -> BearerFuture<'a> {
        Box::pin(async move {
            let key = token_key(token);
            if let Some(node) = self.lookup(&key) {
                return Ok(node);
            }
            let node = self.inner.validate(token).await?;
            self.remember(key, node.clone());
            Ok(node)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::policy::BearerError;

    /// Accepts "good" for node-a, rejects "bad", is unavailable for anything else.
    #[derive(Clone, Default)]
    struct Counting {
        calls: Arc<AtomicUsize>,
    }

    impl BearerValidator for Counting {
        fn validate<'a>(&'a self, token: &'a str) -> BearerFuture<'a> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match token {
                    "good" => Ok(NodeName::new("node-a").unwrap()),
                    "bad" => Err(BearerError::Rejected("no".into())),
                    _ => Err(BearerError::Unavailable("down".into())),
                }
            })
        }
    }

    #[tokio::test]
    async fn caches_only_acceptances() {
        let inner = Counting::default();
        let calls = inner.calls.clone();
        let cached = CachedBearer::new(inner, Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(cached.validate("good").await.unwrap().as_str(), "node-a");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one review for three requests"
        );
        for _ in 0..2 {
            assert!(matches!(
                cached.validate("bad").await,
                Err(BearerError::Rejected(_))
            ));
            assert!(matches!(
                cached.validate("other").await,
                Err(BearerError::Unavailable(_))
            ));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5, "refusals are never cached");
        // The key is a hash: nothing in the cache is the token.
        let entries = cached.entries.lock().unwrap();
        assert_eq!(entries.len(), 1);
        assert!(entries.contains_key(&token_key("good")));
    }

    #[tokio::test]
    async fn expired_entries_are_asked_again() {
        let inner = Counting::default();
        let calls = inner.calls.clone();
        let cached = CachedBearer::new(inner, Duration::ZERO);
        cached.validate("good").await.unwrap();
        cached.validate("good").await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // An entry past its expiry is dropped and the token reviewed again.
        let cached = CachedBearer::new(Counting::default(), Duration::from_secs(60));
        cached.entries.lock().unwrap().insert(
            token_key("good"),
            (NodeName::new("stale").unwrap(), Instant::now()),
        );
        assert_eq!(cached.validate("good").await.unwrap().as_str(), "node-a");
        assert_eq!(cached.inner.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn stays_bounded() {
        let cached = CachedBearer::new(Counting::default(), Duration::from_secs(60));
        let far = Instant::now() + Duration::from_secs(3600);
        {
            let mut entries = cached.entries.lock().unwrap();
            for i in 0..MAX_ENTRIES {
                entries.insert(
                    token_key(&i.to_string()),
                    (NodeName::new("n").unwrap(), far),
                );
            }
        }
        cached.validate("good").await.unwrap();
        assert!(cached.entries.lock().unwrap().len() <= MAX_ENTRIES);
    }
}
