//! The PPO trainer (and the critic-free family): one `step` = rollout through the sampler →
//! verifier rewards → reference log-probs and critic values → KL-shaped rewards → advantages →
//! `ppo_epochs` passes of clipped policy / value updates over shuffled micro-batches with gradient
//! accumulation, global-norm clipping and AdamW on a cosine schedule. The math lives in
//! `advantages.rs` and `loss.rs`; this file only orchestrates.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, DeviceOps};
use burn::tensor::{DType, FloatDType};
use qwen2_burn::{load_lora, load_qwen2, save_lora, save_qwen2, Qwen2, Qwen2Config, SaveDtype};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;

use crate::advantages::{self as adv, Estimator, Grid, KlEstimator};
use crate::checkpoint::{self as ckpt, LoopState};
use crate::config::{BaseDtype, TrainConfig};
use crate::critic::Critic;
use crate::eval;
use crate::experience::{grid_tensor, pad_rows, ragged, token_budget_groups, Batch, Experience};
use crate::loss;
use crate::memory::{MemoryPlan, PlanInputs};
use crate::optimizer::{adamw, clip_global_norm, cosine_lr};
use crate::parallel::{nth_device, stable_param_ids, World};
use crate::prompt;
use crate::sampler::{self, SamplingParams};
use crate::task::{self, LoadOptions, McqaItem};
use crate::tokenizer::Tokenizer;
use crate::verifier::{self, Stage, Summary, Verdict};

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
    /// Wall-clock seconds of the step's phases: `generate`, `reward`, `reference_values`
    /// (reference log-probs and critic values), `advantages`, `update`.
    pub phase_seconds: std::collections::BTreeMap<String, f64>,
    pub stages: std::collections::BTreeMap<String, usize>,
    /// Greedy held-out accuracy / format rate, on evaluation steps.
    pub eval_accuracy: Option<f64>,
    pub eval_format_rate: Option<f64>,
    /// Why the step's update was skipped (a NaN or Inf in the KL, a loss or a gradient norm);
    /// absent on normal steps. Updates applied before the fault in the same step are kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

type ActorOptim<B> = OptimizerAdaptor<AdamW, Qwen2<B>, B>;
type CriticOptim<B> = OptimizerAdaptor<AdamW, Critic<B>, B>;
type ActorRecord<B> = <ActorOptim<B> as Optimizer<Qwen2<B>, B>>::Record;
type CriticRecord<B> = <CriticOptim<B> as Optimizer<Critic<B>, B>>::Record;

pub struct Trainer<B: AutodiffBackend> {
    pub cfg: TrainConfig,
    pub model_config: Qwen2Config,
    /// The memory plan computed before loading (see `memory.rs`).
    pub plan: MemoryPlan,
    pub tok: Tokenizer,
    pub actor: Qwen2<B>,
    pub critic: Option<Critic<B>>,
    reference: Qwen2<B::InnerBackend>,
    actor_optim: ActorOptim<B>,
    critic_optim: Option<CriticOptim<B>>,
    pub train_items: Vec<McqaItem>,
    train_prompts: Vec<Vec<u32>>,
    pub eval_items: Vec<McqaItem>,
    order: Vec<usize>,
    cursor: usize,
    pub epoch: usize,
    pub step: usize,
    opt_step: usize,
    pub total_steps: usize,
    total_opt_steps: usize,
    kl_coef: f64,
    /// Consecutive skipped steps.
    pub bad_streak: usize,
    /// Fault injection for tests: at these steps the policy loss is multiplied by NaN.
    pub inject_nan_steps: Vec<usize>,
    eos: u32,
    device: B::Device,
    /// This replica's place among the data-parallel replicas (see `parallel.rs`).
    pub world: World,
}

/// Parameter-id bases of the actor and the critic (see [`stable_param_ids`]).
const ACTOR_IDS: u64 = 0xA << 32;
const CRITIC_IDS: u64 = 0xC << 32;

fn load_items(path: &Path, cfg: &TrainConfig) -> Result<Vec<McqaItem>> {
    let opts = LoadOptions {
        category: cfg.data.category.clone(),
        none_of_the_above: cfg.data.none_of_the_above,
        skip_invalid: cfg.data.skip_invalid,
    };
    let ds = task::load(path, cfg.data.format, &opts)?;
    if !ds.skipped.is_empty() {
        eprintln!(
            "{}: skipped {} malformed rows",
            path.display(),
            ds.skipped.len()
        );
    }
    if ds.items.is_empty() {
        bail!("{}: no items (after the category filter)", path.display());
    }
    Ok(ds.items)
}

impl<B: AutodiffBackend> Trainer<B> {
    pub fn new(cfg: TrainConfig, device: B::Device) -> Result<Self> {
        Self::replica(cfg, device, World::single())
    }

