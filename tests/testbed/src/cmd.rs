//! Running iproute2 and checking what it says.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// Runs `ip ARGS...` and fails with its stderr if it exits non-zero.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let line = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: line.clone(),
            source,
        })?;
    check(line, output)
}

/// Runs a batch of `ip` commands (one per line) inside `netns` in a single process.
///
/// One process per namespace instead of one per command keeps cluster builds fast; `ip`
/// stops at the first failing line and names it on stderr.
pub(crate) fn ip_batch(netns: &str, script: &str) -> Result<()> {
    let line = format!("ip -n {netns} -batch - <<<{script:?}");
    let spawn_err = |source| Error::Spawn {
        command: line.clone(),
        source,
    };
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // Dropping stdin after writing closes it, so `ip` sees the end of the batch.
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    check(line, output).map(|_| ())
}

fn check(command: String, output: Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
