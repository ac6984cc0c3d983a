//! The patched burn-flex (`patches/burn-flex`: N-D strided copies by rows, a collapsed
//! `StridedIter`) against ndarray, exactly, on a seeded sweep of strided layouts: rank 1–5, every
//! permutation, slices, flips (negative strides) and broadcast (stride-0) dims — through
//! `reshape` (the contiguous copy), unary, scalar and broadcast binary ops, `mask_fill` with a
//! broadcast mask, boolean and comparison ops, and sums; and the decode-shaped 2-D products of
//! the patch's `matmul_skinny.rs` (few rows, one column) over a sweep of sizes and layouts, from
//! a thread of a rayon pool and from outside one. The values are small integers, so every result
//! is exact whatever the order of the arithmetic: any difference is a misplaced element.

use burn::backend::{Flex, NdArray};
use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// A strided view of a fresh tensor: `base` shape, then a permutation, an optional slice
/// `[start, end)` of one dim, an optional flip of one dim, and size-1 dims broadcast to `expand`.
#[derive(Debug, Clone)]
struct View {
    base: Vec<usize>,
    perm: Vec<usize>,
    slice: Option<(usize, usize, usize)>,
    flip: Option<usize>,
    expand: usize,
}

fn view() -> impl Strategy<Value = View> {
    prop::collection::vec(1usize..=5, 1..=5)
        .prop_flat_map(|base| {
            let rank = base.len();
            let perm = Just((0..rank).collect::<Vec<_>>()).prop_shuffle();
            let slice = prop::option::of((0..rank, 0usize..5, 1usize..=5));
            let flip = prop::option::of(0..rank);
            (Just(base), perm, slice, flip, 1usize..=4)
        })
        .prop_map(|(base, perm, slice, flip, expand)| View {
            base,
            perm,
            slice,
            flip,
            expand,
        })
}

/// The view on backend `B`, from values `seed, seed + 1, …` (f32 integers).
fn make<B: Backend>(v: &View, seed: usize) -> Tensor<B, 5> {
    let n: usize = v.base.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + seed) % 97) as f32 - 40.0)
        .collect();
    let mut dims = [1usize; 5];
    dims[..v.base.len()].copy_from_slice(&v.base);
    let mut perm = [0usize, 1, 2, 3, 4];
    perm[..v.perm.len()].copy_from_slice(&v.perm);
    let t = Tensor::<B, 5>::from_data(TensorData::new(values, dims), &Default::default());
    let mut t = t.permute(perm);
    if let Some((dim, start, len)) = v.slice {
        let size = t.dims()[dim];
        let start = start % size;
        let end = (start + len).min(size);
        let mut ranges = t.dims().map(|d| 0..d);
        ranges[dim] = start..end;
        t = t.slice(ranges);
    }
    if let Some(dim) = v.flip {
        t = t.flip([dim as isize]);
    }
    let shape = t.dims().map(|d| if d == 1 { v.expand } else { d });
    t.expand(shape)
}

fn data<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn bools<B: Backend, const D: usize>(t: Tensor<B, D, Bool>) -> Vec<bool> {
    t.into_data().to_vec().unwrap()
}

/// Every op's output on flex, as host values, for one view (and a second view of the same shape
/// made by swapping the roles of two dims of the same size, when there are any).
fn outputs<B: Backend>(v: &View) -> Vec<(String, Vec<f32>)> {
    let x = make::<B>(v, 3);
    let y = make::<B>(v, 11);
    let n: usize = x.dims().iter().product();
    let dims = x.dims();
    let mask = x.clone().greater_elem(0.0);
    let other = y.clone().lower_elem(5.0);
    let row = x
        .clone()
        .slice([0..dims[0], 0..1, 0..dims[2], 0..dims[3], 0..dims[4]]);
    let as_f = |b: Vec<bool>| b.into_iter().map(|b| b as u8 as f32).collect::<Vec<_>>();
    vec![
        ("reshape".into(), data(x.clone().reshape([n]))),
        ("neg".into(), data(x.clone().neg())),
        ("abs".into(), data(x.clone().abs())),
        ("mul_scalar".into(), data(x.clone().mul_scalar(3.0))),
        ("add".into(), data(x.clone() + y.clone())),
        ("mul".into(), data(x.clone() * y.clone())),
        ("sub broadcast row".into(), data(y.clone() - row.clone())),
        ("add broadcast row".into(), data(row + x.clone())),
        (
            "mask_fill".into(),
            data(y.clone().mask_fill(mask.clone(), -1.0e4)),
        ),
        (
            "mask_fill broadcast".into(),
            data(
                y.clone().mask_fill(
                    mask.clone()
                        .slice([0..dims[0], 0..dims[1], 0..dims[2], 0..dims[3], 0..1])
                        .expand(dims),
                    7.0,
                ),
            ),
        ),
        (
            "bool_or".into(),
            as_f(bools(mask.clone().bool_or(other.clone()))),
        ),
        ("bool_and".into(), as_f(bools(mask.clone().bool_and(other)))),
        ("bool_not".into(), as_f(bools(mask.bool_not()))),
        ("equal".into(), as_f(bools(x.clone().equal(y.clone())))),
        ("greater".into(), as_f(bools(x.clone().greater(y.clone())))),
        ("sum".into(), data(x.clone().sum())),
        ("sum_dim 1".into(), data(x.clone().sum_dim(1))),
        ("sum_dim 4".into(), data(x.clone().sum_dim(4))),
        ("max_dim 3".into(), data(x.clone().max_dim(3))),
        ("cat".into(), data(Tensor::cat(vec![x.clone(), y], 2))),
        (
            "swap_dims reshape".into(),
            data(x.swap_dims(1, 3).reshape([n])),
        ),
    ]
}

