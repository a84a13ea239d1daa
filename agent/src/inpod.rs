//! The capture a stock ztunnel needs inside each pod it serves (`--data-plane ztunnel`): the
//! rules istio-cni installs in a pod's network namespace in Istio's in-pod mode, as one
//! nftables table plus a policy route, so that
//!
//! - the pod's outbound TCP goes to ztunnel's in-pod outbound listener (REDIRECT to 15001;
//!   ztunnel reads the original destination from conntrack, SO_ORIGINAL_DST);
//! - inbound plaintext goes to its in-pod plaintext listener (REDIRECT to 15006), HBONE on
//!   15008 reaches its in-pod HBONE listener as it is;
//! - ztunnel's own sockets (packet mark 0x539) and their answers (connection mark 0x111,
//!   routed back to ztunnel's transparent sockets through `fwmark 0x111/0xfff lookup 100`)
//!   are left alone, as are loopback and the health-probe source 169.254.7.127;
//! - in strict mode, a new TCP connection from outside the pod to anything but 15008 is
//!   refused with a reset instead of being redirected to 15006.
//!
//! nftables rather than our eBPF programs: ztunnel reads the original destination with
//! getsockopt(SO_ORIGINAL_DST) from a process outside the pods' cgroup, which only
//! netfilter's conntrack answers without a cgroup program attached over ztunnel itself; and
//! one table per namespace is replaced atomically (`nft -f`), so a restarted agent neither
//! duplicates nor briefly removes a running pod's rules.
//!
//! Everything here runs commands inside a pod's network namespace: call it from a blocking
//! thread.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};

use zmesh_dataplane::Mode;

