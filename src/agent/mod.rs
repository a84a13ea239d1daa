//! The node agent: cluster state in, enrollment, certificates and proxy configuration out.

pub mod admin;
pub mod cluster_state;
pub mod credentials;
pub mod enroll;
pub mod flows_api;
pub mod kube_source;
pub mod manifests;
pub mod placement;
pub mod run;
pub mod spire;
pub mod table;
pub mod token_review;
pub mod zds;
