//! The Qwen2 / Qwen2.5 and Qwen3 (dense) decoder: token embedding → N × (RMSNorm → GQA
//! self-attention → residual → RMSNorm → SwiGLU MLP → residual) → final RMSNorm → LM head (tied to
//! the embedding or not). The attention projects q/k/v (with a bias in Qwen2; in Qwen3 only with
//! `attention_bias`, which also biases o), applies Qwen3's per-head RMSNorm to queries and keys
//! (`q_norm`, `k_norm`, over `head_dim`), then `rotate_half` RoPE. Generic over the Burn backend;
//! batches may be left-padded (a key-validity mask plus per-row positions).

use burn::module::{Module, Param};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::config::Qwen2Config;
use crate::linear::{mixed_matmul, to_dtype, Linear};
use crate::rope::{apply_rope, rope_tables};

/// Value written into masked attention scores by [`scaled_dot_product`] (finite, so even a fully
/// masked row would give a uniform distribution, never NaN).
const MASKED: f32 = -1.0e30;

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// Qwen3: RMSNorm over `head_dim` of each query head, before RoPE (`None` for Qwen2).
    pub q_norm: Option<RmsNorm<B>>,
    /// Qwen3: RMSNorm over `head_dim` of each key head, before RoPE (`None` for Qwen2).
    pub k_norm: Option<RmsNorm<B>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `softmax(q·kᵀ/√d + mask)·v` for `x: [b, t, hidden]`. The `rep = heads / kv_heads` query heads
    /// that share a key/value head are folded into the row dimension (`[b, kv, rep·t, d]`), so the
    /// keys and values are never copied `rep` times (same result as HF `repeat_kv`).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &Tensor<B, 4, Bool>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = nh / nkv;
        // `[b, t, n·d]` → `[b, n, t, d]`, through the per-head norm (over `d`) when there is one.
        let heads = |y: Tensor<B, 3>, n: usize, norm: Option<&RmsNorm<B>>| {
            let y = y.reshape([b, t, n, d]);
            let y = match norm {
                Some(norm) => norm.forward(y),
                None => y,
            };
            y.swap_dims(1, 2)
        };
        let q = heads(self.q_proj.forward(x.clone()), nh, self.q_norm.as_ref());
        let k = heads(self.k_proj.forward(x.clone()), nkv, self.k_norm.as_ref());
        let q = apply_rope(q, &rope.0, &rope.1);
        let k = apply_rope(k, &rope.0, &rope.1);
        let v = heads(self.v_proj.forward(x), nkv, None);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let q = q.reshape([b, nkv, rep * t, d]);
        let out = match B::ad_enabled(&q.device()) {
            true => scaled_dot_product(q, k, v, mask),
            false => fused_scaled_dot_product(q, k, v, mask),
        }; // [b, nkv, rep·t, d]
        debug_assert_eq!(out.dims(), [b, nkv, rep * t, d]);
        let out = out
            .reshape([b, nh, t, d])
            .swap_dims(1, 2)
            .reshape([b, t, nh * d]);
        self.o_proj.forward(out)
    }
}

/// `softmax(q·kᵀ/√d, masked)·v` from its parts: the `[b, kv, rows, s]` scores are materialised,
/// masked in f32 and normalised by `softmax`. This is the path autodiff differentiates (Burn 0.21's
/// fused `attention` has no backward of its own).
fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    let d = q.dims()[3];
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt());
    let dtype = scores.dtype();
    let scores = scores.cast(DType::F32).mask_fill(mask.clone(), MASKED);
    softmax(scores, 3).cast(dtype).matmul(v)
}

/// The same `softmax(q·kᵀ/√d, masked)·v` through Burn's fused `attention` op, for passes without a
/// graph (rollout prefill and decode, reference log-probs, critic values, recomputation's forward):
/// burn-flex runs it per (batch, head) tile without materialising the scores (its naive kernel
/// for short rows, its flash kernel with an online softmax for long ones). The scale is passed
/// explicitly, which on cubecl (wgpu, CUDA) selects Burn's decomposed, NaN-safe fallback rather
/// than its flash kernels, whose results cannot be checked on CUDA here (see README). No row is
/// fully masked ([`attention_mask`] lets a padding query see itself), so masking to −∞ inside the
/// op and to [`MASKED`] above give the same numbers. Computed in f32 whatever the inputs are.
fn fused_scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    let d = q.dims()[3];
    let dtype = q.dtype();
    let options = AttentionModuleOptions {
        scale: Some(1.0 / (d as f64).sqrt()),
        softcap: None,
        is_causal: false,
    };
    let out = attention(
        q.cast(DType::F32),
        k.cast(DType::F32),
        v.cast(DType::F32),
        Some(mask.clone()),
        None,
        options,
    );
    out.cast(dtype)
}

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &Tensor<B, 4, Bool>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The seven projection layers of a Qwen2 / Qwen3 block, by their Hugging Face names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The whole causal language model.
#[derive(Module, Debug)]
pub struct Qwen2<B: Backend> {
    /// `[vocab, hidden]` (the Hugging Face layout).
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    pub rope_theta: f64,
    pub head_dim: usize,
    /// With a bf16 output head: multiply it in bf16 (true) or cast it up and compute the logits
    /// in the activations' f32 (false, the default: the head product adds no bf16 rounding).
    pub low_precision_logits: bool,
}

