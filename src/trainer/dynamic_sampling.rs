//! Phases 1–2 as one: the step's prompts drawn, sampled and scored ([`Scored`]); under DAPO's
//! dynamic sampling (`rollout.filter_groups`; Yu et al. 2025 §3.2, verl's `filter_groups`) again
//! and again until the step holds `prompts_per_step` groups whose rewards differ.
//!
//! A group (one prompt's `n` samples) whose rewards are all equal has zero advantage under group
//! normalisation: it adds nothing to the policy gradient but its tokens to the loss's normaliser.
//! Such groups are set aside, and another `prompts_per_step` prompts are drawn (each replica its
//! shard, as for the first draw), until every replica holds its share of groups with differing
//! rewards or `rollout.max_draws` batches were drawn; set-aside groups then fill what is missing,
//! so every replica trains on the same number of samples.

use std::collections::BTreeMap;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use super::rollout::{Rollout, StepPrompts};
use super::score::Scored;
use super::{PhaseClock, Trainer};
use crate::sampler::Sample;
use crate::verifier::Verdict;

/// How the step's groups were drawn (this replica's; summed over replicas in the metrics).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Draws {
    /// Groups sampled and scored.
    pub drawn: usize,
    /// Groups in the batch whose rewards differ (all of them unless `max_draws` ran out).
    pub kept: usize,
}

/// One prompt and its scored samples.
struct Group {
    item: usize,
    tokens: Vec<u32>,
    samples: Vec<Sample>,
    verdicts: Vec<Verdict>,
    texts: Vec<String>,
}

impl Group {
    /// Its rewards differ ([`rewards_differ`]).
    fn informative(&self) -> bool {
        rewards_differ(&self.verdicts.iter().map(|v| v.reward).collect::<Vec<_>>())
    }
}

/// Whether a group's rewards differ (or it has a single sample, as verl keeps those): the groups
/// that carry an advantage under group normalisation.
fn rewards_differ(rewards: &[f32]) -> bool {
    rewards.len() == 1 || rewards.iter().any(|&r| r != rewards[0])
}

/// [`rewards_differ`] for each group of `n` consecutive rewards.
fn differing_groups(rewards: &[f32], n: usize) -> Vec<bool> {
    rewards.chunks(n.max(1)).map(rewards_differ).collect()
}

/// The groups drawn so far: those kept (differing rewards) and those set aside, in draw order,
/// and the reward program's component sums (weighted by samples).
#[derive(Default)]
struct Pool {
    kept: Vec<Group>,
    aside: Vec<Group>,
    drawn: usize,
    components: BTreeMap<String, (f64, usize)>,
}

impl Pool {
    fn add(&mut self, scored: Scored) {
        let count = scored.verdicts.len();
        for (name, mean) in scored.components {
            let c = self.components.entry(name).or_default();
            c.0 += mean * count as f64;
            c.1 += count;
        }
        let Rollout { prompts, samples } = scored.rollout;
        let mut groups: Vec<Group> = (prompts.items.into_iter().zip(prompts.tokens))
            .map(|(item, tokens)| Group {
                item,
                tokens,
                samples: vec![],
                verdicts: vec![],
                texts: vec![],
            })
            .collect();
        for ((s, v), t) in samples.into_iter().zip(scored.verdicts).zip(scored.texts) {
            let g = &mut groups[s.prompt_index];
            g.samples.push(s);
            g.verdicts.push(v);
            g.texts.push(t);
        }
        self.drawn += groups.len();
        for g in groups {
            match g.informative() {
                true => self.kept.push(g),
                false => self.aside.push(g),
            }
        }
    }

    /// The first `quota` kept groups, topped up with set-aside ones, as one scored batch (prompt
    /// indices renumbered; `first` is the first draw's).
    fn into_scored(mut self, quota: usize, first: usize) -> (Scored, Draws) {
        self.kept.truncate(quota);
        let kept = self.kept.len();
        let missing = quota - kept;
        self.kept.extend(self.aside.into_iter().take(missing));
        let mut prompts = StepPrompts {
            items: vec![],
            tokens: vec![],
            first,
        };
        let (mut samples, mut verdicts, mut texts) = (vec![], vec![], vec![]);
        for (k, g) in self.kept.into_iter().enumerate() {
            prompts.items.push(g.item);
            prompts.tokens.push(g.tokens);
            samples.extend(g.samples.into_iter().map(|s| Sample {
                prompt_index: k,
                ..s
            }));
            verdicts.extend(g.verdicts);
            texts.extend(g.texts);
        }
        let components = (self.components.into_iter())
            .map(|(name, (sum, count))| (name, sum / count.max(1) as f64))
            .collect();
        let scored = Scored {
            rollout: Rollout { prompts, samples },
            verdicts,
            texts,
            components,
        };
        let draws = Draws {
            drawn: self.drawn,
            kept,
        };
        (scored, draws)
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// The step's scored samples: one draw of `rollout.prompts_per_step` prompts, or with
    /// `rollout.filter_groups` as many as it takes (at most `rollout.max_draws`) to fill the step
    /// with groups whose rewards differ. Every replica draws the same number of batches (the
    /// data order stays shared) and skips sampling those it does not need.
    pub(super) fn sample_and_score(&mut self, clock: &mut PhaseClock) -> Result<(Scored, Draws)> {
        let scored = self.sample_and_score_one(0, clock)?;
        let quota = scored.rollout.prompts.items.len();
        if !self.cfg.rollout.filter_groups {
            let kept = differing_groups(&rewards(&scored), self.cfg.rollout.n);
            let draws = Draws {
                drawn: quota,
                kept: kept.iter().filter(|&&k| k).count(),
            };
            return Ok((scored, draws));
        }
        let first = scored.rollout.prompts.first;
        let mut pool = Pool::default();
        pool.add(scored);
        let mut draw = 1;
        while draw < self.cfg.rollout.max_draws && self.agree(pool.kept.len() < quota)? {
            if pool.kept.len() < quota {
                pool.add(self.sample_and_score_one(draw, clock)?);
            } else {
                self.draw_prompts(draw);
            }
            draw += 1;
        }
        Ok(pool.into_scored(quota, first))
    }

    /// Draw `draw` of the step: rollout (phase `generate`), then score (phase `reward`).
    fn sample_and_score_one(&mut self, draw: usize, clock: &mut PhaseClock) -> Result<Scored> {
        let prompts = self.draw_prompts(draw);
        let rollout = self.rollout(prompts);
        clock.mark("generate");
        let scored = self.score(rollout);
        clock.mark("reward");
        scored
    }
}

fn rewards(scored: &Scored) -> Vec<f32> {
    scored.verdicts.iter().map(|v| v.reward).collect()
}
