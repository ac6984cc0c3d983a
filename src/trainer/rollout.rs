//! Phase 1 of a PPO step: draw the step's prompts and sample their responses ([`Rollout`]).

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::Trainer;
use crate::sampler::{self, Sample, SamplingParams};

/// The prompts of one step on this replica.
pub(super) struct StepPrompts {
    /// Indices into the training items.
    pub items: Vec<usize>,
    pub tokens: Vec<Vec<u32>>,
    /// Index of this replica's first prompt among the step's prompts (keys the sampler RNG).
    pub first: usize,
}

/// What the rollout phase produces: the step's prompts on this replica and their samples.
pub(super) struct Rollout {
    pub prompts: StepPrompts,
    pub samples: Vec<Sample>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Every replica draws the same prompts and keeps its shard of them. `draw` counts the
    /// batches drawn before in this step (dynamic sampling draws more than one); it keys the
    /// sampler RNG with the shard's, so every prompt of a step has its own.
    pub(super) fn draw_prompts(&mut self, draw: usize) -> StepPrompts {
        let per_step = self.cfg.rollout.prompts_per_step;
        let all = self.next_batch(per_step);
        let shard = self.world.shard(all.len());
        let items = all[shard.clone()].to_vec();
        let tokens = items
            .iter()
            .map(|&i| self.train_prompts[i].clone())
            .collect();
        StepPrompts {
            items,
            tokens,
            first: draw * per_step + shard.start,
        }
    }

    /// `rollout.n` samples per prompt from the current actor, continuously batched
    /// `rollout.generate_batch` prompts' rows at a time (bounds the KV cache); each prompt's RNG
    /// is keyed by its index in the step, so neither the batch size nor sharding changes them.
    pub(super) fn rollout(&self, prompts: StepPrompts) -> Rollout {
        let params = SamplingParams {
            max_rows: self.cfg.rollout.generate_batch * self.cfg.rollout.n,
            ..self.sampling()
        };
        let samples = sampler::generate_from(
            &self.actor.valid(),
            &self.model_config,
            &prompts.tokens,
            prompts.first,
            &params,
            &self.tok,
            &self.device,
        );
        Rollout { prompts, samples }
    }
}
