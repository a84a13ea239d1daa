//! `zmesh completion SHELL` and `zmesh man --out-dir DIR`: shell completion scripts and
//! man pages, both generated from the CLI's own definition so they never go stale.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Where to write the pages (created if missing): zmesh.1 and one page per subcommand,
    /// zmesh-<command>[-<subcommand>].1.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

/// Writes the completion script for `shell` to `out`.
pub fn completion(args: CompletionArgs, mut cli: clap::Command) -> anyhow::Result<ExitCode> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cli, "zmesh", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

/// Renders zmesh.1 and a page for every visible subcommand, at any depth, into `dir`.
/// Returns the files written.
pub fn write_man_pages(cli: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cli = cli.disable_help_subcommand(true);
    // Building gives each subcommand its display name (`zmesh-ca-init`), the page's name.
    cli.build();
    let mut written = Vec::new();
    render(&cli, dir, &mut written)?;
    Ok(written)
}

fn render(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("zmesh {}", super::version::VERSION))
        .manual("zmesh manual");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("rendering {}", path.display()))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render(sub, dir, written)?;
    }
    Ok(())
}

pub fn man(args: ManArgs, cli: clap::Command) -> anyhow::Result<ExitCode> {
    for path in write_man_pages(cli, &args.out_dir)? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
