//! Phase 2 of a PPO step: the reward of every sample (`reward::score` under the run's prompt
//! style, or the run's reward program) ([`Scored`]).

use std::collections::BTreeMap;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use super::rollout::Rollout;
use super::Trainer;
use crate::prompt;
use crate::reward::{self, Gold, Request};
use crate::task::McqaItem;
use crate::verifier::{self, Verdict};

/// What the score phase produces: the rollout with each sample's verdict (its reward) and
/// decoded text.
pub(super) struct Scored {
    pub rollout: Rollout,
    pub verdicts: Vec<Verdict>,
    pub texts: Vec<String>,
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

impl Scored {
    /// The training item behind sample `i`.
    pub fn item<'a>(&self, items: &'a [McqaItem], i: usize) -> &'a McqaItem {
        let r = &self.rollout;
        &items[r.prompts.items[r.samples[i].prompt_index]]
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Decodes and scores each sample against its item. With `reward.program`, the verifier's
    /// verdict keeps its format/accuracy labels and the program's answer is the reward; with
    /// `reward.overlong_buffer`, DAPO's overlong penalty is added to it.
    pub(super) fn score(&self, rollout: Rollout) -> Result<Scored> {
        let items = &self.train_items;
        let item = |s: &crate::sampler::Sample| &items[rollout.prompts.items[s.prompt_index]];
        let mut verdicts = Vec::with_capacity(rollout.samples.len());
        let mut texts = Vec::with_capacity(rollout.samples.len());
        for s in &rollout.samples {
            let text = self.tok.decode(&s.output_ids);
            let mut v = reward::score(
                self.cfg.data.prompt,
                &text,
                &Gold::of(item(s)),
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
            let rendered: Vec<String> = (rollout.samples.iter())
                .map(|s| prompt::render(item(s), self.cfg.data.prompt))
                .collect();
            let requests: Vec<Request> = (rollout.samples.iter().zip(&texts).zip(&rendered))
                .map(|((s, text), rendered)| {
                    let id = format!(
                        "step-{}/prompt-{}/sample-{}",
                        self.step,
                        rollout.prompts.first + s.prompt_index,
                        s.sample_index
                    );
                    Request::new(id, rendered, text, item(s))
                })
                .collect();
            let answers = program
                .lock()
                .map_err(|_| anyhow::anyhow!("the reward program's lock is poisoned"))?
                .score(&requests)
                .map_err(|e| RewardFailed(format!("{e:#}")))?;
            components = reward::apply_answers(&answers, verdicts.iter_mut());
        }
        let (rw, max_len) = (&self.cfg.reward, self.cfg.rollout.max_new_tokens);
        for (v, s) in verdicts.iter_mut().zip(&rollout.samples) {
            let len = s.output_ids.len();
            v.reward +=
                reward::overlong_penalty(len, max_len, rw.overlong_buffer, rw.overlong_penalty)
                    as f32;
        }
        Ok(Scored {
            rollout,
            verdicts,
            texts,
            components,
        })
    }
}
