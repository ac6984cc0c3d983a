//! Phase 3 of a PPO step: reference log-probs and critic values, without gradients.

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::Trainer;
use crate::experience::{ragged, token_budget_groups, Batch, Experience};
use crate::loss;

impl<B: AutodiffBackend> Trainer<B> {
    /// Fills `ref_logp` (and `old_values` with a critic) in batches of at most
    /// `ppo.forward_tokens` padded tokens, sequences grouped by length. With
    /// `ppo.rollout_is_cap` it also recomputes `old_logp` with the actor and sets the truncated
    /// importance weights.
    pub(super) fn reference_and_values(&self, exps: &mut [Experience]) {
        let critic = self.critic.as_ref().map(|c| c.valid());
        let cap = self.cfg.ppo.rollout_is_cap;
        let actor = cap.map(|_| self.actor.valid());
        let lens: Vec<(usize, usize)> = exps
            .iter()
            .map(|e| (e.prompt.len(), e.response.len()))
            .collect();
        for group in token_budget_groups(&lens, self.cfg.ppo.forward_tokens) {
            let rows: Vec<(&[u32], &[u32])> = group
                .iter()
                .map(|&i| (exps[i].prompt.as_slice(), exps[i].response.as_slice()))
                .collect();
            let lens: Vec<usize> = group.iter().map(|&i| exps[i].response.len()).collect();
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
                exps[i].ref_logp = ref_lp[k].clone();
                if let Some(v) = &values {
                    exps[i].old_values = v[k].clone();
                }
                if let (Some(old), Some(cap)) = (&recomputed, cap) {
                    exps[i].is_weights =
                        loss::truncated_is_weights(&old[k], &exps[i].rollout_logp, cap);
                    exps[i].old_logp = old[k].clone();
                }
            }
        }
    }
}
