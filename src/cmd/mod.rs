//! One module per subcommand: each owns its clap arguments and a `run` function.

pub mod demo;
