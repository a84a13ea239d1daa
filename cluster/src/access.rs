//! What zmesh may do in the Kubernetes API, checked before it starts.
//!
//! The watchers retry every error, so an RBAC role missing a verb would otherwise show as a
//! process that waits forever for its first listing (a missing `list`) or, worse, one that
//! starts and never sees a change (a missing `watch`). [`check_access`] asks the API server
//! (SelfSubjectAccessReview, which every authenticated identity may create) about each
//! permission the caller needs and names every one that is denied, verb and resource, so
//! the agent or the CA can refuse to start with an error that says what to grant.

use futures::future::join_all;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// One permission, cluster-wide: `verb` on `resource` of API `group` ("" for the core
/// group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
}

impl Access {
    const fn new(verb: &'static str, group: &'static str, resource: &'static str) -> Self {
        Self {
            verb,
            group,
            resource,
        }
    }
}

impl std::fmt::Display for Access {
    /// As kubectl names it: `list pods`, `watch authorizationpolicies.security.istio.io`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{} {}", self.verb, self.resource)
        } else {
            write!(f, "{} {}.{}", self.verb, self.resource, self.group)
        }
    }
}

/// What the node agent's source (`zmesh agent --kubernetes`) lists and watches.
pub const AGENT: &[Access] = &[
    Access::new("list", "", "namespaces"),
    Access::new("watch", "", "namespaces"),
    Access::new("list", "", "pods"),
    Access::new("watch", "", "pods"),
    Access::new("list", "", "services"),
    Access::new("watch", "", "services"),
    Access::new("list", "discovery.k8s.io", "endpointslices"),
    Access::new("watch", "discovery.k8s.io", "endpointslices"),
    Access::new("list", "security.istio.io", "authorizationpolicies"),
    Access::new("watch", "security.istio.io", "authorizationpolicies"),
];

/// What the CA's placement (`zmesh ca serve --kubernetes`) lists and watches.
pub const CA_PLACEMENT: &[Access] = &[
    Access::new("list", "", "namespaces"),
    Access::new("watch", "", "namespaces"),
    Access::new("list", "", "pods"),
    Access::new("watch", "", "pods"),
];

/// What the CA's TokenReview authentication (`zmesh ca serve --bearer kubernetes`) does:
/// review tokens, and read the pod a token is bound to (clusters before 1.30 name no node
/// in the review).
pub const CA_TOKEN_REVIEW: &[Access] = &[
    Access::new("create", "authentication.k8s.io", "tokenreviews"),
    Access::new("get", "", "pods"),
];

/// Why the caller cannot run with its permissions.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "RBAC: this Kubernetes identity may not {} (cluster-wide); grant {} in its \
         ClusterRole (examples/kubernetes/10-rbac.yaml has the roles zmesh needs)",
        list(.0),
        if .0.len() == 1 { "it" } else { "them" }
    )]
    Denied(Vec<Access>),
    #[error("cannot check the Kubernetes permissions ({access}): {source}")]
    Unavailable {
        access: Access,
        #[source]
        source: kube::Error,
    },
}

fn list(denied: &[Access]) -> String {
    denied
        .iter()
        .map(Access::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl AccessError {
    /// The permissions denied (empty if the check itself failed).
    pub fn denied(&self) -> &[Access] {
        match self {
            Self::Denied(denied) => denied,
            Self::Unavailable { .. } => &[],
        }
    }
}

/// Asks the API server whether the client's identity has every permission of `needed`;
/// `Err(Denied)` names all those it lacks.
pub async fn check_access(client: &Client, needed: &[Access]) -> Result<(), AccessError> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let reviews = needed.iter().map(|access| {
        let api = api.clone();
        async move {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(access.verb.to_owned()),
                        group: Some(access.group.to_owned()),
                        resource: Some(access.resource.to_owned()),
                        ..ResourceAttributes::default()
                    }),
                    ..SelfSubjectAccessReviewSpec::default()
                },
                ..SelfSubjectAccessReview::default()
            };
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|source| AccessError::Unavailable {
                    access: *access,
                    source,
                })?;
            let allowed = answer.status.is_some_and(|s| s.allowed);
            Ok::<_, AccessError>((*access, allowed))
        }
    });
    let mut denied = Vec::new();
    for answer in join_all(reviews).await {
        let (access, allowed) = answer?;
        if !allowed {
            denied.push(access);
        }
    }
    if denied.is_empty() {
        Ok(())
    } else {
        Err(AccessError::Denied(denied))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_name_verb_and_resource() {
        let error = AccessError::Denied(vec![AGENT[3], AGENT[8]]);
        let message = error.to_string();
        assert!(
            message.contains("may not watch pods, list authorizationpolicies.security.istio.io"),
            "{message}"
        );
        assert!(message.contains("grant them"), "{message}");
        assert!(message.contains("10-rbac.yaml"), "{message}");
        let one = AccessError::Denied(vec![CA_TOKEN_REVIEW[0]]).to_string();
        assert!(
            one.contains("may not create tokenreviews.authentication.k8s.io"),
            "{one}"
        );
        assert!(one.contains("grant it"), "{one}");
    }
}
