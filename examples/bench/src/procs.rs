//! The child processes (the two `zmesh proxy` processes and the two plain relays), and
//! CPU/memory readings from /proc.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running proxy or relay ("proxy A", "relay B", ...). Dropping it stops it (SIGTERM,
/// then SIGKILL), also on error or panic; if the harness itself dies, the kernel kills it
/// (PR_SET_PDEATHSIG).
pub struct ProxyProcess {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ProxyProcess {
    pub fn spawn(name: &'static str, bin: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} for {name}", bin.display()))?;
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the child's log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// Waits until the readiness endpoint answers 200, bounded by `limit`.
    pub fn wait_ready(&mut self, readiness: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if let Ok((200, _)) = http_get(readiness, "/healthz/ready") {
                // The answer must have come from our child, not a process it collided with.
                return self.check_alive();
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready on {readiness} after {limit:?}; its log ends with:\n{}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            // Polling a local HTTP endpoint: there is no event to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `addr` accepts a TCP connection (the relays have no readiness endpoint),
    /// bounded by `limit`: short connect attempts, with a growing pause (1 to 16 ms) only
    /// after a refusal.
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(1);
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                // The connection must have been accepted by our child, not a process it
                // collided with (which would have made it exit on bind).
                return self.check_alive();
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not listening on {addr} after {limit:?}; its log ends with:\n{}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(16));
        }
    }

    pub fn cpu(&self) -> Result<Duration> {
        process_cpu(self.pid())
    }

    pub fn work(&self) -> Result<Work> {
        process_work(self.pid())
    }

    /// Restarts the peak-RSS count (VmHWM), so that the next reading is the peak of
    /// what follows (Linux: writing 5 to /proc/<pid>/clear_refs).
    pub fn reset_peak(&self) -> Result<()> {
        let path = format!("/proc/{}/clear_refs", self.pid());
        std::fs::write(&path, "5").with_context(|| format!("writing {path}"))
    }

    pub fn memory(&self) -> Result<Memory> {
        process_memory(self.pid())
    }

    /// How many file descriptors the child holds (sockets included).
    pub fn open_fds(&self) -> Result<usize> {
        let path = format!("/proc/{}/fd", self.pid());
        Ok(std::fs::read_dir(&path)
            .with_context(|| format!("listing {path}"))?
            .count())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain syscall on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A minimal HTTP/1.1 GET to the proxy's admin ports; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response from {addr}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled Prometheus sample, e.g. `zmesh_inbound_tls_connections_total`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// Sum of all samples of `name` whose labels contain every `labels` pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")));
            all.then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// Resident set now, KiB.
    pub rss_kib: u64,
    /// Peak resident set since start, KiB.
    pub hwm_kib: u64,
    /// The anonymous part of the resident set (heap, stacks), KiB: what connections
    /// cost, unlike file-backed text.
    pub rss_anon_kib: u64,
}

fn parse_status(text: &str) -> Result<Memory> {
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} line"))?;
        let kib = line[name.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad {name} line: {line}"))?;
        Ok(kib)
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        rss_anon_kib: field("RssAnon:")?,
    })
}

/// Raises this process's soft limit on open files to the hard limit (children inherit
/// it); returns (soft before, soft now).
pub fn raise_nofile() -> Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok((before as u64, lim.rlim_cur as u64))
}

/// Memory of all TCP socket buffers on the machine, KiB (the `mem` pages of the TCP line
/// of /proc/net/sockstat): what stalled connections cost the kernel, outside any RSS.
pub fn kernel_tcp_kib() -> Result<u64> {
    let text =
        std::fs::read_to_string("/proc/net/sockstat").context("reading /proc/net/sockstat")?;
    parse_sockstat_tcp_pages(&text).map(|pages| pages * page_kib())
}

fn parse_sockstat_tcp_pages(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in /proc/net/sockstat")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mem")
        .and_then(|w| w[1].parse().ok())
        .with_context(|| format!("no mem figure in {line:?}"))
}

fn page_kib() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64 / 1024
    } else {
        4
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Resident memory of a process, from /proc/<pid>/status.
pub fn process_memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("parsing {path}"))
}

/// User + system CPU time of a process, from /proc/<pid>/stat.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let work = process_work(pid)?;
    Ok(work.user + work.system)
}

/// What a process has done so far: CPU time in user space and in the kernel, and how often
/// its threads were switched out (voluntarily, to wait, or preempted).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    pub user: Duration,
    pub system: Duration,
    pub switches: u64,
}

