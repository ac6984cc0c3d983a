//! Phase 4 of a PPO step: KL-shaped rewards, advantages and returns over the rollout batch. The
//! math is in `crate::advantages`; batch statistics go through `World` (global over replicas).

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use super::Trainer;
use crate::advantages::{self as adv, Grid, KlEstimator};
use crate::experience::{pad_rows, Experience};

/// What the advantage phase reports.
pub(super) struct AdvantageStats {
    /// Mean k1 KL(π_old ‖ π_ref) per token, over every replica's tokens.
    pub kl_mean: f64,
    pub explained_var: f64,
    /// Why the update must be skipped (non-finite rollout numbers on any replica).
    pub fault: Option<String>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Fills every experience's `advantages` and `returns`: GAE over KL-shaped token rewards with
    /// a critic, or a critic-free estimator; whitened as configured.
    pub(super) fn advantages(&self, exps: &mut [Experience]) -> Result<AdvantageStats> {
        // KL-shaped rewards and advantages over the whole rollout batch.
        let r = exps
            .iter()
            .map(|e| e.response.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mask: Grid = exps
            .iter()
            .map(|e| {
                (0..r)
                    .map(|j| if j < e.response.len() { 1.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let old = pad_rows(
            &exps
                .iter()
                .map(|e| e.old_logp.as_slice())
                .collect::<Vec<_>>(),
            r,
        );
        let reference = pad_rows(
            &exps
                .iter()
                .map(|e| e.ref_logp.as_slice())
                .collect::<Vec<_>>(),
            r,
        );
        let kl_est = if self.cfg.ppo.use_kl_loss {
            KlEstimator::K3
        } else {
            self.cfg.ppo.kl_estimator
        };
        let kl = adv::kl(&old, &reference, &mask, kl_est);
        let k1 = adv::kl(&old, &reference, &mask, KlEstimator::K1);
        // Batch statistics are over every replica's rows (`moments` is local with one device).
        let dev = self.device.clone();
        let world = self.world;
        let moments = |x: &Grid| world.masked_moments::<B::InnerBackend>(x, &mask, &dev);
        let (kl_mean, _) = moments(&k1)?;
        let beta_in_reward = if self.cfg.ppo.use_kl_loss {
            0.0
        } else {
            self.kl_coef
        };
        let seq_rewards: Vec<f64> = exps.iter().map(|e| e.reward).collect();
        let (advantages, returns, explained_var) = if self.cfg.ppo.estimator.uses_critic() {
            let values = pad_rows(
                &exps
                    .iter()
                    .map(|e| e.old_values.as_slice())
                    .collect::<Vec<_>>(),
                r,
            );
            let rewards = adv::token_rewards(&seq_rewards, &kl, &mask, beta_in_reward);
            let (a, g) = adv::gae(
                &rewards,
                &values,
                &mask,
                self.cfg.ppo.gamma,
                self.cfg.ppo.lambda,
            );
            let (_, var_g) = moments(&g)?;
            let (_, var_d) = moments(&adv::residuals(&values, &g))?;
            let ev = adv::explained_variance(var_g, var_d);
            let (mean, var) = moments(&a)?;
            (adv::whiten_with(&a, mean, var), g, ev)
        } else {
            let mut a = adv::critic_free_returns(
                &seq_rewards,
                self.cfg.rollout.n,
                &kl,
                &mask,
                beta_in_reward,
                self.cfg.ppo.gamma,
                self.cfg.ppo.estimator,
            );
            if self.cfg.ppo.estimator.whitens() {
                let (mean, var) = moments(&a)?;
                a = adv::whiten_with(&a, mean, var);
            }
            (a.clone(), a, 0.0)
        };
        for (i, e) in exps.iter_mut().enumerate() {
            let n = e.response.len();
            e.advantages = advantages[i][..n].to_vec();
            e.returns = returns[i][..n].to_vec();
        }

        // A non-finite rollout number on any replica skips the update.
        let mut fault: Option<String> = (!kl_mean.is_finite()
            || exps.iter().any(|e| {
                e.old_logp
                    .iter()
                    .chain(&e.ref_logp)
                    .chain(&e.advantages)
                    .chain(&e.returns)
                    .any(|x| !x.is_finite())
            }))
        .then(|| "non-finite log-probs, KL or advantages in the rollout".to_string());
        if world.any::<B::InnerBackend>(fault.is_some(), &dev)? && fault.is_none() {
            fault = Some("non-finite rollout numbers on another device".into());
        }

        Ok(AdvantageStats {
            kl_mean,
            explained_var,
            fault,
        })
    }
}
