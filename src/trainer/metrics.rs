//! Closing a PPO step: the KL controller and fault streak, and the step's metrics as sums over
//! every replica's samples.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use super::advantages::AdvantageStats;
use super::rollout::StepPrompts;
use super::update::UpdateStats;
use super::{PhaseClock, Trainer};
use crate::sampler::Sample;
use crate::verifier::{Stage, Summary, Verdict};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub reward_mean: f64,
    pub format_rate: f64,
    pub accuracy: f64,
    pub response_len_mean: f64,
    pub think_len_mean: f64,
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

impl<B: AutodiffBackend> Trainer<B> {
    /// Updates the KL coefficient (after a clean update) and the bad-step streak, tallies the
    /// metrics and picks the samples to show; advances the step counter.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_step(
        &mut self,
        prompts: &StepPrompts,
        samples: &[Sample],
        verdicts: Vec<Verdict>,
        texts: Vec<String>,
        reward_components: std::collections::BTreeMap<String, f64>,
        adv: AdvantageStats,
        upd: UpdateStats,
        clock: PhaseClock,
    ) -> Result<(StepMetrics, Vec<serde_json::Value>)> {
        let (world, dev) = (self.world, self.device.clone());
        let generated: usize = samples.iter().map(|s| s.output_ids.len()).sum();
        if upd.fault.is_none() {
            self.update_kl_coef(adv.kl_mean, upd.samples);
            self.bad_streak = 0;
        } else {
            self.bad_streak += 1;
        }
        // The step's metrics, as sums over every replica's samples.
        let summary = Summary::from_verdicts(&verdicts);
        let think: Vec<f64> = verdicts
            .iter()
            .filter(|v| v.stage != Stage::FormatFailure)
            .map(|v| v.diagnostics.think_words as f64)
            .collect();
        let entropies = samples.iter().flat_map(|s| s.entropies.iter());
        let n = summary.count as f64;
        let mut tally = vec![
            n,
            verdicts.iter().map(|v| v.reward as f64).sum::<f64>(),
            verdicts.iter().filter(|v| v.format_ok).count() as f64,
            verdicts.iter().filter(|v| v.correct).count() as f64,
            generated as f64,
            think.iter().sum::<f64>(),
            think.len() as f64,
            entropies.clone().map(|&e| e as f64).sum::<f64>(),
            entropies.count() as f64,
            upd.policy_loss,
            upd.value_loss,
            upd.clip_frac,
        ];
        tally.extend(summary.stages.values().map(|&c| c as f64));
        let t = world.sum::<B::InnerBackend>(&tally, &dev)?;
        let stages = summary
            .stages
            .keys()
            .cloned()
            .zip(t[12..].iter().map(|&c| c as usize));
        let per = |i: usize, by: usize| t[i] / t[by].max(1.0);
        let n_opt = upd.optimizer_steps.max(1) as f64;
        let seconds = clock.total();
        let metrics = StepMetrics {
            step: self.step,
            epoch: self.epoch,
            reward_mean: per(1, 0),
            format_rate: per(2, 0),
            accuracy: per(3, 0),
            response_len_mean: per(4, 0),
            think_len_mean: per(5, 6),
            kl: adv.kl_mean,
            kl_coef: self.kl_coef,
            entropy: per(7, 8),
            policy_loss: t[9] / n_opt,
            value_loss: t[10] / n_opt,
            clip_frac: t[11] / n_opt,
            explained_var: adv.explained_var,
            grad_norm: upd.grad_norm / n_opt,
            critic_grad_norm: upd.critic_grad_norm / n_opt,
            lr: upd.lr,
            critic_lr: upd.critic_lr,
            tokens_per_s: t[4] / seconds,
            seconds,
            logprob_gap_mean: upd.gap.mean(),
            logprob_gap_max: upd.gap.abs_max,
            rollout_ratio_std: upd.gap.ratio_std(),
            phase_seconds: clock.phases,
            reward_components,
            stages: stages.collect(),
            eval_accuracy: None,
            eval_format_rate: None,
            skipped: upd.fault,
        };
        let shown: Vec<serde_json::Value> = (0..samples.len().min(self.cfg.train.samples_per_step))
            .map(|i| {
                serde_json::json!({
                    "step": self.step,
                    "id": self.train_items[prompts.items[samples[i].prompt_index]].id,
                    "gold": self.train_items[prompts.items[samples[i].prompt_index]].answer.to_string(),
                    "response": texts[i],
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
