//! One module per subcommand: each owns its clap arguments and a `run` function.

pub mod demo;
pub mod certs;
pub mod ca;
pub mod proxy;
