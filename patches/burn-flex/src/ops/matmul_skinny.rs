//! med-rlvr patch (change 6): decode-shaped 2-D products on every core.
//!
//! - `[m, k] × [k, n]` with few rows (m ≤ 32) and a right-hand side whose rows are contiguous — a
//!   linear layer's weight at decode time, one row per sequence — by [`matmul_few_rows`];
//! - `[m, k] × [k, 1]` — a tied output head `E · hᵀ` for one token — split by rows
//!   ([`matmul_one_column`]).
//!
//! Why: gemm 0.19's AVX-512 kernel tiles 48 rows by 8 columns, so with 1–32 rows most of each
//! tile is empty and the weight is read at 4–8 GB/s; with one row or one column it takes a GEMV
//! that runs on one thread whatever the size; and burn-flex asks gemm for threads only above 192³
//! multiply-adds. A decode step reads every weight once per token, so its speed is the speed of
//! these products.
//!
//! The few-rows kernel keeps an `r × 32` block of the output (r ≤ 8 rows, two 16-lane registers
//! per row) in registers while it walks 16 rows of the right-hand side (prefetching the same
//! columns of the next 16), then moves to the next 32 columns; the column strips are shared out
//! between rayon's threads. Each output element is one fused multiply-add chain over `k` in order,
//! so the result does not depend on the number of threads or on where the strips fall. It runs
//! where the CPU has AVX-512F (checked at run time, like gemm's own kernels); elsewhere gemm does
//! the product as before. The one-column split hands each thread whole rows of gemm's own GEMV,
//! so its results are gemm's, bit for bit.

#[cfg(feature = "rayon")]
use alloc::vec::Vec;
#[cfg(target_arch = "x86")]
use core::arch::x86::{_MM_HINT_T0, _mm_prefetch};
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
use core::ops::Range;

/// Output rows the kernel takes; above this gemm's packed kernels are as fast.
const MAX_ROWS: usize = 32;
/// Columns of one strip: two AVX-512 registers per output row.
const STRIP: usize = 32;
/// Rows of the right-hand side walked before the accumulators go back to memory.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
const DEPTH_BLOCK: usize = 16;
/// Output rows kept in registers at once (8 × 2 accumulators + the weight row + a broadcast).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
const ROW_GROUP: usize = 8;
/// Below this many multiply-adds a product stays on gemm when it is asked for from outside rayon's
/// pool: handing the strips to the pool's threads and waking the caller afterwards costs ~12 µs
/// (more once the threads have gone to sleep).
const MIN_WORK: usize = 256 * 1024;
/// The same asked for from one of the pool's threads (a program whose main thread is one of them:
/// `ThreadPoolBuilder::use_current_thread`), which shares the strips with the others through its
/// own queue at the cost of a few atomic operations.
const MIN_WORK_ON_WORKER: usize = 64 * 1024;
/// Rows of the right-hand side ahead of the one being multiplied whose strip is prefetched: the
/// same strip's rows of the next depth block, which are read after every other strip of this one.
/// Each strip of a weight row is a separate stream of 128 bytes every `n` floats, which the
/// hardware prefetchers follow poorly; with this, timed alone on two Sapphire Rapids cores,
/// `[1, 896] × [896, 896]` reads the weight at 23.5 GB/s instead of 21, `[8, 896] × [896, 4864]`
/// at 23 instead of 16.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
const PREFETCH_ROWS: isize = DEPTH_BLOCK as isize;
/// A one-column product's runs of rows start at multiples of this.
const ROW_BLOCK: usize = 64;
/// A one-column product's rows per thread: at least about this many.
const MIN_RUN: usize = 512;

