//! After a burst, the proxy's process gives freed memory back to the kernel
//! (`runtime::tune_malloc` keeps freed buffers for speed, its trimming thread returns them).
//! A process of its own: the allocator settings are process-wide.

use std::time::{Duration, Instant};

use zmesh_proxy::runtime::{tune_malloc, TRIM_PERIOD};

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

#[test]
fn memory_freed_after_a_burst_goes_back_to_the_kernel() {
    tune_malloc();
    const BURST: usize = 128 << 20;
    const CHUNK: usize = 256 << 10;
    let before = rss_bytes();

    // A burst as the copy loop makes it: read buffers, with small long-lived allocations
    // (connection state) between them, so that the freed buffers cannot fall back into the
    // top of the heap and be released by free() itself.
    let mut buffers = Vec::new();
    let mut pinned = Vec::new();
    for i in 0..BURST / CHUNK {
        // Written all over (not calloc'd zeroes), so resident.
        buffers.push(std::hint::black_box(vec![1 + i as u8 % 250; CHUNK]));
        pinned.push(Box::new([i as u8; 64]));
    }
    let peak = rss_bytes();
    assert!(
        peak >= before + BURST / 2,
        "the burst did not show in RSS: {before} -> {peak}"
    );
    drop(buffers);
    let after_free = rss_bytes();
    // What tune_malloc trades for speed: free() alone keeps the memory.
    assert!(
        after_free >= before + BURST / 2,
        "free() returned the burst by itself ({peak} -> {after_free}): this test no longer \
         shows anything"
    );

    let deadline = Instant::now() + 4 * TRIM_PERIOD;
    let mut now = rss_bytes();
    while now > before + BURST / 8 {
        assert!(
            Instant::now() < deadline,
            "RSS still {} MiB after {:?} (before the burst {} MiB, peak {} MiB)",
            now >> 20,
            4 * TRIM_PERIOD,
            before >> 20,
            peak >> 20
        );
        std::thread::sleep(Duration::from_millis(100));
        now = rss_bytes();
    }
    drop(pinned);
}
