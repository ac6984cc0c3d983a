//! Phase 5 of a PPO step: `ppo_epochs` passes of clipped policy and value updates over shuffled
//! mini-batches, micro-batch gradient accumulation, gradients summed over replicas, global-norm
//! clipping, AdamW on the cosine schedule. The losses are in `crate::loss`.

use anyhow::Result;
use burn::optim::{GradientsAccumulator, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use qwen2_burn::Qwen2;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

use super::{scalar, Trainer};
use crate::critic::Critic;
use crate::experience::{grid_tensor, pad_rows, ragged, Batch, Experience};
use crate::loss;
use crate::optimizer::{clip_global_norm, cosine_lr};

/// Sums over the step's optimizer steps, and how the update ended.
#[derive(Debug, Default)]
pub(super) struct UpdateStats {
    /// Samples in the global batch (over every replica).
    pub samples: usize,
    pub optimizer_steps: usize,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clip_frac: f64,
    pub grad_norm: f64,
    pub critic_grad_norm: f64,
    /// The last learning rates used.
    pub lr: f64,
    pub critic_lr: f64,
    /// Why the rest of the update was skipped, if it was.
    pub fault: Option<String>,
    /// The rollout–trainer log-prob gap over the first mini-batch, before any optimizer step.
    pub gap: Gap,
}

/// `d = log π_update − log π_rollout` over valid tokens at the rollout weights: `Σ|d|`, `max|d|`,
/// the count, and `Σρ`, `Σρ²` of the ratio `ρ = exp(d)` (its spread: `√(E[ρ²] − E[ρ]²)`).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Gap {
    pub abs_sum: f64,
    pub abs_max: f64,
    pub count: f64,
    pub ratio_sum: f64,
    pub ratio_sq_sum: f64,
}

impl Gap {
    fn add(&mut self, update: &[f64], rollout: &[f64]) {
        for (u, r) in update.iter().zip(rollout) {
            let d = u - r;
            let rho = d.exp();
            self.abs_sum += d.abs();
            self.abs_max = self.abs_max.max(d.abs());
            self.count += 1.0;
            self.ratio_sum += rho;
            self.ratio_sq_sum += rho * rho;
        }
    }

    pub fn mean(&self) -> f64 {
        self.abs_sum / self.count.max(1.0)
    }

