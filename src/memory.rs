//! The memory plan: what a training run will hold, estimated from the model geometry and the
//! config before anything is allocated, so a run that cannot fit is refused with the setting to
//! change instead of dying in the middle of step 1.
//!
//! Everything is f32 (4 bytes) except, with `model.base_dtype = "bf16"`, the frozen base under
//! LoRA (2 bytes; the update then also saves each projection's bf16 input, `T·(6·H + I)/2` more
//! f32 slots per layer). Persistent: the frozen base
//! (reference; with LoRA also the actor's and critic's base), the trainable copies (full
//! fine-tuning: actor and critic backbones), adapters, value head, gradients (one per trainable
//! float) and AdamW's two moments. Transient, whichever phase is larger: the rollout (KV cache
//! `2·L·rows·(P+N)·kv_heads·head_dim`, one layer's prefill attention `rows·heads·P²·2`, logits
//! and sampling buffers `rows·V·3`), the no-grad reference/critic passes, or the update of one
//! micro-batch of `T` tokens. The update with `model.recompute` (default) keeps `(L + 3)·T·H`
//! floats (each layer's input, the final hidden states and their gradient) plus one layer's
//! saved activations (`T·(10·H + 4·I)` + `mb·heads·S²·3` for attention) or one log-prob chunk's
//! logits (`mb·chunk·V·2`), whichever is larger; without it, every layer's activations and the
//! logits of every response position. Estimates, checked against measured resident memory by
//! `med-rlvr bench --update` (benches/RESULTS.md).

use qwen2_burn::{LoraSpec, Qwen2Config};
use serde::Serialize;

use crate::config::TrainConfig;

const F32: u64 = 4;

/// `x` as bytes or elements of the plan, `u64::MAX` when it does not fit (the plan then exceeds
/// every limit instead of wrapping around to a small number).
fn saturate(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// Parameters of one set of LoRA adapters: `r·(in + out)` per target layer.
pub fn lora_params(c: &Qwen2Config, spec: &LoraSpec) -> u64 {
    let (h, i) = (c.hidden_size as u128, c.intermediate_size as u128);
    let q = c.num_attention_heads as u128 * c.head_dim as u128;
    let kv = c.num_key_value_heads as u128 * c.head_dim as u128;
    let per_layer: u128 = spec
        .targets
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => h + q,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            "gate_proj" | "up_proj" => h + i,
            "down_proj" => i + h,
            _ => 0,
        })
        .sum();
    saturate(c.num_hidden_layers as u128 * spec.rank as u128 * per_layer)
}

/// Elements of the rollout's KV cache: keys and values of every layer.
pub fn kv_cache_elements(c: &Qwen2Config, rows: usize, capacity: usize) -> u64 {
    saturate(
        2 * [
            c.num_hidden_layers,
            rows,
            capacity,
            c.num_key_value_heads,
            c.head_dim,
        ]
        .iter()
        .map(|&x| x as u128)
        .product::<u128>(),
    )
}

/// What the plan is computed from.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    pub model: Qwen2Config,
    pub lora: Option<LoraSpec>,
    pub critic: bool,
    /// Sequences decoded together (prompts per batch × n).
    pub rollout_rows: usize,
    /// Whether finished rows are refilled (fewer rows than a step's samples): the KV cache then
    /// holds room for a second reply ([`crate::sampler::cache_columns`]).
    pub refills: bool,
    /// Padded tokens per no-grad forward (reference log-probs, critic values).
    pub forward_tokens: usize,
    /// Longest prompt in tokens.
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    pub micro_batch: usize,
    /// Padded tokens per micro-batch instead of `micro_batch` samples (0: off).
    pub micro_batch_tokens: usize,
    pub logprob_chunk: usize,
    /// Layer-by-layer recomputation in the update (`model.recompute`).
    pub recompute: bool,
    /// Bytes per element of the frozen base (4, or 2 with `model.base_dtype = "bf16"`).
    pub base_bytes: u64,
    /// A bf16 head multiplied in f32 (`model.logits_dtype = "f32"`): an f32 copy of it exists
    /// while logits are computed.
    pub f32_logits_over_bf16: bool,
}

impl PlanInputs {
    /// The inputs of a training config for a model geometry and the longest prompt, per device
    /// when the run is data-parallel over `devices` (each generates for its share of prompts).
    pub fn from_config(
        cfg: &TrainConfig,
        model: &Qwen2Config,
        prompt_len: usize,
        devices: usize,
    ) -> Self {
        let prompts = cfg.rollout.prompts_per_step / devices.max(1);
        Self {
            model: model.clone(),
            lora: cfg.lora.spec(),
            critic: cfg.ppo.estimator.uses_critic,
            rollout_rows: match cfg.rollout.generate_batch {
                0 => prompts,
                g => g.min(prompts),
            } * cfg.rollout.n,
            refills: cfg.rollout.generate_batch > 0 && cfg.rollout.generate_batch < prompts,
            forward_tokens: cfg.ppo.forward_tokens,
            prompt_len,
            max_new_tokens: cfg.rollout.max_new_tokens,
            micro_batch: cfg.ppo.micro_batch,
            micro_batch_tokens: cfg.ppo.micro_batch_tokens,
            logprob_chunk: cfg.model.logprob_chunk,
            recompute: cfg.model.recompute,
            base_bytes: match cfg.lora.spec() {
                Some(_) => cfg.model.base_dtype.bytes(),
                None => F32,
            },
            f32_logits_over_bf16: cfg.lora.spec().is_some()
                && cfg.model.base_dtype == crate::config::BaseDtype::Bf16
                && cfg.model.logits_dtype == crate::config::BaseDtype::F32,
        }
    }
}

