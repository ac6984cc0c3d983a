//! Phase 2 of a PPO step: the reward of every sample (`reward::score`, under the run's prompt
//! style).

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use super::rollout::StepPrompts;
use super::Trainer;
use crate::experience::Experience;
use crate::reward::{self, Gold};
use crate::sampler::Sample;
use crate::verifier::{self, Verdict};

/// The samples' verdicts and decoded texts, and the experiences they start.
pub(super) struct Scored {
    pub verdicts: Vec<Verdict>,
    pub texts: Vec<String>,
    pub experiences: Vec<Experience>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Decodes and scores each sample against its item; `log π_old` starts as the sampler's.
    pub(super) fn score(&self, prompts: &StepPrompts, samples: &[Sample]) -> Result<Scored> {
        let mut verdicts = Vec::with_capacity(samples.len());
        let mut texts = Vec::with_capacity(samples.len());
        let mut experiences = Vec::with_capacity(samples.len());
        for s in samples {
            let item = &self.train_items[prompts.items[s.prompt_index]];
            let text = self.tok.decode(&s.output_ids);
            let mut v = reward::score(
                self.cfg.data.prompt,
                &text,
                &Gold::of(item),
                &self.cfg.verifier,
            );
            if let Some(think) = verifier::think_text(&text) {
                v.diagnostics.think_tokens = Some(self.tok.encode(think)?.len());
            }
            experiences.push(Experience {
                prompt_index: s.prompt_index,
                prompt: prompts.tokens[s.prompt_index].clone(),
                response: s.output_ids.clone(),
                rollout_logp: s.logprobs.iter().map(|&x| x as f64).collect(),
                old_logp: s.logprobs.iter().map(|&x| x as f64).collect(),
                is_weights: vec![],
                ref_logp: vec![],
                old_values: vec![],
                reward: v.reward as f64,
                advantages: vec![],
                returns: vec![],
            });
            verdicts.push(v);
            texts.push(text);
        }
        Ok(Scored {
            verdicts,
            texts,
            experiences,
        })
    }
}
