//! Choosing the next token of every row, on the model's device. One decode step turns the
//! `[rows, vocab]` logits into `rows` token ids and three numbers per row, and only those come back
//! to the host: O(rows) bytes per step, never O(rows × vocab).
//!
//! The randomness stays on the host, keyed per row: the caller passes one uniform `u ∈ [0, 1)` per
//! row (drawn from that row's own RNG) and the device inverts the row's CDF at `u`. So a sample
//! depends on its (seed, prompt, sample) key only, not on the batch it ran in.

use burn::tensor::{activation, backend::Backend, DType, Int, Tensor, TensorData};

/// The distribution the next token is drawn from: the model's at `temperature` (0: greedy),
/// truncated to the `top_k` most likely tokens (0: all) and then to the nucleus of mass `top_p`
/// (1: all).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

/// One decode step's choices, read back to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Choices {
    pub ids: Vec<u32>,
    /// `log π(id)` at temperature 1, untruncated (PPO's `log π_old`).
    pub logprobs: Vec<f32>,
    /// `log q(id)` under the distribution sampled from (0 for greedy).
    pub sampling_logprobs: Vec<f32>,
    /// `−Σ π log π` of the temperature-1 distribution (nats).
    pub entropies: Vec<f32>,
    /// Bytes copied from the device for this step.
    pub bytes_read: usize,
}

/// Whether `params` sample from the model's own temperature-1 distribution, untruncated.
fn is_plain(params: &Draw, vocab: usize) -> bool {
    params.temperature == 1.0 && (params.top_k == 0 || params.top_k >= vocab) && params.top_p >= 1.0
}

/// Chooses one token per row of `logits: [rows, vocab]`.
///
/// - `T = 0`: greedy, `id = argmax z`, `log q = 0`.
/// - otherwise `q ∝ softmax(z / T)`, restricted to the `top_k` largest and then to the smallest
///   prefix by descending probability whose mass reaches `top_p` (a token is kept while the mass
///   before it is `< top_p`; the first always is), renormalised; `id = F_q⁻¹(u)`, the first token
///   whose cumulative mass exceeds `u · Σq`.
///
/// Always `log π = log_softmax(z)[id]` and `H = −Σ softmax(z)·log_softmax(z)`, at temperature 1.
/// `uniforms` holds one `u` per row (ignored when greedy).
pub fn choose<B: Backend>(logits: Tensor<B, 2>, params: &Draw, uniforms: &[f32]) -> Choices {
    let [rows, vocab] = logits.dims();
    let device = logits.device();
    let z = logits.cast(DType::F32);
    let log_pi = activation::log_softmax(z.clone(), 1);
    let pi = log_pi.clone().exp();
    let entropy = (pi.clone() * log_pi.clone()).sum_dim(1).neg();
    // `log q` of the chosen ids; `None` where q is π itself (plain sampling).
    let (ids, log_q) = if params.temperature <= 0.0 {
        (z.argmax(1), Some(Tensor::zeros([rows, 1], &device)))
    } else {
        assert_eq!(uniforms.len(), rows, "one uniform per row");
        let u = Tensor::<B, 2>::from_data(TensorData::new(uniforms.to_vec(), [rows, 1]), &device);
        if is_plain(params, vocab) {
            (inverse_cdf(pi, u), None)
        } else {
            let scaled = z.div_scalar(params.temperature as f64);
            let (top, order) = if params.top_k > 0 && params.top_k < vocab {
                scaled.topk_with_indices(params.top_k, 1)
            } else if params.top_p < 1.0 {
                scaled.sort_descending_with_indices(1)
            } else {
                (scaled, column_index::<B>(rows, vocab, &device))
            };
            let mut q = activation::softmax(top, 1);
            if params.top_p < 1.0 {
                let width = q.dims()[1];
                let before = q.clone().cumsum(1) - q.clone();
                let first = column_index::<B>(rows, width, &device).equal_elem(0);
                let keep = before.lower_elem(params.top_p as f64).bool_or(first);
                q = q.mask_fill(keep.bool_not(), 0.0);
            }
            let pos = inverse_cdf(q.clone(), u);
            let mass = q.clone().sum_dim(1);
            let log_q = (q.gather(1, pos.clone()) / mass).log();
            (order.gather(1, pos), Some(log_q))
        }
    };
    let log_pi = log_pi.gather(1, ids.clone());
    let log_q = log_q.unwrap_or_else(|| log_pi.clone());
    let stats = Tensor::cat(vec![log_pi, log_q, entropy], 1).into_data();
    let ids = ids.into_data();
    let bytes_read = stats.as_bytes().len() + ids.as_bytes().len();
    let stats: Vec<f32> = stats.iter::<f32>().collect();
    let column = |c: usize| (0..rows).map(|r| stats[r * 3 + c]).collect::<Vec<f32>>();
    Choices {
        ids: ids.iter::<i64>().map(|i| i as u32).collect(),
        logprobs: column(0),
        sampling_logprobs: column(1),
        entropies: column(2),
        bytes_read,
    }
}

/// `F⁻¹(u)` per row of unnormalised weights `w: [rows, n]` (`u: [rows, 1]` in `[0, 1)`): the
/// number of entries whose cumulative weight is `≤ u · Σw`, i.e. the first index whose cumulative
/// weight exceeds it (a zero-weight entry is never that index), clamped to the last entry with
/// weight (rounding can put `u · Σw` at the total).
fn inverse_cdf<B: Backend>(w: Tensor<B, 2>, u: Tensor<B, 2>) -> Tensor<B, 2, Int> {
    let [rows, n] = w.dims();
    let cdf = w.clone().cumsum(1);
    let total = cdf.clone().slice([0..rows, n - 1..n]);
    let target = (u * total).expand([rows, n]);
    let pos = cdf.lower_equal(target).int().sum_dim(1);
    let last = column_index::<B>(rows, n, &w.device())
        .mask_fill(w.lower_equal_elem(0.0), 0)
        .max_dim(1);
    pos.min_pair(last)
}

/// `[rows, n]` holding each entry's column index.
fn column_index<B: Backend>(rows: usize, n: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::arange(0..n as i64, device)
        .unsqueeze::<2>()
        .expand([rows, n])
}
