//! The `zmesh` package's library side: the node agent, which ties the crates together
//! (cluster state -> enrollment, certificates, redirect maps, proxy workload table).

pub mod agent;
pub mod lab;