    /// Replica `world.rank` of a data-parallel run (built from the same files and seeds as every
    /// other replica, so all start equal). `World::join` must have been called for it.
    pub fn replica(cfg: TrainConfig, device: B::Device, world: World) -> Result<Self> {
        check_shardable(&cfg, world.size)?;
        let dir = &cfg.model.path;
        let tok = Tokenizer::from_dir(dir)?;
        let train_items = load_items(&cfg.data.train, &cfg)?;
        let mut eval_items = match &cfg.data.eval {
            Some(p) => load_items(p, &cfg)?,
            None => vec![],
        };
        if cfg.data.eval_limit > 0 {
            eval_items.truncate(cfg.data.eval_limit);
        }
        let train_prompts = train_items
            .iter()
            .map(|it| tok.encode(&prompt::render(it, cfg.data.prompt)))
            .collect::<Result<Vec<_>>>()?;
        // The memory plan, before any weight is allocated.
        let model_config = Qwen2Config::from_dir(dir)?;
        let prompt_len = train_prompts.iter().map(Vec::len).max().unwrap_or(0);
        let plan = MemoryPlan::new(&PlanInputs::from_config(
            &cfg,
            &model_config,
            prompt_len,
            world.size,
        ));
        if let Some(gb) = cfg.model.memory_limit_gb {
            plan.check((gb * (1u64 << 30) as f64) as u64)
                .map_err(|e| anyhow::anyhow!("{e} (model.memory_limit_gb = {gb})"))?;
        }
        let (_, mut base) = load_qwen2::<B>(dir, &device)?;
        if cfg.model.base_dtype == BaseDtype::Bf16 {
            if !B::supports_dtype(&device, DType::BF16) {
                bail!(
                    "model.base_dtype = \"bf16\": this backend has no bf16 tensors; build with \
                     --features cuda (or wgpu, flex), or set model.base_dtype = \"f32\""
                );
            }
            base = base.with_base_dtype(FloatDType::BF16);
        }
        // With LoRA the base weights are frozen and shared (tensor clones share storage): the
        // reference is the base itself, actor and critic each add their own adapters.
        let lora = cfg.lora.spec();
        let reference = base.valid();
        let backbone = |salt: u64| match &lora {
            Some(spec) => base.clone().with_lora(spec, cfg.seed ^ salt, &device),
            None => base.clone(),
        };
        let actor = stable_param_ids(backbone(0), ACTOR_IDS);
        let critic = (cfg.ppo.estimator == Estimator::Gae).then(|| {
            stable_param_ids(Critic::new(backbone(0xC817), cfg.seed, &device), CRITIC_IDS)
        });
        let per_step = cfg.rollout.prompts_per_step;
        let total_steps = if cfg.train.steps > 0 {
            cfg.train.steps
        } else {
            (cfg.train.epochs * train_items.len()).div_ceil(per_step)
        };
        let samples = per_step * cfg.rollout.n;
        let total_opt_steps =
            total_steps * cfg.ppo.ppo_epochs * samples.div_ceil(cfg.ppo.train_batch);
        let eos = tok.eos_id()?;
        let mut t = Self {
            actor_optim: adamw(&cfg.optim).init(),
            critic_optim: critic.as_ref().map(|_| adamw(&cfg.optim).init()),
            kl_coef: cfg.ppo.kl_coef,
            bad_streak: 0,
            inject_nan_steps: vec![],
            cfg,
            model_config,
            plan,
            tok,
            actor,
            critic,
            reference,
            train_items,
            train_prompts,
            eval_items,
            order: vec![],
            cursor: 0,
            epoch: 0,
            step: 0,
            opt_step: 0,
            total_steps,
            total_opt_steps,
            eos,
            device,
            world,
        };
        t.reshuffle();
        Ok(t)
    }

    fn reshuffle(&mut self) {
        self.order = (0..self.train_items.len()).collect();
        let mut rng = StdRng::seed_from_u64(
            self.cfg
                .seed
                .wrapping_add(self.epoch as u64)
                .wrapping_mul(0x9E37_79B9),
        );
        self.order.shuffle(&mut rng);
        self.cursor = 0;
    }

    /// The next `k` training items (epoch-wise shuffled, without replacement within an epoch).
    fn next_batch(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.cursor == self.order.len() {
                self.epoch += 1;
                self.reshuffle();
            }
            out.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        out
    }

    fn sampling(&self) -> SamplingParams {
        let r = &self.cfg.rollout;
        SamplingParams {
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            max_new_tokens: r.max_new_tokens,
            stop_token_ids: vec![self.eos],
            stop_strings: r.stop.clone(),
            n: r.n,
            seed: self
                .cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(self.step as u64),
            compact: true,
            max_rows: 0,
        }
    }

    /// Greedy held-out evaluation: (accuracy, format rate).
    pub fn evaluate(&self) -> Result<(f64, f64)> {
        let params = SamplingParams {
            temperature: 0.0,
            n: 1,
            ..self.sampling()
        };
        let settings = eval::ScoreSettings {
            style: self.cfg.data.prompt,
            sampling: params,
            verifier: self.cfg.verifier.clone(),
            batch: 64,
        };
        let gens = eval::generate_and_score(
            &self.actor.valid(),
            &self.model_config,
            &self.tok,
            &self.eval_items,
            &settings,
            &self.device,
        )?;
        let s = Summary::from_verdicts(gens.iter().map(|g| &g.verdict));
        Ok((s.accuracy, s.format_rate))
    }

