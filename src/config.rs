//! The training configuration: a TOML file (every key optional, defaults below) plus `--set
//! key=value` overrides with dotted keys (`--set ppo.kl_coef=0.05`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::advantages::KlEstimator;
use crate::estimator::Estimator;
use crate::loss::{Aggregation, RatioLevel};
use crate::prompt::PromptStyle;
use crate::task::DataFormat;
use crate::verifier::VerifierConfig;

/// The embedded default: the demo model and task in `assets/demo`, learning in minutes on a CPU.
pub const DEMO_PRESET: &str = include_str!("../assets/presets/demo.toml");

/// The presets folder (`assets/presets`): relative paths of the embedded demo preset resolve
/// against it, as they do when the same file is given with `--config`.
pub fn presets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/presets")
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub rollout: RolloutConfig,
    pub ppo: PpoConfig,
    pub optim: OptimConfig,
    pub train: LoopConfig,
    pub verifier: VerifierConfig,
    pub reward: RewardConfig,
    pub lora: LoraConfig,
}

/// Where the reward comes from (see `reward.rs`): the built-in verifier (`program` empty, the
/// default), or an external program started once per run that answers one JSON line per reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Command and arguments, e.g. `["python3", "examples/reward.py"]`, run from the working
    /// folder.
    pub program: Vec<String>,
    /// Seconds to wait for each answer before the run stops (with a checkpoint).
    pub timeout_s: f64,
    /// DAPO's overlong reward shaping: the last `overlong_buffer` tokens before
    /// `rollout.max_new_tokens` are a zone where the reward falls linearly, to
    /// `−overlong_penalty` at the limit ([`crate::reward::overlong_penalty`]); 0 = off.
    pub overlong_buffer: usize,
    pub overlong_penalty: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            program: vec![],
            timeout_s: 60.0,
            overlong_buffer: 0,
            overlong_penalty: 1.0,
        }
    }
}

/// LoRA adapters on a frozen base shared by actor, critic and reference (`rank = 0`: full
/// fine-tuning). See `model/src/lora.rs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 16.0,
            targets: qwen2_burn::PROJECTIONS.map(String::from).to_vec(),
        }
    }
}

