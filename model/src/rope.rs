//! Rotary position embedding in the Hugging Face Qwen2 convention (`rotate_half`: the first half
//! of each head's dimensions is paired with the second half, not interleaved pairs as in Burn's
//! `RotaryEncoding`), evaluated at per-row positions so left-padded batches work.

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

/// `cos` and `sin` tables for one forward call, each `[batch, 1, seq, head_dim]`.
///
/// `inv_freq_i = θ^(−2i/d)` for `i < d/2`, `φ = pos · inv_freq`, `emb = [φ, φ]`,
/// `cos = cos(emb)`, `sin = sin(emb)` — computed in f32 like transformers.
pub fn rope_tables<B: Backend>(
    positions: Tensor<B, 2, Int>,
    head_dim: usize,
    theta: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let device = positions.device();
    let [b, t] = positions.dims();
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            // transformers: 1 / base ** (arange(0, d, 2, dtype=int64).float() / d), all in f32.
            let e = (2 * i) as f32 / head_dim as f32;
            1.0f32 / (theta as f32).powf(e)
        })
        .collect();
    let inv = Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), (&device, DType::F32))
        .reshape([1, 1, half]);
    let pos = positions.float().cast(DType::F32).reshape([b, t, 1]);
    let freqs = pos.mul(inv); // [b, t, half]
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, t, head_dim]);
    (emb.clone().cos(), emb.sin())
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half([x1, x2]) = [−x2, x1]`; `x` is
/// `[batch, heads, seq, head_dim]`, the tables broadcast over heads.
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let dtype = x.dtype();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().cast(dtype) + rotated * sin.clone().cast(dtype)
}