    /// Runs one PPO step; returns its metrics and a few decoded samples.
    pub fn step(&mut self) -> Result<(StepMetrics, Vec<serde_json::Value>)> {
        let t0 = Instant::now();
        let cfg = self.cfg.clone();
        let chunk = cfg.model.logprob_chunk;
        let world = self.world;
        // Every replica draws the same prompts and keeps its shard of them.
        let all = self.next_batch(cfg.rollout.prompts_per_step);
        let shard = world.shard(all.len());
        let idx = all[shard.clone()].to_vec();
        let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| self.train_prompts[i].clone()).collect();
        let inner_actor = self.actor.valid();
        // Continuous batching over the step's prompts, `rollout.generate_batch` prompts' rows at
        // a time (bounds the KV cache); each prompt's RNG is keyed by its index in the step, so
        // neither the batch size nor sharding changes the samples.
        let params = SamplingParams {
            max_rows: cfg.rollout.generate_batch * cfg.rollout.n,
            ..self.sampling()
        };
        let samples = sampler::generate_from(
            &inner_actor,
            &self.model_config,
            &prompts,
            shard.start,
            &params,
            &self.tok,
            &self.device,
        );
        let generated: usize = samples.iter().map(|s| s.output_ids.len()).sum();
        // Phase ends, for `phase_seconds`.
        let mut marks = vec![("generate", Instant::now())];

        // Rewards.
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(samples.len());
        let mut texts = Vec::with_capacity(samples.len());
        for s in &samples {
            let item = &self.train_items[idx[s.prompt_index]];
            let text = self.tok.decode(&s.output_ids);
            let mut v = verifier::verify(
                &text,
                item.answer,
                item.num_options(),
                Some(item.gold_text()),
                &cfg.verifier,
            );
            if let Some(think) = verifier::think_text(&text) {
                v.diagnostics.think_tokens = Some(self.tok.encode(think)?.len());
            }
            verdicts.push(v);
            texts.push(text);
        }
        let mut exps: Vec<Experience> = samples
            .iter()
            .zip(&verdicts)
            .map(|(s, v)| Experience {
                prompt_index: s.prompt_index,
                prompt: prompts[s.prompt_index].clone(),
                response: s.output_ids.clone(),
                old_logp: s.logprobs.iter().map(|&x| x as f64).collect(),
                ref_logp: vec![],
                old_values: vec![],
                reward: v.reward as f64,
                advantages: vec![],
                returns: vec![],
            })
            .collect();

        marks.push(("reward", Instant::now()));
        // Reference log-probs and critic values (no gradients), in batches of at most
        // `ppo.forward_tokens` padded tokens, sequences grouped by length.
        let inner_critic = self.critic.as_ref().map(|c| c.valid());
        let lens: Vec<(usize, usize)> = exps
            .iter()
            .map(|e| (e.prompt.len(), e.response.len()))
            .collect();
        for group in token_budget_groups(&lens, cfg.ppo.forward_tokens) {
            let rows: Vec<(&[u32], &[u32])> = group
                .iter()
                .map(|&i| (exps[i].prompt.as_slice(), exps[i].response.as_slice()))
                .collect();
            let lens: Vec<usize> = group.iter().map(|&i| exps[i].response.len()).collect();
            let batch = Batch::new(&rows);
            let ref_lp = ragged(batch.logprobs(&self.reference, chunk, &self.device), &lens);
            let vals = inner_critic
                .as_ref()
                .map(|c| ragged(batch.values(c, &self.device), &lens));
            for (k, &i) in group.iter().enumerate() {
                exps[i].ref_logp = ref_lp[k].clone();
                if let Some(v) = &vals {
                    exps[i].old_values = v[k].clone();
                }
            }
        }