impl LoraConfig {
    /// The adapter spec, or `None` for full fine-tuning.
    pub fn spec(&self) -> Option<qwen2_burn::LoraSpec> {
        (self.rank > 0).then(|| qwen2_burn::LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face Qwen2 folder, or a Hub id (`Qwen/Qwen2.5-3B[@revision]`, fetched into the
    /// Hugging Face cache by `hub`). Relative paths resolve against the config file's folder.
    pub path: PathBuf,
    /// Compute per-token log-probs this many positions at a time (bounds the logits' memory).
    pub logprob_chunk: usize,
    /// Refuse to start when the memory plan's peak exceeds this many GiB (unset: no check).
    pub memory_limit_gb: Option<f64>,
    /// Storage of the frozen base under LoRA: `f32`, or `bf16` (half the memory; projections
    /// multiply in bf16, activations, adapters, log-probs and losses stay f32). Needs LoRA and a
    /// backend with bf16 tensors (cuda, flex; not wgpu: WGSL has no bf16).
    pub base_dtype: BaseDtype,
    /// The LM head product over a bf16 base: `f32` (default; the head is cast up while it runs,
    /// so the product adds no bf16 rounding of its own) or `bf16` (faster, less memory). Compare
    /// the two with the `logprob_gap_*` metrics.
    pub logits_dtype: BaseDtype,
    /// Recompute activations during training instead of keeping them: the update's forward keeps
    /// only each decoder layer's input and the backward re-runs one layer (and one log-prob
    /// chunk of the LM head) at a time. Same gradients, one more forward; the update's memory
    /// falls from all layers' activations to one layer's (see `med-rlvr plan`).
    pub recompute: bool,
}

/// See [`ModelConfig::base_dtype`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    #[default]
    F32,
    Bf16,
}

impl BaseDtype {
    /// Bytes per stored element.
    pub fn bytes(self) -> u64 {
        match self {
            BaseDtype::F32 => 4,
            BaseDtype::Bf16 => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A jsonl or parquet file, or `hf://datasets/OWNER/NAME[@REVISION]/PATH` on the Hub.
    pub train: PathBuf,
    /// Held-out set for greedy evaluation during training (optional); a file or `hf://` path.
    pub eval: Option<PathBuf>,
    pub format: DataFormat,
    pub category: Option<String>,
    pub none_of_the_above: bool,
    pub skip_invalid: bool,
    pub prompt: PromptStyle,
    /// At most this many eval items (0 = all).
    pub eval_limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts per PPO step (rollout batch).
    pub prompts_per_step: usize,
    /// Samples per prompt.
    pub n: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    /// Stop strings (kept in the reply); `<|endoftext|>` always stops. Unset: the prompt style's
    /// ([`crate::reward::stop_strings`]: `</answer>` for r1, a newline for direct).
    pub stop: Option<Vec<String>>,
    /// Prompts per sampler call (bounds the rollout's KV cache); 0 = all of a step's prompts.
    /// Samples do not depend on it.
    pub generate_batch: usize,
    /// DAPO's dynamic sampling (verl's `filter_groups`): a prompt whose `n` samples all got the
    /// same reward carries no advantage under group normalisation, so its group is dropped and
    /// more prompts are drawn until the step holds `prompts_per_step` groups with differing
    /// rewards, or `max_draws` batches were drawn (then dropped groups fill the rest).
    pub filter_groups: bool,
    /// Batches of `prompts_per_step` prompts drawn per step at most under `filter_groups`
    /// (verl's `max_num_gen_batches`).
    pub max_draws: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    pub estimator: Estimator,
    pub ppo_epochs: usize,
    /// Samples per optimizer step.
    pub train_batch: usize,
    /// Samples per forward/backward (gradient accumulation inside a train batch).
    pub micro_batch: usize,
    /// Padded tokens per forward/backward instead of `micro_batch` samples when above 0 (verl's
    /// `use_dynamic_bsz`): a mini-batch's sequences grouped by length into micro-batches of
    /// `rows × width ≤ micro_batch_tokens` (a longer sequence alone), so short replies are not
    /// padded to long ones. The loss weights are unchanged: the same gradient as any split.
    pub micro_batch_tokens: usize,
    /// Padded tokens per no-grad forward (reference log-probs, critic values): sequences are
    /// grouped by length into batches of `rows × width ≤ forward_tokens`, independent of
    /// `micro_batch`. Memory only; no effect on the numbers.
    pub forward_tokens: usize,
    /// Truncated importance sampling against the rollout–trainer mismatch (off when unset): the
    /// actor's log-probs are recomputed by the trainer's kernels before the update and serve as
    /// `log π_old`; each token's policy loss is weighted by `min(π_old / π_rollout, cap)`.
    /// A number, or `"off"`.
    #[serde(with = "number_or_off")]
    pub rollout_is_cap: Option<f64>,
    pub eps_low: f64,
    pub eps_high: f64,
    /// Where the clipped ratio is taken: `"token"` (PPO), `"sequence"` (GSPO) or
    /// `"sequence-token"` (GSPO-token); see [`RatioLevel`].
    pub ratio_level: RatioLevel,
    /// DAPO's overlong filtering (TRL's `mask_truncated_completions`): samples cut at
    /// `rollout.max_new_tokens` are left out of the losses (and of their normalisers).
    pub mask_truncated: bool,
    /// Value clip `c`, or `"off"`: the unclipped value loss `½·agg((V − G)²)`.
    #[serde(with = "number_or_off")]
    pub value_clip: Option<f64>,
    pub gamma: f64,
    pub lambda: f64,
    pub kl_estimator: KlEstimator,
    /// β: initial KL coefficient.
    pub kl_coef: f64,
    /// Adaptive KL controller (Ziegler et al.): target KL, or `"off"` (the default): fixed β.
    #[serde(with = "number_or_off")]
    pub kl_target: Option<f64>,
    pub kl_horizon: f64,
    /// GRPO style: k3 KL as a loss term (weight β) instead of KL-shaped rewards.
    pub use_kl_loss: bool,
    pub loss_agg: Aggregation,
    /// PPO steps at the start during which only the critic trains.
    pub critic_warmup: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub actor_lr: f64,
    pub critic_lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    pub warmup_ratio: f64,
    /// Cosine floor as a fraction of the peak learning rate.
    pub min_lr_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    /// PPO steps (rollout + update). 0: `epochs` passes over the training set.
    pub steps: usize,
    pub epochs: usize,
    /// Greedy evaluation on the eval set every this many steps (and at the start and end); 0 = off.
    pub eval_every: usize,
    /// Decoded rollouts written to samples.jsonl per step.
    pub samples_per_step: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 = only on interrupt or abort.
    pub save_every: usize,
    /// Keep the newest this many checkpoints.
    pub keep_checkpoints: usize,
    /// Stop (with a checkpoint) after this many consecutive steps skipped for NaN/Inf.
    pub max_bad_steps: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            logprob_chunk: 64,
            memory_limit_gb: None,
            base_dtype: BaseDtype::F32,
            logits_dtype: BaseDtype::F32,
            recompute: true,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            format: DataFormat::Auto,
            category: None,
            none_of_the_above: false,
            skip_invalid: false,
            prompt: PromptStyle::R1,
            eval_limit: 0,
        }
    }
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            prompts_per_step: 1024,
            n: 1,
            max_new_tokens: 1024,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            stop: None,
            generate_batch: 0,
            filter_groups: false,
            max_draws: 4,
        }
    }
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            estimator: Estimator::default(),
            ppo_epochs: 1,
            train_batch: 128,
            micro_batch: 8,
            micro_batch_tokens: 0,
            forward_tokens: 8192,
            rollout_is_cap: None,
            eps_low: 0.2,
            eps_high: 0.2,
            ratio_level: RatioLevel::Token,
            mask_truncated: false,
            value_clip: Some(0.2),
            gamma: 1.0,
            lambda: 1.0,
            kl_estimator: KlEstimator::K1,
            kl_coef: 0.01,
            kl_target: None,
            kl_horizon: 10000.0,
            use_kl_loss: false,
            loss_agg: Aggregation::SeqMeanTokenMean,
            critic_warmup: 0,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            actor_lr: 5e-7,
            critic_lr: 9e-6,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.1,
        }
    }
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            steps: 0,
            epochs: 1,
            eval_every: 0,
            samples_per_step: 4,
            save_every: 0,
            keep_checkpoints: 3,
            max_bad_steps: 3,
        }
    }
}