/// One line of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanItem {
    pub what: String,
    pub bytes: u64,
    /// `persistent`, `rollout`, `experience` or `update`.
    pub phase: &'static str,
    /// The setting that shrinks it.
    pub knob: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub items: Vec<PlanItem>,
    pub persistent: u64,
    pub rollout: u64,
    /// The no-grad reference/critic passes.
    pub experience: u64,
    pub update: u64,
    /// `persistent + max(rollout, experience, update)`.
    pub peak: u64,
    /// Trainable floats (what gradients and optimizer state scale with).
    pub trainable: u64,
}

impl MemoryPlan {
    pub fn new(p: &PlanInputs) -> Self {
        let c = &p.model;
        let base = c.num_parameters() as u128;
        let h = c.hidden_size as u128;
        let head = h; // value head [hidden, 1]
        let mut items = Vec::new();
        let mut add = |what: String, elems: u128, phase, knob| {
            items.push(PlanItem {
                what,
                bytes: saturate(elems * F32 as u128),
                phase,
                knob,
            })
        };
        // Elements of the frozen base, counted in f32 slots (bf16 storage: half as many).
        let base_slots = base * p.base_bytes as u128 / F32 as u128;
        let trainable = match &p.lora {
            Some(spec) => {
                let a = lora_params(c, spec) as u128;
                let sets = if p.critic { 2 } else { 1 };
                add(
                    format!(
                        "base weights ({}; frozen; shared by actor, critic, reference)",
                        if p.base_bytes == 2 { "bf16" } else { "f32" }
                    ),
                    base_slots,
                    "persistent",
                    "a smaller model",
                );
                add(
                    format!("LoRA adapters (rank {}, {sets} set(s))", spec.rank),
                    a * sets,
                    "persistent",
                    "lora.rank, lora.targets",
                );
                a * sets + if p.critic { head } else { 0 }
            }
            None => {
                add(
                    "reference weights (frozen)".into(),
                    base,
                    "persistent",
                    "lora.rank > 0 (shares one base)",
                );
                add(
                    "actor weights (trainable)".into(),
                    base,
                    "persistent",
                    "lora.rank > 0",
                );
                if p.critic {
                    add(
                        "critic backbone (trainable)".into(),
                        base,
                        "persistent",
                        "lora.rank > 0, or a critic-free ppo.estimator",
                    );
                }
                base * if p.critic { 2 } else { 1 } + if p.critic { head } else { 0 }
            }
        };
        if p.critic {
            add("value head".into(), head, "persistent", "-");
        }
        let knob = if p.lora.is_some() {
            "lora.rank, lora.targets"
        } else {
            "lora.rank > 0"
        };
        add("gradients".into(), trainable, "persistent", knob);
        add(
            "AdamW moments (2 per trainable float)".into(),
            2 * trainable,
            "persistent",
            knob,
        );
        let (rows, pl, n) = (
            p.rollout_rows as u128,
            p.prompt_len as u128,
            p.max_new_tokens as u128,
        );
        let (heads, v) = (c.num_attention_heads as u128, c.vocab_size as u128);
        let columns = crate::sampler::cache_columns(p.prompt_len, p.max_new_tokens, p.refills);
        add(
            format!("rollout KV cache ({rows} rows × {columns} tokens)"),
            kv_cache_elements(c, p.rollout_rows, columns) as u128,
            "rollout",
            "rollout.generate_batch, rollout.max_new_tokens",
        );
        add(
            "rollout prefill attention (one layer)".into(),
            rows * heads * pl * pl * 2,
            "rollout",
            "rollout.generate_batch",
        );
        // The next-token choice on the device: logits, log-softmax, probabilities, their product
        // (entropy), cumulative sums, the comparison with u (top-p adds a sorted copy).
        add(
            "rollout logits and sampling buffers".into(),
            rows * v * 6,
            "rollout",
            "rollout.generate_batch",
        );
        // No-grad passes: at most `forward_tokens` padded tokens; one layer's transients (norm,
        // q/k/v/o, gate/up/act/down, residual) plus its attention scores, the final hidden
        // states and one log-prob chunk's logits. (flex's fused attention never materialises the
        // scores; cubecl's decomposed fallback, which the GPU runs, does: they stay counted.)
        let (ft, s) = ((p.forward_tokens as u128).max(pl + n), pl + n);
        let fr = ft / s.max(1);
        add(
            format!("reference/critic forward ({ft} tokens, ≈)"),
            ft * (8 * h + 4 * c.intermediate_size as u128)
                + fr * heads * s * s * 2
                + fr * (p.logprob_chunk as u128).min(n.max(1)) * v * 3,
            "experience",
            "ppo.forward_tokens",
        );
        // A micro-batch: `micro_batch` sequences of the longest length, or under a token budget
        // as many of them as fit (at least one).
        let s = pl + n;
        let (mb, t) = match p.micro_batch_tokens as u128 {
            0 => (p.micro_batch as u128, p.micro_batch as u128 * s),
            budget => ((budget / s.max(1)).max(1), (budget / s.max(1)).max(1) * s),
        };
        let layers = c.num_hidden_layers as u128;
        let i = c.intermediate_size as u128;
        // A bf16 base also keeps each projection's bf16 input for the backward: q, k, v, o, gate
        // and up read H-wide rows, down an I-wide one; in f32 slots, T·(6·H + I)/2.
        let casts = if p.base_bytes < F32 {
            (6 * h + i) / 2
        } else {
            0
        };
        // What one layer's forward saves for its backward: its norms, q/k/v/o, gate/up/act/down
        // and residuals, and the attention scores and probabilities.
        let one_layer = t * (10 * h + 4 * i + casts) + mb * heads * s * s * 3;
        // Logits of `positions` response positions under autodiff: z and exp(z − m), which the
        // log-softmax's backward keeps (measured on flex: 2.0 × `[mb, positions, V]` floats).
        let logits = |positions: u128| mb * positions * v * 2;
        let chunk = (p.logprob_chunk as u128).min(n.max(1));
        // The actor and the critic update one after the other: one graph at a time.
        if p.recompute {
            add(
                format!(
                    "update layer inputs kept ({} × micro-batch {mb} × {s} tokens)",
                    layers + 3
                ),
                (layers + 3) * t * h,
                "update",
                "ppo.micro_batch",
            );
            add(
                "update: one layer recomputed, or one log-prob chunk (≈)".into(),
                one_layer.max(logits(chunk)),
                "update",
                "ppo.micro_batch, model.logprob_chunk",
            );
        } else {
            add(
                format!("update activations (micro-batch {mb} × {s} tokens, ≈)"),
                layers * one_layer,
                "update",
                "model.recompute = true, ppo.micro_batch",
            );
            add(
                format!("update log-prob logits (all {n} positions: the graph keeps every chunk)"),
                logits(n),
                "update",
                "model.recompute = true",
            );
        }
        if p.f32_logits_over_bf16 {
            for phase in ["rollout", "experience", "update"] {
                add(
                    format!("f32 copy of the bf16 LM head while logits run ({phase})"),
                    v * h,
                    phase,
                    "model.logits_dtype = \"bf16\"",
                );
            }
        }
        let sum = |ph: &str| {
            items
                .iter()
                .filter(|i| i.phase == ph)
                .fold(0u64, |sum, i| sum.saturating_add(i.bytes))
        };
        let (persistent, rollout, experience, update) = (
            sum("persistent"),
            sum("rollout"),
            sum("experience"),
            sum("update"),
        );
        Self {
            persistent,
            rollout,
            experience,
            update,
            peak: persistent.saturating_add(rollout.max(experience).max(update)),
            trainable: saturate(trainable),
            items,
        }
    }