/// A proptest runner with a fixed seed and no failure files: the same cases on every run.
fn seeded_runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

/// `got` and `want` have the same length and the same bits at every index (`what` names the case).
fn same_bits(what: &str, got: &[f32], want: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: length", what);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            a.to_bits() == b.to_bits(),
            "{}: element {}: flex {} ndarray {}",
            what,
            i,
            a,
            b
        );
    }
    Ok(())
}

#[test]
fn flex_strided_layouts_equal_ndarray_exactly() {
    seeded_runner(300)
        .run(&view(), |v| {
            let got = outputs::<Flex>(&v);
            let want = outputs::<NdArray<f32>>(&v);
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                same_bits(&format!("{v:?}: {name}"), g, w)?;
            }
            Ok(())
        })
        .unwrap();
}

/// A 2-D product `[m, k] × [k, n]`, each side contiguous or a transposed view of its transpose,
/// asked for from a thread of a rayon pool or from outside one.
#[derive(Debug, Clone)]
struct Product {
    m: usize,
    n: usize,
    k: usize,
    lhs_transposed: bool,
    rhs_transposed: bool,
    on_pool_thread: bool,
}

/// Decode-shaped products: 1–40 rows (the few-rows kernel takes up to 32) by 256–1,100 columns
/// (not all multiples of its 32-column strips), depth 64–1,000 (work on both sides of the kernel's
/// thresholds, 64 Ki and 256 Ki multiply-adds); 1–6 rows by 128–300 columns (from 128 columns the
/// kernel takes up to 4 rows on a pool thread), depth 256–1,000; or one column by 1,024–4,000 rows
/// (split by rows), depth 64–1,000.
fn product() -> impl Strategy<Value = Product> {
    let few_rows = (1usize..=40, 256usize..=1100, 64usize..=1000);
    let narrow = (1usize..=6, 128usize..=300, 256usize..=1000);
    let one_column = (1024usize..=4000, Just(1usize), 64usize..=1000);
    (
        prop_oneof![2 => few_rows, 3 => narrow, 1 => one_column],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |((m, n, k), lhs_transposed, rhs_transposed, on_pool_thread)| Product {
                m,
                n,
                k,
                lhs_transposed,
                rhs_transposed,
                on_pool_thread,
            },
        )
}

/// A `[rows, cols]` matrix of small integers from `seed`, contiguous or a transposed view.
fn matrix<B: Backend>(rows: usize, cols: usize, transposed: bool, seed: usize) -> Tensor<B, 2> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7 + seed) % 29) as f32 - 14.0)
        .collect();
    let device = Default::default();
    if transposed {
        Tensor::<B, 2>::from_data(TensorData::new(values, [cols, rows]), &device).transpose()
    } else {
        Tensor::<B, 2>::from_data(TensorData::new(values, [rows, cols]), &device)
    }
}

fn product_of<B: Backend>(p: &Product) -> Vec<f32> {
    let lhs = matrix::<B>(p.m, p.k, p.lhs_transposed, 3);
    let rhs = matrix::<B>(p.k, p.n, p.rhs_transposed, 11);
    data(lhs.matmul(rhs))
}

#[test]
fn flex_decode_shaped_products_equal_ndarray_exactly() {
    // The binary's main thread is one of rayon's (src/app/threads.rs), where the kernel takes
    // narrower and smaller products than from outside the pool.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    seeded_runner(120)
        .run(&product(), |p| {
            let got = if p.on_pool_thread {
                pool.install(|| product_of::<Flex>(&p))
            } else {
                product_of::<Flex>(&p)
            };
            same_bits(
                &format!("{p:?} (element = row × {} + column)", p.n),
                &got,
                &product_of::<NdArray<f32>>(&p),
            )
        })
        .unwrap();
}
