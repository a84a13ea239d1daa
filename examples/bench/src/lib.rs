//! What the benchmark binaries share: the load generator, the throwaway PKI and workload
//! table, and the proxy processes they run and measure.

pub mod certs;
pub mod compare;
pub mod load;
pub mod procs;
