//! What the daemon asks of glibc's allocator, so that its RSS follows what is live rather
//! than what a checkpoint once needed at its peak. On other C libraries these do nothing.

/// Keeps freed memory from piling up in glibc's allocator, which would otherwise make the
/// daemon's RSS grow with the data written with nothing live behind it (60–75 bytes per
/// unique block in `make bench` section 8's RAM figure):
///
/// * glibc gives threads that allocate at once arenas of their own, up to 8 per core, and an
///   arena keeps what was freed in it; a checkpoint's transient buffers (the dedup index's
///   changes, map node images) land in whichever arena its thread has. One per core.
/// * Allocations from 128 KiB up are mapped and unmapped on free, but glibc raises that
///   threshold to the size of each such block freed (up to 32 MiB), after which a
///   checkpoint's buffers of a few MiB stay in the heap. A fixed 4 MiB threshold returns
///   them to the system; the data path's buffers are far smaller.
///
/// `MALLOC_ARENA_MAX` and `MALLOC_MMAP_THRESHOLD_` in the environment still decide, if set.
/// Call it before any thread starts.
pub fn tune_for_daemon() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let tune = [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, cores.clamp(2, 64)),
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 4 << 20),
        ];
        for (env, param, value) in tune {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only tunes the allocator; it is called before the daemon
                // starts its threads, with values valid for each parameter.
                unsafe {
                    libc::mallopt(param, value as libc::c_int);
                }
            }
        }
    }
}

/// Hands the pages of freed memory back to the system, in every arena.
///
/// A checkpoint's many small transient allocations (the merge's per-node keys and images,
/// the cut's lists) spread the heap out to their peak, and glibc returns only the free space
/// at the top of a heap, so the long-lived allocations made meanwhile (cached blocks, map
/// nodes) pin the rest: the daemon's RSS grew by 12–19 bytes per unique block written while
/// what was live stayed flat. The checkpoint thread calls this on its next round after any
/// checkpoint; it took 2–5 ms on the daemon's heap of ~40 MiB (`make bench` section 8), during
/// which an allocation in the arena it is trimming waits.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let t = std::time::Instant::now();
        // SAFETY: malloc_trim only releases free memory; it takes the arenas' own locks.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(
            released = released != 0,
            us = t.elapsed().as_micros() as u64,
            "returned freed memory to the system"
        );
    }
}
