//! Everything between rewards and the loss: KL estimators, KL-shaped token rewards, GAE, advantage
//! whitening, and the critic-free estimators. Small pure functions on `[batch][response_len]` grids
//! with a right-padded action mask (1 = response token), in f64; OpenRLHF v0.5.9 semantics
//! (`tests/fixtures/openrlhf_v0.5.9_ppo_math.json` pins the numbers).

use serde::{Deserialize, Serialize};

/// `[batch][len]` values.
pub type Grid = Vec<Vec<f64>>;

/// Which KL estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `k1 = d`, with `d = log π − log π_ref`.
    K1,
    /// `k2 = d² / 2`.
    K2,
    /// `k3 = exp(−d) − 1 + d` (non-negative, unbiased for KL(π‖π_ref) under π).
    K3,
}

/// Per-token KL estimate times the mask: `d_t = (log π_t − log π_ref,t)·m_t`, then k1/k2/k3 of `d_t`.
pub fn kl(logp: &Grid, ref_logp: &Grid, mask: &Grid, est: KlEstimator) -> Grid {
    map3(logp, ref_logp, mask, |a, b, m| {
        let d = (a - b) * m;
        match est {
            KlEstimator::K1 => d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => (-d).exp() - 1.0 + d,
        }
    })
}

/// Index of the last response token of each row (the mask is right-padded).
pub fn last_index(mask: &Grid) -> Vec<usize> {
    mask.iter()
        .map(|row| row.iter().rposition(|&m| m > 0.0).unwrap_or(0))
        .collect()
}

/// Token rewards: `r_t = −β·kl_t`, plus the sequence reward `R` at the last response token.
pub fn token_rewards(seq_rewards: &[f64], kl: &Grid, mask: &Grid, beta: f64) -> Grid {
    let last = last_index(mask);
    kl.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut r: Vec<f64> = row.iter().map(|&k| -beta * k).collect();
            r[last[i]] += seq_rewards[i];
            r
        })
        .collect()
}

/// Generalised advantage estimation, values and rewards masked first:
/// `δ_t = r_t + γ·V_{t+1} − V_t` (V past the end = 0), `A_t = δ_t + γλ·A_{t+1}`, `G_t = A_t + V_t`.
/// Returns `(advantages, returns)`.
pub fn gae(rewards: &Grid, values: &Grid, mask: &Grid, gamma: f64, lambda: f64) -> (Grid, Grid) {
    let mut adv = Vec::with_capacity(rewards.len());
    let mut ret = Vec::with_capacity(rewards.len());
    for ((r, v), m) in rewards.iter().zip(values).zip(mask) {
        let n = r.len();
        let v: Vec<f64> = v.iter().zip(m).map(|(a, b)| a * b).collect();
        let r: Vec<f64> = r.iter().zip(m).map(|(a, b)| a * b).collect();
        let mut a = vec![0.0; n];
        let mut last = 0.0;
        for t in (0..n).rev() {
            let next = if t + 1 < n { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            last = delta + gamma * lambda * last;
            a[t] = last;
        }
        ret.push(a.iter().zip(&v).map(|(a, v)| a + v).collect());
        adv.push(a);
    }
    (adv, ret)
}

/// Return-to-go `G_t = Σ_{s≥t} γ^{s−t}·r_s` over masked rewards (the critic-free advantage).
pub fn returns_to_go(rewards: &Grid, mask: &Grid, gamma: f64) -> Grid {
    rewards
        .iter()
        .zip(mask)
        .map(|(r, m)| {
            let mut g = vec![0.0; r.len()];
            let mut acc = 0.0;
            for t in (0..r.len()).rev() {
                acc = r[t] * m[t] + gamma * acc;
                g[t] = acc;
            }
            g
        })
        .collect()
}

/// Mean and population variance over the valid tokens of the whole batch: the mean from
/// [`masked_sum`], then the variance from [`masked_squared_deviation`] (two passes; the
/// data-parallel trainer all-reduces each sum between the passes).
pub fn masked_moments(x: &Grid, mask: &Grid) -> (f64, f64) {
    let (s, n) = masked_sum(x, mask);
    let mean = s / n.max(1.0);
    (mean, masked_squared_deviation(x, mask, mean) / n.max(1.0))
}

/// `(Σ m·x, Σ m)` over the batch.
pub fn masked_sum(x: &Grid, mask: &Grid) -> (f64, f64) {
    let (mut s, mut n) = (0.0, 0.0);
    for (row, m) in x.iter().zip(mask) {
        for (a, b) in row.iter().zip(m) {
            s += a * b;
            n += b;
        }
    }
    (s, n)
}

/// `Σ m·(x − mean)²` over the batch.
pub fn masked_squared_deviation(x: &Grid, mask: &Grid, mean: f64) -> f64 {
    let mut v = 0.0;
    for (row, m) in x.iter().zip(mask) {
        for (a, b) in row.iter().zip(m) {
            v += (a - mean).powi(2) * b;
        }
    }
    v
}

/// Whitening: `(A − mean) / √max(var, 1e-8)`, mean and population variance over the valid tokens
/// of the batch (applied to every position, as OpenRLHF does; padding is masked in the loss).
pub fn whiten(x: &Grid, mask: &Grid) -> Grid {
    let (mean, var) = masked_moments(x, mask);
    whiten_with(x, mean, var)
}

/// Whitening with given (e.g. globally all-reduced) moments.
pub fn whiten_with(x: &Grid, mean: f64, var: f64) -> Grid {
    let rstd = 1.0 / var.max(1e-8).sqrt();
    x.iter()
        .map(|row| row.iter().map(|a| (a - mean) * rstd).collect())
        .collect()
}

/// Advantage estimators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// PPO with a critic: GAE, then whitening.
    Gae,
    /// `(R_i − mean_g) / (std_g + 1e-9)`, unbiased std over the group.
    Grpo,
    /// `R_i − mean_g` (no std).
    DrGrpo,
    /// `R_i − mean of the other samples of the prompt`.
    Rloo,
    /// Return-to-go of the KL-shaped rewards, whitened over the batch.
    ReinforcePp,
    /// `R_i − mean_g`, then return-to-go, whitened over the batch.
    ReinforcePpBaseline,
}

