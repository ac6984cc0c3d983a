//! Phase 5 of a PPO step: `ppo_epochs` passes of clipped policy and value updates over shuffled
//! mini-batches, micro-batch gradient accumulation, gradients summed over replicas, global-norm
//! clipping, AdamW on the cosine schedule. The losses are in `crate::loss`.

use anyhow::Result;
use burn::optim::{GradientsAccumulator, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use qwen2_burn::Qwen2;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

use super::{scalar, Fault, Trainer};
use crate::critic::Critic;
use crate::experience::{grid_tensor, micro_batch_groups, pad_rows, ragged, Batch, Experience};
use crate::loss;
use crate::optimizer::{clip_global_norm, cosine_lr};
use crate::parallel::World;

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
    /// Tokens of this replica's micro-batches, over every epoch: the sequences' own
    /// (`Σ prompt + response`) and as laid out with padding (`rows × (max prompt + max response)`
    /// per micro-batch). Their ratio is what `ppo.micro_batch_tokens` saves.
    pub real_tokens: usize,
    pub padded_tokens: usize,
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
            // A NaN difference shows as a NaN maximum (`f64::max` would drop it).
            if d.is_nan() || d.abs() > self.abs_max {
                self.abs_max = d.abs();
            }
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

    /// The gap over every replica's samples.
    fn all_reduce<B: burn::tensor::backend::Backend>(
        self,
        world: &World,
        dev: &B::Device,
    ) -> Result<Self> {
        let s = world.sum::<B>(
            &[self.abs_sum, self.count, self.ratio_sum, self.ratio_sq_sum],
            dev,
        )?;
        Ok(Gap {
            abs_sum: s[0],
            abs_max: world.max::<B>(self.abs_max, dev)?,
            count: s[1],
            ratio_sum: s[2],
            ratio_sq_sum: s[3],
        })
    }
}

