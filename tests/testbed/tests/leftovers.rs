//! Leftovers of crashed runs are removed by the next build; live runs are never touched
//! (needs root).
//!
//! The "other processes" are this test binary re-run with `ZMESH_TESTBED_CHILD` set: it
//! builds a cluster, prints its run id and then either kills itself (a crash: no Drop runs)
//! or waits for stdin to close and exits cleanly.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

use zmesh_testbed::{cleanup_leftovers, Cluster};

const CHILD_ENV: &str = "ZMESH_TESTBED_CHILD";

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cluster = common::build();
    // A pod process that outlives a crash of its test: cleanup must kill it.
    let sleeper = cluster
        .pod("default", "web")
        .unwrap()
        .command("sleep")
        .unwrap()
        .arg("1000")
        .spawn()
        .unwrap();
    println!("RUN_ID={} SLEEPER={}", cluster.run_id(), sleeper.id());
    std::io::stdout().flush().unwrap();
    match mode.as_str() {
        // SAFETY: kill has no memory-safety preconditions; this ends the process at once.
        "crash" => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
        "live" => {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        other => panic!("unknown child mode {other}"),
    }
}

struct ChildRun {
    child: Child,
    run_id: String,
    sleeper: u32,
    _stdout: BufReader<ChildStdout>,
}

fn spawn_child(mode: &str) -> ChildRun {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // Blocks until the child printed its ids (or exited, which would be a failure).
    let (run_id, sleeper) = loop {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "child {mode} exited early");
        if let Some(rest) = line.trim().strip_prefix("RUN_ID=") {
            let (id, sleeper) = rest.split_once(" SLEEPER=").unwrap();
            break (id.to_owned(), sleeper.parse().unwrap());
        }
    };
    ChildRun {
        child,
        run_id,
        sleeper,
        _stdout: stdout,
    }
}

#[test]
fn crashed_runs_are_removed_and_live_runs_survive() {
    let mut crashed = spawn_child("crash");
    let status = crashed.child.wait().unwrap();
    assert!(!status.success(), "the crash child must die by SIGKILL");
    let mut live = spawn_child("live");
    let in_process = common::build();

    // The crashed run left everything behind, including its pod process.
    let crashed_netns = common::netns_of(&crashed.run_id);
    assert_eq!(crashed_netns.len(), 6, "{crashed_netns:?}");
    assert!(!common::process_gone(crashed.sleeper));

    // A new build cleans up the dead run...
    let fresh = common::build();
    assert_eq!(common::remnants(&crashed.run_id), Vec::<String>::new());
    assert!(common::process_gone(crashed.sleeper), "orphaned pod process killed");

    // ...and leaves every live run alone: another process's, and this process's own.
    assert_eq!(cleanup_leftovers().unwrap(), Vec::<String>::new());
    for (id, sleeper) in [(&live.run_id, Some(live.sleeper)), (&in_process.run_id().to_owned(), None)] {
        assert_eq!(common::netns_of(id).len(), 6, "live run {id} was touched");
        if let Some(pid) = sleeper {
            assert!(!common::process_gone(pid), "live run's pod process was killed");
        }
    }
    let web = in_process.pod("default", "web").unwrap();
    let server = web.serve_echo(8080).unwrap();
    let client = in_process.pod("default", "client").unwrap();
    assert_eq!(client.echo(server.addr(), b"still works").unwrap(), b"still works");
    drop(server);

    // The live child cleans up after itself when it ends normally.
    drop(live.child.stdin.take());
    assert!(live.child.wait().unwrap().success());
    assert_eq!(common::remnants(&live.run_id), Vec::<String>::new());
    assert!(common::process_gone(live.sleeper));

    let (in_process_id, fresh_id) = (in_process.run_id().to_owned(), fresh.run_id().to_owned());
    drop((in_process, fresh));
    assert_eq!(common::remnants(&in_process_id), Vec::<String>::new());
    assert_eq!(common::remnants(&fresh_id), Vec::<String>::new());
}

#[test]
fn cleanup_without_leftovers_is_a_no_op() {
    // Only this test binary's own (live) runs can exist here; none may be removed.
    let cluster = Cluster::build(&common::two_node_spec()).unwrap();
    assert!(!cleanup_leftovers().unwrap().contains(&cluster.run_id().to_owned()));
    assert_eq!(common::netns_of(cluster.run_id()).len(), 6);
}
