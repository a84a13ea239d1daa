//! Leftovers of crashed runs are removed by the next build; live runs are never touched
//! (needs root).
//!
//! The "other processes" are this test binary re-run with `ZMESH_TESTBED_CHILD` set: it
//! builds a cluster, prints its run id and reads a line from stdin: "crash" makes it kill
//! itself (no Drop runs), end of input makes it exit cleanly.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use zmesh_testbed::cleanup_leftovers;

const CHILD_ENV: &str = "ZMESH_TESTBED_CHILD";

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_process_entry() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = common::build();
    // A pod process that outlives a crash of its test: cleanup must kill it.
    let mut sleeper = cluster
        .pod("default", "web")
        .unwrap()
        .command("sleep")
        .unwrap()
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    println!("RUN_ID={} SLEEPER={}", cluster.run_id(), sleeper.id());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    if line.trim() == "crash" {
        // SAFETY: kill has no memory-safety preconditions; this ends the process at once.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    drop(cluster);
    let _ = sleeper.wait();
}

/// Takes the lock that leftover cleanups take, so no build in any process can remove a
/// dead run until the returned file is closed.
fn take_cleanup_lock() -> std::fs::File {
    let file = std::fs::File::create("/run/zmesh-testbed/.lock").unwrap();
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
    file
}

struct ChildRun {
    child: Child,
    run_id: String,
    sleeper: u32,
}

fn spawn_child() -> ChildRun {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read on a thread so a child that never prints fails the test instead of hanging it.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        while stdout.read_line(&mut line).unwrap_or(0) > 0 {
            // libtest prints "test child_process_entry ... " on the same line.
            if let Some((_, rest)) = line.trim().split_once("RUN_ID=") {
                let (id, sleeper) = rest.split_once(" SLEEPER=").unwrap();
                let _ = tx.send((id.to_owned(), sleeper.parse::<u32>().unwrap()));
                break;
            }
            line.clear();
        }
        // Keep the pipe open until the child exits so it never gets SIGPIPE.
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    });
    let (run_id, sleeper) = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("child printed no run id: {e}"));
    ChildRun {
        child,
        run_id,
        sleeper,
    }
}

#[test]
fn crashed_runs_are_removed_and_live_runs_survive() {
    // Live runs first: a build always cleans up dead runs, so they must exist before the crash.
    let mut live = spawn_child();
    let in_process = common::build();
    let mut crashed = spawn_child();
    {
        // No build anywhere may clean up before we have seen what the crash left behind.
        let _lock = take_cleanup_lock();
        let mut stdin = crashed.child.stdin.take().unwrap();
        stdin.write_all(b"crash\n").unwrap();
        drop(stdin);
        let status = crashed.child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the crash child must die"
        );

        // The crashed run left everything behind, including its pod process.
        let crashed_netns = common::netns_of(&crashed.run_id);
        assert_eq!(crashed_netns.len(), 6, "{crashed_netns:?}");
        assert!(!common::process_gone(crashed.sleeper));
    }

    // A new build cleans up the dead run...
    let fresh = common::build();
    assert_eq!(common::remnants(&crashed.run_id), Vec::<String>::new());
    assert!(
        common::process_gone(crashed.sleeper),
        "orphaned pod process killed"
    );

    // ...and leaves every live run alone: another process's, and this process's own.
    let removed = cleanup_leftovers().unwrap();
    let in_process_id = in_process.run_id().to_owned();
    let fresh_id = fresh.run_id().to_owned();
    for id in [&live.run_id, &in_process_id, &fresh_id] {
        assert!(!removed.contains(id), "live run {id} was removed");
        assert_eq!(common::netns_of(id).len(), 6, "live run {id} was touched");
    }
    assert!(
        !common::process_gone(live.sleeper),
        "live run's pod process was killed"
    );
    let web = in_process.pod("default", "web").unwrap();
    let server = web.serve_echo(8080).unwrap();
    let client = in_process.pod("default", "client").unwrap();
    assert_eq!(
        client.echo(server.addr(), b"still works").unwrap(),
        b"still works"
    );
    drop(server);

    // The live child cleans up after itself when it ends normally.
    drop(live.child.stdin.take());
    assert!(live.child.wait().unwrap().success());
    assert_eq!(common::remnants(&live.run_id), Vec::<String>::new());
    assert!(common::process_gone(live.sleeper));

    drop((in_process, fresh));
    assert_eq!(common::remnants(&in_process_id), Vec::<String>::new());
    assert_eq!(common::remnants(&fresh_id), Vec::<String>::new());
}
