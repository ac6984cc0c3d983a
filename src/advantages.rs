//! The math between rewards and the loss: KL estimators, KL-shaped token rewards, GAE, return-to-go,
//! batch moments and whitening. Small pure functions on `[batch][response_len]` grids with a
//! right-padded action mask (1 = response token), in f64; OpenRLHF v0.5.9 semantics
//! (`tests/fixtures/ppo_math_reference.json` pins the numbers). The advantage estimators that
//! combine them are in `estimator.rs`.

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

/// Whitening: `(A − mean) / √max(var, 1e-8)` with the batch's mean and population variance over
/// valid tokens (from [`masked_moments`], or all-reduced over replicas), applied to every position
/// as OpenRLHF does (padding is masked in the loss).
pub fn whiten(x: &Grid, mean: f64, var: f64) -> Grid {
    let rstd = 1.0 / var.max(1e-8).sqrt();
    x.iter()
        .map(|row| row.iter().map(|a| (a - mean) * rstd).collect())
        .collect()
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