        marks.push(("reference_values", Instant::now()));
        // KL-shaped rewards and advantages over the whole rollout batch.
        let r = exps
            .iter()
            .map(|e| e.response.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mask: Grid = exps
            .iter()
            .map(|e| {
                (0..r)
                    .map(|j| if j < e.response.len() { 1.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let old = pad_rows(
            &exps
                .iter()
                .map(|e| e.old_logp.as_slice())
                .collect::<Vec<_>>(),
            r,
        );
        let reference = pad_rows(
            &exps
                .iter()
                .map(|e| e.ref_logp.as_slice())
                .collect::<Vec<_>>(),
            r,
        );
        let kl_est = if cfg.ppo.use_kl_loss {
            KlEstimator::K3
        } else {
            cfg.ppo.kl_estimator
        };
        let kl = adv::kl(&old, &reference, &mask, kl_est);
        let k1 = adv::kl(&old, &reference, &mask, KlEstimator::K1);
        // Batch statistics are over every replica's rows (`moments` is local with one device).
        let dev = self.device.clone();
        let moments = |x: &Grid| world.masked_moments::<B::InnerBackend>(x, &mask, &dev);
        let (kl_mean, _) = moments(&k1)?;
        let beta_in_reward = if cfg.ppo.use_kl_loss {
            0.0
        } else {
            self.kl_coef
        };
        let seq_rewards: Vec<f64> = exps.iter().map(|e| e.reward).collect();
        let (advantages, returns, explained_var) = if cfg.ppo.estimator == Estimator::Gae {
            let values = pad_rows(
                &exps
                    .iter()
                    .map(|e| e.old_values.as_slice())
                    .collect::<Vec<_>>(),
                r,
            );
            let rewards = adv::token_rewards(&seq_rewards, &kl, &mask, beta_in_reward);
            let (a, g) = adv::gae(&rewards, &values, &mask, cfg.ppo.gamma, cfg.ppo.lambda);
            let (_, var_g) = moments(&g)?;
            let (_, var_d) = moments(&adv::residuals(&values, &g))?;
            let ev = adv::explained_variance(var_g, var_d);
            let (mean, var) = moments(&a)?;
            (adv::whiten_with(&a, mean, var), g, ev)
        } else {
            let mut a = adv::critic_free_returns(
                &seq_rewards,
                cfg.rollout.n,
                &kl,
                &mask,
                beta_in_reward,
                cfg.ppo.gamma,
                cfg.ppo.estimator,
            );
            if cfg.ppo.estimator.whitens() {
                let (mean, var) = moments(&a)?;
                a = adv::whiten_with(&a, mean, var);
            }
            (a.clone(), a, 0.0)
        };
        for (i, e) in exps.iter_mut().enumerate() {
            let n = e.response.len();
            e.advantages = advantages[i][..n].to_vec();
            e.returns = returns[i][..n].to_vec();
        }

        // Updates (none if the rollout's numbers are not finite).
        let mut fault: Option<String> = (!kl_mean.is_finite()
            || exps.iter().any(|e| {
                e.old_logp
                    .iter()
                    .chain(&e.ref_logp)
                    .chain(&e.advantages)
                    .chain(&e.returns)
                    .any(|x| !x.is_finite())
            }))
        .then(|| "non-finite log-probs, KL or advantages in the rollout".to_string());
        if world.any::<B::InnerBackend>(fault.is_some(), &dev)? && fault.is_none() {
            fault = Some("non-finite rollout numbers on another device".into());
        }
        marks.push(("advantages", Instant::now()));
        let inject_nan = self.inject_nan_steps.contains(&self.step);
        let train_actor = self.step >= cfg.ppo.critic_warmup;
        let mut rng =
            StdRng::seed_from_u64(cfg.seed ^ (self.step as u64).wrapping_mul(0x5851_F42D));
        // The shuffle and the loss weights are over the global batch: replica `r` holds global
        // samples `first..first + exps.len()` and trains on its members of each global mini-batch.
        let first = world.rank * exps.len();
        let mut lens = vec![0.0; exps.len() * world.size];
        for (k, e) in exps.iter().enumerate() {
            lens[first + k] = e.response.len() as f64;
        }
        let lens = world.sum::<B::InnerBackend>(&lens, &dev)?;
        let (mut pl_sum, mut vl_sum, mut cf_sum, mut gn_sum, mut cgn_sum, mut n_opt) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0usize);
        let mut lr = 0.0;
        let mut critic_lr = 0.0;
        'update: for _ in 0..cfg.ppo.ppo_epochs {
            if fault.is_some() {
                break;
            }
            let mut order: Vec<usize> = (0..lens.len()).collect();
            order.shuffle(&mut rng);
            for train_batch in order.chunks(cfg.ppo.train_batch) {
                let total_tokens = (train_batch.iter().map(|&i| lens[i]).sum::<f64>()).max(1.0);
                let mut mine: Vec<usize> = train_batch
                    .iter()
                    .filter(|&&i| (first..first + exps.len()).contains(&i))
                    .map(|&i| i - first)
                    .collect();
                // A replica with no member of this mini-batch still reduces the same parameters:
                // it runs one of its samples with weight 0.
                let idle = mine.is_empty();
                if idle {
                    mine.push(0);
                }
                let mut acc_actor = GradientsAccumulator::<Qwen2<B>>::new();
                let mut acc_critic = GradientsAccumulator::<Critic<B>>::new();
                let mut local_fault = None;
                for mb in mine.chunks(cfg.ppo.micro_batch) {
                    let rows: Vec<(&[u32], &[u32])> = mb
                        .iter()
                        .map(|&i| (exps[i].prompt.as_slice(), exps[i].response.as_slice()))
                        .collect();
                    let batch = Batch::new(&rows);
                    let m = batch.mask_tensor::<B>(&self.device);
                    let take = |f: &dyn Fn(&Experience) -> &[f64]| {
                        grid_tensor::<B>(
                            &pad_rows(
                                &mb.iter().map(|&i| f(&exps[i])).collect::<Vec<_>>(),
                                batch.r,
                            ),
                            &self.device,
                        )
                    };
                    // Weight of this micro-batch in the global mini-batch mean.
                    let weight = if idle {
                        0.0
                    } else {
                        match cfg.ppo.loss_agg {
                            loss::Aggregation::SeqMeanTokenMean => {
                                mb.len() as f64 / train_batch.len() as f64
                            }
                            loss::Aggregation::TokenMean => {
                                mb.iter().map(|&i| exps[i].response.len()).sum::<usize>() as f64
                                    / total_tokens
                            }
                        }
                    };
                    if train_actor {
                        let logp = batch.logprobs(&self.actor, chunk, &self.device);
                        let (pl, cf) = loss::policy_loss(
                            logp.clone(),
                            take(&|e| &e.old_logp),
                            take(&|e| &e.advantages),
                            m.clone(),
                            cfg.ppo.eps_low,
                            cfg.ppo.eps_high,
                            cfg.ppo.loss_agg,
                        );
                        let mut total = pl.clone();
                        if inject_nan {
                            total = total.mul_scalar(f64::NAN);
                        }
                        if cfg.ppo.use_kl_loss {
                            total = total
                                + loss::kl_loss(
                                    logp,
                                    take(&|e| &e.ref_logp),
                                    m.clone(),
                                    cfg.ppo.loss_agg,
                                )
                                .mul_scalar(self.kl_coef);
                        }
                        let total_value = scalar(total.clone());
                        if !total_value.is_finite() {
                            local_fault = Some(format!("policy loss {total_value}"));
                            break;
                        }
                        pl_sum += scalar(pl) * weight;
                        cf_sum += cf * weight;
                        let grads = total.mul_scalar(weight).backward();
                        acc_actor.accumulate(
                            &self.actor,
                            GradientsParams::from_grads(grads, &self.actor),
                        );
                    }
                    if let Some(critic) = &self.critic {
                        let v = batch.values(critic, &self.device);
                        let vl = loss::value_loss(
                            v,
                            take(&|e| &e.old_values),
                            take(&|e| &e.returns),
                            m,
                            cfg.ppo.value_clip,
                            cfg.ppo.loss_agg,
                        );
                        let vl_value = scalar(vl.clone());
                        if !vl_value.is_finite() {
                            local_fault = Some(format!("value loss {vl_value}"));
                            break;
                        }
                        vl_sum += vl_value * weight;
                        let grads = vl.mul_scalar(weight).backward();
                        acc_critic.accumulate(critic, GradientsParams::from_grads(grads, critic));
                    }
                }
                // Every replica learns of a fault on any of them before reducing gradients.
                if world.any::<B::InnerBackend>(local_fault.is_some(), &dev)? {
                    fault =
                        local_fault.or_else(|| Some("a non-finite loss on another device".into()));
                    break 'update;
                }
                lr = cosine_lr(
                    cfg.optim.actor_lr,
                    self.opt_step,
                    self.total_opt_steps,
                    cfg.optim.warmup_ratio,
                    cfg.optim.min_lr_ratio,
                );
                critic_lr = cosine_lr(
                    cfg.optim.critic_lr,
                    self.opt_step,
                    self.total_opt_steps,
                    cfg.optim.warmup_ratio,
                    cfg.optim.min_lr_ratio,
                );
                // Gradients summed over the replicas, then norms: a non-finite one skips the rest
                // of the step before any update.
                let mut actor_grads = match train_actor {
                    true => Some(world.sum_grads::<B>(acc_actor.grads())?),
                    false => None,
                };
                let mut critic_grads = match &self.critic {
                    Some(_) => Some(world.sum_grads::<B>(acc_critic.grads())?),
                    None => None,
                };
                let gn = match (&mut actor_grads, &self.actor) {
                    (Some(g), a) => clip_global_norm(a, g, cfg.optim.grad_clip),
                    _ => 0.0,
                };
                let cgn = match (&mut critic_grads, &self.critic) {
                    (Some(g), Some(c)) => clip_global_norm(c, g, cfg.optim.grad_clip),
                    _ => 0.0,
                };
                if !gn.is_finite() || !cgn.is_finite() {
                    fault = Some(format!("gradient norm actor {gn}, critic {cgn}"));
                    break 'update;
                }
                gn_sum += gn;
                cgn_sum += cgn;
                if let Some(g) = actor_grads {
                    self.actor = self.actor_optim.step(lr, self.actor.clone(), g);
                }
                if let (Some(critic), Some(opt), Some(g)) =
                    (self.critic.take(), self.critic_optim.as_mut(), critic_grads)
                {
                    self.critic = Some(opt.step(critic_lr, critic, g));
                }
                self.opt_step += 1;
                n_opt += 1;
            }
        }
        marks.push(("update", Instant::now()));
        let mut last = t0;
        let phase_seconds = marks
            .into_iter()
            .map(|(name, at)| {
                let d = at.duration_since(last).as_secs_f64();
                last = at;
                (name.to_string(), d)
            })
            .collect();
        if fault.is_none() {
            self.update_kl_coef(kl_mean, lens.len());
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
            pl_sum,
            vl_sum,
            cf_sum,
        ];
        tally.extend(summary.stages.values().map(|&c| c as f64));
        let t = world.sum::<B::InnerBackend>(&tally, &dev)?;
        let stages = summary
            .stages
            .keys()
            .cloned()
            .zip(t[12..].iter().map(|&c| c as usize));
        let per = |i: usize, by: usize| t[i] / t[by].max(1.0);
        let n_opt = n_opt.max(1) as f64;
        let seconds = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: self.step,
            epoch: self.epoch,
            reward_mean: per(1, 0),
            format_rate: per(2, 0),
            accuracy: per(3, 0),
            response_len_mean: per(4, 0),
            think_len_mean: per(5, 6),
            kl: kl_mean,
            kl_coef: self.kl_coef,
            entropy: per(7, 8),
            policy_loss: t[9] / n_opt,
            value_loss: t[10] / n_opt,
            clip_frac: t[11] / n_opt,
            explained_var,
            grad_norm: gn_sum / n_opt,
            critic_grad_norm: cgn_sum / n_opt,
            lr,
            critic_lr,
            tokens_per_s: t[4] / seconds,
            seconds,
            phase_seconds,
            stages: stages.collect(),
            eval_accuracy: None,
            eval_format_rate: None,
            skipped: fault,
        };
        let shown: Vec<serde_json::Value> = (0..samples.len().min(cfg.train.samples_per_step))
            .map(|i| {
                serde_json::json!({
                    "step": self.step,
                    "id": self.train_items[idx[samples[i].prompt_index]].id,
                    "gold": self.train_items[idx[samples[i].prompt_index]].answer.to_string(),
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

    /// Adaptive KL controller (Ziegler et al. 2019):
    /// `β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon)`; fixed when no target is set.
    fn update_kl_coef(&mut self, kl: f64, n: usize) {
        if let Some(target) = self.cfg.ppo.kl_target {
            let err = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.kl_coef *= 1.0 + err * n as f64 / self.cfg.ppo.kl_horizon;
        }
    }

    /// Writes the actor as a Hugging Face folder (config, safetensors, tokenizer); with LoRA the
    /// adapters are merged into the base first.
    pub fn save_actor(&self, dir: &Path) -> Result<()> {
        save_qwen2(
            &self.actor.valid().merge_lora(),
            &self.model_config,
            dir,
            SaveDtype::F32,
            5 << 30,
        )?;
        ckpt::copy_tokenizer_files(&self.cfg.model.path, dir)?;
        Ok(())
    }

    /// Whether `flag` is set on any data-parallel replica (itself when alone).
    pub fn agree(&self, flag: bool) -> Result<bool> {
        self.world.any::<B::InnerBackend>(flag, &self.device)
    }

    /// The frozen reference policy (with LoRA: the base model, adapters off).
    pub fn reference(&self) -> &Qwen2<B::InnerBackend> {
        &self.reference
    }

    /// The loop counters (which, with the seed, determine every random draw).
    pub fn loop_state(&self) -> LoopState {
        LoopState {
            format_version: ckpt::FORMAT_VERSION,
            step: self.step,
            epoch: self.epoch,
            cursor: self.cursor,
            opt_step: self.opt_step,
            kl_coef: self.kl_coef,
            bad_streak: self.bad_streak,
            seed: self.cfg.seed,
            rng: "derived: sampler row streams from (seed, step, prompt, sample); epoch shuffle \
                  from (seed, epoch); PPO mini-batch shuffle from (seed, step)"
                .into(),
        }
    }

    /// Writes a checkpoint of everything a resume needs into `RUN/checkpoints/step-…` (see
    /// `checkpoint.rs` for the layout); returns its folder.
    pub fn save_checkpoint(&self, run: &Path) -> Result<PathBuf> {
        let lora = self.cfg.lora.spec();
        ckpt::write_atomic(run, self.step, self.cfg.train.keep_checkpoints, |dir| {
            match &lora {
                Some(spec) => save_lora(
                    &self.actor,
                    spec,
                    Some(&self.cfg.model.path),
                    &dir.join("actor"),
                )?,
                None => self.save_actor(&dir.join("actor"))?,
            }
            let optim = dir.join("optimizer");
            std::fs::create_dir_all(&optim)?;
            ckpt::save_record::<B, ActorRecord<B>>(
                ckpt::to_stable_keys(
                    self.actor_optim.to_record(),
                    &ckpt::param_names::<B, _>(&self.actor),
                )?,
                &optim.join("actor.mpk"),
            )?;
            if let (Some(c), Some(o)) = (&self.critic, &self.critic_optim) {
                let cdir = dir.join("critic");
                match &lora {
                    Some(spec) => save_lora(&c.backbone, spec, Some(&self.cfg.model.path), &cdir)?,
                    None => save_qwen2(
                        &c.backbone.valid(),
                        &self.model_config,
                        &cdir,
                        SaveDtype::F32,
                        5 << 30,
                    )?,
                }
                c.save_head(&cdir.join("value_head.safetensors"))?;
                ckpt::save_record::<B, CriticRecord<B>>(
                    ckpt::to_stable_keys(o.to_record(), &ckpt::param_names::<B, _>(c))?,
                    &optim.join("critic.mpk"),
                )?;
            }
            std::fs::write(dir.join("config.toml"), toml::to_string_pretty(&self.cfg)?)?;
            ckpt::write_state(dir, &self.loop_state())
        })
    }

    /// A checkpoint's model folder: full weights, or (LoRA) adapters on the frozen base already
    /// in memory (shared with the reference, not read again).
    fn load_weights(&self, dir: &Path) -> Result<Qwen2<B>> {
        if self.cfg.lora.spec().is_some() {
            let base = self.actor.clone().without_lora();
            let (model, spec) = load_lora(base, dir, &self.device)?;
            if Some(&spec) != self.cfg.lora.spec().as_ref() {
                bail!(
                    "{}: adapter rank/alpha/targets differ from the config's [lora]",
                    dir.display()
                );
            }
            Ok(model)
        } else {
            if dir.join("adapter_config.json").exists() {
                bail!(
                    "{}: holds LoRA adapters but the config has lora.rank = 0",
                    dir.display()
                );
            }
            Ok(load_qwen2::<B>(dir, &self.device)?.1)
        }
    }

    /// Restores weights, optimizer state and loop counters from a checkpoint folder. The
    /// reference model stays the start model (`model.path`).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let st = ckpt::read_state(dir)?;
        let actor = stable_param_ids(self.load_weights(&dir.join("actor"))?, ACTOR_IDS);
        let file = dir.join("optimizer").join("actor.mpk");
        let rec: ActorRecord<B> = ckpt::load_record::<B, _>(&file, &self.device)?;
        let rec = ckpt::from_stable_keys(rec, &ckpt::param_names::<B, _>(&actor), &file)?;
        self.actor_optim = adamw(&self.cfg.optim).init().load_record(rec);
        self.actor = actor;
        if self.critic.is_some() {
            let cdir = dir.join("critic");
            let backbone = self.load_weights(&cdir)?;
            let critic = stable_param_ids(
                Critic::load_head(backbone, &cdir.join("value_head.safetensors"), &self.device)?,
                CRITIC_IDS,
            );
            let file = dir.join("optimizer").join("critic.mpk");
            let rec: CriticRecord<B> = ckpt::load_record::<B, _>(&file, &self.device)?;
            let rec = ckpt::from_stable_keys(rec, &ckpt::param_names::<B, _>(&critic), &file)?;
            self.critic_optim = Some(adamw(&self.cfg.optim).init().load_record(rec));
            self.critic = Some(critic);
        }
        self.epoch = st.epoch;
        self.reshuffle();
        if st.cursor > self.order.len() {
            bail!(
                "{}: data cursor {} beyond the training set ({} items): different data?",
                dir.join("state.json").display(),
                st.cursor,
                self.order.len()
            );
        }
        self.cursor = st.cursor;
        self.step = st.step;
        self.opt_step = st.opt_step;
        self.kl_coef = st.kl_coef;
        self.bad_streak = st.bad_streak;
        Ok(())
    }
}

fn scalar<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

/// How [`run`] starts and stops.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub quiet: bool,
    /// Continue from this checkpoint folder (see `checkpoint::resolve`).
    pub resume: Option<PathBuf>,
    /// Set (e.g. by a SIGINT/SIGTERM handler) to finish the current step, write a checkpoint and
    /// return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Fault injection for tests (see [`Trainer::inject_nan_steps`]).
    pub inject_nan_steps: Vec<usize>,
    /// Data-parallel replicas, one per device (0 or 1: one device).
    pub devices: usize,
}

/// What a run did.
#[derive(Debug)]
pub struct RunOutcome {
    /// Metrics of the steps run in this process.
    pub metrics: Vec<StepMetrics>,
    /// The checkpoint written on an interrupt; `None` when the run finished.
    pub interrupted: Option<PathBuf>,
}

/// Keeps the lines of a jsonl file whose `step` is below `step` (a resumed run rewrites what a
/// crashed one wrote after its last checkpoint), by rewrite and rename.
fn truncate_jsonl(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| (s as usize) < step)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
}

fn open_log(path: &Path, append: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))
}

/// Each of `devices` replicas takes an equal share of a step's prompts.
fn check_shardable(cfg: &TrainConfig, devices: usize) -> Result<()> {
    let n = cfg.rollout.prompts_per_step;
    if !n.is_multiple_of(devices) {
        bail!("rollout.prompts_per_step ({n}) must be a multiple of the number of devices ({devices})");
    }
    Ok(())
}

/// The whole run: metrics.jsonl, samples.jsonl, a progress bar, held-out evaluations, periodic
/// checkpoints (`train.save_every`), resume, the NaN/Inf guard (`train.max_bad_steps`), a clean
/// stop on `opts.stop`, and the final actor in `OUT/final`. With `opts.devices > 1`, one replica
/// per device (device `i` of `device`'s kind; on the CPU backends they share the CPU), each on
/// its own thread; replica 0 logs, evaluates and writes checkpoints (see `parallel.rs`).
pub fn run<B: AutodiffBackend>(
    cfg: TrainConfig,
    out: &Path,
    device: B::Device,
    opts: &RunOptions,
) -> Result<RunOutcome> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string_pretty(&cfg)?)?;
    let size = opts.devices.max(1);
    check_shardable(&cfg, size)?;
    if size == 1 {
        return drive(Trainer::<B>::new(cfg, device)?, out, opts);
    }
    // GPUs must exist; the CPU backends have one device, which the replicas share.
    if nth_device(&device, 1) != device {
        let found = B::device_count(device.id().type_id);
        if size > found {
            bail!("--devices {size}: only {found} device(s) of this backend's kind were found");
        }
    }
    let mut workers = Vec::with_capacity(size - 1);
    for rank in 1..size {
        let (cfg, device) = (cfg.clone(), nth_device(&device, rank));
        let (out, opts) = (
            out.to_path_buf(),
            RunOptions {
                stop: None,
                quiet: true,
                ..opts.clone()
            },
        );
        let body = move || -> Result<()> {
            let world = World::join::<B::InnerBackend>(rank, size, &device)?;
            drive(Trainer::<B>::replica(cfg, device, world)?, &out, &opts)?;
            world.leave::<B::InnerBackend>()
        };
        // A replica that fails leaves the others waiting in a collective: end the process.
        workers.push(
            std::thread::Builder::new()
                .name(format!("replica-{rank}"))
                .spawn(move || {
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            eprintln!("error on data-parallel replica {rank}: {e:#}");
                            std::process::exit(1);
                        }
                        Err(_) => {
                            eprintln!("data-parallel replica {rank} panicked");
                            std::process::exit(101);
                        }
                    }
                })?,
        );
    }
    let device = nth_device(&device, 0);
    let world = World::join::<B::InnerBackend>(0, size, &device)?;
    let outcome = drive(Trainer::<B>::replica(cfg, device, world)?, out, opts)?;
    world.leave::<B::InnerBackend>()?;
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a data-parallel replica thread panicked"))?;
    }
    Ok(outcome)
}