impl TrainConfig {
    /// Parses TOML text, applies `key=value` overrides, resolves relative paths against `base`
    /// and checks every value's range ([`TrainConfig::problems`]). Errors name the key, the
    /// value and where it came from: `origin` (the file), the `--set` override, or the default.
    pub fn from_toml(text: &str, origin: &str, overrides: &[String], base: &Path) -> Result<Self> {
        let file: toml::Table =
            toml::from_str(text).map_err(|e| anyhow!("{origin}: invalid TOML: {e}"))?;
        // The file alone first, then each override on top, so an error names its source.
        let mut value = file.clone();
        let mut cfg: TrainConfig = toml::Value::Table(value.clone())
            .try_into()
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .ok_or_else(|| anyhow!("--set {o}: expected key=value"))?;
            set_dotted(&mut value, key.trim(), parse_literal(raw.trim()))
                .with_context(|| format!("--set {o}"))?;
            cfg = toml::Value::Table(value.clone())
                .try_into()
                .map_err(|e| anyhow!("--set {o}: {e}"))?;
        }
        // Relative paths against the file's folder; hub ids (a model id with no local folder of
        // that name there) and hf:// paths stay as they are, for `hub` to fetch.
        let resolve = |p: &mut PathBuf, model: bool| {
            let s = p.to_string_lossy();
            if p.as_os_str().is_empty() || !p.is_relative() || s.starts_with("hf://") {
                return;
            }
            let local = crate::paths::lexical(&base.join(&*p));
            if !(model && !local.exists() && crate::hub::Repo::model(&s).is_some()) {
                *p = local;
            }
        };
        resolve(&mut cfg.model.path, true);
        resolve(&mut cfg.data.train, false);
        if let Some(e) = cfg.data.eval.as_mut() {
            resolve(e, false);
        }
        if let Some(p) = cfg.problems().into_iter().next() {
            let source = |key: &str| {
                overrides
                    .iter()
                    .rev()
                    .find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key))
                    .map(|o| format!("--set {o}"))
                    .or_else(|| has_dotted(&file, key).then(|| origin.to_string()))
            };
            let mut sources: Vec<String> = p.keys.iter().filter_map(|k| source(k)).collect();
            sources.dedup();
            let from = match sources.is_empty() {
                true => format!("the default, {origin} sets no such key"),
                false => sources.join("; "),
            };
            bail!("{} (from {from})", p.message);
        }
        Ok(cfg)
    }

    /// Reads a TOML file (or the embedded demo preset when `path` is none). Relative paths in
    /// the file resolve against its folder (the embedded preset's: `assets/presets`).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
                Self::from_toml(&text, &p.display().to_string(), overrides, &base)
            }
            None => Self::from_toml(
                DEMO_PRESET,
                "embedded demo preset",
                overrides,
                &presets_dir(),
            ),
        }
    }

    /// The paths a training run needs, with the fix named when one is missing.
    pub fn require_paths(&self) -> Result<()> {
        if self.model.path.as_os_str().is_empty() {
            bail!("model.path is not set: give --model DIR or set model.path in the config");
        }
        if self.data.train.as_os_str().is_empty() {
            bail!("data.train is not set: give --data FILE or set data.train in the config");
        }
        Ok(())
    }

    /// Every value outside its range and every broken relationship between values, each naming
    /// its keys, the value and what is allowed (empty when the config is valid).
    pub fn problems(&self) -> Vec<Problem> {
        let mut v = Vec::new();
        let r = &self.rollout;
        let (p, o, t) = (&self.ppo, &self.optim, &self.train);
        let mut count = |key: &'static str, x: usize, min: usize, max: usize| {
            if !(min..=max).contains(&x) {
                v.push(Problem::range(
                    key,
                    x,
                    &format!("an integer in {min}..={max}"),
                ));
            }
        };
        count("rollout.prompts_per_step", r.prompts_per_step, 1, 1 << 20);
        count("rollout.n", r.n, 1, 1024);
        count("rollout.max_new_tokens", r.max_new_tokens, 1, 1 << 20);
        count("rollout.max_draws", r.max_draws, 1, 1 << 20);
        count("model.logprob_chunk", self.model.logprob_chunk, 1, 1 << 20);
        count("ppo.ppo_epochs", p.ppo_epochs, 1, 1000);
        count("ppo.train_batch", p.train_batch, 1, 1 << 30);
        count("ppo.micro_batch", p.micro_batch, 1, 1 << 30);
        count("ppo.micro_batch_tokens", p.micro_batch_tokens, 0, 1 << 32);
        count("ppo.forward_tokens", p.forward_tokens, 1, 1 << 32);
        count("train.keep_checkpoints", t.keep_checkpoints, 1, 1 << 20);
        count("train.max_bad_steps", t.max_bad_steps, 1, 1 << 20);
        if t.steps == 0 {
            count("train.epochs", t.epochs, 1, 1 << 20);
        }
        let mut real = |key: &'static str, x: f64, range: Range| {
            if !range.contains(x) {
                v.push(Problem::range(key, x, &range.to_string()));
            }
        };
        use Range::*;
        real("rollout.temperature", r.temperature as f64, AtLeast(0.0));
        real("rollout.top_p", r.top_p as f64, AboveAtMost(0.0, 1.0));
        real("ppo.eps_low", p.eps_low, Below(0.0, 1.0));
        real("ppo.eps_high", p.eps_high, AtLeast(0.0));
        real("ppo.gamma", p.gamma, Within(0.0, 1.0));
        real("ppo.lambda", p.lambda, Within(0.0, 1.0));
        real("ppo.kl_coef", p.kl_coef, AtLeast(0.0));
        real("ppo.kl_horizon", p.kl_horizon, Above(0.0));
        if let Some(c) = p.value_clip {
            real("ppo.value_clip", c, Above(0.0));
        }
        if let Some(c) = p.kl_target {
            real("ppo.kl_target", c, Above(0.0));
        }
        if let Some(c) = p.rollout_is_cap {
            real("ppo.rollout_is_cap", c, Above(0.0));
        }
        real("optim.actor_lr", o.actor_lr, AtLeast(0.0));
        real("optim.critic_lr", o.critic_lr, AtLeast(0.0));
        real("optim.beta1", o.beta1, Below(0.0, 1.0));
        real("optim.beta2", o.beta2, Below(0.0, 1.0));
        real("optim.eps", o.eps, Above(0.0));
        real("optim.weight_decay", o.weight_decay, AtLeast(0.0));
        real("optim.grad_clip", o.grad_clip, AtLeast(0.0));
        real("optim.warmup_ratio", o.warmup_ratio, Within(0.0, 1.0));
        real("optim.min_lr_ratio", o.min_lr_ratio, Within(0.0, 1.0));
        real(
            "verifier.answer_leak_penalty",
            self.verifier.answer_leak_penalty as f64,
            AtLeast(0.0),
        );
        real(
            "verifier.preamble_penalty",
            self.verifier.preamble_penalty as f64,
            AtLeast(0.0),
        );
        if let Some(gb) = self.model.memory_limit_gb {
            real("model.memory_limit_gb", gb, Above(0.0));
        }
        real("reward.timeout_s", self.reward.timeout_s, Above(0.0));
        real(
            "reward.overlong_penalty",
            self.reward.overlong_penalty,
            AtLeast(0.0),
        );
        if self.lora.rank > 0 {
            real("lora.alpha", self.lora.alpha, Above(0.0));
        }
        if self
            .reward
            .program
            .first()
            .is_some_and(|p| p.trim().is_empty())
        {
            v.push(Problem::new(
                &["reward.program"],
                "reward.program starts with an empty command name".into(),
            ));
        }
        if let Some(i) = r.stop.iter().flatten().position(String::is_empty) {
            v.push(Problem::new(
                &["rollout.stop"],
                format!("rollout.stop[{i}] is empty: a stop string needs at least one character"),
            ));
        }
        let samples = r.prompts_per_step * r.n;
        if p.train_batch > samples {
            v.push(Problem::new(
                &["ppo.train_batch", "rollout.prompts_per_step", "rollout.n"],
                format!(
                    "ppo.train_batch = {} exceeds the samples of a step (rollout.prompts_per_step {} × rollout.n {} = {samples}): lower it or sample more",
                    p.train_batch, r.prompts_per_step, r.n
                ),
            ));
        }
        if let Some(spec) = self.lora.spec() {
            if let Err(e) = spec.validate() {
                v.push(Problem::new(&["lora.rank", "lora.targets"], e));
            }
        }
        if self.model.base_dtype != BaseDtype::F32 && self.lora.spec().is_none() {
            v.push(Problem::new(
                &["model.base_dtype", "lora.rank"],
                "model.base_dtype = \"bf16\" stores the frozen base of LoRA training; set \
                 lora.rank > 0, or model.base_dtype = \"f32\" for full fine-tuning"
                    .into(),
            ));
        }
        if r.filter_groups && r.n < 2 {
            v.push(Problem::new(
                &["rollout.filter_groups", "rollout.n"],
                "rollout.filter_groups compares the rewards of a prompt's samples: it needs \
                 rollout.n >= 2"
                    .into(),
            ));
        }
        let rw = &self.reward;
        if rw.overlong_buffer > r.max_new_tokens {
            v.push(Problem::new(
                &["reward.overlong_buffer", "rollout.max_new_tokens"],
                format!(
                    "reward.overlong_buffer = {} exceeds rollout.max_new_tokens = {}: the \
                     penalty zone is the last overlong_buffer tokens before the limit",
                    rw.overlong_buffer, r.max_new_tokens
                ),
            ));
        }
        if p.estimator.needs_groups && r.n < 2 {
            v.push(Problem::new(
                &["rollout.n", "ppo.estimator"],
                format!(
                    "ppo.estimator {:?} needs rollout.n >= 2 samples per prompt",
                    p.estimator
                ),
            ));
        }
        v
    }
}