impl Estimator {
    /// Whether it trains a critic (GAE only).
    pub fn uses_critic(self) -> bool {
        self == Estimator::Gae
    }

    /// Whether its baseline is computed over a group of samples of one prompt, so it needs
    /// `rollout.n ≥ 2` (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline).
    pub fn needs_groups(self) -> bool {
        matches!(
            self,
            Estimator::Grpo | Estimator::DrGrpo | Estimator::Rloo | Estimator::ReinforcePpBaseline
        )
    }

    /// Whether the advantages are whitened over the whole batch (GAE and the REINFORCE++ pair).
    pub fn whitens(self) -> bool {
        matches!(
            self,
            Estimator::Gae | Estimator::ReinforcePp | Estimator::ReinforcePpBaseline
        )
    }
}

/// The sequence-reward shaping of a critic-free estimator, on groups of `n` consecutive samples of
/// one prompt:
/// - `grpo`: `(R_i − μ)/(σ + 1e-9)`, σ the unbiased std of the group;
/// - `dr_grpo`, `reinforce_pp_baseline`: `R_i − μ`;
/// - `rloo`: `R_i − (Σ_j R_j − R_i)/(n − 1)`;
/// - `reinforce_pp`, `gae`: `R_i` unchanged.
pub fn shape_sequence_rewards(rewards: &[f64], n: usize, est: Estimator) -> Vec<f64> {
    let n = n.max(1);
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(n) {
        let k = g.len() as f64;
        let mean = g.iter().sum::<f64>() / k;
        let std = if g.len() > 1 {
            (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt()
        } else {
            0.0
        };
        for &r in g {
            out.push(match est {
                Estimator::Grpo => (r - mean) / (std + 1e-9),
                Estimator::DrGrpo | Estimator::ReinforcePpBaseline => r - mean,
                Estimator::Rloo if g.len() > 1 => r - (g.iter().sum::<f64>() - r) / (k - 1.0),
                Estimator::Rloo | Estimator::ReinforcePp | Estimator::Gae => r,
            });
        }
    }
    out
}

/// Critic-free advantages: shape the sequence rewards, add the KL-shaped token rewards
/// (`−β·kl_t`, β = 0 when the KL is a loss term instead), take the return-to-go with γ, and whiten
/// for `reinforce_pp` and `reinforce_pp_baseline`.
pub fn critic_free_advantages(
    seq_rewards: &[f64],
    n: usize,
    kl: &Grid,
    mask: &Grid,
    beta: f64,
    gamma: f64,
    est: Estimator,
) -> Grid {
    let g = critic_free_returns(seq_rewards, n, kl, mask, beta, gamma, est);
    if est.whitens() {
        whiten(&g, mask)
    } else {
        g
    }
}

/// [`critic_free_advantages`] before the batch whitening (the data-parallel trainer whitens
/// with statistics over every device's rows).
pub fn critic_free_returns(
    seq_rewards: &[f64],
    n: usize,
    kl: &Grid,
    mask: &Grid,
    beta: f64,
    gamma: f64,
    est: Estimator,
) -> Grid {
    let shaped = shape_sequence_rewards(seq_rewards, n, est);
    let rewards = token_rewards(&shaped, kl, mask, beta);
    returns_to_go(&rewards, mask, gamma)
}

/// `G − V`, element-wise.
pub fn residuals(values: &Grid, returns: &Grid) -> Grid {
    returns
        .iter()
        .zip(values)
        .map(|(g, v)| g.iter().zip(v).map(|(a, b)| a - b).collect())
        .collect()
}

/// Fraction of the return variance the critic explains, `1 − Var[G − V] / Var[G]` over valid
/// tokens, from the two variances (0 when `Var[G]` is 0).
pub fn explained_variance(var_returns: f64, var_residuals: f64) -> f64 {
    if var_returns <= 0.0 {
        0.0
    } else {
        1.0 - var_residuals / var_returns
    }
}

fn map3(a: &Grid, b: &Grid, c: &Grid, f: impl Fn(f64, f64, f64) -> f64) -> Grid {
    a.iter()
        .zip(b)
        .zip(c)
        .map(|((x, y), z)| {
            x.iter()
                .zip(y)
                .zip(z)
                .map(|((p, q), r)| f(*p, *q, *r))
                .collect()
        })
        .collect()
}