impl Work {
    /// The work done between `earlier` and `self`.
    pub fn since(self, earlier: Work) -> Work {
        Work {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, other: Work) -> Work {
        Work {
            user: self.user + other.user,
            system: self.system + other.system,
            switches: self.switches + other.switches,
        }
    }
}

/// [`Work`] of a process: CPU times from /proc/<pid>/stat, context switches summed over
/// its threads' /proc/<pid>/task/<tid>/status (the process's own status counts only its
/// first thread). Threads that have ended are no longer counted.
pub fn process_work(pid: u32) -> Result<Work> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (user, system) = parse_stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    let tick = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks() as f64);
    let tasks = format!("/proc/{pid}/task");
    let mut switches = 0;
    for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let status = task?.path().join("status");
        // A thread that ended since the listing has nothing more to add.
        let Ok(text) = std::fs::read_to_string(&status) else {
            continue;
        };
        switches += parse_context_switches(&text)
            .with_context(|| format!("parsing {}", status.display()))?;
    }
    Ok(Work {
        user: tick(user),
        system: tick(system),
        switches,
    })
}

/// voluntary_ctxt_switches + nonvoluntary_ctxt_switches of a status file.
fn parse_context_switches(status: &str) -> Result<u64> {
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name}"))
    };
    Ok(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

/// utime and stime in clock ticks (fields 14 and 15); the command name in field 2 may
/// contain spaces and parentheses, so fields are counted after the last ')'.
fn parse_stat_cpu_ticks(text: &str) -> Result<(u64, u64)> {
    let (_, rest) = text.rsplit_once(')').context("no ')' in stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let get = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {} missing or not a number", i + 3))
    };
    Ok((get(11)?, get(12)?))
}

/// User + system CPU time of this process (the load generator: client and server).
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes only into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Machine-wide (busy, total) CPU time from /proc/stat, to show how saturated the box was.
pub fn machine_cpu() -> Result<(Duration, Duration)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_cpu(&text)
}

fn parse_machine_cpu(text: &str) -> Result<(Duration, Duration)> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().context("bad /proc/stat number"))
        .collect::<Result<_>>()?;
    if v.len() < 5 {
        bail!("short cpu line in /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal (guest is included in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let hz = clock_ticks() as f64;
    Ok((
        Duration::from_secs_f64((total - idle) as f64 / hz),
        Duration::from_secs_f64(total as f64 / hz),
    ))
}

/// CPUs online on this machine.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Parses `--cpus`: comma-separated CPU numbers (e.g. `0` or `0,1`), each below `online`;
/// returns them sorted, without duplicates.
pub fn parse_cpus(list: &str, online: usize) -> Result<Vec<usize>> {
    let max = online.min(libc::CPU_SETSIZE as usize);
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        if part.is_empty() {
            bail!("--cpus {list:?}: empty entry (expected CPU numbers like 0 or 0,1)");
        }
        let Ok(cpu) = part.parse::<usize>() else {
            bail!("--cpus {list:?}: {part:?} is not a CPU number (expected e.g. 0 or 0,1)");
        };
        if cpu >= max {
            bail!(
                "--cpus {list:?}: there is no CPU {cpu}; this machine has {online} online \
                 (0-{})",
                online.saturating_sub(1)
            );
        }
        if !cpus.contains(&cpu) {
            cpus.push(cpu);
        }
    }
    cpus.sort_unstable();
    Ok(cpus)
}

/// Restricts the calling thread, and so every thread and process it starts afterwards, to
/// `cpus` (sched_setaffinity(0, ..)); fails unless the kernel applied exactly that set
/// (e.g. a cgroup cpuset that excludes some of them).
pub fn set_affinity(cpus: &[usize]) -> Result<()> {
    set_thread_affinity(0, cpus)?;
    let applied = affinity()?;
    if applied != cpus {
        bail!("asked for CPUs {cpus:?} but the kernel allows this process only {applied:?}");
    }
    Ok(())
}

/// sched_setaffinity of one thread (`tid` 0: the calling one).
fn set_thread_affinity(tid: libc::pid_t, cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        bail!("empty CPU set");
    }
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("CPU {cpu} is beyond CPU_SETSIZE");
        }
        // SAFETY: cpu < CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: plain syscall; the set outlives the call.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_setaffinity of thread {tid} to CPUs {cpus:?}"));
    }
    Ok(())
}

/// Every thread of some processes held to a set of CPUs (threads they start meanwhile
/// inherit it) until dropped, which lets them run on every online CPU again.
pub struct Pinned {
    pids: Vec<u32>,
}

