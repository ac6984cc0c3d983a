//! The PPO losses on Burn tensors (so their gradients come from autodiff). All inputs are
//! `[batch, len]` with a right-padded action mask `m` (1 = response token).

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over the valid tokens of each sequence, then mean over sequences (OpenRLHF v0.5.9).
    SeqMeanTokenMean,
    /// Mean over all valid tokens of the batch (current frameworks).
    TokenMean,
}

/// `agg(x, m)`: `mean_i (Σ_t x·m / Σ_t m)` or `Σ x·m / Σ m` (empty rows count as zero).
pub fn aggregate<B: Backend>(
    x: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    agg: Aggregation,
) -> Tensor<B, 1> {
    let xm = x * mask.clone();
    match agg {
        Aggregation::SeqMeanTokenMean => {
            let per_row = xm.sum_dim(1) / mask.sum_dim(1).clamp_min(1.0);
            per_row.mean().reshape([1])
        }
        Aggregation::TokenMean => (xm.sum() / mask.sum().clamp_min(1.0)).reshape([1]),
    }
}

/// Where the importance ratio of the clipped surrogate is taken (`ppo.ratio_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RatioLevel {
    /// PPO's per-token ratio `ρ_t = π(y_t)/π_old(y_t)`.
    #[default]
    Token,
    /// GSPO (Zheng et al. 2025, eq. 5–7): one ratio per sequence, the geometric mean of its token
    /// ratios `s_i = (π(y_i)/π_old(y_i))^(1/|y_i|) = exp(mean_t log ρ_t)`, clipped as one; its
    /// gradient is `s_i·mean_t ∇log π(y_t)`. Meant for one advantage per sequence (GRPO-style).
    Sequence,
    /// GSPO-token (eq. 13): `s_{i,t} = sg[s_i]·π(y_t)/sg[π(y_t)]`, the value of `s_i` with token
    /// `t`'s own gradient, so per-token advantages are allowed; with one advantage per sequence
    /// it equals [`RatioLevel::Sequence`] in value and gradient (verl's "gspo").
    SequenceToken,
}

/// The clipped surrogate's settings: `ppo.eps_low`, `ppo.eps_high` (DAPO's clip-higher when
/// larger), `ppo.ratio_level` and `ppo.loss_agg`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surrogate {
    pub eps_low: f64,
    pub eps_high: f64,
    pub level: RatioLevel,
    pub agg: Aggregation,
}

impl Surrogate {
    /// PPO's per-token surrogate.
    pub fn token(eps_low: f64, eps_high: f64, agg: Aggregation) -> Self {
        Surrogate {
            eps_low,
            eps_high,
            level: RatioLevel::Token,
            agg,
        }
    }
}

/// `log ρ` per token, at `level`: `log π − log π_old` ([`RatioLevel::Token`]); the masked row mean
/// `ℓ_i = Σ_t (log π − log π_old)·m / Σ_t m` on every token ([`RatioLevel::Sequence`]); or
/// `log π − sg[log π] + sg[ℓ_i]` ([`RatioLevel::SequenceToken`]). Clamped to ±[`MAX_LOG_RATIO`].
pub fn log_ratio<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    level: RatioLevel,
) -> Tensor<B, 2> {
    let token = logp.clone() - old_logp;
    let log_ratio = match level {
        RatioLevel::Token => token,
        RatioLevel::Sequence | RatioLevel::SequenceToken => {
            let [b, t] = token.dims();
            let seq = (token * mask.clone()).sum_dim(1) / mask.sum_dim(1).clamp_min(1.0);
            match level {
                RatioLevel::Sequence => seq.expand([b, t]),
                _ => logp.clone() - logp.detach() + seq.detach().expand([b, t]),
            }
        }
    };
    log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
}

/// Clipped surrogate: `ρ = exp(log_ratio)` at the surrogate's level ([`log_ratio`]), per token
/// `−w·min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)`, aggregated, with `w` the truncated importance
/// weights ([`truncated_is_weights`], constants) or 1. Returns the loss and the clip fraction
/// (share of valid tokens where the clipped branch was taken).
pub fn policy_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    advantages: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    s: &Surrogate,
    is_weights: Option<Tensor<B, 2>>,
) -> (Tensor<B, 1>, f64) {
    let ratio = log_ratio(logp, old_logp, mask.clone(), s.level).exp();
    let surr1 = ratio.clone() * advantages.clone();
    let surr2 = ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high) * advantages;
    let clipped = surr2.clone().lower(surr1.clone()).float() * mask.clone();
    let clip_frac =
        (clipped.sum().into_scalar_f64()) / mask.clone().sum().into_scalar_f64().max(1.0);
    let mut loss = surr1.min_pair(surr2).neg();
    if let Some(w) = is_weights {
        loss = loss * w;
    }
    (aggregate(loss, mask, s.agg), clip_frac)
}

/// Truncated importance sampling (TIS, Yao et al. 2025; verl's `rollout_is`): per token
/// `w = min(exp(log π_old − log π_rollout), cap)`, where `π_old` is the trainer's log-prob at the
/// rollout weights and `π_rollout` the sampler's. It corrects the policy gradient for the
/// sampler and the trainer computing different numbers; `w ≡ 1` when they agree.
pub fn truncated_is_weights(old_logp: &[f64], rollout_logp: &[f64], cap: f64) -> Vec<f64> {
    old_logp
        .iter()
        .zip(rollout_logp)
        .map(|(o, r)| (o - r).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp().min(cap))
        .collect()
}

/// `log π − log π_old` is clamped to this before `exp` so a stale sample cannot overflow.
pub const MAX_LOG_RATIO: f64 = 20.0;

/// Clipped value loss: `½·agg(max((V_clip − G)², (V − G)²))`, `V_clip = V_old + clip(V − V_old, ±c)`;
/// without `clip`, `½·agg((V − G)²)`.
pub fn value_loss<B: Backend>(
    values: Tensor<B, 2>,
    old_values: Tensor<B, 2>,
    returns: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    clip: Option<f64>,
    agg: Aggregation,
) -> Tensor<B, 1> {
    let plain = (values.clone() - returns.clone()).powi_scalar(2);
    let per_token = match clip {
        Some(c) => {
            let clipped = old_values.clone() + (values - old_values).clamp(-c, c);
            (clipped - returns).powi_scalar(2).max_pair(plain)
        }
        None => plain,
    };
    aggregate(per_token, mask, agg).mul_scalar(0.5)
}

/// The k3 KL *loss* (GRPO style): `agg(exp(log π_ref − log π) − 1 − (log π_ref − log π))`, with
/// gradients flowing into `log π`.
pub fn kl_loss<B: Backend>(
    logp: Tensor<B, 2>,
    ref_logp: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    agg: Aggregation,
) -> Tensor<B, 1> {
    let d = (ref_logp - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO);
    let k3 = d.clone().exp() - 1.0 - d;
    aggregate(k3, mask, agg)
}

trait ScalarF64 {
    fn into_scalar_f64(self) -> f64;
}

impl<B: Backend> ScalarF64 for Tensor<B, 1> {
    fn into_scalar_f64(self) -> f64 {
        self.into_data().iter::<f64>().next().unwrap_or(0.0)
    }
}
