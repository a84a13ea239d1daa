//! Capturing underlay traffic with tcpdump.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::pcap::Pcap;

/// How long tcpdump may take to start capturing, to flush, or to exit.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two looks at the pcap file while waiting for the flush marker.
const POLL: Duration = Duration::from_millis(20);
/// UDP "discard" port: the marker datagram is not meant to be received by anyone.
const MARKER_PORT: u16 = 9;

/// A running tcpdump on the underlay bridge. [`Capture::stop`] returns what it saw; dropping
/// it without stopping kills tcpdump and deletes the file.
#[derive(Debug)]
pub struct Capture<'a> {
    cluster: &'a Cluster,
    child: Option<Child>,
    path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl<'a> Capture<'a> {
    /// Starts tcpdump in the underlay namespace and returns once it is really capturing
    /// (it prints "listening on" after its packet socket is bound and filtered).
    pub(crate) fn start(cluster: &'a Cluster, path: PathBuf) -> Result<Capture<'a>> {
        let mut command = cluster
            .underlay_netns()
            .command("tcpdump", cluster.capture_cgroup())?;
        command
            .arg("-i")
            .arg(cluster.bridge())
            // Numeric output, no snap limit, every packet written out as soon as it is read,
            // stay root so the file can be written anywhere.
            .args([
                "-n",
                "-s",
                "0",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-w",
            ])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let line = format!("{command:?}");
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            command: line,
            source,
        })?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(pipe) = child.stderr.take() {
            let stderr = stderr.clone();
            // Keeps draining stderr for tcpdump's whole life, so it never blocks on the pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                    let listening = line.contains("listening on");
                    {
                        let mut all = stderr.lock().unwrap_or_else(PoisonError::into_inner);
                        all.push_str(&line);
                        all.push('\n');
                    }
                    if listening {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let mut capture = Capture {
            cluster,
            child: Some(child),
            path,
            stderr,
        };
        match rx.recv_timeout(CAPTURE_TIMEOUT) {
            Ok(()) => Ok(capture),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                capture.kill();
                Err(Error::Capture(format!(
                    "tcpdump exited before capturing: {}",
                    capture.stderr_text()
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                capture.kill();
                Err(Error::Timeout {
                    what: format!("tcpdump to start capturing ({})", capture.stderr_text()),
                    after: CAPTURE_TIMEOUT,
                })
            }
        }
    }

    /// The pcap file being written (deleted when the capture is stopped or dropped).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the capture once everything sent before this call is in the file, and
    /// returns the parsed capture.
    ///
    /// To know tcpdump has caught up, a marker datagram is broadcast on the underlay and the
    /// file is read until the marker shows up; the marker is UDP to port 9 and carries
    /// `zmesh-testbed-flush`, so it does not disturb TCP checks.
    pub fn stop(mut self) -> Result<Pcap> {
        self.wait_for_marker()?;
        let Some(mut child) = self.child.take() else {
            return Err(Error::Capture("tcpdump is not running".into()));
        };
        // SIGINT makes tcpdump flush, close the file and print its statistics.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Timeout {
                        what: "tcpdump to exit after SIGINT".into(),
                        after: CAPTURE_TIMEOUT,
                    });
                }
                Err(e) => return Err(Error::Capture(format!("waiting for tcpdump: {e}"))),
            }
        };
        if !status.success() {
            return Err(Error::Capture(format!(
                "tcpdump exited with {status}: {}",
                self.stderr_text()
            )));
        }
        Pcap::from_file(&self.path)
    }

    fn wait_for_marker(&self) -> Result<()> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let marker = format!("zmesh-testbed-flush-{}-{nanos}", self.cluster.run_id());
        // validate() guarantees at least one node.
        let node = &self.cluster.nodes()[0];
        let socket = node.udp_socket(0)?;
        let sock_err = |source| Error::Socket {
            action: "broadcasting the capture flush marker".into(),
            netns: node.netns().name().to_owned(),
            source,
        };
        socket.set_broadcast(true).map_err(sock_err)?;
        let broadcast = SocketAddr::from((Ipv4Addr::new(10, 200, 0, 255), MARKER_PORT));
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        loop {
            socket
                .send_to(marker.as_bytes(), broadcast)
                .map_err(sock_err)?;
            let data = match std::fs::read(&self.path) {
                Ok(data) => data,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(Error::io("reading pcap", &self.path, e)),
            };
            if data.len() >= 24 && Pcap::parse_partial(&data)?.contains(marker.as_bytes()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "tcpdump to write out the flush marker ({})",
                        self.stderr_text()
                    ),
                    after: CAPTURE_TIMEOUT,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .trim()
            .to_owned()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        self.kill();
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}
