//! Phase 4 of a PPO step: KL-shaped rewards, advantages and returns over the rollout batch
//! ([`Experience`]s). The estimator is `crate::estimator::estimate` (the function the tests check
//! against verl and OpenRLHF); batch statistics go through `World` (global over replicas).

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use super::Trainer;
use crate::advantages::{self as adv, Grid, KlEstimator};
use crate::estimator::{self, Inputs};
use crate::experience::{pad_rows, Evaluated, Experience};

/// What the advantage phase reports besides the experiences.
pub(super) struct AdvantageStats {
    /// Mean k1 KL(π_old ‖ π_ref) per token, over every replica's tokens.
    pub kl_mean: f64,
    pub explained_var: f64,
    /// Why the update must be skipped (non-finite rollout numbers on any replica).
    pub fault: Option<String>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Every evaluated sample with its advantages and returns: the run's estimator over
    /// KL-shaped rewards (β in the reward unless the KL is a loss term), batch moments over
    /// every replica's tokens.
    pub(super) fn advantages(
        &self,
        evaluated: Vec<Evaluated>,
    ) -> Result<(Vec<Experience>, AdvantageStats)> {
        let r = evaluated
            .iter()
            .map(|e| e.response.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mask: Grid = evaluated
            .iter()
            .map(|e| {
                (0..r)
                    .map(|j| if j < e.response.len() { 1.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let grid = |f: &dyn Fn(&Evaluated) -> &[f64]| {
            pad_rows(&evaluated.iter().map(f).collect::<Vec<_>>(), r)
        };
        let (old, reference) = (grid(&|e| &e.old_logp), grid(&|e| &e.ref_logp));
        let ppo = &self.cfg.ppo;
        let kl_est = if ppo.use_kl_loss {
            KlEstimator::K3
        } else {
            ppo.kl_estimator
        };
        let kl = adv::kl(&old, &reference, &mask, kl_est);
        let k1 = adv::kl(&old, &reference, &mask, KlEstimator::K1);
        // Batch statistics are over every replica's rows (`moments` is local with one device).
        let (dev, world) = (self.device.clone(), self.world);
        let moments = |x: &Grid| world.masked_moments::<B::InnerBackend>(x, &mask, &dev);
        let (kl_mean, _) = moments(&k1)?;
        let values = ppo.estimator.uses_critic.then(|| grid(&|e| &e.old_values));
        let rewards: Vec<f64> = evaluated.iter().map(|e| e.reward).collect();
        let est = estimator::estimate(
            ppo.estimator,
            &Inputs {
                rewards: &rewards,
                group_size: self.cfg.rollout.n,
                kl: &kl,
                beta: if ppo.use_kl_loss { 0.0 } else { self.kl_coef },
                mask: &mask,
                values: values.as_ref(),
                gamma: ppo.gamma,
                lambda: ppo.lambda,
            },
            moments,
        )?;
        let experiences: Vec<Experience> = evaluated
            .into_iter()
            .zip(est.advantages.iter().zip(&est.returns))
            .map(|(sample, (a, g))| {
                let n = sample.response.len();
                Experience {
                    sample,
                    advantages: a[..n].to_vec(),
                    returns: g[..n].to_vec(),
                }
            })
            .collect();

        // A non-finite rollout number on any replica skips the update.
        let mut fault: Option<String> = (!kl_mean.is_finite()
            || experiences.iter().any(|e| {
                (e.sample.old_logp.iter())
                    .chain(&e.sample.ref_logp)
                    .chain(&e.advantages)
                    .chain(&e.returns)
                    .any(|x| !x.is_finite())
            }))
        .then(|| "non-finite log-probs, KL or advantages in the rollout".to_string());
        if world.any::<B::InnerBackend>(fault.is_some(), &dev)? && fault.is_none() {
            fault = Some("non-finite rollout numbers on another device".into());
        }
        let stats = AdvantageStats {
            kl_mean,
            explained_var: est.explained_var,
            fault,
        };
        Ok((experiences, stats))
    }
}
