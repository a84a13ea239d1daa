//! `zmesh enroll` / `zmesh unenroll`: label a namespace in a manifest directory.
//! Against a real cluster, use `kubectl label namespace NS io.cilium/mtls-enabled=true`.

use std::path::PathBuf;
use std::process::ExitCode;

use zmesh_cluster::enroll::{set_enrollment, Outcome};

#[derive(clap::Args)]
pub struct EnrollArgs {
    /// The namespace to (un)enroll.
    namespace: String,
    /// The manifest directory the agents watch.
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
}

pub fn run(args: EnrollArgs, enrolled: bool) -> anyhow::Result<ExitCode> {
    let verb = if enrolled { "enrolled" } else { "un-enrolled" };
    match set_enrollment(&args.manifests, &args.namespace, enrolled)? {
        Outcome::Changed(file) => {
            println!("namespace {} {verb} ({})", args.namespace, file.display())
        }
        Outcome::AlreadyDone(_) => println!("namespace {} was already {verb}", args.namespace),
    }
    Ok(ExitCode::SUCCESS)
}
