//! The PPO trainer (and the critic-free family). One `step` is a pipeline of phases, each in its
//! own file under `trainer/`: rollout through the sampler (`rollout.rs`) → verifier rewards
//! (`score.rs`) → reference log-probs and critic values (`reference_values.rs`) → KL-shaped rewards
//! and advantages (`advantages.rs`) → `ppo_epochs` passes of clipped policy / value updates
//! (`update.rs`) → metrics (`metrics.rs`). The math lives in `crate::advantages` and `crate::loss`;
//! data parallelism stays behind `World` calls inside the phases. This file holds the trainer's
//! state, checkpoints and the run loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::tensor::backend::{AutodiffBackend, DeviceOps};
use burn::tensor::{DType, FloatDType};
use qwen2_burn::{load_lora, load_qwen2, save_lora, save_qwen2, Qwen2, Qwen2Config, SaveDtype};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;

use crate::advantages::Estimator;
use crate::checkpoint::{self as ckpt, LoopState};
use crate::config::{BaseDtype, TrainConfig};
use crate::critic::Critic;
use crate::eval;
use crate::memory::{MemoryPlan, PlanInputs};
use crate::optimizer::adamw;
use crate::parallel::{nth_device, stable_param_ids, World};
use crate::prompt;
use crate::sampler::SamplingParams;
use crate::task::{self, LoadOptions, McqaItem};
use crate::tokenizer::Tokenizer;
use crate::verifier::Summary;

mod advantages;
mod metrics;
mod reference_values;
mod rollout;
mod score;
mod update;

pub use score::RewardFailed;

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
    let ds = task::load(path, cfg.data.format, &opts)?;
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
        let dir = &cfg.model.path;
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
        let (_, mut base) = load_qwen2::<B>(dir, &device)?;
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
        let reward_program = match cfg.reward.program.is_empty() {
            true => None,
            false => Some(std::sync::Mutex::new(crate::reward::RewardProgram::start(
                &cfg.reward.program,
                std::time::Duration::from_secs_f64(cfg.reward.timeout_s),
            )?)),
        };
        let mut t = Self {
            reward_program,
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
        let mut clock = PhaseClock::start();
        // Drawing the prompts moves the data cursor (and may start an epoch); a failed reward
        // puts both back — the order is a function of (seed, epoch) — so the checkpoint written
        // then resumes with this very step.
        let (cursor, epoch) = (self.cursor, self.epoch);
        let prompts = self.draw_prompts();
        let samples = self.rollout(&prompts);
        clock.mark("generate");
        let scored = match self.score(&prompts, &samples) {
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
        let mut exps = scored.experiences;
        clock.mark("reward");
        self.reference_and_values(&mut exps);
        clock.mark("reference_values");
        let mut adv = self.advantages(&mut exps)?;
        clock.mark("advantages");
        let upd = self.update(&exps, adv.fault.take())?;
        clock.mark("update");
        self.finish_step(
            &prompts,
            &samples,
            scored.verdicts,
            scored.texts,
            scored.components,
            adv,
            upd,
            clock,
        )
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
            std::fs::create_dir_all(&optim)
                .with_context(|| format!("{}: cannot create", optim.display()))?;
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
            let config = dir.join("config.toml");
            std::fs::write(&config, toml::to_string_pretty(&self.cfg)?)
                .with_context(|| format!("{}: cannot write", config.display()))?;
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

    /// Ends phase `name` now.
    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.phases
            .insert(name.into(), now.duration_since(self.last).as_secs_f64());
        self.last = now;
    }

    fn total(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
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
    let size = opts.devices.max(1);
    check_shardable(&cfg, size)?;
    let write_config = |cfg: &TrainConfig| -> Result<()> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        let path = out.join("config.toml");
        std::fs::write(&path, toml::to_string_pretty(cfg)?)
            .with_context(|| format!("{}: cannot write", path.display()))
    };
    if size == 1 {
        // Built (inputs checked, weights loaded) before anything is written into the run folder.
        let trainer = Trainer::<B>::new(cfg, device)?;
        write_config(&trainer.cfg)?;
        return drive(trainer, out, opts);
    }
    write_config(&cfg)?;
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
        let (mut m, shown) = match trainer.step() {
            Ok(x) => x,
            Err(e) if main && e.is::<RewardFailed>() => {
                bar.abandon();
                let ck = trainer.save_checkpoint(out)?;
                return Err(crate::exit::RunFailed(format!(
                    "{e:#}; stopped before step {s} with a checkpoint at {}: fix the reward \
                     program, then `train --resume {}`",
                    ck.display(),
                    ck.display()
                ))
                .into());
            }
            Err(e) => return Err(e),
        };
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
            writeln!(metrics_file, "{}", serde_json::to_string(&m)?)
                .with_context(|| format!("{}: cannot write", metrics_path.display()))?;
            for line in shown {
                writeln!(samples_file, "{line}")
                    .with_context(|| format!("{}: cannot write", samples_path.display()))?;
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
            return Err(crate::exit::RunFailed(format!(
                "{} consecutive steps had NaN/Inf (see `skipped` in {}); stopped with a checkpoint \
                 at {}: lower optim.actor_lr / optim.grad_clip or check the data, then \
                 `train --resume {}`",
                trainer.bad_streak,
                metrics_path.display(),
                ck.display(),
                ck.display()
            ))
            .into());
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

/// A fresh run folder in `runs` (`train` uses `runs/` of the working folder) named by time
/// (`train-<unix seconds>`, then `-2`, `-3`, … when a run started in the same second has it),
/// created here so no other run can take it.
pub fn default_out_dir(runs: &Path) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    std::fs::create_dir_all(runs).with_context(|| format!("{}: cannot create", runs.display()))?;
    for k in 1.. {
        let name = match k {
            1 => format!("train-{secs}"),
            k => format!("train-{secs}-{k}"),
        };
        let dir = runs.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create", dir.display())),
        }
    }
    unreachable!("an unbounded range ends only by returning")
}

