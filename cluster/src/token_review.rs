//! The CA authenticates node agents by their Kubernetes ServiceAccount tokens (the agent's
//! side, presenting the token, is `zmesh_agent::ca::CaTokenCredential`).
//!
//! [`TokenReviewValidator`]: the CA asks the API server (TokenReview) who the
//! token is, and accepts it only for the agent's service account, taking the node from
//! the token's `authentication.kubernetes.io/node-name` extra (pod-bound tokens carry it
//! since Kubernetes 1.30). Before 1.30 a pod-bound token names only its pod
//! (`.../pod-name` and `.../pod-uid` extras): the node is then that pod's `spec.nodeName`,
//! read from the API, provided the pod is still the one the token was bound to (same UID),
//! as Istio does for ztunnel. Fails closed: anything but a positive review for the agent
//! account and our audience that leads to exactly one node is a rejection, and an API
//! error is "unavailable", never "yes".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use zmesh_certs::{BearerError, BearerFuture, BearerValidator, NodeName};

/// The audience node agents request for their CA token (the projected volume's
/// `audience`): a token minted for another service is useless here, and ours is useless
/// to others.
pub const DEFAULT_AUDIENCE: &str = "zmesh-ca";
/// The node agents' service account.
pub const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "zmesh-system/zmesh-agent";
/// The user extra in which the API server names the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The user extras in which the API server names the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// How long to trust an accepted token without asking again. Short, because a deleted
/// pod's token stays usable this long.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// A `namespace/name` service account reference (shown that way by Debug too, as it is
/// printed in `zmesh ca serve --dry-run`).
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceAccountRef {
    namespace: String,
    name: String,
}

/// A service account reference that is not `namespace/name`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0:?} is not a service account reference: expected namespace/name, both DNS labels")]
pub struct ServiceAccountRefError(String);

