//! zmesh's chained CNI plugin.
//!
//! Chained after the cluster's own CNI plugin, it runs when a pod's sandbox is created,
//! before any of the pod's containers start. For a pod of an enrolled namespace it asks the
//! node agent (over [`protocol`]) to enroll the pod in redirection and waits for the
//! answer, so that the pod's first connection is already captured: without it, a pod
//! could connect before the agent had seen it and send plaintext.
//!
//! The library holds the protocol (which the agent implements), the plugin's logic
//! ([`plugin::run`]) and its parts; `src/main.rs` only binds it to the process.

pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod log;
pub mod plugin;
pub mod protocol;