/// What a run writes into its folder; `--overwrite` removes exactly these.
const RUN_ENTRIES: &[&str] = &[
    "config.toml",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "samples.jsonl",
    "samples.jsonl.tmp",
    "checkpoints",
    "final",
    "final_adapter",
    "training.png",
    "training.svg",
];

/// The folder a run writes to. Fresh runs: `out` when it is missing or empty (never inside
/// the run's `inputs`), else refused — unless `overwrite`, which removes a previous run's files
/// (and refuses a folder holding anything else, or the run's own inputs). Resumed runs: the
/// checkpoint's own run folder, or an empty one. No `out`: the checkpoint's run, or a new
/// [`default_out_dir`].
pub fn run_folder(
    out: Option<&Path>,
    resume: Option<&Path>,
    overwrite: bool,
    inputs: &[(&str, &Path)],
) -> Result<PathBuf> {
    let entries = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect()
    };
    let Some(out) = out else {
        return match resume.and_then(ckpt::run_of) {
            Some(run) => Ok(run),
            None => default_out_dir(Path::new("runs")),
        };
    };
    if out.exists() && !out.is_dir() {
        bail!("--out {}: is a file, not a folder", out.display());
    }
    let fresh = entries(out).is_empty();
    if let Some(ck) = resume {
        let own = ckpt::run_of(ck).map(|r| crate::paths::absolute(&r))
            == Some(crate::paths::absolute(out));
        if own || fresh {
            return Ok(out.to_path_buf());
        }
        bail!(
            "--out {}: holds another run's files, and checkpoint {} belongs to {}: resume into \
             that run (leave out --out) or into an empty folder",
            out.display(),
            ck.display(),
            ckpt::run_of(ck).unwrap_or_default().display()
        );
    }
    crate::paths::refuse_overlap("--out", out, inputs)?;
    if fresh {
        return Ok(out.to_path_buf());
    }
    if !overwrite {
        bail!(
            "--out {}: already exists and is not empty; a new run there would overwrite or mix \
             with what it holds. Continue that run with `--resume latest --out {}`, choose \
             another folder, or pass --overwrite to replace it",
            out.display(),
            out.display()
        );
    }
    let foreign: Vec<String> = entries(out)
        .into_iter()
        .filter(|e| !RUN_ENTRIES.contains(&e.as_str()))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "--out {} --overwrite: the folder holds {} that a run does not write; not a run \
             folder, so nothing was removed: choose another folder",
            out.display(),
            foreign.join(", ")
        );
    }
    for name in RUN_ENTRIES {
        let p = out.join(name);
        let removed = match p.is_dir() {
            true => std::fs::remove_dir_all(&p),
            false if p.exists() => std::fs::remove_file(&p),
            false => Ok(()),
        };
        removed.with_context(|| format!("{}: cannot remove (--overwrite)", p.display()))?;
    }
    eprintln!("--overwrite: removed the previous run in {}", out.display());
    Ok(out.to_path_buf())
}
