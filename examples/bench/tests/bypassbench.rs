//! zmesh-bypassbench runs end to end on one small round, and still finds what keeps the
//! sockmap/sk_msg bypass out of the product: with it, a sender queues without bound into
//! a receiver that never reads (BENCHMARKS.md, "The local-leg bypass"). Should a kernel
//! give that queue flow control, this test fails and the bypass deserves another look.

use std::process::Command;

#[test]
fn the_bypass_probe_measures_one_leg_and_finds_no_flow_control() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: zmesh-bypassbench needs root (network namespaces, cgroups, eBPF)");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh-bypassbench"))
        .args(["--rounds", "1", "--bulk-mib", "64", "--pings", "200"])
        .args(["--early-writes", "50", "--flood-cap-mib", "32"])
        .output()
        .expect("running zmesh-bypassbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "zmesh-bypassbench failed:\n{stdout}\n{stderr}"
    );
    let queued = stdout
        .lines()
        .find(|l| l.starts_with("| MiB queued to a reader that never reads |"))
        .unwrap_or_else(|| panic!("no flow-control row in:\n{stdout}"));
    let cells: Vec<f64> = queued
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert!(cells.len() >= 2, "unreadable row {queued:?}");
    let (tcp, bypass) = (cells[0], cells[1]);
    assert!(tcp < 16.0, "TCP let {tcp} MiB queue to a stalled reader");
    assert!(
        bypass >= 32.0,
        "the bypass stopped at {bypass} MiB: {stdout}"
    );
    for row in ["| throughput, Gb/s |", "| RTT p50, us |", "out of order |"] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
}
