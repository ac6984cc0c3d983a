//! Closing a PPO step: the KL controller and fault streak, and the step's metrics as sums over
//! every replica's samples.

use std::collections::BTreeMap;

use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::Serialize;

use super::advantages::AdvantageStats;
use super::dynamic_sampling::Draws;
use super::score::Scored;
use super::update::UpdateStats;
use super::{PhaseClock, Trainer};
use crate::parallel::World;
use crate::verifier::{Stage, Summary};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub reward_mean: f64,
    pub format_rate: f64,
    pub accuracy: f64,
    pub response_len_mean: f64,
    /// Share of the samples cut at `rollout.max_new_tokens`.
    pub truncated_rate: f64,
    pub think_len_mean: f64,
    /// Groups (prompts with their `rollout.n` samples) sampled this step, and those in the
    /// trained batch whose rewards differ; more are drawn than trained under
    /// `rollout.filter_groups` (DAPO's dynamic sampling).
    pub groups_drawn: usize,
    pub groups_kept: usize,
    /// Share of the trained batch's groups whose rewards are all equal (zero advantage under
    /// group normalisation).
    pub zero_adv_groups: f64,
    pub kl: f64,
    pub kl_coef: f64,
    pub entropy: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clip_frac: f64,
    pub explained_var: f64,
    pub grad_norm: f64,
    pub critic_grad_norm: f64,
    pub lr: f64,
    pub critic_lr: f64,
    pub tokens_per_s: f64,
    /// Tokens through the update's micro-batches (every epoch, every replica): the sequences'
    /// own, and with the padding of their micro-batch (`rows × (max prompt + max response)`);
    /// `ppo.micro_batch_tokens` groups similar lengths to bring the second down to the first.
    pub update_tokens: usize,
    pub update_padded_tokens: usize,
    pub seconds: f64,
    /// `|log π_update − log π_rollout|` over the first mini-batch's tokens before any optimizer
    /// step (the sampler's and the trainer's kernels at the same weights): mean and max; and
    /// the spread (std) of the ratio `π_update / π_rollout` there. 0 when the actor did not train.
    pub logprob_gap_mean: f64,
    pub logprob_gap_max: f64,
    pub rollout_ratio_std: f64,
    /// Wall-clock seconds of the step's phases: `generate`, `reward`, `reference_values`
    /// (reference log-probs and critic values), `advantages`, `update`.
    pub phase_seconds: std::collections::BTreeMap<String, f64>,
    /// A reward program's named components, mean over the step's samples (this replica's).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub reward_components: std::collections::BTreeMap<String, f64>,
    pub stages: std::collections::BTreeMap<String, usize>,
    /// Greedy held-out accuracy / format rate, on evaluation steps.
    pub eval_accuracy: Option<f64>,
    pub eval_format_rate: Option<f64>,
    /// Why the step's update was skipped (a NaN or Inf in the KL, a loss or a gradient norm);
    /// absent on normal steps. Updates applied before the fault in the same step are kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Sums over this replica's samples by name, added up over every replica in one all-reduce
/// (every replica adds the same names).
#[derive(Default)]
struct Totals(BTreeMap<String, f64>);

impl Totals {
    fn add(&mut self, name: &str, x: f64) {
        *self.0.entry(name.to_string()).or_default() += x;
    }

    fn all_reduce<B: Backend>(self, world: &World, dev: &B::Device) -> Result<Self> {
        let sums = world.sum::<B>(&self.0.values().copied().collect::<Vec<_>>(), dev)?;
        Ok(Totals(self.0.into_keys().zip(sums).collect()))
    }

    fn get(&self, name: &str) -> f64 {
        self.0[name]
    }

