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

/// Keeps glibc malloc from returning the copy loop's 256 KiB buffers to the kernel after
/// every use: by default they are mmap'd or trimmed from the heap top and faulted back in
/// on the next read, which cost the proxy pair ~15-20% more CPU per GB (BENCHMARKS.md).
/// One arena instead of one per thread keeps the peak RSS in check. Process-wide: call it
/// once, before the data path allocates.
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
}

/// Other platforms keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_malloc() {}