impl FromStr for ServiceAccountRef {
    type Err = ServiceAccountRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ServiceAccountRefError(s.to_owned());
        let (namespace, name) = s.split_once('/').ok_or_else(bad)?;
        // Namespaces are DNS labels; service account names are DNS subdomains.
        let label = |p: &str, dots: bool| {
            !p.is_empty()
                && p.len() <= 253
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
                })
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        };
        if !label(namespace, false) || namespace.len() > 63 || !label(name, true) {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl ServiceAccountRef {
    /// The user name the API server gives this account's tokens.
    fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// Validates node agents' tokens with the TokenReview API. Wrap it in
/// [`zmesh_certs::CachedBearer`] so every request does not cost a review.
pub struct TokenReviewValidator {
    api: Api<TokenReview>,
    /// The agent account's namespace: where the pods its tokens are bound to run.
    pods: Api<Pod>,
    audience: String,
    agent: ServiceAccountRef,
    username: String,
}

impl TokenReviewValidator {
    /// Accepts tokens for `audience` of the `agent` service account. The client's
    /// identity needs `create` on `tokenreviews.authentication.k8s.io` and `get` on pods
    /// (`crate::access::CA_TOKEN_REVIEW`).
    pub fn new(client: Client, audience: &str, agent: ServiceAccountRef) -> Self {
        Self {
            pods: Api::namespaced(client.clone(), &agent.namespace),
            api: Api::all(client),
            audience: audience.to_owned(),
            username: agent.username(),
            agent,
        }
    }

    async fn review(&self, token: &str) -> Result<NodeName, BearerError> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        // The review (request and answer) holds the token: it is never logged.
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &request),
        )
        .await
        .map_err(|_| BearerError::Unavailable("the TokenReview API did not answer in time".into()))?
        .map_err(|e| BearerError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.ok_or_else(|| {
            BearerError::Unavailable("the API server returned a TokenReview without status".into())
        })?;
        match self.decide(status, token)? {
            Bound::Node(node) => Ok(node),
            Bound::Pod { name, uid } => self.node_of_pod(&name, &uid).await,
        }
    }

    /// The node of the agent pod `name` a token is bound to, if it is still that pod.
    async fn node_of_pod(&self, name: &str, uid: &str) -> Result<NodeName, BearerError> {
        let reject = |reason: String| Err(BearerError::Rejected(reason));
        let pod = format!("{}/{name}", self.agent.namespace);
        let found = tokio::time::timeout(REVIEW_TIMEOUT, self.pods.get_opt(name))
            .await
            .map_err(|_| BearerError::Unavailable("the API server did not answer in time".into()))?
            .map_err(|e| {
                BearerError::Unavailable(format!("cannot read the token's pod {pod}: {e}"))
            })?;
        let Some(found) = found else {
            return reject(format!("the token's pod {pod} no longer exists"));
        };
        if found.metadata.uid.as_deref() != Some(uid) {
            return reject(format!(
                "the token's pod {pod} was replaced (UID {:?}, the token's {uid:?})",
                found.metadata.uid.as_deref().unwrap_or("")
            ));
        }
        let spec = found.spec.unwrap_or_default();
        let account = spec.service_account_name.as_deref().unwrap_or("default");
        if account != self.agent.name {
            return reject(format!(
                "the token's pod {pod} runs as {account:?}, not the node agent's service \
                 account {}",
                self.agent
            ));
        }
        match spec.node_name.filter(|n| !n.is_empty()) {
            Some(node) => NodeName::new(&node).or_else(|e| {
                reject(format!(
                    "the node name {node:?} of the token's pod {pod} is not valid: {e}"
                ))
            }),
            None => reject(format!("the token's pod {pod} is not scheduled on a node")),
        }
    }

    /// What a reviewed token is bound to, or why it is refused.
    fn decide(&self, status: TokenReviewStatus, token: &str) -> Result<Bound, BearerError> {
        let reject = |reason: String| Err(BearerError::Rejected(reason));
        if status.authenticated != Some(true) {
            return match status.error.filter(|e| !e.is_empty()) {
                // The API server's reason, with the token masked should it ever be quoted.
                Some(error) => reject(format!(
                    "Kubernetes did not authenticate the token: {}",
                    error.replace(token, "<token>")
                )),
                None => reject("Kubernetes did not authenticate the token".into()),
            };
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return reject(format!(
                "the token is not for audience {:?} (the API server confirmed {audiences:?})",
                self.audience
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return reject(format!(
                "the token is {username:?}, not the node agent's service account {}",
                self.agent
            ));
        }
        let mut extra = user.extra.unwrap_or_default();
        let mut take = |key: &str| extra.remove(key).unwrap_or_default();
        let (nodes, pods, uids) = (
            take(NODE_NAME_EXTRA),
            take(POD_NAME_EXTRA),
            take(POD_UID_EXTRA),
        );
        match (nodes.as_slice(), pods.as_slice(), uids.as_slice()) {
            ([node], _, _) => NodeName::new(node)
                .map(Bound::Node)
                .or_else(|e| reject(format!("the token's node name {node:?} is not valid: {e}"))),
            ([], [pod], [uid]) => Ok(Bound::Pod {
                name: pod.clone(),
                uid: uid.clone(),
            }),
            ([], [], []) => reject(format!(
                "the token names no node and no pod ({NODE_NAME_EXTRA}, {POD_NAME_EXTRA}): \
                 use the agent pod's projected token"
            )),
            ([], _, _) => reject(format!(
                "the token names {} pods and {} pod UIDs",
                pods.len(),
                uids.len()
            )),
            _ => reject(format!("the token names {} nodes", nodes.len())),
        }
    }
}

/// What a token is bound to, as the review says.
#[derive(Debug, PartialEq, Eq)]
enum Bound {
    /// Kubernetes 1.30+: the node itself.
    Node(NodeName),
    /// Before 1.30: the pod only; its node is read from the API.
    Pod { name: String, uid: String },
}

impl BearerValidator for TokenReviewValidator {
    fn validate<'a>(&'a self, token: &'a str) -> BearerFuture<'a> {
        Box::pin(self.review(token))
    }
}

#[cfg(test)]
mod tests {

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    /// A validator whose API is never called (decisions are tested on their own).
    fn validator() -> TokenReviewValidator {
        let service = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("no API here"))
        });
        TokenReviewValidator::new(
            Client::new(service, "default"),
            DEFAULT_AUDIENCE,
            DEFAULT_AGENT_SERVICE_ACCOUNT.parse().unwrap(),
        )
    }

    fn agent_status(nodes: &[&str]) -> TokenReviewStatus {
        with_extras(&[(NODE_NAME_EXTRA, nodes)])
    }

    /// A positive review of the agent's token with these user extras.
    fn with_extras(extras: &[(&str, &[&str])]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![DEFAULT_AUDIENCE.into()]),
            error: None,
            user: Some(UserInfo {
                username: Some("system:serviceaccount:zmesh-system:zmesh-agent".into()),
                extra: Some(
                    extras
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                        .collect(),
                ),
                ..UserInfo::default()
            }),
        }
    }

    fn rejected<T: std::fmt::Debug>(result: Result<T, BearerError>) -> String {
        match result {
            Err(BearerError::Rejected(reason)) => reason,
            other => panic!("not rejected: {other:?}"),
        }
    }

    #[tokio::test]
    async fn decisions() {
        let v = validator();
        assert_eq!(
            v.decide(agent_status(&["node-a"]), "t").unwrap(),
            Bound::Node(NodeName::new("node-a").unwrap())
        );
        let reason = rejected(v.decide(agent_status(&["node-a", "node-b"]), "t"));
        assert!(reason.contains("names 2 nodes"), "{reason}");
        let reason = rejected(v.decide(agent_status(&["Node_A"]), "t"));
        assert!(reason.contains("not valid"), "{reason}");
        // Authenticated but with no audience confirmed: the API server may not be
        // audience-aware, so the token proves nothing about being minted for us.
        let mut status = agent_status(&["node-a"]);
        status.audiences = None;
        assert!(rejected(v.decide(status, "t")).contains("not for audience"));
        // "authenticated" missing counts as false; the API's error is quoted, the token not.
        let status = TokenReviewStatus {
            error: Some("token s3cr3t-token is malformed".into()),
            ..agent_status(&["node-a"])
        };
        let mut status = status;
        status.authenticated = None;
        let reason = rejected(v.decide(status, "s3cr3t-token"));
        assert!(!reason.contains("s3cr3t-token"), "{reason}");
        assert!(reason.contains("token <token> is malformed"), "{reason}");
    }

    #[tokio::test]
    async fn tokens_bound_to_a_pod_only_are_resolved_through_the_pod() {
        let v = validator();
        // Before Kubernetes 1.30: the pod, not the node.
        let pod_only = with_extras(&[(POD_NAME_EXTRA, &["agent-x"]), (POD_UID_EXTRA, &["u-1"])]);
        assert_eq!(
            v.decide(pod_only, "t").unwrap(),
            Bound::Pod {
                name: "agent-x".into(),
                uid: "u-1".into()
            }
        );
        // 1.30 and later name both: the node is taken as is.
        let both = with_extras(&[
            (NODE_NAME_EXTRA, &["node-a"]),
            (POD_NAME_EXTRA, &["agent-x"]),
            (POD_UID_EXTRA, &["u-1"]),
        ]);
        assert_eq!(
            v.decide(both, "t").unwrap(),
            Bound::Node(NodeName::new("node-a").unwrap())
        );
        // A pod without its UID (it could be any pod of that name): refused.
        let reason = rejected(v.decide(with_extras(&[(POD_NAME_EXTRA, &["agent-x"])]), "t"));
        assert!(reason.contains("1 pods and 0 pod UIDs"), "{reason}");
        // Neither: a token not bound to a pod (a Secret's, or a TokenRequest without one).
        let reason = rejected(v.decide(with_extras(&[]), "t"));
        assert!(reason.contains("names no node and no pod"), "{reason}");
        // The pod is looked up in the API; unreachable, that is not a verdict.
        match v.node_of_pod("agent-x", "u-1").await {
            Err(BearerError::Unavailable(reason)) => {
                assert!(reason.contains("zmesh-system/agent-x"), "{reason}")
            }
            other => panic!("an unreachable API must not decide: {other:?}"),
        }
    }

    #[tokio::test]
    async fn api_errors_are_unavailable() {
        match validator().validate("t").await {
            Err(BearerError::Unavailable(reason)) => {
                assert!(reason.contains("TokenReview failed"), "{reason}")
            }
            other => panic!("an unreachable API must not decide: {other:?}"),
        }
    }

    #[test]
    fn service_account_refs() {
        let sa: ServiceAccountRef = "zmesh-system/zmesh-agent".parse().unwrap();
        assert_eq!(
            sa.username(),
            "system:serviceaccount:zmesh-system:zmesh-agent"
        );
        assert_eq!(sa.to_string(), "zmesh-system/zmesh-agent");
        assert!("ns/sa.v1".parse::<ServiceAccountRef>().is_ok());
        for bad in [
            "",
            "zmesh-agent",
            "/sa",
            "ns/",
            "ns/a/b",
            "Ns/sa",
            "ns/sa:x",
            "-ns/sa",
            "ns.x/sa",
            "ns/sa-",
        ] {
            assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad}");
        }
    }
}