/// The nftables table zmesh owns in every captured pod's network namespace.
pub const TABLE: &str = "zmesh_inpod";
/// ztunnel's packet mark (its `PACKET_MARK`, 1337) and the mark of its connections' answers.
const ZTUNNEL_MARK: u32 = 0x539;
const CONN_MARK: u32 = 0x111;
const MARK_MASK: u32 = 0xfff;
/// The routing table that delivers answers to ztunnel's transparent sockets.
const ROUTE_TABLE: u32 = 100;
/// Where kubelet's probes come from once SNATed (istio-cni's address).
pub const PROBE_SOURCE: &str = "169.254.7.127";
const PROBE_SOURCE6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// Why a pod's capture could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InPodError {
    #[error("entering the pod's network namespace: {0}")]
    Enter(std::io::Error),
    #[error("running {command}: {source} (is {program} installed? scripts/setup.sh installs it)")]
    Spawn {
        command: String,
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// The table for `mode`, as one nftables transaction that replaces any earlier version.
pub fn ruleset(mode: Mode) -> String {
    let (zt, cm, mask) = (ZTUNNEL_MARK, CONN_MARK, MARK_MASK);
    let inbound = match mode {
        Mode::Permissive => format!(
            "    ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & {mask:#x} != {zt:#x} redirect to :15006\n\
             \x20   ip6 daddr != ::1 tcp dport != 15008 meta mark & {mask:#x} != {zt:#x} redirect to :15006\n"
        ),
        Mode::Strict => String::new(),
    };
    let strict = match mode {
        Mode::Strict => format!(
            "  chain strict {{\n\
             \x20   type filter hook input priority filter; policy accept;\n\
             \x20   iifname \"lo\" accept\n\
             \x20   ip saddr {PROBE_SOURCE} accept\n\
             \x20   ip6 saddr {PROBE_SOURCE6} accept\n\
             \x20   tcp dport != 15008 ct state new counter reject with tcp reset\n\
             \x20 }}\n"
        ),
        Mode::Permissive => String::new(),
    };
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20 chain prerouting_mangle {{\n\
         \x20   type filter hook prerouting priority mangle; policy accept;\n\
         \x20   meta mark & {mask:#x} == {zt:#x} ct mark set ct mark & {not_mask:#x} | {cm:#x}\n\
         \x20 }}\n\
         \x20 chain output_mangle {{\n\
         \x20   type route hook output priority mangle; policy accept;\n\
         \x20   ct mark & {mask:#x} == {cm:#x} meta mark set ct mark\n\
         \x20 }}\n\
         \x20 chain output_nat {{\n\
         \x20   type nat hook output priority -100; policy accept;\n\
         \x20   ip daddr {PROBE_SOURCE} meta l4proto tcp accept\n\
         \x20   ip6 daddr {PROBE_SOURCE6} meta l4proto tcp accept\n\
         \x20   meta l4proto tcp meta mark & {mask:#x} == {cm:#x} accept\n\
         \x20   oifname \"lo\" ip daddr != 127.0.0.1 accept\n\
         \x20   oifname \"lo\" ip6 daddr != ::1 accept\n\
         \x20   ip daddr != 127.0.0.1 meta l4proto tcp meta mark & {mask:#x} != {zt:#x} redirect to :15001\n\
         \x20   ip6 daddr != ::1 meta l4proto tcp meta mark & {mask:#x} != {zt:#x} redirect to :15001\n\
         \x20 }}\n\
         \x20 chain prerouting_nat {{\n\
         \x20   type nat hook prerouting priority -100; policy accept;\n\
         \x20   ip saddr {PROBE_SOURCE} meta l4proto tcp accept\n\
         \x20   ip6 saddr {PROBE_SOURCE6} meta l4proto tcp accept\n\
         {inbound}\
         \x20 }}\n\
         {strict}\
         }}\n",
        not_mask = !mask,
    )
}

/// Installs (or replaces) the capture in the network namespace `netns`. Idempotent: the
/// table is replaced in one transaction, the policy route added only where missing.
pub fn install(netns: BorrowedFd<'_>, mode: Mode) -> Result<(), InPodError> {
    in_netns(netns, || {
        run("nft", &["-f", "-"], Some(&ruleset(mode)))?;
        for family in ["-4", "-6"] {
            let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            let table = ROUTE_TABLE.to_string();
            let routes =
                output("ip", &[family, "route", "show", "table", &table]).unwrap_or_default();
            if !routes
                .lines()
                .any(|l| l.starts_with("local default dev lo"))
            {
                let r = run(
                    "ip",
                    &[
                        family, "route", "add", "local", any, "dev", "lo", "table", &table,
                    ],
                    None,
                );
                // a pod without IPv6 (disabled in its namespace) needs no IPv6 route
                if family == "-4" {
                    r?;
                }
            }
            let rules = output("ip", &[family, "rule", "show"]).unwrap_or_default();
            let mark = format!("fwmark {CONN_MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}");
            if !rules.lines().any(|l| l.contains(&mark)) {
                let fwmark = format!("{CONN_MARK:#x}/{MARK_MASK:#x}");
                let r = run(
                    "ip",
                    &[
                        family, "rule", "add", "fwmark", &fwmark, "pref", "32764", "lookup", &table,
                    ],
                    None,
                );
                if family == "-4" {
                    r?;
                }
            }
        }
        Ok(())
    })
}

/// Removes the capture from `netns`; returns whether there was any. Absent pieces are fine.
pub fn remove(netns: BorrowedFd<'_>) -> Result<bool, InPodError> {
    in_netns(netns, || {
        let had = run("nft", &["list", "table", "inet", TABLE], None).is_ok();
        if had {
            run("nft", &["delete", "table", "inet", TABLE], None)?;
        }
        let fwmark = format!("{CONN_MARK:#x}/{MARK_MASK:#x}");
        let table = ROUTE_TABLE.to_string();
        for family in ["-4", "-6"] {
            let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            while run(
                "ip",
                &[family, "rule", "del", "fwmark", &fwmark, "lookup", &table],
                None,
            )
            .is_ok()
            {}
            let _ = run(
                "ip",
                &[
                    family, "route", "del", "local", any, "dev", "lo", "table", &table,
                ],
                None,
            );
        }
        Ok(had)
    })
}

/// Removes the capture from every network namespace of this node that it can find: those
/// of the processes under `proc_dir` (the node's /proc; pods' sandboxes hold theirs) and
/// those named under `netns_dir` (/run/netns). Returns where it found one (a path to the
/// namespace). `zmesh uninstall` runs it.
pub fn remove_everywhere(
    proc_dir: &std::path::Path,
    netns_dir: &std::path::Path,
) -> Result<Vec<String>, InPodError> {
    use std::os::unix::fs::MetadataExt;
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(proc_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                candidates.push(entry.path().join("ns/net"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(netns_dir) {
        candidates.extend(entries.flatten().map(|e| e.path()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut removed = Vec::new();
    for path in candidates {
        // a process that exits meanwhile, or a namespace we may not open, is skipped
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if remove(file.as_fd())? {
            removed.push(path.display().to_string());
        }
    }
    Ok(removed)
}

/// Whether `netns` holds zmesh's capture table.
pub fn is_installed(netns: BorrowedFd<'_>) -> Result<bool, InPodError> {
    in_netns(netns, || {
        Ok(run("nft", &["list", "table", "inet", TABLE], None).is_ok())
    })
}

/// Runs `f` on a short-lived thread inside `netns`; processes it starts inherit it.
fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> Result<T, InPodError> + Send,
) -> Result<T, InPodError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| InPodError::Enter(e.into()))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(InPodError::Enter(std::io::Error::other(
                    "the thread in the pod's namespace panicked",
                )))
            })
    })
}

fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<(), InPodError> {
    output_with(program, args, stdin).map(drop)
}

fn output(program: &'static str, args: &[&str]) -> Result<String, InPodError> {
    output_with(program, args, None)
}

fn output_with(
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, InPodError> {
    let command = format!("{program} {}", args.join(" "));
    let spawn_err = |source| InPodError::Spawn {
        command: command.clone(),
        program,
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(InPodError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_refuses_instead_of_redirecting_plaintext() {
        let permissive = ruleset(Mode::Permissive);
        assert!(permissive.contains("redirect to :15006"));
        assert!(permissive.contains("redirect to :15001"));
        assert!(!permissive.contains("reject"));
        let strict = ruleset(Mode::Strict);
        assert!(!strict.contains("redirect to :15006"));
        assert!(strict.contains("redirect to :15001"));
        assert!(strict.contains("tcp dport != 15008 ct state new counter reject with tcp reset"));
        // replaced as a whole: the table is declared, deleted and recreated in one go
        assert!(strict.starts_with("table inet zmesh_inpod\ndelete table inet zmesh_inpod\n"));
    }
}