impl Pinned {
    pub fn new(pids: &[u32], cpus: &[usize]) -> Result<Self> {
        let pinned = Self {
            pids: pids.to_vec(),
        };
        for &pid in pids {
            set_process_affinity(pid, cpus)?;
        }
        Ok(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let all: Vec<usize> = (0..online_cpus()).collect();
        for &pid in &self.pids {
            if let Err(e) = set_process_affinity(pid, &all) {
                eprintln!("warning: could not unpin process {pid}: {e:#}");
            }
        }
    }
}

/// sched_setaffinity of every thread of `pid` (a thread that ends meanwhile is skipped).
fn set_process_affinity(pid: u32, cpus: &[usize]) -> Result<()> {
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let name = task?.file_name();
        let Some(tid) = name.to_str().and_then(|t| t.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        if let Err(e) = set_thread_affinity(tid, cpus) {
            let gone = e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.raw_os_error() == Some(libc::ESRCH));
            if !gone {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The CPUs the calling thread may run on, sorted.
pub fn affinity() -> Result<Vec<usize>> {
    // SAFETY: as in set_affinity.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes at most the size we pass.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: every index is below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_counted_after_the_command_name() {
        let stat = "1234 (tricky) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), (250, 50));
        assert!(parse_stat_cpu_ticks("1234 (x) S 1 2").is_err());
        assert!(parse_stat_cpu_ticks("no parens").is_err());
        // Our own process parses, and burning CPU makes it grow.
        let before = process_cpu(std::process::id()).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        assert!(process_cpu(std::process::id()).unwrap() > before);
        assert!(self_cpu() > Duration::ZERO);
    }

    /// Tests that change this process's CPU affinity, one at a time: pinning the process
    /// changes every test's threads.
    static AFFINITY: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn pinning_holds_every_thread_and_new_ones_until_dropped() {
        let _one = AFFINITY.lock().unwrap_or_else(|e| e.into_inner());
        let me = std::process::id();
        // A thread that exists before the pinning, asked for its CPUs after it.
        let (ask, answer) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel());
        let before = std::thread::spawn(move || {
            while ask.1.recv().is_ok() {
                answer.0.send(affinity().unwrap()).unwrap();
            }
        });
        let pinned = Pinned::new(&[me], &[0]).unwrap();
        ask.0.send(()).unwrap();
        assert_eq!(answer.1.recv().unwrap(), [0]);
        assert_eq!(affinity().unwrap(), [0]);
        let started = std::thread::spawn(|| affinity().unwrap()).join().unwrap();
        assert_eq!(started, [0]);
        drop(pinned);
        let all: Vec<usize> = (0..online_cpus()).collect();
        assert_eq!(affinity().unwrap(), all);
        ask.0.send(()).unwrap();
        assert_eq!(answer.1.recv().unwrap(), all);
        drop(ask.0);
        before.join().unwrap();
        assert!(Pinned::new(&[me], &[]).is_err());
    }

    #[test]
    fn work_splits_user_from_kernel_time_and_counts_every_threads_switches() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t2\n";
        assert_eq!(parse_context_switches(status).unwrap(), 9);
        assert!(parse_context_switches("Name:\tx\nvoluntary_ctxt_switches:\t7\n").is_err());
        let me = std::process::id();
        let before = process_work(me).unwrap();
        // A thread other than the first one waits 20 times (each wait is a switch), and
        // lives on until it has been counted.
        let (waited, exit) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let waiter = std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            waited.0.send(()).unwrap();
            let _ = exit.1.recv();
        });
        waited.1.recv().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let done = process_work(me).unwrap().since(before);
        exit.0.send(()).unwrap();
        waiter.join().unwrap();
        assert!(done.user > Duration::ZERO, "{done:?}");
        assert!(done.switches >= 20, "{done:?}");
    }

    #[test]
    fn status_memory_fields() {
        let text = "Name:\tzmesh\nVmHWM:\t   21000 kB\nVmRSS:\t   18000 kB\n\
            RssAnon:\t    5000 kB\nRssFile:\t   13000 kB\n";
        assert_eq!(
            parse_status(text).unwrap(),
            Memory {
                rss_kib: 18000,
                hwm_kib: 21000,
                rss_anon_kib: 5000,
            }
        );
        assert!(parse_status("VmRSS: 1 kB\n").is_err());
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        let m = parse_status(&own).unwrap();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib && m.rss_anon_kib <= m.rss_kib);
    }

    #[test]
    fn sockstat_tcp_memory() {
        let text =
            "sockets: used 18\nTCP: inuse 5 orphan 0 tw 0 alloc 5 mem 410\nUDP: inuse 0 mem 3\n";
        assert_eq!(parse_sockstat_tcp_pages(text).unwrap(), 410);
        assert!(parse_sockstat_tcp_pages("UDP: inuse 0 mem 3\n").is_err());
        assert!(kernel_tcp_kib().is_ok());
    }

    #[test]
    fn nofile_soft_limit_reaches_the_hard_one() {
        let (before, now) = raise_nofile().unwrap();
        assert!(now >= before);
        // Our own descriptors are countable the way the children's are.
        assert!(std::fs::read_dir("/proc/self/fd").unwrap().count() > 2);
    }

    #[test]
    fn machine_cpu_parses() {
        let (busy, total) =
            parse_machine_cpu("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let hz = clock_ticks() as f64;
        assert_eq!(busy, Duration::from_secs_f64(150.0 / hz));
        assert_eq!(total, Duration::from_secs_f64(1000.0 / hz));
        assert!(parse_machine_cpu("cpu  1 2\n").is_err());
        assert!(parse_machine_cpu("intr 1\n").is_err());
    }

    #[test]
    fn metrics_are_read_by_name_and_labels() {
        let text = "# HELP x\nzmesh_inbound_tls_connections_total 3\n\
            zmesh_connections_opened_total{direction=\"outbound\"} 7\n\
            zmesh_connections_opened_total{direction=\"inbound\"} 2\n\
            zmesh_connections_closed_total{direction=\"outbound\",result=\"ok\"} 5\n\
            zmesh_connections_closed_total{direction=\"outbound\",result=\"error\"} 1\n";
        assert_eq!(
            metric(text, "zmesh_inbound_tls_connections_total"),
            Some(3.0)
        );
        assert_eq!(metric(text, "zmesh_missing"), None);
        let opened = "zmesh_connections_opened_total";
        assert_eq!(metric_sum(text, opened, &[("direction", "outbound")]), 7.0);
        assert_eq!(metric_sum(text, opened, &[]), 9.0);
        let closed = "zmesh_connections_closed_total";
        assert_eq!(
            metric_sum(text, closed, &[("direction", "outbound"), ("result", "ok")]),
            5.0
        );
    }

    /// A child that exits at once is reported with its log, and Drop reaps a live one.
    #[test]
    fn child_lifecycle() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dead = ProxyProcess::spawn(
            "dead",
            Path::new("/bin/sh"),
            &["-c".into(), "echo boom >&2; exit 3".into()],
            tmp.path().join("dead.log"),
        )
        .unwrap();
        let _ = dead.child.wait();
        let err = format!("{:#}", dead.check_alive().unwrap_err());
        assert!(err.contains("boom"), "{err}");

        let live = ProxyProcess::spawn(
            "live",
            Path::new("/bin/sleep"),
            &["30".into()],
            tmp.path().join("live.log"),
        )
        .unwrap();
        let pid = live.pid();
        drop(live);
        // Reaped: no /proc entry, or at least not our sleeping child any more.
        assert!(process_cpu(pid).is_err());
    }

    #[test]
    fn cpus_list_parses() {
        assert_eq!(parse_cpus("0", 2).unwrap(), [0]);
        assert_eq!(parse_cpus("0,1", 2).unwrap(), [0, 1]);
        assert_eq!(parse_cpus(" 1 , 0,1", 2).unwrap(), [0, 1]);
        assert_eq!(parse_cpus("7", 8).unwrap(), [7]);
        for bad in [
            "",
            ",",
            "0,",
            "0,,1",
            "2",
            "0,2",
            "a",
            "-1",
            "0-1",
            "1.0",
            "99999999999999999999999",
        ] {
            let err = parse_cpus(bad, 2).expect_err(bad).to_string();
            assert!(err.starts_with("--cpus"), "{bad:?}: {err}");
        }
        assert!(parse_cpus("2", 2)
            .unwrap_err()
            .to_string()
            .contains("2 online"));
        // Beyond what a cpu_set_t holds, even if the machine claimed more CPUs.
        assert!(parse_cpus("1024", 4096).is_err());
    }

    /// Pinning applies to the calling thread (a scratch thread here) and reads back.
    #[test]
    fn affinity_is_set_and_read_back() {
        let _one = AFFINITY.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::spawn(|| {
            let all = affinity().unwrap();
            assert!(!all.is_empty());
            let first = all[0];
            set_affinity(&[first]).unwrap();
            assert_eq!(affinity().unwrap(), [first]);
            // Inherited by threads started afterwards.
            let child = std::thread::spawn(|| affinity().unwrap()).join().unwrap();
            assert_eq!(child, [first]);
            assert!(set_affinity(&[]).is_err());
        })
        .join()
        .unwrap();
    }

    /// A child listening is found; one that never listens times out with its log.
    #[test]
    fn wait_listening_polls_until_accepting() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = ProxyProcess::spawn(
            "relay T",
            Path::new("/bin/sleep"),
            &["30".into()],
            tmp.path().join("t.log"),
        )
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        child.wait_listening(open, Duration::from_secs(5)).unwrap();
        drop(l);
        let start = Instant::now();
        let err = child
            .wait_listening(open, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay T not listening"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
