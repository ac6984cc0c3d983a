//! The PPO trainer (and the critic-free family). One `step` is a pipeline of phases, each in its
//! own file under `trainer/` and each producing the type the next one reads: `rollout` (the
//! sampler's [`rollout::Rollout`]) → `score` (rewards: [`score::Scored`]) → `reference_values`
//! (reference log-probs and critic values: [`crate::experience::Evaluated`]) → `advantages`
//! (KL-shaped rewards and the estimator: [`crate::experience::Experience`]) → `update`
//! (`ppo_epochs` passes of clipped policy / value updates) → `finish_step` (`metrics.rs`). The math lives in `crate::advantages` and `crate::loss`;
//! data parallelism stays behind `World` calls inside the phases. This file holds the trainer's
//! state and the step; `checkpointing.rs` its checkpoints, `run.rs` the run around the steps,
//! `faults.rs` the faults the tests plan.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use qwen2_burn::{load_weights, save_qwen2, Qwen2, Qwen2Config, SaveDtype};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

use crate::checkpoint as ckpt;
use crate::config::{BaseDtype, TrainConfig};
use crate::critic::Critic;
use crate::eval;
use crate::memory::{MemoryPlan, PlanInputs};
use crate::optimizer::adamw;
use crate::parallel::{stable_param_ids, World};
use crate::prompt;
use crate::sampler::SamplingParams;
use crate::task::{self, LoadOptions, McqaItem};
use crate::tokenizer::Tokenizer;
use crate::verifier::Summary;

mod advantages;
mod checkpointing;
mod dynamic_sampling;
mod faults;
mod metrics;
mod reference_values;
mod rollout;
mod run;
mod score;
mod update;

pub use faults::{Fault, Faults};
pub use metrics::StepMetrics;
use run::check_shardable;
pub use run::{default_out_dir, one_device_per_rank, run, run_folder, RunOptions, RunOutcome};
pub use score::RewardFailed;

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
    /// Faults planned by the tests (see [`Faults`]; none in a normal build).
    pub faults: Faults,
    eos: u32,
    /// `reward.program`, started once per run.
    reward_program: Option<std::sync::Mutex<crate::reward::RewardProgram>>,
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
    let ds = task::load(&crate::hub::data_file(path)?, cfg.data.format, &opts)?;
    if let Some(c) = &cfg.data.category {
        if ds.items.is_empty() {
            bail!("{}: no items of data.category {c:?}", path.display());
        }
    }
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
        cfg.require_paths()?;
        let dir = &crate::hub::model_dir(&cfg.model.path)?;
        let (model_config, tok) = Tokenizer::for_model(dir)?;
        if let Some(spec) = cfg.lora.spec() {
            if spec.rank > model_config.hidden_size {
                bail!(
                    "lora.rank = {}: above the model's hidden_size {} (a rank-{} adapter is \
                     no smaller than the layer)",
                    spec.rank,
                    model_config.hidden_size,
                    spec.rank
                );
            }
        }
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
        let prompt_len = train_prompts.iter().map(Vec::len).max().unwrap_or(0);
        crate::tokenizer::check_context(
            model_config.max_position_embeddings,
            prompt_len + cfg.rollout.max_new_tokens,
            &format!(
                "the longest prompt of {} ({prompt_len} tokens) and rollout.max_new_tokens {}",
                cfg.data.train.display(),
                cfg.rollout.max_new_tokens
            ),
        )?;
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
        let mut base = load_weights::<B>(dir, &model_config, &device)?;
        if cfg.model.base_dtype == BaseDtype::Bf16 {
            if !B::supports_dtype(&device, DType::BF16) {
                bail!(
                    "model.base_dtype = \"bf16\": this backend has no bf16 tensors; build with \
                     --features cuda (or flex; WGSL has no bf16), or set model.base_dtype = \"f32\""
                );
            }
            base = base.with_base_dtype(FloatDType::BF16);
            base.low_precision_logits = cfg.model.logits_dtype == BaseDtype::Bf16;
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
        let critic = cfg.ppo.estimator.uses_critic.then(|| {
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
        let reward_program = crate::reward::RewardProgram::start_if_given(
            &cfg.reward.program,
            std::time::Duration::from_secs_f64(cfg.reward.timeout_s),
        )?
        .map(std::sync::Mutex::new);
        let mut t = Self {
            reward_program,
            actor_optim: adamw(&cfg.optim).init(),
            critic_optim: critic.as_ref().map(|_| adamw(&cfg.optim).init()),
            kl_coef: cfg.ppo.kl_coef,
            bad_streak: 0,
            faults: Faults::default(),
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
            stop_strings: r
                .stop
                .clone()
                .unwrap_or_else(|| crate::reward::stop_strings(self.cfg.data.prompt)),
            n: r.n,
            seed: self
                .cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(self.step as u64),
            ..Default::default()
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
        let mut clock = PhaseClock::start();
        // Drawing the prompts moves the data cursor (and may start an epoch); a failed reward
        // puts both back — the order is a function of (seed, epoch) — so the checkpoint written
        // then resumes with this very step.
        let (cursor, epoch) = (self.cursor, self.epoch);
        let (scored, draws) = match self.sample_and_score(&mut clock) {
            Ok(s) => s,
            Err(e) => {
                if self.epoch != epoch {
                    self.epoch = epoch;
                    self.reshuffle();
                }
                self.cursor = cursor;
                return Err(e);
            }
        };
        let mut evaluated = self.reference_values(&scored);
        if self.faults.hits(self.step, self.world.rank, Fault::Rollout) {
            if let Some(x) = evaluated.first_mut().and_then(|e| e.old_logp.first_mut()) {
                *x = f64::NAN;
            }
        }
        clock.mark("reference_values");
        let (experiences, mut adv) = self.advantages(evaluated)?;
        clock.mark("advantages");
        let upd = self.update(&experiences, adv.fault.take())?;
        clock.mark("update");
        self.finish_step(scored, draws, adv, upd, clock)
    }

    /// Adaptive KL controller (Ziegler et al. 2019):
    /// `β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon)`; fixed when no target is set.
    /// A non-finite KL (a step the guard skips) leaves β as it is, so β stays finite.
    fn update_kl_coef(&mut self, kl: f64, n: usize) {
        if let (Some(target), true) = (self.cfg.ppo.kl_target, kl.is_finite()) {
            let err = (kl / target - 1.0).clamp(-0.2, 0.2);
            let next = self.kl_coef * (1.0 + err * n as f64 / self.cfg.ppo.kl_horizon);
            if next.is_finite() {
                self.kl_coef = next.max(0.0);
            }
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
        ckpt::copy_tokenizer_files(&crate::hub::model_dir(&self.cfg.model.path)?, dir)?;
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
}

/// Wall-clock seconds of a step's phases, each from the end of the one before.
struct PhaseClock {
    start: Instant,
    last: Instant,
    phases: std::collections::BTreeMap<String, f64>,
}

impl PhaseClock {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            phases: Default::default(),
        }
    }

    /// Ends phase `name` now (a phase run more than once in a step adds up).
    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        *self.phases.entry(name.into()).or_default() += now.duration_since(self.last).as_secs_f64();
        self.last = now;
    }

    fn total(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

fn scalar<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}
