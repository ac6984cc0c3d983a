//! Advantage estimators, looked up by name in one table ([`ESTIMATORS`], as verl's `core_algos`
//! registers them). An estimator is the baseline each sequence reward gets within its prompt's
//! group, whether it trains a critic (GAE) and whether it whitens; adding one is one entry in the
//! table (and its baseline function). [`estimate`] is the whole path from rewards to advantages:
//! the trainer runs it with batch moments over every replica, the tests with local ones.

use anyhow::{anyhow, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::advantages::{self as adv, Grid};

/// One advantage estimator (an entry of [`ESTIMATORS`]; compared by name).
#[derive(Clone, Copy)]
pub struct Estimator {
    /// The name in `ppo.estimator`.
    pub name: &'static str,
    /// The baseline of sequence reward `r` given its group's rewards (`group` contains `r`; the
    /// groups are `rollout.n` consecutive samples of one prompt).
    pub baseline: fn(r: f64, group: &[f64]) -> f64,
    /// GAE over the critic's values (else the return-to-go of the token rewards).
    pub uses_critic: bool,
    /// The baseline is computed over a group of samples of one prompt, so it needs
    /// `rollout.n ≥ 2`.
    pub needs_groups: bool,
    /// The advantages are whitened over the whole batch.
    pub whitens: bool,
}

/// Every estimator `ppo.estimator` may name; the first is the default.
pub const ESTIMATORS: &[Estimator] = &[
    // PPO with a critic (the paper): GAE over KL-shaped token rewards, whitened.
    Estimator {
        name: "gae",
        baseline: unchanged,
        uses_critic: true,
        needs_groups: false,
        whitens: true,
    },
    // GRPO (Shao et al. 2024).
    Estimator {
        name: "grpo",
        baseline: group_standardised,
        uses_critic: false,
        needs_groups: true,
        whitens: false,
    },
    // Dr. GRPO (Liu et al. 2025): GRPO without the std.
    Estimator {
        name: "dr_grpo",
        baseline: group_centred,
        uses_critic: false,
        needs_groups: true,
        whitens: false,
    },
    // RLOO (Ahmadian et al. 2024).
    Estimator {
        name: "rloo",
        baseline: leave_one_out,
        uses_critic: false,
        needs_groups: true,
        whitens: false,
    },
    // REINFORCE++ (Hu 2025): return-to-go of the KL-shaped rewards, whitened over the batch.
    Estimator {
        name: "reinforce_pp",
        baseline: unchanged,
        uses_critic: false,
        needs_groups: false,
        whitens: true,
    },
    // REINFORCE++ with the group mean as baseline.
    Estimator {
        name: "reinforce_pp_baseline",
        baseline: group_centred,
        uses_critic: false,
        needs_groups: true,
        whitens: true,
    },
];

/// `R` unchanged.
fn unchanged(r: f64, _group: &[f64]) -> f64 {
    r
}

/// `R − μ_g`.
fn group_centred(r: f64, group: &[f64]) -> f64 {
    r - group.iter().sum::<f64>() / group.len() as f64
}

/// `(R − μ_g)/(σ_g + 1e-9)`, `σ_g` the unbiased std of the group (0 for a group of one).
fn group_standardised(r: f64, group: &[f64]) -> f64 {
    let k = group.len() as f64;
    let mean = group.iter().sum::<f64>() / k;
    let std = if group.len() > 1 {
        (group.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt()
    } else {
        0.0
    };
    (r - mean) / (std + 1e-9)
}

/// `R − (Σ_g R_j − R)/(|g| − 1)`: the mean of the other samples of the prompt (`R` alone).
fn leave_one_out(r: f64, group: &[f64]) -> f64 {
    if group.len() > 1 {
        r - (group.iter().sum::<f64>() - r) / (group.len() as f64 - 1.0)
    } else {
        r
    }
}

impl Estimator {
    /// The estimator called `name`, or an error listing every name.
    pub fn by_name(name: &str) -> Result<Estimator, String> {
        ESTIMATORS
            .iter()
            .find(|e| e.name == name)
            .copied()
            .ok_or_else(|| {
                let names: Vec<&str> = ESTIMATORS.iter().map(|e| e.name).collect();
                format!(
                    "unknown estimator {name:?}, expected one of: {}",
                    names.join(", ")
                )
            })
    }
}

/// The paper's: PPO with a critic (`gae`).
impl Default for Estimator {
    fn default() -> Self {
        ESTIMATORS[0]
    }
}

impl PartialEq for Estimator {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Estimator {}

impl std::fmt::Debug for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.name)
    }
}