    pub fn ratio_std(&self) -> f64 {
        let n = self.count.max(1.0);
        (self.ratio_sq_sum / n - (self.ratio_sum / n).powi(2))
            .max(0.0)
            .sqrt()
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Trains actor and critic on `exps` unless `fault` already says the rollout is unusable.
    pub(super) fn update(
        &mut self,
        exps: &[Experience],
        fault: Option<String>,
    ) -> Result<UpdateStats> {
        let cfg = self.cfg.clone();
        let chunk = cfg.model.logprob_chunk;
        let (world, dev) = (self.world, self.device.clone());
        let inject_nan = self.inject_nan_steps.contains(&self.step);
        let train_actor = self.step >= cfg.ppo.critic_warmup;
        let mut rng =
            StdRng::seed_from_u64(cfg.seed ^ (self.step as u64).wrapping_mul(0x5851_F42D));
        // The shuffle and the loss weights are over the global batch: replica `r` holds global
        // samples `first..first + exps.len()` and trains on its members of each global mini-batch.
        let first = world.rank * exps.len();
        let mut lens = vec![0.0; exps.len() * world.size];
        for (k, e) in exps.iter().enumerate() {
            lens[first + k] = e.response.len() as f64;
        }
        let lens = world.sum::<B::InnerBackend>(&lens, &dev)?;
        let mut out = UpdateStats {
            samples: lens.len(),
            fault,
            ..Default::default()
        };
        'update: for epoch in 0..cfg.ppo.ppo_epochs {
            if out.fault.is_some() {
                break;
            }
            let mut order: Vec<usize> = (0..lens.len()).collect();
            order.shuffle(&mut rng);
            for (mini, train_batch) in order.chunks(cfg.ppo.train_batch).enumerate() {
                let at_rollout_weights = epoch == 0 && mini == 0;
                let total_tokens = (train_batch.iter().map(|&i| lens[i]).sum::<f64>()).max(1.0);
                let mut mine: Vec<usize> = train_batch
                    .iter()
                    .filter(|&&i| (first..first + exps.len()).contains(&i))
                    .map(|&i| i - first)
                    .collect();
                // A replica with no member of this mini-batch still reduces the same parameters:
                // it runs one of its samples with weight 0.
                let idle = mine.is_empty();
                if idle {
                    mine.push(0);
                }
                let mut acc_actor = GradientsAccumulator::<Qwen2<B>>::new();
                let mut acc_critic = GradientsAccumulator::<Critic<B>>::new();
                let mut local_fault = None;
                for mb in mine.chunks(cfg.ppo.micro_batch) {
                    let rows: Vec<(&[u32], &[u32])> = mb
                        .iter()
                        .map(|&i| (exps[i].prompt.as_slice(), exps[i].response.as_slice()))
                        .collect();
                    let batch = Batch::new(&rows);
                    let m = batch.mask_tensor::<B>(&self.device);
                    let take = |f: &dyn Fn(&Experience) -> &[f64]| {
                        grid_tensor::<B>(
                            &pad_rows(
                                &mb.iter().map(|&i| f(&exps[i])).collect::<Vec<_>>(),
                                batch.r,
                            ),
                            &self.device,
                        )
                    };
                    // Weight of this micro-batch in the global mini-batch mean.
                    let weight = if idle {
                        0.0
                    } else {
                        match cfg.ppo.loss_agg {
                            loss::Aggregation::SeqMeanTokenMean => {
                                mb.len() as f64 / train_batch.len() as f64
                            }
                            loss::Aggregation::TokenMean => {
                                mb.iter().map(|&i| exps[i].response.len()).sum::<usize>() as f64
                                    / total_tokens
                            }
                        }
                    };
                    if train_actor {
                        let trainable = batch.train_logprobs(
                            &self.actor,
                            chunk,
                            cfg.model.recompute,
                            &self.device,
                        );
                        let logp = trainable.output.clone();
                        if at_rollout_weights && !idle {
                            let lens: Vec<usize> =
                                mb.iter().map(|&i| exps[i].response.len()).collect();
                            let update = ragged(logp.clone().detach(), &lens);
                            for (row, &i) in update.iter().zip(mb) {
                                out.gap.add(row, &exps[i].rollout_logp);
                            }
                        }
                        let (pl, cf) = loss::policy_loss(
                            logp.clone(),
                            take(&|e| &e.old_logp),
                            take(&|e| &e.advantages),
                            m.clone(),
                            cfg.ppo.eps_low,
                            cfg.ppo.eps_high,
                            cfg.ppo.loss_agg,
                            cfg.ppo.rollout_is_cap.map(|_| take(&|e| &e.is_weights)),
                        );
                        let mut total = pl.clone();
                        if inject_nan {
                            total = total.mul_scalar(f64::NAN);
                        }
                        if cfg.ppo.use_kl_loss {
                            total = total
                                + loss::kl_loss(
                                    logp,
                                    take(&|e| &e.ref_logp),
                                    m.clone(),
                                    cfg.ppo.loss_agg,
                                )
                                .mul_scalar(self.kl_coef);
                        }
                        let total_value = scalar(total.clone());
                        if !total_value.is_finite() {
                            local_fault = Some(format!("policy loss {total_value}"));
                            break;
                        }
                        out.policy_loss += scalar(pl) * weight;
                        out.clip_frac += cf * weight;
                        let grads = total.mul_scalar(weight).backward();
                        acc_actor.accumulate(&self.actor, trainable.param_grads(grads));
                    }
                    if let Some(critic) = &self.critic {
                        let trainable = batch.train_values(critic, cfg.model.recompute, &dev);
                        let vl = loss::value_loss(
                            trainable.output.clone(),
                            take(&|e| &e.old_values),
                            take(&|e| &e.returns),
                            m,
                            cfg.ppo.value_clip,
                            cfg.ppo.loss_agg,
                        );
                        let vl_value = scalar(vl.clone());
                        if !vl_value.is_finite() {
                            local_fault = Some(format!("value loss {vl_value}"));
                            break;
                        }
                        out.value_loss += vl_value * weight;
                        let grads = vl.mul_scalar(weight).backward();
                        acc_critic.accumulate(critic, trainable.param_grads(grads));
                    }
                }
                // Every replica learns of a fault on any of them before reducing gradients.
                if world.any::<B::InnerBackend>(local_fault.is_some(), &dev)? {
                    out.fault =
                        local_fault.or_else(|| Some("a non-finite loss on another device".into()));
                    break 'update;
                }
                out.lr = cosine_lr(
                    cfg.optim.actor_lr,
                    self.opt_step,
                    self.total_opt_steps,
                    cfg.optim.warmup_ratio,
                    cfg.optim.min_lr_ratio,
                );
                out.critic_lr = cosine_lr(
                    cfg.optim.critic_lr,
                    self.opt_step,
                    self.total_opt_steps,
                    cfg.optim.warmup_ratio,
                    cfg.optim.min_lr_ratio,
                );
                // Gradients summed over the replicas, then norms: a non-finite one skips the rest
                // of the step before any update.
                let mut actor_grads = match train_actor {
                    true => Some(world.sum_grads::<B>(acc_actor.grads())?),
                    false => None,
                };
                let mut critic_grads = match &self.critic {
                    Some(_) => Some(world.sum_grads::<B>(acc_critic.grads())?),
                    None => None,
                };
                let gn = match (&mut actor_grads, &self.actor) {
                    (Some(g), a) => clip_global_norm(a, g, cfg.optim.grad_clip),
                    _ => 0.0,
                };
                let cgn = match (&mut critic_grads, &self.critic) {
                    (Some(g), Some(c)) => clip_global_norm(c, g, cfg.optim.grad_clip),
                    _ => 0.0,
                };
                if !gn.is_finite() || !cgn.is_finite() {
                    out.fault = Some(format!("gradient norm actor {gn}, critic {cgn}"));
                    break 'update;
                }
                out.grad_norm += gn;
                out.critic_grad_norm += cgn;
                if let Some(g) = actor_grads {
                    self.actor = self.actor_optim.step(out.lr, self.actor.clone(), g);
                }
                if let (Some(critic), Some(opt), Some(g)) =
                    (self.critic.take(), self.critic_optim.as_mut(), critic_grads)
                {
                    self.critic = Some(opt.step(out.critic_lr, critic, g));
                }
                if at_rollout_weights {
                    let g = out.gap;
                    let s = world.sum::<B::InnerBackend>(
                        &[g.abs_sum, g.count, g.ratio_sum, g.ratio_sq_sum],
                        &dev,
                    )?;
                    out.gap = Gap {
                        abs_sum: s[0],
                        abs_max: world.max::<B::InnerBackend>(g.abs_max, &dev)?,
                        count: s[1],
                        ratio_sum: s[2],
                        ratio_sq_sum: s[3],
                    };
                }
                self.opt_step += 1;
                out.optimizer_steps += 1;
            }
        }
        Ok(out)
    }
}