/// One invalid setting: the keys involved (the first one decides where it came from) and a
/// message naming them, the value and what is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub keys: Vec<&'static str>,
    pub message: String,
}

impl Problem {
    fn new(keys: &[&'static str], message: String) -> Self {
        Self {
            keys: keys.to_vec(),
            message,
        }
    }

    fn range(key: &'static str, value: impl std::fmt::Display, allowed: &str) -> Self {
        Self::new(&[key], format!("{key} = {value}: must be {allowed}"))
    }
}

/// The allowed values of a real-valued setting (NaN and ±∞ are never allowed).
#[derive(Debug, Clone, Copy)]
enum Range {
    AtLeast(f64),
    Above(f64),
    /// `[lo, hi)`.
    Below(f64, f64),
    /// `(lo, hi]`.
    AboveAtMost(f64, f64),
    /// `[lo, hi]`.
    Within(f64, f64),
}

impl Range {
    fn contains(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Range::AtLeast(lo) => x >= lo,
                Range::Above(lo) => x > lo,
                Range::Below(lo, hi) => x >= lo && x < hi,
                Range::AboveAtMost(lo, hi) => x > lo && x <= hi,
                Range::Within(lo, hi) => x >= lo && x <= hi,
            }
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Range::AtLeast(lo) => write!(f, "a finite number >= {lo}"),
            Range::Above(lo) => write!(f, "a finite number > {lo}"),
            Range::Below(lo, hi) => write!(f, "in [{lo}, {hi})"),
            Range::AboveAtMost(lo, hi) => write!(f, "in ({lo}, {hi}]"),
            Range::Within(lo, hi) => write!(f, "in [{lo}, {hi}]"),
        }
    }
}

/// Optional numbers a config can switch off by name, since TOML has no null: a number, or the
/// string `"off"` (`value_clip = "off"`, `--set ppo.value_clip=off`); `None` is written as
/// `"off"`, so a run's saved `config.toml` reads back as it was.
mod number_or_off {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_f64(*x),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::Float(x) => Ok(Some(x)),
            toml::Value::Integer(x) => Ok(Some(x as f64)),
            toml::Value::String(s) if s == "off" => Ok(None),
            other => Err(D::Error::custom(format!(
                "expected a number or \"off\", found {other}"
            ))),
        }
    }
}

/// Whether a dotted key (`ppo.kl_coef`) is present in a TOML table.
fn has_dotted(table: &toml::Table, key: &str) -> bool {
    let mut t = table;
    let mut parts = key.split('.').peekable();
    while let Some(p) = parts.next() {
        match (t.get(p), parts.peek()) {
            (Some(_), None) => return true,
            (Some(toml::Value::Table(inner)), Some(_)) => t = inner,
            _ => return false,
        }
    }
    false
}

fn parse_literal(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("empty key"))?;
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        t = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("`{p}` is not a table"),
        };
    }
    t.insert(last.to_string(), value);
    Ok(())
}
