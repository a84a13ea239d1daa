//! Node names and the node SPIFFE IDs the CA gives node agents.

use std::fmt;
use std::str::FromStr;

use zmesh_identity::{SpiffeId, TrustDomain};

use crate::error::NodeNameError;

/// A Kubernetes node name (a DNS subdomain: lowercase letters, digits, '-' and '.').
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: &str) -> Result<Self, NodeNameError> {
        let ok_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        let ok_edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.chars().all(ok_char)
            && ok_edge(name.chars().next())
            && ok_edge(name.chars().last())
            && !name.split('.').any(|label| label.is_empty());
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(NodeNameError(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>/zmesh/node/<name>`: the identity in a node agent's client certificate.
    pub fn spiffe_id(&self, trust_domain: &TrustDomain) -> SpiffeId {
        // A valid node name is always a valid path segment, so this cannot fail.
        SpiffeId::from_segments(trust_domain, ["zmesh", "node", &self.0])
            .expect("node names are valid SPIFFE path segments")
    }

    /// The node named by a node SPIFFE ID of `trust_domain`, if `id` is one.
    pub fn from_spiffe_id(id: &SpiffeId, trust_domain: &TrustDomain) -> Option<Self> {
        if id.trust_domain() != trust_domain {
            return None;
        }
        let segments: Vec<&str> = id.segments().collect();
        match segments.as_slice() {
            ["zmesh", "node", name] => Self::new(name).ok(),
            _ => None,
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeName {
    type Err = NodeNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeName {
    type Error = NodeNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> Self {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_dns_subdomain_rules() {
        for good in ["node-a", "ip-10-0-0-1.ec2.internal", "a", "7"] {
            assert!(NodeName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Node",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "a_b",
            &"a".repeat(254),
        ] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_ids_round_trip_and_reject_others() {
        let td = TrustDomain::default();
        let n = NodeName::new("node-a").unwrap();
        let id = n.spiffe_id(&td);
        assert_eq!(id.to_string(), "spiffe://cluster.local/zmesh/node/node-a");
        assert_eq!(NodeName::from_spiffe_id(&id, &td), Some(n));
        let other_td = TrustDomain::new("other.org").unwrap();
        assert_eq!(NodeName::from_spiffe_id(&id, &other_td), None);
        for not_node in [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/zmesh/node",
            "spiffe://cluster.local/zmesh/node/a/b",
        ] {
            assert_eq!(
                NodeName::from_spiffe_id(&SpiffeId::parse(not_node).unwrap(), &td),
                None
            );
        }
    }
}