    /// The plan as a table.
    pub fn render(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut s = format!(
            "{:<62} {:>10}  {:<10} {}\n",
            "memory plan", "GiB", "phase", "to shrink"
        );
        for i in &self.items {
            s.push_str(&format!(
                "{:<62} {:>10.3}  {:<10} {}\n",
                i.what,
                gib(i.bytes),
                i.phase,
                i.knob
            ));
        }
        s.push_str(&format!(
            "{:<62} {:>10.3}  (persistent {:.3} + max(rollout {:.3}, experience {:.3}, update {:.3}))\n",
            "peak",
            gib(self.peak),
            gib(self.persistent),
            gib(self.rollout),
            gib(self.experience),
            gib(self.update)
        ));
        s
    }

    /// An error naming the largest items and their settings when the peak exceeds `limit` bytes.
    pub fn check(&self, limit: u64) -> Result<(), String> {
        if self.peak <= limit {
            return Ok(());
        }
        let mut big: Vec<&PlanItem> = self.items.iter().collect();
        big.sort_by_key(|i| std::cmp::Reverse(i.bytes));
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        Err(format!(
            "the plan needs {:.2} GiB but the limit is {:.2} GiB; largest: {}",
            gib(self.peak),
            gib(limit),
            big.iter()
                .take(3)
                .map(|i| format!("{} {:.2} GiB (change {})", i.what, gib(i.bytes), i.knob))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }
}

/// The largest `x` in `1..=max` with `fits(x)`, for a `fits` that holds up to some point and not
/// after (as the peak grows with a batch size); `None` when even 1 does not fit.
pub fn largest_fitting(max: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if max == 0 || !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}
