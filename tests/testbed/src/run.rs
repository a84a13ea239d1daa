//! Run ids, who owns a run, and removing everything a run created.
//!
//! Every resource of a run carries its run id (`zt` + 5 base36 characters) in its name. The
//! owner of a run is recorded in `/run/zmesh-testbed/<run id>` as `"<pid> <start time>"` before
//! the run creates anything, and removed only after everything is gone. A later build removes
//! the resources of runs whose owner process is dead (the start time guards against pid
//! reuse), and never touches a run whose owner is alive.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::{cgroup, cmd, netns};

/// Every run id starts with this, so leftovers are easy to spot in `ip netns list`.
pub const RUN_ID_PREFIX: &str = "zt";
/// Characters after the prefix: 36^5 ≈ 60 million ids, short enough for 15-char link names.
const RUN_ID_RANDOM_LEN: usize = 5;
/// Owner records live here (tmpfs: gone after a reboot, like the resources they describe).
pub(crate) const STATE_DIR: &str = "/run/zmesh-testbed";

/// Whether run `run_id` may still be alive: its owner record exists until the run is torn
/// down (or a later build has cleaned up after its dead owner). Lets users of the testbed
/// clean up their own per-run resources after a crash.
pub fn run_is_recorded(run_id: &str) -> bool {
    !run_id.contains('/') && std::path::Path::new(STATE_DIR).join(run_id).exists()
}
/// Name of the directory under the cgroup2 mount that holds all runs.
pub(crate) const CGROUP_DIR: &str = "zmesh-testbed";

/// Whether `s` has the shape of a run id.
pub(crate) fn is_run_id(s: &str) -> bool {
    s.len() == RUN_ID_PREFIX.len() + RUN_ID_RANDOM_LEN
        && s.starts_with(RUN_ID_PREFIX)
        && s[RUN_ID_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A fresh candidate id, unique across threads (counter), processes (pid) and time.
fn candidate_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let mut v = hasher.finish();
    let mut id = String::from(RUN_ID_PREFIX);
    for _ in 0..RUN_ID_RANDOM_LEN {
        let digit = (v % 36) as u32;
        v /= 36;
        id.push(char::from_digit(digit, 36).unwrap_or('0'));
    }
    id
}

/// The start time of a live, non-zombie process (field 22 of /proc/PID/stat), or None.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')': fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn owner_record() -> Result<String> {
    let pid = std::process::id();
    let start = process_start_time(pid).ok_or_else(|| {
        Error::io(
            "reading start time from",
            format!("/proc/{pid}/stat"),
            ErrorKind::InvalidData.into(),
        )
    })?;
    Ok(format!("{pid} {start}\n"))
}

/// Whether the owner recorded in `record` is still running.
fn owner_alive(record: &str) -> bool {
    let mut fields = record.split_whitespace();
    let (Some(pid), Some(start)) = (fields.next(), fields.next()) else {
        return false;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

fn state_dir() -> Result<&'static Path> {
    let dir = Path::new(STATE_DIR);
    fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    Ok(dir)
}

/// A reserved run id. Dropping it tears the whole run down.
#[derive(Debug)]
pub(crate) struct RunGuard {
    id: String,
    cgroup_base: PathBuf,
    torn_down: bool,
}

impl RunGuard {
    /// Picks an unused run id and records this process as its owner, atomically: the record
    /// is written to a temporary file and hard-linked into place, so a reader never sees a
    /// half-written record and two runs can never get the same id.
    pub(crate) fn reserve(cgroup_base: PathBuf) -> Result<RunGuard> {
        let dir = state_dir()?;
        let record = owner_record()?;
        for _ in 0..100 {
            let id = candidate_id();
            let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(|e| Error::io("creating", &tmp, e))?;
            file.write_all(record.as_bytes())
                .map_err(|e| Error::io("writing", &tmp, e))?;
            drop(file);
            let linked = fs::hard_link(&tmp, dir.join(&id));
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    return Ok(RunGuard {
                        id,
                        cgroup_base,
                        torn_down: false,
                    })
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("recording run owner in", dir.join(&id), e)),
            }
        }
        Err(Error::io(
            "finding a free run id in",
            dir,
            io::Error::other("100 candidates were all taken"),
        ))
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Tears the run down now; later calls and the drop do nothing.
    pub(crate) fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        teardown(&self.id, &self.cgroup_base)
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("{e}");
        }
    }
}

