//! The node agent: cluster state in, enrollment, certificates and proxy configuration out.

pub mod cluster_state;
pub mod manifests;
pub mod kube_source;
pub mod admin;
pub mod credentials;
pub mod table;
pub mod run;
pub mod placement;
