//! The process's compute threads: the main thread is one of rayon's.
//!
//! burn-flex (the CPU backend) and gemm run each large op on rayon's global pool. Asked from a
//! thread outside the pool, rayon hands the op to the pool's threads and puts the caller to sleep
//! until they are done: ~12 µs per op while those threads are awake, ~70 µs once they have gone to
//! sleep (two Sapphire Rapids cores; `benches/RESULTS.md`, "main thread in the pool"), where one
//! decode step of Qwen2.5-0.5B is ~170 products of 0.1–1 ms. From a thread of the pool, an op goes
//! on that thread's own queue: it does its share itself and the others take the rest.
//! `bench --outside-pool` leaves the main thread out, as before, to time the two side by side.

/// Makes the calling (main) thread thread 0 of rayon's global pool, before anything has used the
/// pool. The pool keeps its size (`RAYON_NUM_THREADS`, else one thread per CPU), the main thread
/// counted as one of them.
pub fn main_thread_computes() {
    // Fails only where the global pool already exists, which cannot be the case this early; it
    // then stays as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
}