/// Supplies the tensor called `name` (Hugging Face name and `[out, in]` shape) while a model is
/// built; the loader reads it from safetensors, `init_random` draws it.
pub trait TensorSource {
    fn tensor(&mut self, name: &str, hf_shape: &[usize]) -> crate::Result<TensorData>;
}

impl<B: Backend> Qwen2<B> {
    /// Builds the model, asking `src` for every tensor by its Hugging Face name.
    pub fn build(
        config: &Qwen2Config,
        src: &mut dyn TensorSource,
        device: &B::Device,
    ) -> crate::Result<Self> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mut vector = |name: String, n: usize| -> crate::Result<Param<Tensor<B, 1>>> {
            Ok(Param::from_tensor(Tensor::from_data(
                src.tensor(&name, &[n])?,
                device,
            )))
        };
        // Cannot borrow `src` in two closures at once: collect 1-D tensors through `vector`
        // and 2-D through a helper below.
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut norms = Vec::new();
        let mut biases = Vec::new();
        let mut qk_norms = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            norms.push((
                vector(format!("{p}.input_layernorm.weight"), h)?,
                vector(format!("{p}.post_attention_layernorm.weight"), h)?,
            ));
            let mut bias = |n: &str, len: usize, present: bool| {
                present
                    .then(|| vector(format!("{p}.self_attn.{n}.bias"), len))
                    .transpose()
            };
            biases.push([
                bias("q_proj", q_out, c.qkv_bias())?,
                bias("k_proj", kv_out, c.qkv_bias())?,
                bias("v_proj", kv_out, c.qkv_bias())?,
                bias("o_proj", h, c.o_bias())?,
            ]);
            qk_norms.push(match c.qk_norm() {
                true => Some((
                    vector(format!("{p}.self_attn.q_norm.weight"), hd)?,
                    vector(format!("{p}.self_attn.k_norm.weight"), hd)?,
                )),
                false => None,
            });
        }
        let final_norm = vector("model.norm.weight".into(), h)?;
        let matrix = |src: &mut dyn TensorSource, name: &str, out: usize, inp: usize| {
            let data = src.tensor(name, &[out, inp])?;
            // HF stores [out, in]; we multiply x·W with W [in, out]. Transposed here on the host so
            // the stored tensor is contiguous (a transposed view would be copied by every matmul).
            Ok::<_, crate::ModelError>(Tensor::<B, 2>::from_data(transpose_2d(data), device))
        };
        let linear = |src: &mut dyn TensorSource, name: &str, out: usize, inp: usize, bias| {
            Ok::<_, crate::ModelError>(Linear {
                weight: Param::from_tensor(matrix(src, &format!("{name}.weight"), out, inp)?),
                bias,
                lora: None,
            })
        };
        let embed = Tensor::<B, 2>::from_data(
            src.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?,
            device,
        );
        let norm_of = |gamma: Param<Tensor<B, 1>>| {
            let mut n: RmsNorm<B> = RmsNormConfig::new(gamma.dims()[0])
                .with_epsilon(c.rms_norm_eps)
                .init(device);
            n.gamma = gamma;
            n
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let per_layer = norms.into_iter().zip(biases).zip(qk_norms);
        for (i, (((n1, n2), [qb, kb, vb, ob]), qk)) in per_layer.enumerate() {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = match qk {
                Some((qn, kn)) => (Some(norm_of(qn)), Some(norm_of(kn))),
                None => (None, None),
            };
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(src, &format!("{p}.self_attn.q_proj"), q_out, h, qb)?,
                    k_proj: linear(src, &format!("{p}.self_attn.k_proj"), kv_out, h, kb)?,
                    v_proj: linear(src, &format!("{p}.self_attn.v_proj"), kv_out, h, vb)?,
                    o_proj: linear(src, &format!("{p}.self_attn.o_proj"), h, q_out, ob)?,
                    q_norm,
                    k_norm,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                },
                mlp: Mlp {
                    gate_proj: linear(
                        src,
                        &format!("{p}.mlp.gate_proj"),
                        c.intermediate_size,
                        h,
                        None,
                    )?,
                    up_proj: linear(
                        src,
                        &format!("{p}.mlp.up_proj"),
                        c.intermediate_size,
                        h,
                        None,
                    )?,
                    down_proj: linear(
                        src,
                        &format!("{p}.mlp.down_proj"),
                        h,
                        c.intermediate_size,
                        None,
                    )?,
                },
                input_layernorm: norm_of(n1),
                post_attention_layernorm: norm_of(n2),
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(linear(src, "lm_head", c.vocab_size, h, None)?)
        };
        Ok(Self {
            embed_tokens: Param::from_tensor(embed),
            layers,
            norm: norm_of(final_norm),
            lm_head,
            rope_theta: c.rope_theta,
            head_dim: hd,
            low_precision_logits: false,
        })
    }

    /// A model with random weights (normal, std 0.02; norms near 1; small biases), for
    /// benchmarks and tests. Deterministic for a given `seed`.
    pub fn init_random(config: &Qwen2Config, seed: u64, device: &B::Device) -> Self {
        Self::build(config, &mut RandomSource::new(seed), device)
            .expect("random source never fails")
    }

    /// Final hidden states `[b, t, hidden]` (after the last RMSNorm) for `tokens: [b, t]` at
    /// `positions: [b, t]`. `valid: [b, t]` is false at padding. Without a cache the call sees only
    /// these tokens; with one, it attends to everything cached before them and appends to it.
    pub fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        valid: Tensor<B, 2, Bool>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let t = tokens.dims()[1];
        let past = cache.as_ref().map_or(0, |c| c.len());
        let key_valid = match cache.as_mut() {
            Some(c) => c.push_valid(valid),
            None => valid,
        };
        let (rope, mask) = self.context(positions, key_valid, past, t);
        let mut x = self.embed(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(x, &rope, &mask, layer_cache);
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.norm.forward(x)
    }

    /// Input embeddings `[b, t, hidden]` of `tokens: [b, t]`, in the norms' dtype (f32) whatever
    /// the embedding is stored in.
    pub(crate) fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let hidden = self.embed_tokens.dims()[1];
        let x = self
            .embed_tokens
            .val()
            .select(0, tokens.reshape([b * t]))
            .reshape([b, t, hidden]);
        to_dtype(x, self.norm.gamma.dtype())
    }

    /// The rotary tables for `positions: [b, t]` and the attention mask of `t` queries after
    /// `past` cached keys, `key_valid: [b, past + t]`.
    pub(crate) fn context(
        &self,
        positions: Tensor<B, 2, Int>,
        key_valid: Tensor<B, 2, Bool>,
        past: usize,
        t: usize,
    ) -> ((Tensor<B, 4>, Tensor<B, 4>), Tensor<B, 4, Bool>) {
        let rep = self
            .layers
            .first()
            .map_or(1, |l| l.self_attn.n_heads / l.self_attn.n_kv_heads);
        let device = positions.device();
        let mask = attention_mask(key_valid, past, t, rep, &device);
        (rope_tables(positions, self.head_dim, self.rope_theta), mask)
    }

    /// Vocabulary logits `[b, t, vocab]` from hidden states, in the hidden states' dtype. A head
    /// stored in bf16 is cast up for the product (an f32 copy of `[vocab, hidden]` while it runs)
    /// unless `low_precision_logits`, which multiplies in bf16.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        let dtype = hidden.dtype();
        // The head in the dtype the product runs in.
        let head = |w: Tensor<B, 2>| match self.low_precision_logits {
            true => w,
            false => to_dtype(w, dtype),
        };
        match &self.lm_head {
            // `[hidden, vocab]`; Qwen2's output head has no bias.
            Some(lin) => {
                let w = head(lin.weight.val());
                let v = w.dims()[1];
                mixed_matmul(hidden.reshape([b * t, h]), w).reshape([b, t, v])
            }
            None => {
                // (E·hᵀ)ᵀ: the [vocab, hidden] embedding is used in its stored layout, so it is
                // never copied; only the small [hidden, b·t] activations are transposed.
                let w = head(self.embed_tokens.val());
                let v = w.dims()[0];
                let ht = to_dtype(hidden.reshape([b * t, h]).transpose(), w.dtype());
                to_dtype(w.matmul(ht), dtype).transpose().reshape([b, t, v])
            }
        }
    }

    /// `log p(targets[b, j] | ·)` from hidden states `[b, t, hidden]`, computed `chunk` positions
    /// at a time so the full `[b, t, vocab]` logits never exist at once:
    /// `log p = z_target − (m + log Σ exp(z − m))`, `m = max z`, in f32.
    pub fn token_logprobs(
        &self,
        hidden: Tensor<B, 3>,
        targets: Tensor<B, 2, Int>,
        chunk: usize,
    ) -> Tensor<B, 2> {
        let [b, t, h] = hidden.dims();
        let chunk = chunk.max(1);
        let mut parts = Vec::with_capacity(t.div_ceil(chunk));
        let mut start = 0;
        while start < t {
            let end = (start + chunk).min(t);
            parts.push(self.logprobs_of(
                hidden.clone().slice([0..b, start..end, 0..h]),
                targets.clone().slice([0..b, start..end]),
            ));
            start = end;
        }
        Tensor::cat(parts, 1)
    }

    /// `log p(targets)` `[b, t]` from hidden states `[b, t, hidden]` in one piece (f32).
    pub(crate) fn logprobs_of(
        &self,
        hidden: Tensor<B, 3>,
        targets: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let z = self.logits(hidden).cast(DType::F32);
        log_softmax_gather(z, targets.unsqueeze_dim::<3>(2))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every block's projections named in `names` (among [`PROJECTIONS`]), with their full
    /// Hugging Face names (`model.layers.3.mlp.up_proj`), in layer order.
    pub fn projections_mut<S: AsRef<str>>(&mut self, names: &[S]) -> Vec<(String, &mut Linear<B>)> {
        let want = |n: &str| names.iter().any(|t| t.as_ref() == n);
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for (n, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                if want(n.rsplit('.').next().unwrap_or(n)) {
                    out.push((format!("model.layers.{i}.{n}"), lin));
                }
            }
        }
        out
    }
}