/// One replica's loop; only the main replica writes files and evaluates.
fn drive<B: AutodiffBackend>(
    mut trainer: Trainer<B>,
    out: &Path,
    opts: &RunOptions,
) -> Result<RunOutcome> {
    let main = trainer.world.is_main();
    if main && !opts.quiet {
        eprint!("{}", trainer.plan.render());
    }
    trainer.inject_nan_steps = opts.inject_nan_steps.clone();
    let (metrics_path, samples_path) = (out.join("metrics.jsonl"), out.join("samples.jsonl"));
    if let Some(dir) = &opts.resume {
        trainer.load_checkpoint(dir)?;
        if main {
            truncate_jsonl(&metrics_path, trainer.step)?;
            truncate_jsonl(&samples_path, trainer.step)?;
            eprintln!("resumed from {} at step {}", dir.display(), trainer.step);
        }
    }
    let resumed = opts.resume.is_some();
    let mut logs = match main {
        true => Some((
            open_log(&metrics_path, resumed)?,
            open_log(&samples_path, resumed)?,
        )),
        false => None,
    };
    let bar = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(trainer.total_steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step as u64);
    let tc = trainer.cfg.train.clone();
    let has_eval = main && tc.eval_every > 0 && !trainer.eval_items.is_empty();
    let mut all = Vec::new();
    let mut last_eval = if has_eval && trainer.step == 0 {
        Some(trainer.evaluate()?)
    } else {
        None
    };
    if let Some((a, f)) = last_eval {
        bar.println(format!(
            "step 0 held-out: accuracy {a:.3}, format rate {f:.3}"
        ));
    }
    while trainer.step < trainer.total_steps {
        let s = trainer.step;
        let (mut m, shown) = trainer.step()?;
        if has_eval && ((s + 1).is_multiple_of(tc.eval_every) || s + 1 == trainer.total_steps) {
            let (a, f) = trainer.evaluate()?;
            m.eval_accuracy = Some(a);
            m.eval_format_rate = Some(f);
            last_eval = Some((a, f));
        }
        if s == 0 {
            if let Some((a, f)) = last_eval {
                // Record the starting point too (before any update).
                m.eval_accuracy.get_or_insert(a);
                m.eval_format_rate.get_or_insert(f);
            }
        }
        if let Some((metrics_file, samples_file)) = &mut logs {
            writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
            for line in shown {
                writeln!(samples_file, "{line}")?;
            }
        }
        if let Some(why) = &m.skipped {
            bar.println(format!("step {s}: update skipped ({why})"));
        }
        bar.set_message(format!(
            "reward {:+.3} fmt {:.2} acc {:.2} kl {:.4} len {:.0}{}",
            m.reward_mean,
            m.format_rate,
            m.accuracy,
            m.kl,
            m.response_len_mean,
            last_eval
                .map(|(a, f)| format!(" | held-out acc {a:.2} fmt {f:.2}"))
                .unwrap_or_default()
        ));
        bar.inc(1);
        all.push(m);
        // The fault streak is the same on every replica (faults are agreed on in `step`).
        if trainer.bad_streak >= tc.max_bad_steps.max(1) {
            if !main {
                return Ok(RunOutcome {
                    metrics: all,
                    interrupted: None,
                });
            }
            bar.abandon();
            let ck = trainer.save_checkpoint(out)?;
            bail!(
                "{} consecutive steps had NaN/Inf (see `skipped` in {}); stopped with a checkpoint \
                 at {}: lower optim.actor_lr / optim.grad_clip or check the data, then \
                 `train --resume {}`",
                trainer.bad_streak,
                metrics_path.display(),
                ck.display(),
                ck.display()
            );
        }
        let done = trainer.step == trainer.total_steps;
        if main && tc.save_every > 0 && (trainer.step.is_multiple_of(tc.save_every) || done) {
            trainer.save_checkpoint(out)?;
        }
        // The main replica's stop request, agreed on by all.
        let stop = trainer.agree(opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)))?;
        if !done && stop {
            bar.abandon();
            let ck = match main {
                true => Some(trainer.save_checkpoint(out)?),
                false => None,
            };
            return Ok(RunOutcome {
                metrics: all,
                interrupted: ck,
            });
        }
    }
    bar.finish();
    if main {
        trainer.save_actor(&out.join("final"))?;
        if let Some(spec) = trainer.cfg.lora.spec() {
            save_lora(
                &trainer.actor,
                &spec,
                Some(&trainer.cfg.model.path),
                &out.join("final_adapter"),
            )?;
        }
    }
    Ok(RunOutcome {
        metrics: all,
        interrupted: None,
    })
}

/// A fresh run folder under `runs/` named by time.
pub fn default_out_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("train-{secs}"))
}
