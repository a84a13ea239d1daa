//! `zmesh demo`: the README's main command.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the demo is not built yet")
}
