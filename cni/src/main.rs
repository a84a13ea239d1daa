//! `zmesh-cni`: the binary the container runtime executes (see the crate documentation).

use std::io::{Read, Write};
use std::process::ExitCode;

/// Far more than any network configuration; a runaway writer cannot make us buffer more.
const MAX_STDIN_BYTES: u64 = 16 * 1024 * 1024;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let stdin = std::io::stdin()
        .take(MAX_STDIN_BYTES)
        .read_to_end(&mut stdin)
        .map(|_| stdin);
    let output = zmesh_cni::plugin::run(|name| std::env::var_os(name), stdin);
    if let Some(text) = output.stdout {
        let mut stdout = std::io::stdout().lock();
        // Nothing to do if the runtime closed our stdout: the exit status still tells.
        let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
    }
    ExitCode::from(output.exit_code)
}