impl Serialize for Estimator {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

impl<'de> Deserialize<'de> for Estimator {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Estimator::by_name(&name).map_err(serde::de::Error::custom)
    }
}

/// Each sequence reward after its estimator's baseline, on groups of `n` consecutive samples.
pub fn shape_sequence_rewards(rewards: &[f64], n: usize, est: Estimator) -> Vec<f64> {
    rewards
        .chunks(n.max(1))
        .flat_map(|g| g.iter().map(move |&r| (est.baseline)(r, g)))
        .collect()
}

/// What an estimate reads: `[batch][len]` grids over the rollout's responses.
pub struct Inputs<'a> {
    /// Each sample's sequence reward `R`, groups of `group_size` consecutive samples per prompt.
    pub rewards: &'a [f64],
    pub group_size: usize,
    /// The per-token KL estimate (`advantages::kl`) and its coefficient β in the reward (0 when
    /// the KL is a loss term instead).
    pub kl: &'a Grid,
    pub beta: f64,
    /// 1 on response tokens (right-padded).
    pub mask: &'a Grid,
    /// The critic's values `V_t` (estimators with a critic).
    pub values: Option<&'a Grid>,
    pub gamma: f64,
    pub lambda: f64,
}

/// Advantages, returns, and the share of the return variance the critic explains (0 without one).
#[derive(Debug)]
pub struct Advantages {
    pub advantages: Grid,
    pub returns: Grid,
    pub explained_var: f64,
}

/// The estimator's advantages:
/// - sequence rewards after the baseline, `R'_i = baseline(R_i, group)`;
/// - token rewards `r_t = −β·kl_t`, plus `R'_i` at the last response token;
/// - with a critic, GAE: `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = δ_t + γλ·A_{t+1}`, `G_t = A_t + V_t`,
///   and the explained variance `1 − Var[G − V] / Var[G]`; without, `A_t = G_t = Σ_{s≥t} γ^{s−t}·r_s`;
/// - whitened when the estimator says so: `(A − mean) / √max(var, 1e-8)`.
///
/// `moments(x)` gives the mean and population variance of `x` over the valid tokens of the whole
/// batch: `advantages::masked_moments` on one device, all-reduced across data-parallel replicas.
pub fn estimate(
    est: Estimator,
    x: &Inputs,
    mut moments: impl FnMut(&Grid) -> Result<(f64, f64)>,
) -> Result<Advantages> {
    let shaped = shape_sequence_rewards(x.rewards, x.group_size, est);
    let rewards = adv::token_rewards(&shaped, x.kl, x.mask, x.beta);
    let (advantages, returns, explained_var) = if est.uses_critic {
        let values = x
            .values
            .ok_or_else(|| anyhow!("estimator {:?} needs the critic's values", est.name))?;
        let (a, g) = adv::gae(&rewards, values, x.mask, x.gamma, x.lambda);
        let (_, var_g) = moments(&g)?;
        let (_, var_d) = moments(&adv::residuals(values, &g))?;
        (a, g, adv::explained_variance(var_g, var_d))
    } else {
        let g = adv::returns_to_go(&rewards, x.mask, x.gamma);
        (g.clone(), g, 0.0)
    };
    let advantages = if est.whitens {
        let (mean, var) = moments(&advantages)?;
        adv::whiten(&advantages, mean, var)
    } else {
        advantages
    };
    Ok(Advantages {
        advantages,
        returns,
        explained_var,
    })
}

/// [`estimate`] on one device: batch moments from `advantages::masked_moments`.
pub fn estimate_local(est: Estimator, x: &Inputs) -> Result<Advantages> {
    estimate(est, x, |g| Ok(adv::masked_moments(g, x.mask)))
}
