//! zmesh-podbench runs one short round end to end (direct and zmesh; ztunnel only when
//! ZTUNNEL_BIN is given to the benchmark by hand): the lab cluster, the real CA, an agent
//! per node with its eBPF redirection and a data path process, the client and server in
//! their pods. A round only succeeds when the proxies did the work (CPU per GB above a
//! floor) and their access logs show the exchange, so this guards the harness and the
//! product path it measures.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn one_short_round_of_the_product_path_runs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: zmesh-podbench needs root (network namespaces, cgroups, eBPF)");
        return;
    }
    let podbench = PathBuf::from(env!("CARGO_BIN_EXE_zmesh-podbench"));
    let zmesh = podbench.with_file_name("zmesh");
    if !zmesh.is_file() {
        // `cargo test --workspace` (the README's test command) builds it.
        eprintln!("skipped: {} is not built", zmesh.display());
        return;
    }
    let out = Command::new(&podbench)
        .env_remove("ZTUNNEL_BIN")
        .arg("--zmesh")
        .arg(&zmesh)
        .args(["--rounds", "1", "--seconds", "0.5", "--pings", "300"])
        .args(["--streams", "2", "--conn-threads", "2"])
        .output()
        .expect("running zmesh-podbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "zmesh-podbench failed:\n{stdout}\n{stderr}"
    );
    let single = stdout
        .lines()
        .find(|l| l.contains("1 stream"))
        .unwrap_or_else(|| panic!("no 1-stream row in:\n{stdout}"));
    let figures: Vec<f64> = single
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert!(
        figures.len() >= 2 && figures.iter().all(|f| *f > 0.0),
        "direct and zmesh should both carry bytes: {single:?}"
    );
}