/// A pointer shared by threads that read one input or write disjoint parts of one output.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Whether `[m, k] × [k, n]` with the right-hand side's column stride `rhs_cs` goes to
/// [`matmul_few_rows`]: few rows, contiguous weight rows, AVX-512F present, and enough columns and
/// work to pay for sharing them between threads — at least 8 strips and [`MIN_WORK`] in general;
/// on one of rayon's threads, where sharing is cheap, [`MIN_WORK_ON_WORKER`], and 4 strips for up
/// to 4 rows (a decode step's 128-column key and value projections; with 8 rows gemm is faster).
pub(crate) fn few_rows_applies(m: usize, n: usize, k: usize, rhs_cs: isize) -> bool {
    let on_worker = on_pool_thread();
    let work = m.saturating_mul(n).saturating_mul(k);
    let wide_enough = n >= 8 * STRIP || (on_worker && n >= 4 * STRIP && m <= 4);
    let min_work = if on_worker {
        MIN_WORK_ON_WORKER
    } else {
        MIN_WORK
    };
    (1..=MAX_ROWS).contains(&m)
        && wide_enough
        && k >= 1
        && rhs_cs == 1
        && work >= min_work
        && has_avx512()
}

/// Whether this thread is one of rayon's (always, without rayon: nothing is handed over).
fn on_pool_thread() -> bool {
    #[cfg(feature = "rayon")]
    {
        rayon::current_thread_index().is_some()
    }
    #[cfg(not(feature = "rayon"))]
    {
        true
    }
}

fn has_avx512() -> bool {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64"))))]
    {
        false
    }
}

/// Whether `[m, k] × [k, n]` is a one-column product worth splitting by rows over threads.
pub(crate) fn one_column_applies(m: usize, n: usize, k: usize) -> bool {
    cfg!(feature = "rayon") && n == 1 && m >= 2 * MIN_RUN && m.saturating_mul(k) >= MIN_WORK
}

/// `out` (a one-column product's `m` rows) cut into one run of rows per thread, `rows(first_row,
/// out_rows)` computing one run. Every run starts at a multiple of [`ROW_BLOCK`] (gemm's GEMV puts
/// the same rows in the same SIMD lanes as for the whole product) and is longer than 256 rows
/// (gemm takes another kernel for products of at most 16 × 16 elements), so each row is computed
/// as gemm computes it for the whole product.
#[cfg(feature = "rayon")]
pub(crate) fn matmul_one_column<T: Send>(out: &mut [T], rows: impl Fn(usize, &mut [T]) + Sync) {
    use rayon::prelude::*;
    let m = out.len();
    let parts = rayon::current_num_threads().clamp(1, m / MIN_RUN);
    // runs of `per` rows (≥ MIN_RUN − ROW_BLOCK + 1 > 256), the last one takes the rest (≥ per)
    let per = (m / parts) / ROW_BLOCK * ROW_BLOCK;
    let mut runs = Vec::with_capacity(parts);
    let mut rest = out;
    for p in 0..parts - 1 {
        let (run, tail) = rest.split_at_mut(per);
        runs.push((p * per, run));
        rest = tail;
    }
    runs.push(((parts - 1) * per, rest));
    runs.into_par_iter().for_each(|(row, out)| rows(row, out));
}

/// `out[i, j] = Σ_p lhs[i, p] · rhs[p, j]` for `i < m`, `j < n`, `p < k`, summed in order of `p`
/// with fused multiply-adds; `out` is row-major `[m, n]`, `lhs` has strides `(lhs_rs, lhs_cs)`,
/// `rhs` has row stride `rhs_rs` and column stride 1. Call only where [`few_rows_applies`].
///
/// # Safety
/// `lhs` and `rhs` must address `m × k` and `k × n` valid elements through their strides.
pub(crate) unsafe fn matmul_few_rows(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
) {
    debug_assert!(few_rows_applies(m, n, k, 1) && out.len() == m * n);
    let strips = n.div_ceil(STRIP);
    let out = Shared(out.as_mut_ptr());
    let (lhs, rhs) = (Shared(lhs), Shared(rhs));
    let part = move |range: Range<usize>| {
        let (out, lhs, rhs) = (out, lhs, rhs);
        // SAFETY: each part writes only its own column strips of `out`.
        unsafe { strips_avx512(m, n, k, out.0, lhs.0, lhs_rs, lhs_cs, rhs.0, rhs_rs, range) }
    };
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        let parts = rayon::current_num_threads().clamp(1, strips);
        let per = strips.div_ceil(parts);
        (0..parts)
            .into_par_iter()
            .for_each(|p| part(p * per..((p + 1) * per).min(strips)));
    }
    #[cfg(not(feature = "rayon"))]
    part(0..strips);
}