/// Removes everything of run `id`: processes, namespaces (and with them their links and
/// routes), stray links in the root namespace, cgroups, and finally the owner record.
///
/// Processes go first: they would keep namespaces alive and cgroups busy. If any step fails
/// the owner record stays, so the next build retries once this process is gone.
pub(crate) fn teardown(id: &str, cgroup_base: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let run_cgroup = cgroup_base.join(id);
    if let Err(e) = cgroup::kill_tree(&run_cgroup) {
        problems.push(e.to_string());
    }
    let prefix = format!("{id}-");
    match netns::list() {
        Ok(names) => {
            for name in names.iter().filter(|n| n.starts_with(&prefix)) {
                if let Err(e) = netns::delete(name) {
                    problems.push(e.to_string());
                }
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    // Links are created directly inside run namespaces; one can only be in the root
    // namespace if a run died in the middle of creating it.
    match fs::read_dir("/sys/class/net") {
        Ok(entries) => {
            for name in entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(id))
            {
                if let Err(e) = cmd::ip(&["link", "del", &name]) {
                    problems.push(e.to_string());
                }
            }
        }
        Err(e) => problems.push(Error::io("listing", "/sys/class/net", e).to_string()),
    }
    if let Err(e) = cgroup::remove_tree(&run_cgroup) {
        problems.push(e.to_string());
    }
    if !problems.is_empty() {
        return Err(Error::Teardown {
            run_id: id.to_owned(),
            problems,
        });
    }
    let record = Path::new(STATE_DIR).join(id);
    match fs::remove_file(&record) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing", record, e)),
    }
}

/// Removes the runs whose owner process has died (a crashed or killed test), and returns
/// their ids. Runs of live processes, including other threads of this one, are left alone.
///
/// Cluster builds call this first; it only needs calling by hand to clean up without
/// building (e.g. `zmesh demo --cleanup`).
pub fn cleanup_leftovers() -> Result<Vec<String>> {
    let base = cgroup::cgroup2_mount()?.join(CGROUP_DIR);
    cleanup_leftovers_in(&base)
}

pub(crate) fn cleanup_leftovers_in(cgroup_base: &Path) -> Result<Vec<String>> {
    let dir = state_dir()?;
    // One cleaner at a time across processes, so two builds do not race on the same corpse.
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(|e| Error::io("creating", &lock_path, e))?;
    // SAFETY: flock on an fd we own; the lock is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io("locking", &lock_path, io::Error::last_os_error()));
    }
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_run_id(&name) {
            let record = match fs::read_to_string(entry.path()) {
                Ok(record) => record,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    problems.push(Error::io("reading", entry.path(), e).to_string());
                    continue;
                }
            };
            if owner_alive(&record) {
                continue;
            }
            tracing::info!(run_id = %name, "removing leftovers of a dead run");
            match teardown(&name, cgroup_base) {
                Ok(()) => removed.push(name),
                Err(e) => problems.push(e.to_string()),
            }
        } else if let Some(pid) = tmp_file_pid(&name) {
            // A reservation interrupted between write and link.
            if process_start_time(pid).is_none() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    if problems.is_empty() {
        Ok(removed)
    } else {
        Err(Error::Teardown {
            run_id: "(leftovers)".into(),
            problems,
        })
    }
}

fn tmp_file_pid(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (id, pid) = inner.split_once('.')?;
    if !is_run_id(id) {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_ids_have_run_id_shape_and_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| candidate_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| is_run_id(id)), "{ids:?}");
    }

    #[test]
    fn run_id_shape() {
        assert!(is_run_id("zt0a9zq"));
        assert!(!is_run_id("zt0a9z"));
        assert!(!is_run_id("zt0a9zqq"));
        assert!(!is_run_id("zt0A9zq"));
        assert!(!is_run_id("xx0a9zq"));
        assert!(!is_run_id("zt0a-zq"));
    }

    #[test]
    fn owner_liveness_uses_pid_and_start_time() {
        let me = owner_record().unwrap();
        assert!(owner_alive(&me));
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap();
        assert!(!owner_alive(&format!("{pid} {}", start + 1)), "reused pid");
        assert!(!owner_alive("garbage"));
        assert!(!owner_alive(""));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let child_pid = child.id();
        child.wait().unwrap();
        assert!(!owner_alive(&format!("{child_pid} 1")));
    }

    #[test]
    fn recognises_interrupted_reservations() {
        assert_eq!(tmp_file_pid(".zt0a9zq.1234.tmp"), Some(1234));
        assert_eq!(tmp_file_pid("zt0a9zq"), None);
        assert_eq!(tmp_file_pid(".lock"), None);
        assert_eq!(tmp_file_pid(".other.1234.tmp"), None);
    }
}