/// `z[.., target] − logsumexp(z)` over the last axis; `z: [b, t, v]`, `target: [b, t, 1]` → `[b, t]`.
pub fn log_softmax_gather<B: Backend>(z: Tensor<B, 3>, target: Tensor<B, 3, Int>) -> Tensor<B, 2> {
    let m = z.clone().max_dim(2).detach();
    let lse = (z.clone() - m.clone()).exp().sum_dim(2).log() + m;
    (z.gather(2, target) - lse).squeeze_dim::<2>(2)
}

/// Boolean mask `[b, 1, rep·t, past + t]`, true where attention is forbidden: key `j` is masked for
/// query `i` (absolute index `past + i`) when `j > past + i` (causal) or key `j` is padding and not
/// the query's own position. So a padding query (left padding) sees only itself and no row is
/// fully masked: its output is finite and the same whichever kernel computes it, and no real
/// query ever sees it. The `t` query rows are tiled `rep` times to match the grouped-query layout.
fn attention_mask<B: Backend>(
    key_valid: Tensor<B, 2, Bool>,
    past: usize,
    t: usize,
    rep: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let [b, s] = key_valid.dims();
    let q = Tensor::<B, 1, Int>::arange(past as i64..(past + t) as i64, device).reshape([t, 1]);
    let k = Tensor::<B, 1, Int>::arange(0..s as i64, device).reshape([1, s]);
    let causal = k
        .clone()
        .greater(q.clone())
        .reshape([1, 1, t, s])
        .expand([b, 1, t, s]);
    let other = k.not_equal(q).reshape([1, 1, t, s]).expand([b, 1, t, s]);
    let pad = key_valid
        .bool_not()
        .reshape([b, 1, 1, s])
        .expand([b, 1, t, s])
        .bool_and(other);
    causal.bool_or(pad).repeat_dim(2, rep)
}

/// Transposes a 2-D `[r, c]` tensor's data to `[c, r]` on the host.
fn transpose_2d(data: TensorData) -> TensorData {
    let (r, c) = (data.shape[0], data.shape[1]);
    let src: Vec<f32> = data.iter::<f32>().collect();
    let mut dst = vec![0.0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            dst[j * r + i] = src[i * c + j];
        }
    }
    TensorData::new(dst, [c, r])
}

/// Draws weights for [`Qwen2::init_random`] from a small xorshift generator (no global RNG).
struct RandomSource {
    state: u64,
}

impl RandomSource {
    fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn uniform(&mut self) -> f32 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        ((self.state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// Approximately normal with std `std` (sum of four uniforms, variance-matched).
    fn normal(&mut self, std: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
        s * std * (3.0f32).sqrt()
    }
}

impl TensorSource for RandomSource {
    fn tensor(&mut self, name: &str, hf_shape: &[usize]) -> crate::Result<TensorData> {
        let n: usize = hf_shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + self.normal(0.1)).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| self.normal(0.02)).collect()
        } else {
            (0..n).map(|_| self.normal(0.02)).collect()
        };
        Ok(TensorData::new(values, hf_shape.to_vec()))
    }
}