/// The column strips `strips` of the output, for all rows and the whole depth.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn strips_avx512(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    strips: Range<usize>,
) {
    let mut depth = 0;
    while depth < k {
        let block = depth..(depth + DEPTH_BLOCK).min(k);
        for s in strips.clone() {
            let col = s * STRIP;
            let width = STRIP.min(n - col);
            let mut row = 0;
            while row < m {
                let rows = ROW_GROUP.min(m - row);
                let tile = Tile {
                    out: unsafe { out.add(row * n + col) },
                    out_rs: n,
                    lhs: unsafe { lhs.offset(row as isize * lhs_rs) },
                    lhs_rs,
                    lhs_cs,
                    rhs: unsafe { rhs.add(col) },
                    rhs_rs,
                    width,
                    depth: block.clone(),
                };
                unsafe {
                    match rows {
                        8 => tile.run::<8>(),
                        7 => tile.run::<7>(),
                        6 => tile.run::<6>(),
                        5 => tile.run::<5>(),
                        4 => tile.run::<4>(),
                        3 => tile.run::<3>(),
                        2 => tile.run::<2>(),
                        _ => tile.run::<1>(),
                    }
                }
                row += rows;
            }
        }
        depth = block.end;
    }
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
#[allow(clippy::too_many_arguments)]
unsafe fn strips_avx512(
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
    _: *const f32,
    _: isize,
    _: isize,
    _: *const f32,
    _: isize,
    _: Range<usize>,
) {
    unreachable!("few_rows_applies is false without AVX-512")
}

/// `R` output rows × `width` (≤ 32) columns, over the depth range `depth` of the product.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
struct Tile {
    out: *mut f32,
    out_rs: usize,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    width: usize,
    depth: Range<usize>,
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl Tile {
    /// `R` rows of a full strip (`fma_chain` with `FULL`: fixed-length loops) or of the last,
    /// narrower one.
    #[inline(always)]
    unsafe fn run<const R: usize>(&self) {
        if self.width == STRIP {
            unsafe { self.fma_chain::<R, true>() }
        } else {
            unsafe { self.fma_chain::<R, false>() }
        }
    }

    /// `acc = out` (or 0 at depth 0); `acc[i][j] = fma(lhs[i, p], rhs[p, j], acc[i][j])` for each
    /// `p` of the range in order; `out = acc`. With `FULL` every loop has the strip's fixed
    /// length, so the block stays in registers.
    #[inline(always)]
    unsafe fn fma_chain<const R: usize, const FULL: bool>(&self) {
        let width = if FULL { STRIP } else { self.width };
        let mut acc = [[0f32; STRIP]; R];
        if self.depth.start > 0 {
            for (i, acc) in acc.iter_mut().enumerate() {
                let out = unsafe { self.out.add(i * self.out_rs) };
                for (j, a) in acc.iter_mut().enumerate() {
                    if FULL || j < width {
                        *a = unsafe { *out.add(j) };
                    }
                }
            }
        }
        for p in self.depth.clone() {
            let rhs = unsafe { self.rhs.offset(p as isize * self.rhs_rs) };
            // A hint only: past the last row it reads nothing and cannot fault.
            let ahead = rhs.wrapping_offset(PREFETCH_ROWS * self.rhs_rs);
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(STRIP / 2) as *const i8);
            }
            let mut w = [0f32; STRIP];
            for (j, w) in w.iter_mut().enumerate() {
                if FULL || j < width {
                    *w = unsafe { *rhs.add(j) };
                }
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = unsafe {
                    *self
                        .lhs
                        .offset(i as isize * self.lhs_rs + p as isize * self.lhs_cs)
                };
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = x.mul_add(*w, *a);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let out = unsafe { self.out.add(i * self.out_rs) };
            for (j, a) in acc.iter().enumerate() {
                if FULL || j < width {
                    unsafe { *out.add(j) = *a };
                }
            }
        }
    }
}
