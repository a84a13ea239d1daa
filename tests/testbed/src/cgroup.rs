//! cgroup v2 directories: finding the hierarchy, creating, killing and removing subtrees.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long we wait for killed processes to leave a cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two looks at a condition we wait on (processes exiting).
const POLL: Duration = Duration::from_millis(10);

/// The mount point of the cgroup v2 hierarchy, read from /proc/self/mounts.
///
/// On hybrid systems it is /sys/fs/cgroup/unified, on unified ones /sys/fs/cgroup.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|e| Error::io("reading", "/proc/self/mounts", e))?;
    parse_cgroup2_mount(&mounts).ok_or(Error::NoCgroup2)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        (fields.next()? == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/self/mount{s,info} escape space, tab, newline and backslash as \ooo octal.
pub fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(v) = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a cgroup directory and returns its id (the directory's inode number, which is
/// what `bpf_get_current_cgroup_id()` reports).
pub(crate) fn create(path: &Path) -> Result<u64> {
    fs::create_dir(path).map_err(|e| Error::io("creating cgroup", path, e))?;
    id(path)
}

/// The id of an existing cgroup.
pub(crate) fn id(path: &Path) -> Result<u64> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| Error::io("reading cgroup id of", path, e))
}

/// Kills every process in the subtree at `path` and waits until the subtree is empty.
pub(crate) fn kill_tree(path: &Path) -> Result<()> {
    let kill_file = path.join("cgroup.kill");
    match fs::write(&kill_file, "1") {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound && !path.exists() => return Ok(()),
        // Kernels before 5.14 have no cgroup.kill: signal each process instead.
        Err(e) if e.kind() == ErrorKind::NotFound => kill_each(path)?,
        Err(e) => return Err(Error::io("writing", kill_file, e)),
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match populated(path) {
            Ok(false) => return Ok(()),
            Err(e) if !path.exists() => {
                tracing::debug!("cgroup {} vanished while waiting: {e}", path.display());
                return Ok(());
            }
            Err(e) => return Err(e),
            Ok(true) if Instant::now() >= deadline => {
                return Err(Error::Timeout {
                    what: format!("processes in {} to exit", path.display()),
                    after: KILL_TIMEOUT,
                })
            }
            Ok(true) => {
                // Processes that were forked while we signalled also need the signal.
                if !path.join("cgroup.kill").exists() {
                    kill_each(path)?;
                }
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Whether any process is left in the subtree (`populated` in cgroup.events).
fn populated(path: &Path) -> Result<bool> {
    let events_path = path.join("cgroup.events");
    let events =
        fs::read_to_string(&events_path).map_err(|e| Error::io("reading", &events_path, e))?;
    Ok(events
        .lines()
        .any(|l| l.split_whitespace().eq(["populated", "1"])))
}

fn kill_each(path: &Path) -> Result<()> {
    for dir in subtree(path)? {
        let procs = dir.join("cgroup.procs");
        let pids = match fs::read_to_string(&procs) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("reading", procs, e)),
        };
        for pid in pids
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions; ESRCH (already gone) is fine.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    Ok(())
}

/// The directories of a subtree, children before their parents.
fn subtree(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    collect(path, &mut out)?;
    Ok(out)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("listing cgroup", path, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing cgroup", path, e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&entry.path(), out)?;
        }
    }
    out.push(path.to_owned());
    Ok(())
}

/// Removes an empty (process-free) subtree, deepest directories first.
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    for dir in subtree(path)? {
        remove_dir(&dir)?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            // EBUSY while exiting tasks are still being released from the cgroup.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(POLL)
            }
            Err(e) => return Err(Error::io("removing cgroup", dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_cgroup2_mount("cgroup /a cgroup rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(unescape_mount_path(r"/mnt/my\040cg"), "/mnt/my cg");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/trailing\04"), r"/trailing\04");
    }
}
