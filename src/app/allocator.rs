//! The C allocator's settings for this process: keep freed memory for the next tensor.
//!
//! Every tensor op on a CPU backend allocates its output and frees its inputs, megabytes at a
//! time. glibc's defaults give memory above 128 KiB back to the kernel (`munmap`, or trimming the
//! heap's top past its adaptive threshold), so the next op's buffer may be faulted in and zeroed
//! again page by page. How often varied from run to run: four demo steps spent 1.1 s or 4.4 s in
//! the kernel with glibc's defaults, 0.8–0.9 s with this setting (benches/RESULTS.md, "burn-flex
//! patched", the allocator table).
//! [`keep_freed_memory`] serves buffers up to 32 MiB from the heap and keeps up to 1 GiB of freed
//! heap in the process. A `MALLOC_*_` variable in the environment (glibc's own tuning) wins: then
//! nothing is changed. Other C libraries are left as they are.

/// glibc: buffers below 32 MiB (glibc's own ceiling for its adaptive threshold) from the heap,
/// 1 GiB of free heap kept before trimming, 64 MiB of extra heap per growth.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    let tuned = std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_"));
    if tuned {
        return;
    }
    // SAFETY: mallopt only sets glibc's malloc parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}

/// Gives the free memory the allocator kept back to the kernel, so that a measurement of peak
/// resident memory that starts now counts every page the measured work touches.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_kept_memory() {
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_kept_memory() {}
