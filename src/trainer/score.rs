//! Phase 2 of a PPO step: the reward of every sample (`reward::score` under the run's prompt
//! style, or the run's reward program).

use std::collections::BTreeMap;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use super::rollout::StepPrompts;
use super::Trainer;
use crate::experience::Experience;
use crate::prompt;
use crate::reward::{self, Gold, Request};
use crate::sampler::Sample;
use crate::verifier::{self, Verdict};

/// The samples' verdicts and decoded texts, and the experiences they start.
pub(super) struct Scored {
    pub verdicts: Vec<Verdict>,
    pub texts: Vec<String>,
    pub experiences: Vec<Experience>,
    /// The reward program's named components, mean over the samples (empty without one).
    pub components: BTreeMap<String, f64>,
}

/// A reward program failed: the step did not happen (the trainer's state is the previous
/// step's), so the run can stop with a checkpoint and resume after the program is fixed.
#[derive(Debug)]
pub struct RewardFailed(pub String);

impl std::fmt::Display for RewardFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RewardFailed {}

impl<B: AutodiffBackend> Trainer<B> {
    /// Decodes and scores each sample against its item; `log π_old` starts as the sampler's.
    /// With `reward.program`, the verifier's verdict keeps its format/accuracy labels and the
    /// program's answer is the reward.
    pub(super) fn score(&self, prompts: &StepPrompts, samples: &[Sample]) -> Result<Scored> {
        let mut verdicts = Vec::with_capacity(samples.len());
        let mut texts = Vec::with_capacity(samples.len());
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
            verdicts.push(v);
            texts.push(text);
        }
        let mut components = BTreeMap::new();
        if let Some(program) = &self.reward_program {
            let rendered: Vec<String> = samples
                .iter()
                .map(|s| {
                    let item = &self.train_items[prompts.items[s.prompt_index]];
                    prompt::render(item, self.cfg.data.prompt)
                })
                .collect();
            let requests: Vec<Request> = samples
                .iter()
                .zip(&texts)
                .zip(&rendered)
                .map(|((s, text), p)| {
                    let id = format!(
                        "step-{}/prompt-{}/sample-{}",
                        self.step,
                        prompts.first + s.prompt_index,
                        s.sample_index
                    );
                    Request::new(
                        id,
                        p,
                        text,
                        &self.train_items[prompts.items[s.prompt_index]],
                    )
                })
                .collect();
            let answers = program
                .lock()
                .map_err(|_| anyhow::anyhow!("the reward program's lock is poisoned"))?
                .score(&requests)
                .map_err(|e| RewardFailed(format!("{e:#}")))?;
            components = reward::apply_answers(&answers, verdicts.iter_mut());
        }
        let experiences = samples
            .iter()
            .zip(&verdicts)
            .map(|(s, v)| Experience {
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
            })
            .collect();
        Ok(Scored {
            verdicts,
            texts,
            experiences,
            components,
        })
    }
}