/// A mini-batch's gradients, summed over its micro-batches on this replica.
struct Accumulated<B: AutodiffBackend> {
    actor: GradientsAccumulator<Qwen2<B>>,
    critic: GradientsAccumulator<Critic<B>>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Trains actor and critic on `exps` unless `fault` already says the rollout is unusable:
    /// `ppo_epochs` passes over the global batch in shuffled mini-batches of `ppo.train_batch`
    /// samples, one optimizer step each ([`Trainer::train_mini_batch`]). The shuffle and the loss
    /// weights are over the global batch: replica `r` holds global samples
    /// `first..first + exps.len()` and trains on its members of each mini-batch. A fault ends the
    /// update; the optimizer steps before it stay applied.
    pub(super) fn update(
        &mut self,
        exps: &[Experience],
        fault: Option<String>,
    ) -> Result<UpdateStats> {
        let (epochs, size) = (self.cfg.ppo.ppo_epochs, self.cfg.ppo.train_batch);
        let mut rng =
            StdRng::seed_from_u64(self.cfg.seed ^ (self.step as u64).wrapping_mul(0x5851_F42D));
        let first = self.world.rank * exps.len();
        let mut lens = vec![0.0; exps.len() * self.world.size];
        for (k, e) in exps.iter().enumerate() {
            lens[first + k] = self.loss_tokens(e) as f64;
        }
        let lens = self.world.sum::<B::InnerBackend>(&lens, &self.device)?;
        let mut out = UpdateStats {
            samples: lens.len(),
            fault,
            ..Default::default()
        };
        'update: for epoch in 0..epochs {
            if out.fault.is_some() {
                break;
            }
            let mut order: Vec<usize> = (0..lens.len()).collect();
            order.shuffle(&mut rng);
            for (mini, batch) in order.chunks(size).enumerate() {
                let at_rollout_weights = epoch == 0 && mini == 0;
                out.fault =
                    self.train_mini_batch(exps, &lens, batch, at_rollout_weights, &mut out)?;
                if out.fault.is_some() {
                    break 'update;
                }
            }
        }
        Ok(out)
    }

    /// One optimizer step on global mini-batch `batch` (indices into the global batch, `lens`
    /// their tokens in the loss, [`Trainer::loss_tokens`]): this replica's members, in
    /// micro-batches of `ppo.micro_batch`, each weighted by its share of the mini-batch — samples
    /// in the loss (seq-mean-token-mean) or their tokens (token-mean) — so the accumulated
    /// gradient is that of the whole mini-batch's mean loss ([`Trainer::micro_batch`]); then
    /// [`Trainer::apply_gradients`]. A replica holding
    /// none of the members runs one of its samples with weight 0, since every replica reduces
    /// the same parameters. Returns the fault that skipped the step, agreed by all replicas.
    fn train_mini_batch(
        &mut self,
        exps: &[Experience],
        lens: &[f64],
        batch: &[usize],
        at_rollout_weights: bool,
        out: &mut UpdateStats,
    ) -> Result<Option<String>> {
        let (world, dev) = (self.world, self.device.clone());
        let first = world.rank * exps.len();
        let total_tokens = batch.iter().map(|&i| lens[i]).sum::<f64>().max(1.0);
        let total_samples = batch.iter().filter(|&&i| lens[i] > 0.0).count().max(1) as f64;
        let mut mine: Vec<usize> = batch
            .iter()
            .filter(|&&i| (first..first + exps.len()).contains(&i))
            .map(|&i| i - first)
            .collect();
        let idle = mine.is_empty();
        if idle {
            mine.push(0);
        }
        let mut acc = Accumulated {
            actor: GradientsAccumulator::new(),
            critic: GradientsAccumulator::new(),
        };
        let mut local_fault = None;
        for rows in &self.micro_batches(exps, &mine) {
            let weight = match (idle, self.cfg.ppo.loss_agg) {
                (true, _) => 0.0,
                (false, loss::Aggregation::SeqMeanTokenMean) => rows.len() as f64 / total_samples,
                (false, loss::Aggregation::TokenMean) => {
                    rows.iter()
                        .map(|&i| self.loss_tokens(&exps[i]))
                        .sum::<usize>() as f64
                        / total_tokens
                }
            };
            let measure_gap = at_rollout_weights && !idle;
            local_fault = self.micro_batch(exps, rows, weight, measure_gap, &mut acc, out);
            if local_fault.is_some() {
                break;
            }
        }
        // Every replica learns of a fault on any of them before reducing gradients.
        if world.any::<B::InnerBackend>(local_fault.is_some(), &dev)? {
            return Ok(local_fault.or_else(|| Some("a non-finite loss on another device".into())));
        }
        if let Some(fault) = self.apply_gradients(acc, out)? {
            return Ok(Some(fault));
        }
        if at_rollout_weights {
            out.gap = out.gap.all_reduce::<B::InnerBackend>(&world, &dev)?;
        }
        self.opt_step += 1;
        out.optimizer_steps += 1;
        Ok(None)
    }

    /// The tokens sample `e` puts into the losses: its response, or none when it was cut at
    /// `rollout.max_new_tokens` and `ppo.mask_truncated` leaves such samples out.
    fn loss_tokens(&self, e: &Experience) -> usize {
        match self.cfg.ppo.mask_truncated && e.sample.truncated {
            true => 0,
            false => e.sample.response.len(),
        }
    }

    /// This replica's members of a mini-batch cut into micro-batches ([`micro_batch_groups`]:
    /// `ppo.micro_batch` samples each, or groups of similar length under
    /// `ppo.micro_batch_tokens` padded tokens).
    fn micro_batches(&self, exps: &[Experience], mine: &[usize]) -> Vec<Vec<usize>> {
        let lens: Vec<(usize, usize)> = mine
            .iter()
            .map(|&i| (exps[i].sample.prompt.len(), exps[i].sample.response.len()))
            .collect();
        let ppo = &self.cfg.ppo;
        micro_batch_groups(&lens, ppo.micro_batch, ppo.micro_batch_tokens)
            .into_iter()
            .map(|g| g.into_iter().map(|k| mine[k]).collect())
            .collect()
    }

    /// One micro-batch (`rows` of `exps`): the clipped policy loss (plus the k3 KL loss with
    /// `ppo.use_kl_loss`) unless the critic is still warming up, and the value loss with a
    /// critic; each, times `weight`, backpropagated into `acc`. With `measure_gap`, the
    /// rollout–trainer log-prob gap of these rows is added to `out.gap`. Returns a non-finite
    /// loss as a fault, before its gradient is accumulated.
    fn micro_batch(
        &mut self,
        exps: &[Experience],
        rows: &[usize],
        weight: f64,
        measure_gap: bool,
        acc: &mut Accumulated<B>,
        out: &mut UpdateStats,
    ) -> Option<String> {
        let cfg = &self.cfg;
        let planned = |f| self.faults.hits(self.step, self.world.rank, f);
        let seqs: Vec<(&[u32], &[u32])> = rows
            .iter()
            .map(|&i| {
                let s = &exps[i].sample;
                (s.prompt.as_slice(), s.response.as_slice())
            })
            .collect();
        let mut batch = Batch::new(&seqs);
        let (real, padded) = batch.token_counts();
        out.real_tokens += real;
        out.padded_tokens += padded;
        for (row, &i) in batch.mask.iter_mut().zip(rows) {
            if self.loss_tokens(&exps[i]) == 0 {
                row.fill(0.0);
            }
        }
        let m = batch.mask_tensor::<B>(&self.device);
        let take = |f: &dyn Fn(&Experience) -> &[f64]| {
            grid_tensor::<B>(
                &pad_rows(
                    &rows.iter().map(|&i| f(&exps[i])).collect::<Vec<_>>(),
                    batch.r,
                ),
                &self.device,
            )
        };
        if self.step >= cfg.ppo.critic_warmup {
            let trainable = batch.train_logprobs(
                &self.actor,
                cfg.model.logprob_chunk,
                cfg.model.recompute,
                &self.device,
            );
            let logp = trainable.output.clone();
            if measure_gap {
                let lens: Vec<usize> = rows
                    .iter()
                    .map(|&i| exps[i].sample.response.len())
                    .collect();
                let update = ragged(logp.clone().detach(), &lens);
                for (row, &i) in update.iter().zip(rows) {
                    out.gap.add(row, &exps[i].sample.rollout_logp);
                }
            }
            let (pl, clip_frac) = loss::policy_loss(
                logp.clone(),
                take(&|e| &e.sample.old_logp),
                take(&|e| &e.advantages),
                m.clone(),
                &loss::Surrogate {
                    eps_low: cfg.ppo.eps_low,
                    eps_high: cfg.ppo.eps_high,
                    level: cfg.ppo.ratio_level,
                    agg: cfg.ppo.loss_agg,
                },
                cfg.ppo
                    .rollout_is_cap
                    .map(|_| take(&|e| &e.sample.is_weights)),
            );
            let mut total = pl.clone();
            if planned(Fault::PolicyLoss) {
                total = total.mul_scalar(f64::NAN);
            }
            if cfg.ppo.use_kl_loss {
                let kl = loss::kl_loss(
                    logp,
                    take(&|e| &e.sample.ref_logp),
                    m.clone(),
                    cfg.ppo.loss_agg,
                );
                total = total + kl.mul_scalar(self.kl_coef);
            }
            let total_value = scalar(total.clone());
            if !total_value.is_finite() {
                return Some(format!("policy loss {total_value}"));
            }
            out.policy_loss += scalar(pl) * weight;
            out.clip_frac += clip_frac * weight;
            // A planned gradient fault: a finite loss whose backward is not.
            let scale = if planned(Fault::Gradient) {
                f64::INFINITY
            } else {
                weight
            };
            let grads = total.mul_scalar(scale).backward();
            acc.actor
                .accumulate(&self.actor, trainable.param_grads(grads));
        }
        if let Some(critic) = &self.critic {
            let trainable = batch.train_values(critic, cfg.model.recompute, &self.device);
            let mut vl = loss::value_loss(
                trainable.output.clone(),
                take(&|e| &e.sample.old_values),
                take(&|e| &e.returns),
                m,
                cfg.ppo.value_clip,
                cfg.ppo.loss_agg,
            );
            if planned(Fault::ValueLoss) {
                vl = vl.mul_scalar(f64::NAN);
            }
            let vl_value = scalar(vl.clone());
            if !vl_value.is_finite() {
                return Some(format!("value loss {vl_value}"));
            }
            out.value_loss += vl_value * weight;
            let grads = vl.mul_scalar(weight).backward();
            acc.critic.accumulate(critic, trainable.param_grads(grads));
        }
        None
    }

    /// The optimizer step of a mini-batch: the learning rates on the cosine schedule, the
    /// gradients summed over the replicas, global-norm clipping (`optim.grad_clip`), then AdamW on
    /// actor (unless the critic is warming up) and critic. A non-finite norm is a fault, returned
    /// before any weight changes.
    fn apply_gradients(
        &mut self,
        mut acc: Accumulated<B>,
        out: &mut UpdateStats,
    ) -> Result<Option<String>> {
        let o = &self.cfg.optim;
        let lr = |peak| {
            cosine_lr(
                peak,
                self.opt_step,
                self.total_opt_steps,
                o.warmup_ratio,
                o.min_lr_ratio,
            )
        };
        out.lr = lr(o.actor_lr);
        out.critic_lr = lr(o.critic_lr);
        let mut actor_grads = match self.step >= self.cfg.ppo.critic_warmup {
            true => Some(self.world.sum_grads::<B>(acc.actor.grads())?),
            false => None,
        };
        let mut critic_grads = match &self.critic {
            Some(_) => Some(self.world.sum_grads::<B>(acc.critic.grads())?),
            None => None,
        };
        let gn = match &mut actor_grads {
            Some(g) => clip_global_norm(&self.actor, g, o.grad_clip),
            None => 0.0,
        };
        let cgn = match (&mut critic_grads, &self.critic) {
            (Some(g), Some(c)) => clip_global_norm(c, g, o.grad_clip),
            _ => 0.0,
        };
        if !gn.is_finite() || !cgn.is_finite() {
            return Ok(Some(format!("gradient norm actor {gn}, critic {cgn}")));
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
        Ok(None)
    }
}
