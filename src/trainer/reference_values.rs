//! Phase 3 of a PPO step: reference log-probs and critic values, without gradients
//! ([`Evaluated`] samples).

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::score::Scored;
use super::Trainer;
use crate::experience::{ragged, token_budget_groups, Batch, Evaluated};
use crate::loss;

impl<B: AutodiffBackend> Trainer<B> {
    /// Every scored sample with `log π_ref` (and the critic's values with a critic), computed in
    /// batches of at most `ppo.forward_tokens` padded tokens, sequences grouped by length.
    /// `log π_old` is the sampler's; with `ppo.rollout_is_cap` it is the actor's own
    /// recomputation, and the truncated importance weights are set.
    pub(super) fn reference_values(&self, scored: &Scored) -> Vec<Evaluated> {
        let samples = &scored.rollout.samples;
        let prompts = &scored.rollout.prompts.tokens;
        let critic = self.critic.as_ref().map(|c| c.valid());
        let cap = self.cfg.ppo.rollout_is_cap;
        let actor = cap.map(|_| self.actor.valid());
        let mut out: Vec<Evaluated> = samples
            .iter()
            .zip(&scored.verdicts)
            .map(|(s, v)| {
                let rollout_logp: Vec<f64> = s.logprobs.iter().map(|&x| x as f64).collect();
                Evaluated {
                    prompt: prompts[s.prompt_index].clone(),
                    response: s.output_ids.clone(),
                    // Recomputed below with `ppo.rollout_is_cap`.
                    old_logp: match cap {
                        Some(_) => vec![],
                        None => rollout_logp.clone(),
                    },
                    rollout_logp,
                    is_weights: vec![],
                    ref_logp: vec![],
                    old_values: vec![],
                    reward: v.reward as f64,
                    truncated: s.truncated(),
                }
            })
            .collect();
        let lens: Vec<(usize, usize)> = out
            .iter()
            .map(|e| (e.prompt.len(), e.response.len()))
            .collect();
        for group in token_budget_groups(&lens, self.cfg.ppo.forward_tokens) {
            let rows: Vec<(&[u32], &[u32])> = group
                .iter()
                .map(|&i| (out[i].prompt.as_slice(), out[i].response.as_slice()))
                .collect();
            let lens: Vec<usize> = group.iter().map(|&i| out[i].response.len()).collect();
            let batch = Batch::new(&rows);
            let chunk = self.cfg.model.logprob_chunk;
            let ref_lp = ragged(batch.logprobs(&self.reference, chunk, &self.device), &lens);
            let values = critic
                .as_ref()
                .map(|c| ragged(batch.values(c, &self.device), &lens));
            let recomputed = actor
                .as_ref()
                .map(|a| ragged(batch.logprobs(a, chunk, &self.device), &lens));
            for (k, &i) in group.iter().enumerate() {
                let e = &mut out[i];
                e.ref_logp = ref_lp[k].clone();
                if let Some(v) = &values {
                    e.old_values = v[k].clone();
                }
                if let (Some(old), Some(cap)) = (&recomputed, cap) {
                    e.is_weights = loss::truncated_is_weights(&old[k], &e.rollout_logp, cap);
                    e.old_logp = old[k].clone();
                }
            }
        }
        out
    }
}