    /// `num / den`, 0 when `den` is 0.
    fn per(&self, num: &str, den: &str) -> f64 {
        self.get(num) / self.get(den).max(1.0)
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Updates the KL coefficient (after a clean update) and the bad-step streak, tallies the
    /// metrics and picks the samples to show; advances the step counter.
    pub(super) fn finish_step(
        &mut self,
        scored: Scored,
        draws: Draws,
        adv: AdvantageStats,
        upd: UpdateStats,
        clock: PhaseClock,
    ) -> Result<(StepMetrics, Vec<serde_json::Value>)> {
        let (world, dev) = (self.world, self.device.clone());
        if upd.fault.is_none() {
            self.update_kl_coef(adv.kl_mean, upd.samples);
            self.bad_streak = 0;
        } else {
            self.bad_streak += 1;
        }
        // The step's metrics, as sums over every replica's samples.
        let (samples, verdicts) = (&scored.rollout.samples, &scored.verdicts);
        let summary = Summary::from_verdicts(verdicts);
        let mut t = Totals::default();
        for name in [
            "reward",
            "format_ok",
            "correct",
            "think_words",
            "think_replies",
            "tokens",
            "entropy",
            "entropy_tokens",
            "truncated",
        ] {
            t.add(name, 0.0);
        }
        t.add("samples", summary.count as f64);
        t.add("groups", scored.rollout.prompts.items.len() as f64);
        t.add("groups_drawn", draws.drawn as f64);
        t.add("groups_kept", draws.kept as f64);
        for v in verdicts {
            t.add("reward", v.reward as f64);
            t.add("format_ok", v.format_ok as u8 as f64);
            t.add("correct", v.correct as u8 as f64);
            if v.stage != Stage::FormatFailure {
                t.add("think_words", v.diagnostics.think_words as f64);
                t.add("think_replies", 1.0);
            }
        }
        for s in samples {
            t.add("tokens", s.output_ids.len() as f64);
            t.add("entropy", s.entropies.iter().map(|&e| e as f64).sum());
            t.add("entropy_tokens", s.entropies.len() as f64);
            t.add("truncated", s.truncated() as u8 as f64);
        }
        t.add("policy_loss", upd.policy_loss);
        t.add("value_loss", upd.value_loss);
        t.add("clip_frac", upd.clip_frac);
        t.add("update_tokens", upd.real_tokens as f64);
        t.add("update_padded_tokens", upd.padded_tokens as f64);
        for (stage, &c) in &summary.stages {
            t.add(&format!("stage/{stage}"), c as f64);
        }
        let t = t.all_reduce::<B::InnerBackend>(&world, &dev)?;
        let stages = (summary.stages.keys())
            .map(|s| (s.clone(), t.get(&format!("stage/{s}")) as usize))
            .collect();
        let n_opt = upd.optimizer_steps.max(1) as f64;
        let seconds = clock.total();
        let metrics = StepMetrics {
            step: self.step,
            epoch: self.epoch,
            reward_mean: t.per("reward", "samples"),
            format_rate: t.per("format_ok", "samples"),
            accuracy: t.per("correct", "samples"),
            response_len_mean: t.per("tokens", "samples"),
            truncated_rate: t.per("truncated", "samples"),
            think_len_mean: t.per("think_words", "think_replies"),
            groups_drawn: t.get("groups_drawn") as usize,
            groups_kept: t.get("groups_kept") as usize,
            zero_adv_groups: 1.0 - t.get("groups_kept") / t.get("groups").max(1.0),
            kl: adv.kl_mean,
            kl_coef: self.kl_coef,
            entropy: t.per("entropy", "entropy_tokens"),
            policy_loss: t.get("policy_loss") / n_opt,
            value_loss: t.get("value_loss") / n_opt,
            clip_frac: t.get("clip_frac") / n_opt,
            explained_var: adv.explained_var,
            grad_norm: upd.grad_norm / n_opt,
            critic_grad_norm: upd.critic_grad_norm / n_opt,
            lr: upd.lr,
            critic_lr: upd.critic_lr,
            tokens_per_s: t.get("tokens") / seconds,
            update_tokens: t.get("update_tokens") as usize,
            update_padded_tokens: t.get("update_padded_tokens") as usize,
            seconds,
            logprob_gap_mean: upd.gap.mean(),
            logprob_gap_max: upd.gap.abs_max,
            rollout_ratio_std: upd.gap.ratio_std(),
            phase_seconds: clock.phases,
            reward_components: scored.components.clone(),
            stages,
            eval_accuracy: None,
            eval_format_rate: None,
            skipped: upd.fault,
        };
        let shown: Vec<serde_json::Value> = (0..samples.len().min(self.cfg.train.samples_per_step))
            .map(|i| {
                let item = scored.item(&self.train_items, i);
                serde_json::json!({
                    "step": self.step,
                    "id": item.id,
                    "gold": item.answer.to_string(),
                    "response": scored.texts[i],
                    "reward": verdicts[i].reward,
                    "stage": verdicts[i].stage,
                    "finish_reason": samples[i].finish_reason,
                })
            })
            .collect();
        self.step += 1;
        Ok((metrics, shown))
    }
}
