//! How the data path runs: the runtime and allocator settings BENCHMARKS.md measured. `zmesh
//! proxy` and the node agent's proxy both use them, so what a node runs is what was
//! benchmarked.

/// Worker threads of the data path by default: one. Every hop then stays on one thread
/// (no hand-offs between threads per frame: less latency and CPU per byte).
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// A single-threaded runtime for `threads == 1`, else a multi-threaded one (`0`: tokio's
/// default, one worker per CPU or TOKIO_WORKER_THREADS).
pub fn build(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.build()
}

/// Keeps glibc malloc from returning the copy loop's read buffers (up to 256 KiB) to the
/// kernel after every use: by default they are mmap'd or trimmed from the heap top and
/// faulted back in on the next read, which cost the proxy pair ~15-20% more CPU per GB
/// (BENCHMARKS.md). One arena instead of one per thread keeps the peak RSS in check.
///
/// What that keeps is returned later instead: a thread of its own checks every
/// [`TRIM_PERIOD`] how much freed memory the heap holds and, past [`TRIM_SLACK`], trims it
/// (`malloc_trim`), so the RSS goes back down after a burst of tunnels or traffic. A busy
/// proxy pays that at most once a period.
///
/// Process-wide: call it once, before the data path allocates.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_malloc() {
    use std::os::raw::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    const M_ARENA_MAX: c_int = -8;
    for (param, value) in [
        (M_MMAP_THRESHOLD, 1 << 20),
        (M_TRIM_THRESHOLD, 2 << 20),
        (M_ARENA_MAX, 1),
    ] {
        // SAFETY: mallopt only changes allocator tuning; it returns 0 on a bad value,
        // which leaves the default in place.
        if unsafe { mallopt(param, value) } == 0 {
            tracing::debug!(param, value, "mallopt refused a setting");
        }
    }
    static TRIMMER: std::sync::Once = std::sync::Once::new();
    TRIMMER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("zmesh-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_PERIOD);
                trim_if_worth_it();
            });
        if let Err(e) = spawned {
            tracing::warn!("no memory trimming thread ({e}): RSS stays at its peak");
        }
    });
}

/// How often freed heap memory is considered for returning to the kernel.
pub const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);
/// Freed heap memory the process may keep (beyond this it is trimmed).
pub const TRIM_SLACK: usize = 8 << 20;

/// Free bytes the heap holds that the kernel could have back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_free_bytes() -> usize {
    /// glibc's `struct mallinfo2` (2.33+).
    #[repr(C)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> MallInfo2;
    }
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { mallinfo2() };
    info.fordblks
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_if_worth_it() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    let free = heap_free_bytes();
    if free > TRIM_SLACK {
        // SAFETY: malloc_trim returns free heap pages to the kernel; it is thread-safe.
        unsafe { malloc_trim(0) };
        tracing::debug!(
            free_before = free,
            free_after = heap_free_bytes(),
            "trimmed the heap"
        );
    }
}

/// Other platforms keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_malloc() {}
