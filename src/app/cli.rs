//! The `med-rlvr` command line. Every command is generic over the Burn backend; `main.rs` picks the
//! backend once, from the cargo features.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::{Args, Parser, Subcommand};
use qwen2_burn::{load_qwen2, Qwen2, Qwen2Config};
use serde_json::json;

use med_rlvr::sampler::{self, SamplingParams};
use med_rlvr::tokenizer::Tokenizer;

/// `println!` that returns an error naming stdout instead of panicking when stdout is closed or
/// its disk is full.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).context("cannot write to stdout")?
    };
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).context("cannot write to stdout")?
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "med-rlvr",
    version,
    about = "RLVR for medical multiple-choice QA on Qwen2, in Rust on Burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Log-probabilities of a continuation given a prompt (teacher forcing).
    Logprobs(LogprobsArgs),
    /// Sample continuations through the batched KV-cached sampler.
    Generate(GenerateArgs),
    /// Throughput of a geometry with random weights (prefill/decode, or a rollout).
    Bench(BenchArgs),
    /// Score replies with the verifier: reward, format, extracted letter, stage, diagnostics.
    Score(ScoreArgs),
    /// RL training (PPO or a critic-free estimator). No arguments: the embedded demo.
    Train(TrainArgs),
    /// Rebuild the demo task and tiny model shipped in assets/demo (see src/app/demo.rs).
    DemoAssets(DemoArgs),
    /// Evaluate a model on MCQA files: accuracy and format rate with bootstrap std, per category.
    Eval(EvalArgs),
    /// The SFT baseline: direct template, loss on the answer letter and the end token.
    Sft(SftArgs),
    /// Figures: a run's training curves (`--run`), or a bar chart of eval summaries (`--eval`).
    Plot(PlotArgs),
    /// Write a checkpoint's (or run's) policy as a full Hugging Face folder that transformers loads.
    Export(ExportArgs),
    /// The memory plan of a training config, computed without loading weights.
    Plan(PlanArgs),
    /// Differential check of this build's backend against the CPU reference (ndarray): model,
    /// trainer and sampler entry points over a sweep of shapes; exit 1 on any mismatch.
    Selfcheck(SelfcheckArgs),
}

#[derive(Args, Debug)]
pub struct SelfcheckArgs {
    /// Number of shapes to draw.
    #[arg(long, default_value_t = 24, value_parser = at_least_one)]
    pub cases: usize,
    /// Seed of the drawn shapes, weights and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON object per case instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A TOML config (default: the embedded demo preset).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A model folder or a config.json (only the geometry is read).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `key=value` overrides, as for `train`.
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Longest prompt in tokens (default: measured on data.train with the model's tokenizer,
    /// else 512).
    #[arg(long, value_parser = at_least_one)]
    pub prompt_len: Option<usize>,
    /// Fail (exit 1) when the peak exceeds this many GiB (default: model.memory_limit_gb).
    #[arg(long, value_parser = positive_real, allow_negative_numbers = true)]
    pub limit_gb: Option<f64>,
    /// Plan one device of a `train --devices N` run (its share of the rollout).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub devices: usize,
    #[arg(long)]
    pub json: bool,
}

/// Weight dtype of `bench`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDtype {
    F32,
    Bf16,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint folder, a run folder (its latest checkpoint, else its `final/`), or a model
    /// folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The base model of a LoRA checkpoint (default: the path recorded in adapter_config.json).
    #[arg(long)]
    pub base: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["run", "eval"])))]
pub struct PlotArgs {
    /// A run folder (or its metrics.jsonl): writes training.png and training.svg.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// One or more eval summary.json files (or eval folders): writes eval.png and eval.svg.
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// Output folder (default: the run folder, or the current folder for --eval).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SftArgs {
    #[arg(long, default_value_os_t = crate::app::demo::model_dir())]
    pub model: PathBuf,
    /// Default: the embedded demo task's training file.
    #[arg(long, default_value_os_t = crate::app::demo::assets_dir().join("train.jsonl"))]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: med_rlvr::task::DataFormat,
    #[arg(long)]
    pub category: Option<String>,
    #[arg(long)]
    pub none_of_the_above: bool,
    #[arg(long)]
    pub skip_invalid: bool,
    /// The paper: 10.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub epochs: usize,
    /// Learning rate; repeat for a grid (the paper: 1e-5, 5e-6, 1e-6), one run folder each.
    #[arg(long = "lr", default_values_t = vec![1e-5], value_parser = positive_real, allow_negative_numbers = true)]
    pub lr: Vec<f64>,
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// LoRA rank on every projection (0 = full fine-tuning); adapters in OUT/final_adapter,
    /// merged model in OUT/final.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0, value_parser = positive_real, allow_negative_numbers = true)]
    pub lora_alpha: f64,
    /// Batch examples of similar length together (less padding; the order stays random).
    #[arg(long)]
    pub group_by_length: bool,
    #[arg(long, default_value = "sft-out")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long, default_value_os_t = crate::app::demo::model_dir())]
    pub model: PathBuf,
    /// A LoRA adapter folder (PEFT layout) to apply to --model (merged before generating).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Dataset files; several give one table with a column each.
    /// Default: the embedded demo task's held-out file.
    #[arg(long, num_args = 1.., default_values_os_t = [crate::app::demo::assets_dir().join("test.jsonl")])]
    pub data: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: med_rlvr::task::DataFormat,
    /// Keep only this category (MMLU-Pro `category`, MedQA `meta_info`), e.g. `health`.
    #[arg(long)]
    pub category: Option<String>,
    #[arg(long, value_enum, default_value = "r1")]
    pub prompt: med_rlvr::prompt::PromptStyle,
    /// Generations per question.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub n: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = temperature, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    pub top_p: f32,
    /// At most this many questions per dataset.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub max_new_tokens: usize,
    /// Prompts per sampler batch.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub batch: usize,
    #[arg(long)]
    pub strict: bool,
    #[arg(long)]
    pub none_of_the_above: bool,
    #[arg(long)]
    pub skip_invalid: bool,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
    pub resamples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Row label in the table (default: the model folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Output folder (generations.jsonl, summary.json, table.md).
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// Take each reply's reward from this program (as `reward.program` in training: one JSON
    /// request per line in, one `{"reward": …}` per line out); format and accuracy stay the
    /// verifier's. The command and its arguments, e.g. `--reward-program python3 rp.py`.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub reward_program: Vec<String>,
    /// Seconds to wait for each of the program's answers.
    #[arg(long, default_value_t = 60.0, value_parser = positive_real)]
    pub reward_timeout_s: f64,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML config (assets/presets/*.toml); default: the embedded demo preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `model.path`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Overrides `data.train`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run folder (default: runs/train-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `key=value` override with a dotted key, e.g. `--set ppo.estimator=\"grpo\"` or `--set rollout.n=4`; repeatable.
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write a checkpoint every K steps (overrides `train.save_every`).
    #[arg(long, value_name = "K")]
    pub save_every: Option<usize>,
    /// Data parallelism over N devices (GPUs 0..N with `--features cuda`/`wgpu`; on the CPU
    /// backends N replicas share the CPU, which only tests the machinery). Each device samples
    /// and trains on 1/N of `rollout.prompts_per_step`; gradients are all-reduced with Burn's
    /// collective. Does not change the math.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub devices: usize,
    /// Continue a run: a checkpoint folder, a run folder (its latest checkpoint), or `latest`
    /// (the latest in `--out`). Without `--config`, the checkpoint's config is used.
    #[arg(long, value_name = "DIR|latest")]
    pub resume: Option<PathBuf>,
    /// Resume even when the config differs from the checkpoint's in a way that changes the math.
    #[arg(long)]
    pub force: bool,
    /// Replace the previous run in `--out` (its metrics, samples, checkpoints and final model);
    /// without it an existing, non-empty `--out` is refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = "assets/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Epochs over the knowledge corpus (the first pretraining phase, see src/app/demo.rs).
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub epochs: usize,
    /// Write only the task and the tokenizer (`train.jsonl`, `test.jsonl`,
    /// `model/tokenizer.json`), not the pretrained model: seconds instead of half an hour.
    #[arg(long)]
    pub task_only: bool,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// jsonl with `response`, `answer` (gold letter), optional `num_options` (default 10, A–J) and
    /// `gold_text`.
    #[arg(long)]
    pub input: PathBuf,
    /// The prompt style the replies answer: r1 (think/answer tags, the paper's reward) or direct
    /// (the first letter of the first line).
    #[arg(long, value_enum, default_value = "r1")]
    pub prompt: med_rlvr::prompt::PromptStyle,
    /// Start-anchored, one bare in-range letter.
    #[arg(long)]
    pub strict: bool,
    /// Write scored lines here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A model folder whose tokenizer counts think tokens (optional).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Subtract this when the first sentence of think states the answer (off: 0).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_real, allow_negative_numbers = true)]
    pub answer_leak_penalty: f32,
    /// Subtract this when more than 15 words precede `<think>` (off: 0).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_real, allow_negative_numbers = true)]
    pub preamble_penalty: f32,
    /// Take each reply's reward from this program (as `reward.program` in training and
    /// `eval --reward-program`); format and accuracy stay the verifier's. Each request's `id`,
    /// `prompt`, `question`, `options` and `category` are the line's keys of those names when
    /// present (`id` defaults to `line-N`).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub reward_program: Vec<String>,
    /// Seconds to wait for each of the program's answers.
    #[arg(long, default_value_t = 60.0, value_parser = positive_real)]
    pub reward_timeout_s: f64,
}

#[derive(Args, Debug)]
pub struct LogprobsArgs {
    /// A Hugging Face Qwen2 folder (config.json, safetensors, tokenizer.json).
    #[arg(long, default_value_os_t = crate::app::demo::model_dir())]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub continuation: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long, default_value_os_t = crate::app::demo::model_dir())]
    pub model: PathBuf,
    /// One prompt (plain text, no template applied).
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A jsonl file, one `{"prompt": "..."}` (or a JSON string) per line; one output line per sample.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = temperature, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop string (kept in the output); repeatable.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Extra stop token id; `<|endoftext|>` always stops unless --no-eos-stop.
    #[arg(long = "stop-token")]
    pub stop_token: Vec<u32>,
    #[arg(long)]
    pub no_eos_stop: bool,
    /// Prompts per batch in --prompts mode.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A config.json giving the geometry (e.g. assets/configs/qwen2.5-0.5b.json).
    #[arg(long, required_unless_present = "verifier")]
    pub config: Option<PathBuf>,
    /// Verifier mode: score this many seeded random replies and count the rewards.
    #[arg(long, value_parser = at_least_one)]
    pub verifier: Option<usize>,
    /// Use random weights (the only mode: benches measure kernels, not checkpoints).
    #[arg(long, default_value_t = true)]
    pub random_weights: bool,
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch: usize,
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub new_tokens: usize,
    /// Rollout mode: `--batch` prompts × `--n` samples through the sampler.
    #[arg(long)]
    pub rollout: bool,
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub n: usize,
    /// Rollout: make every k-th token id a stop id, so rows end at varied lengths (mean ≈ k).
    #[arg(long, default_value_t = 0)]
    pub stop_every: usize,
    /// Rollout: keep finished rows in the batch, masked, instead of compacting them out.
    #[arg(long)]
    pub mask: bool,
    /// Rollout: rows decoded together (0 = all); freed rows are refilled (continuous batching).
    #[arg(long, default_value_t = 0)]
    pub max_rows: usize,
    /// Rollout: one sampler call per --max-rows rows instead of continuous batching.
    #[arg(long)]
    pub slices: bool,
    /// Weights in `f32` or `bf16` (embedding and projections stored and multiplied in bf16, as
    /// `model.base_dtype = "bf16"`; logits and sampling in f32). bf16 needs cuda or flex.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDtype,
    /// Update mode: one forward and backward of the PPO loss on `--batch` sequences of
    /// `--prompt-len` + `--new-tokens` tokens (LoRA on a frozen base); prints the resident memory
    /// it took next to `med-rlvr plan`'s update phase. Run once per process (Linux).
    #[arg(long)]
    pub update: bool,
    /// Update: keep every activation (no layer-by-layer recomputation).
    #[arg(long)]
    pub no_recompute: bool,
    /// Update: use only the first N decoder layers of the geometry.
    #[arg(long, value_parser = at_least_one)]
    pub layers: Option<usize>,
    /// Update: LoRA rank on every projection.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub lora_rank: usize,
    /// Update: log-prob chunk (`model.logprob_chunk`).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub chunk: usize,
    #[arg(long)]
    pub json: bool,
}

/// `--flag N` with `N >= 1`.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(n) => Err(format!("{n} is out of range: must be at least 1")),
        Err(e) => Err(format!("{s:?} is not a whole number ({e})")),
    }
}

fn finite<T: std::str::FromStr + Into<f64> + Copy>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let x: T = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number ({e})"))?;
    if x.into().is_finite() {
        Ok(x)
    } else {
        Err(format!("{s} is not a finite number"))
    }
}

/// A finite real `> 0` (learning rates, limits, LoRA alpha).
fn positive_real(s: &str) -> Result<f64, String> {
    let x: f64 = finite(s)?;
    (x > 0.0)
        .then_some(x)
        .ok_or_else(|| format!("{s} is out of range: must be > 0"))
}

/// A finite real `>= 0` (penalties).
fn non_negative_real(s: &str) -> Result<f32, String> {
    let x: f32 = finite(s)?;
    (x >= 0.0)
        .then_some(x)
        .ok_or_else(|| format!("{s} is out of range: must be >= 0"))
}

/// Sampling temperature: a finite real `>= 0` (0 is greedy).
fn temperature(s: &str) -> Result<f32, String> {
    non_negative_real(s).map_err(|e| format!("{e} (0 is greedy)"))
}

/// Nucleus mass in `(0, 1]`.
fn top_p(s: &str) -> Result<f32, String> {
    let x: f32 = finite(s)?;
    (x > 0.0 && x <= 1.0)
        .then_some(x)
        .ok_or_else(|| format!("{s} is out of range: must be in (0, 1]"))
}

impl Cli {
    /// Whether the command computes with the model (and so needs the backend's device).
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn needs_device(&self) -> bool {
        match &self.command {
            Command::Score(_) | Command::Plot(_) | Command::Plan(_) => false,
            Command::Bench(b) => b.verifier.is_none(),
            Command::DemoAssets(a) => !a.task_only,
            _ => true,
        }
    }
}

/// Runs a parsed command line on backend `B` (training commands use `B`, inference its inner
/// backend).
pub fn run<B: AutodiffBackend>(cli: Cli, device: B::Device) -> Result<()> {
    dispatch::<B>(cli, device)?;
    std::io::stdout().flush().context("cannot write to stdout")
}

fn dispatch<B: AutodiffBackend>(cli: Cli, device: B::Device) -> Result<()> {
    match cli.command {
        Command::Logprobs(a) => logprobs::<B::InnerBackend>(a, &device),
        Command::Generate(a) => generate::<B::InnerBackend>(a, &device),
        Command::Bench(a) => bench::<B>(a, &device),
        Command::Score(a) => score(a),
        Command::Train(a) => train::<B>(a, device),
        Command::DemoAssets(a) if a.task_only => {
            crate::app::demo::write_task(&a.out, a.seed).map(drop)
        }
        Command::DemoAssets(a) => crate::app::demo::build::<B>(&a.out, a.seed, a.epochs, &device),
        Command::Eval(a) => eval::<B::InnerBackend>(a, &device),
        Command::Sft(a) => sft::<B>(a, &device),
        Command::Plot(a) => plot(a),
        Command::Export(a) => export::<B::InnerBackend>(a, &device),
        Command::Plan(a) => plan(a),
        Command::Selfcheck(a) => selfcheck::<B>(a, &device),
    }
}

fn selfcheck<B: AutodiffBackend>(a: SelfcheckArgs, device: &B::Device) -> Result<()> {
    use med_rlvr::selfcheck::{cases, run_case, Summary};
    type Reference = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let started = std::time::Instant::now();
    let (mut failed, mut checks) = (0usize, 0usize);
    let (mut worst_abs, mut worst_grad) = (0f64, 0f64);
    for (i, case) in cases(a.seed, a.cases).iter().enumerate() {
        let s = Summary::of(&run_case::<B, Reference>(case, device, &Default::default()));
        checks += s.checks;
        worst_abs = worst_abs.max(s.max_abs);
        worst_grad = worst_grad.max(s.max_abs_grad);
        failed += usize::from(!s.failures.is_empty());
        if a.json {
            outln!(
                "{}",
                json!({"case": i, "shape": case.to_string(), "checks": s.checks,
                       "max_abs_error": s.max_abs, "max_abs_grad_error": s.max_abs_grad,
                       "failures": s.failures})
            );
        } else {
            let verdict = if s.failures.is_empty() {
                "ok  "
            } else {
                "FAIL"
            };
            outln!(
                "{verdict} case {i:>3}: {case}  ({} checks, max |err| {:.1e}, gradients {:.1e})",
                s.checks,
                s.max_abs,
                s.max_abs_grad
            );
            for f in &s.failures {
                outln!("       {f}");
            }
        }
    }
    let summary = format!(
        "selfcheck: {} cases, {checks} checks, {failed} failing cases; max |err| {worst_abs:.1e} \
         (outputs), {worst_grad:.1e} (gradients); {:.0} s",
        a.cases,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(med_rlvr::exit::RunFailed(summary).into());
    }
    eprintln!("{summary}");
    Ok(())
}

fn plan(a: PlanArgs) -> Result<()> {
    use med_rlvr::memory::{MemoryPlan, PlanInputs};
    let mut cfg = med_rlvr::config::TrainConfig::load(a.config.as_deref(), &a.set)?;
    if let Some(m) = &a.model {
        cfg.model.path = m.clone();
    }
    let m = &cfg.model.path;
    if m.as_os_str().is_empty() {
        bail!("model.path is not set: give --model DIR (or a config.json) or set model.path");
    }
    let (geometry, dir) = if m.is_file() {
        (
            Qwen2Config::from_file(m)?,
            m.parent().map(Path::to_path_buf),
        )
    } else {
        (Qwen2Config::from_dir(m)?, Some(m.clone()))
    };
    let prompt_len = match a.prompt_len {
        Some(p) => p,
        None => {
            let measured = dir
                .filter(|d| d.join("tokenizer.json").is_file() && cfg.data.train.is_file())
                .map(|d| -> Result<usize> {
                    let tok = Tokenizer::from_dir(&d)?;
                    let opts = med_rlvr::task::LoadOptions {
                        category: cfg.data.category.clone(),
                        none_of_the_above: cfg.data.none_of_the_above,
                        skip_invalid: cfg.data.skip_invalid,
                    };
                    let ds = med_rlvr::task::load(&cfg.data.train, cfg.data.format, &opts)?;
                    let mut longest = 0;
                    for it in &ds.items {
                        let p = med_rlvr::prompt::render(it, cfg.data.prompt);
                        longest = longest.max(tok.encode(&p)?.len());
                    }
                    Ok(longest)
                })
                .transpose()?;
            match measured {
                Some(p) => {
                    eprintln!("longest prompt in {}: {p} tokens", cfg.data.train.display());
                    p
                }
                None => {
                    eprintln!("no tokenizer or data.train to measure prompts: assuming 512 tokens");
                    512
                }
            }
        }
    };
    let plan = MemoryPlan::new(&PlanInputs::from_config(
        &cfg,
        &geometry,
        prompt_len,
        a.devices.max(1),
    ));
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        out!("{}", plan.render());
    }
    if let Some(gb) = a.limit_gb.or(cfg.model.memory_limit_gb) {
        let limit = (gb * (1u64 << 30) as f64) as u64;
        // The batch sizes that fit, each with the rest of the config as it is.
        let peak = |c: &med_rlvr::config::TrainConfig| {
            MemoryPlan::new(&PlanInputs::from_config(
                c,
                &geometry,
                prompt_len,
                a.devices.max(1),
            ))
            .peak
        };
        let with = |f: &dyn Fn(&mut med_rlvr::config::TrainConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            peak(&c) <= limit
        };
        let show =
            |x: Option<usize>| x.map_or("none (even 1 does not fit)".into(), |x| x.to_string());
        let mb = med_rlvr::memory::largest_fitting(4096, |m| with(&|c| c.ppo.micro_batch = m));
        let prompts = cfg.rollout.prompts_per_step / a.devices.max(1);
        let gb_rows =
            med_rlvr::memory::largest_fitting(prompts, |g| with(&|c| c.rollout.generate_batch = g));
        eprintln!(
            "within {gb} GiB: largest ppo.micro_batch {}, largest rollout.generate_batch {} (of {prompts} prompts)",
            show(mb),
            show(gb_rows)
        );
        plan.check(limit).map_err(med_rlvr::exit::RunFailed)?;
        eprintln!("fits in {gb} GiB");
    }
    Ok(())
}

/// The base model folder recorded in an adapter's `adapter_config.json`.
fn adapter_base(adapter: &Path) -> Result<PathBuf> {
    qwen2_burn::lora::read_adapter_config(adapter)?
        .base_model_name_or_path
        .map(PathBuf::from)
        .filter(|b| b.join("config.json").is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: base_model_name_or_path is not a local model folder; pass --base DIR",
                adapter.join("adapter_config.json").display()
            )
        })
}

fn export<B: Backend>(a: ExportArgs, device: &B::Device) -> Result<()> {
    use qwen2_burn::SaveDtype;
    let dtype = match a.dtype.as_str() {
        "f32" => SaveDtype::F32,
        "bf16" => SaveDtype::Bf16,
        "f16" => SaveDtype::F16,
        other => bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let src = &a.checkpoint;
    let actor = if src.join("config.json").is_file() || src.join("adapter_config.json").is_file() {
        src.clone()
    } else if src.join("state.json").is_file() || src.join("checkpoints").is_dir() {
        med_rlvr::checkpoint::resolve(src, None)?.join("actor")
    } else if src.join("final").join("config.json").is_file() {
        src.join("final")
    } else {
        bail!(
            "{}: not a checkpoint (state.json), a run folder (checkpoints/ or final/), a model \
             folder (config.json) or an adapter folder (adapter_config.json)",
            src.display()
        );
    };
    let base = match actor.join("adapter_config.json").is_file() {
        true => Some(match &a.base {
            Some(b) => b.clone(),
            None => adapter_base(&actor)?,
        }),
        false => None,
    };
    let mut inputs = vec![
        ("checkpoint", src.as_path()),
        ("model folder", actor.as_path()),
    ];
    if let Some(b) = &base {
        inputs.push(("base model", b.as_path()));
    }
    med_rlvr::paths::refuse_overlap("--out", &a.out, &inputs)?;
    let (config, model, tok) = if let Some(base) = &base {
        // LoRA: merge the adapters into their base (--base, else the path recorded at training).
        let (config, model, tok) = med_rlvr::model_folder::load::<B>(base, device)?;
        let (model, _) = qwen2_burn::load_lora(model, &actor, device)?;
        (config, model.merge_lora(), tok)
    } else {
        med_rlvr::model_folder::load::<B>(&actor, device)?
    };
    qwen2_burn::save_qwen2(&model, &config, &a.out, dtype, 5 << 30)?;
    let tok_dir = tok
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    med_rlvr::checkpoint::copy_tokenizer_files(&tok_dir, &a.out)?;
    outln!("{}", a.out.display());
    Ok(())
}

fn plot(a: PlotArgs) -> Result<()> {
    let files = if let Some(run) = &a.run {
        let out = a.out.clone().unwrap_or_else(|| {
            if run.is_dir() {
                run.clone()
            } else {
                run.parent().map(Path::to_path_buf).unwrap_or_default()
            }
        });
        med_rlvr::plot::training_figures(run, &out)?
    } else {
        med_rlvr::plot::eval_figures(&a.eval, &a.out.unwrap_or_else(|| PathBuf::from(".")))?
    };
    for f in files {
        outln!("{}", f.display());
    }
    Ok(())
}

fn logprobs<B: Backend>(a: LogprobsArgs, device: &B::Device) -> Result<()> {
    crate::app::demo::announce_default("model", &a.model);
    let (config, model, tok) = med_rlvr::model_folder::load::<B>(&a.model, device)?;
    let p = tok.encode(&a.prompt)?;
    let c = tok.encode(&a.continuation)?;
    if p.is_empty() {
        bail!("--prompt tokenizes to no tokens: the first continuation token needs a context");
    }
    med_rlvr::tokenizer::check_context(
        config.max_position_embeddings,
        p.len() + c.len(),
        &format!(
            "--prompt ({} tokens) and --continuation ({})",
            p.len(),
            c.len()
        ),
    )?;
    let lps = med_rlvr::model_folder::continuation_logprobs(&model, &p, &c, device);
    if let Some(j) = lps.iter().position(|x| !x.is_finite()) {
        bail!(
            "the model computed a non-finite log-prob ({}) for continuation token {j}: its \
             weights in {} hold NaN/Inf or overflow",
            lps[j],
            a.model.display()
        );
    }
    if a.json {
        outln!(
            "{}",
            json!({"prompt_ids": p, "continuation_ids": c, "continuation_logprobs": lps})
        );
    } else {
        for (id, lp) in c.iter().zip(&lps) {
            outln!("{id}\t{lp:.6}\t{:?}", tok.decode_raw(&[*id]));
        }
        outln!("sum\t{:.6}", lps.iter().map(|&x| x as f64).sum::<f64>());
    }
    Ok(())
}

fn generate<B: Backend>(a: GenerateArgs, device: &B::Device) -> Result<()> {
    crate::app::demo::announce_default("model", &a.model);
    let (config, model, tok) = med_rlvr::model_folder::load::<B>(&a.model, device)?;
    let texts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => med_rlvr::prompt::read_file(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    if let (true, Some(f)) = (texts.is_empty(), &a.prompts) {
        bail!(
            "{}: no prompts (the file has no non-empty line)",
            f.display()
        );
    }
    if let Some(&id) = a
        .stop_token
        .iter()
        .find(|&&id| id as usize >= config.vocab_size)
    {
        bail!(
            "--stop-token {id}: not a token of this model (vocab_size {})",
            config.vocab_size
        );
    }
    let mut stop_token_ids = a.stop_token.clone();
    if !a.no_eos_stop {
        stop_token_ids.push(tok.eos_id()?);
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        stop_token_ids,
        stop_strings: a.stop.clone(),
        n: a.n,
        seed: a.seed,
        compact: true,
        max_rows: a.batch_size.max(1) * a.n.max(1),
    };
    let encoded = texts
        .iter()
        .map(|t| tok.encode(t))
        .collect::<Result<Vec<_>>>()?;
    if let Some(i) = encoded.iter().position(Vec::is_empty) {
        bail!("prompt {} tokenizes to no tokens", i + 1);
    }
    for (i, p) in encoded.iter().enumerate() {
        med_rlvr::tokenizer::check_context(
            config.max_position_embeddings,
            p.len() + a.max_new_tokens,
            &format!(
                "prompt {} ({} tokens) and --max-new-tokens {}",
                i + 1,
                p.len(),
                a.max_new_tokens
            ),
        )?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for s in sampler::generate(&model, &config, &encoded, &params, &tok, device) {
        if let Some(j) = s.logprobs.iter().position(|x| !x.is_finite()) {
            bail!(
                "prompt {} sample {}: the model computed a non-finite log-prob at new token {j}: \
                 its weights in {} hold NaN/Inf or overflow",
                s.prompt_index + 1,
                s.sample_index,
                a.model.display()
            );
        }
        let prompt_ids = &encoded[s.prompt_index];
        let text = tok.decode(&s.output_ids);
        if a.json {
            let line = json!({
                "prompt_index": s.prompt_index,
                "sample_index": s.sample_index,
                "prompt_ids": prompt_ids,
                "output_ids": s.output_ids,
                "text": text,
                "logprobs": s.logprobs,
                "sampling_logprobs": s.sampling_logprobs,
                "finish_reason": s.finish_reason,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "[{} #{}] {}", s.prompt_index, s.sample_index, text)?;
        }
    }
    Ok(())
}

fn bench<A: AutodiffBackend>(a: BenchArgs, device: &A::Device) -> Result<()> {
    type B<A> = <A as AutodiffBackend>::InnerBackend;
    if let Some(count) = a.verifier {
        outln!(
            "{}",
            serde_json::to_string(&crate::app::bench::verifier(count, 0))?
        );
        return Ok(());
    }
    let mut config = Qwen2Config::from_file(a.config.as_deref().context("--config is required")?)?;
    if let Some(n) = a.layers {
        if n > config.num_hidden_layers {
            bail!(
                "--layers {n}: the geometry has only {} decoder layers",
                config.num_hidden_layers
            );
        }
        config.num_hidden_layers = n;
    }
    med_rlvr::tokenizer::check_context(
        config.max_position_embeddings,
        a.prompt_len + a.new_tokens,
        &format!(
            "--prompt-len {} and --new-tokens {}",
            a.prompt_len, a.new_tokens
        ),
    )?;
    if a.update {
        let spec = qwen2_burn::LoraSpec {
            rank: a.lora_rank,
            alpha: 2.0 * a.lora_rank as f64,
            targets: qwen2_burn::PROJECTIONS.map(String::from).to_vec(),
        };
        let model = Qwen2::<A>::init_random(&config, 0, device).with_lora(&spec, 0, device);
        let line = crate::app::bench::update(
            &config,
            &model,
            &spec,
            crate::app::bench::UpdateShape {
                batch: a.batch,
                prompt_len: a.prompt_len,
                response_len: a.new_tokens,
                chunk: a.chunk,
                recompute: !a.no_recompute,
            },
            device,
        )?;
        outln!("{}", serde_json::to_string(&line)?);
        return Ok(());
    }
    let mut model = Qwen2::<B<A>>::init_random(&config, 0, device);
    if a.dtype == BenchDtype::Bf16 {
        if !B::<A>::supports_dtype(device, burn::tensor::DType::BF16) {
            bail!("--dtype bf16: this backend has no bf16 tensors; build with --features cuda or flex");
        }
        model = model.with_base_dtype(burn::tensor::FloatDType::BF16);
    }
    let line = if a.rollout {
        serde_json::to_value(crate::app::bench::rollout(
            &config,
            &model,
            a.batch,
            a.n,
            a.prompt_len,
            a.new_tokens,
            crate::app::bench::RolloutShape {
                stop_every: a.stop_every,
                mask: a.mask,
                max_rows: a.max_rows,
                slices: a.slices,
            },
            device,
        ))?
    } else {
        serde_json::to_value(crate::app::bench::kernels(
            &config,
            &model,
            a.batch,
            a.prompt_len,
            a.new_tokens,
            device,
        ))?
    };
    if a.json {
        outln!("{line}");
    } else {
        outln!("{}", serde_json::to_string_pretty(&line)?);
    }
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    use med_rlvr::verifier::{self, Summary, VerifierConfig};
    let cfg = VerifierConfig {
        strict: a.strict,
        answer_leak_penalty: a.answer_leak_penalty,
        preamble_penalty: a.preamble_penalty,
        ..Default::default()
    };
    let tok = a
        .tokenizer
        .as_deref()
        .map(Tokenizer::from_dir)
        .transpose()?;
    let path = &a.input;
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    if let Some(o) = &a.out {
        med_rlvr::paths::refuse_overlap("--out", o, &[("--input", path)])?;
    }
    let out_name = a
        .out
        .as_ref()
        .map_or("stdout".to_string(), |p| p.display().to_string());
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut program = match a.reward_program.is_empty() {
        true => None,
        false => Some(med_rlvr::reward::RewardProgram::start(
            &a.reward_program,
            std::time::Duration::from_secs_f64(a.reward_timeout_s),
        )?),
    };
    // Every line is read and scored before any is written, so a reward program answers them
    // in one batch.
    let mut lines: Vec<(usize, serde_json::Value)> = Vec::new();
    let mut verdicts = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{}: cannot read", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
        let response = v
            .get("response")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}: no string key `response`", at()))?;
        let gold = v
            .get("answer")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}: no string key `answer`", at()))?;
        let gold = match gold.trim().chars().collect::<Vec<_>>()[..] {
            [c] if c.is_ascii_alphabetic() => c.to_ascii_uppercase(),
            _ => bail!("{}: `answer` must be one letter, got {gold:?}", at()),
        };
        let n = match v.get("num_options") {
            None | Some(serde_json::Value::Null) => 10,
            Some(x) => x
                .as_u64()
                .filter(|&n| (1..=26).contains(&n))
                .with_context(|| format!("{}: `num_options` must be 1..=26", at()))?
                as usize,
        };
        if (gold as u8 - b'A') as usize >= n {
            bail!(
                "{}: `answer` {gold} is not among the {n} options (A–{})",
                at(),
                (b'A' + n as u8 - 1) as char
            );
        }
        let gold = med_rlvr::reward::Gold {
            letter: gold,
            num_options: n,
            text: v.get("gold_text").and_then(|x| x.as_str()),
        };
        let mut verdict = med_rlvr::reward::score(a.prompt, response, &gold, &cfg);
        if let (Some(t), Some(think)) = (&tok, verifier::think_text(response)) {
            verdict.diagnostics.think_tokens = Some(t.encode(think)?.len());
        }
        verdicts.push(verdict);
        lines.push((i + 1, v));
    }
    if verdicts.is_empty() {
        bail!(
            "{}: no replies to score (the file has no non-empty line)",
            path.display()
        );
    }
    if let Some(program) = program.as_mut() {
        let requests = score_requests(&lines, path)?;
        let answers = program.score(&requests)?;
        med_rlvr::reward::apply_answers(&answers, verdicts.iter_mut());
    }
    for ((_, v), verdict) in lines.iter_mut().zip(&verdicts) {
        let obj = v.as_object_mut().expect("checked object");
        obj.insert("reward".into(), json!(verdict.reward));
        obj.insert("format_ok".into(), json!(verdict.format_ok));
        obj.insert(
            "extracted".into(),
            json!(verdict.extracted.map(String::from)),
        );
        obj.insert("correct".into(), json!(verdict.correct));
        obj.insert("stage".into(), json!(verdict.stage));
        if let serde_json::Value::Object(d) = serde_json::to_value(&verdict.diagnostics)? {
            obj.extend(d);
        }
        writeln!(out, "{v}").with_context(|| format!("{out_name}: cannot write"))?;
    }
    out.flush()
        .with_context(|| format!("{out_name}: cannot write"))?;
    let s = Summary::from_verdicts(&verdicts);
    eprintln!(
        "scored {}: mean reward {:.4}, format rate {:.4}, accuracy {:.4}",
        s.count, s.reward_mean, s.format_rate, s.accuracy
    );
    eprintln!("stages: {}", serde_json::to_string(&s.stages)?);
    Ok(())
}

/// A reward program's requests for `score`'s lines (line number, JSON): `id`, `prompt`,
/// `question`, `options` and `category` from the line's keys when present.
fn score_requests<'a>(
    lines: &'a [(usize, serde_json::Value)],
    path: &Path,
) -> Result<Vec<med_rlvr::reward::Request<'a>>> {
    let mut options: Vec<Vec<String>> = Vec::with_capacity(lines.len());
    for (n, v) in lines {
        options.push(match v.get("options") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(o) => serde_json::from_value(o.clone()).with_context(|| {
                format!(
                    "{}:{n}: `options` must be a list of strings",
                    path.display()
                )
            })?,
        });
    }
    let text = |v: &'a serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_str());
    Ok(lines
        .iter()
        .zip(options)
        .map(|((n, v), options)| med_rlvr::reward::Request {
            id: text(v, "id").map_or_else(|| format!("line-{n}"), String::from),
            prompt: text(v, "prompt").unwrap_or(""),
            reply: text(v, "response").unwrap_or(""),
            item_id: text(v, "id").unwrap_or(""),
            question: text(v, "question").unwrap_or(""),
            options: std::borrow::Cow::Owned(options),
            answer: text(v, "answer").unwrap_or("").trim().to_uppercase(),
            category: text(v, "category"),
        })
        .collect())
}

fn train<B: AutodiffBackend>(a: TrainArgs, device: B::Device) -> Result<()> {
    use med_rlvr::checkpoint;
    use med_rlvr::config::TrainConfig;
    use std::sync::atomic::{AtomicBool, Ordering};
    let resume = a
        .resume
        .as_ref()
        .map(|r| checkpoint::resolve(r, a.out.as_deref()))
        .transpose()?;
    let mut cfg = match (&a.config, &resume) {
        (None, Some(ck)) => checkpoint::read_config(ck, &a.set)?,
        _ => TrainConfig::load(a.config.as_deref(), &a.set)?,
    };
    if let Some(m) = a.model {
        cfg.model.path = m;
    }
    if let Some(d) = a.data {
        cfg.data.train = d;
        // The embedded preset's format and held-out set describe the demo task, not this file.
        if a.config.is_none() && resume.is_none() {
            let set = |key: &str| a.set.iter().any(|o| o.trim_start().starts_with(key));
            if !set("data.format") {
                cfg.data.format = med_rlvr::task::DataFormat::Auto;
            }
            if !set("data.eval") && cfg.data.eval.take().is_some() {
                eprintln!(
                    "--data with the embedded demo preset: data.format = \"auto\", no held-out \
                     set (set data.eval to evaluate on one)"
                );
            }
        }
    }
    cfg.require_paths()?;
    if let Some(k) = a.save_every {
        cfg.train.save_every = k;
    }
    if let Some(ck) = &resume {
        let diff = checkpoint::math_diff(&checkpoint::read_config(ck, &[])?, &cfg)?;
        if !diff.is_empty() && !a.force {
            bail!(
                "the configuration differs from the checkpoint's ({}) in ways that change the \
                 math:\n  {}\npass --force to resume anyway",
                ck.join("config.toml").display(),
                diff.join("\n  ")
            );
        }
        for d in &diff {
            eprintln!("warning: resuming with a changed setting: {d}");
        }
    }
    let mut inputs = vec![
        ("model.path", cfg.model.path.as_path()),
        ("data.train", cfg.data.train.as_path()),
    ];
    if let Some(e) = &cfg.data.eval {
        inputs.push(("data.eval", e.as_path()));
    }
    let out =
        med_rlvr::trainer::run_folder(a.out.as_deref(), resume.as_deref(), a.overwrite, &inputs)?;
    eprintln!("run folder: {}", out.display());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing the current step, then writing a checkpoint (again to abort)"
        );
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    let opts = med_rlvr::trainer::RunOptions {
        quiet: a.quiet,
        resume,
        stop: Some(stop),
        devices: a.devices,
        ..Default::default()
    };
    let outcome = med_rlvr::trainer::run::<B>(cfg, &out, device, &opts).inspect_err(|_| {
        // A run refused before writing anything leaves no empty folder behind.
        let _ = std::fs::remove_dir(&out);
    })?;
    let metrics = &outcome.metrics;
    let first = metrics
        .first()
        .and_then(|m| m.eval_accuracy.zip(m.eval_format_rate));
    let last = metrics
        .last()
        .and_then(|m| m.eval_accuracy.zip(m.eval_format_rate));
    if let (Some((a0, f0)), Some((a1, f1))) = (first, last) {
        eprintln!("held-out accuracy {a0:.3} -> {a1:.3}, format rate {f0:.3} -> {f1:.3}");
    }
    match med_rlvr::plot::training_figures(&out, &out) {
        Ok(files) => eprintln!("figures: {}", files[0].display()),
        Err(e) => eprintln!("warning: no figures ({e:#})"),
    }
    if let Some(ck) = outcome.interrupted {
        eprintln!(
            "stopped cleanly; checkpoint {}; continue with: med-rlvr train --resume {}",
            ck.display(),
            ck.display()
        );
        return Ok(());
    }
    eprintln!(
        "metrics: {}, final model: {}",
        out.join("metrics.jsonl").display(),
        out.join("final").display()
    );
    Ok(())
}

fn eval<B: Backend>(a: EvalArgs, device: &B::Device) -> Result<()> {
    use med_rlvr::eval::{self as ev, ScoreSettings};
    use med_rlvr::task::{self, LoadOptions};
    crate::app::demo::announce_default("model", &a.model);
    let (config, model, tok) = med_rlvr::model_folder::load::<B>(&a.model, device)?;
    let model = match &a.adapter {
        Some(dir) => qwen2_burn::load_lora(model, dir, device)?.0.merge_lora(),
        None => model,
    };
    let settings = ScoreSettings {
        style: a.prompt,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            max_new_tokens: a.max_new_tokens,
            stop_token_ids: vec![tok.eos_id()?],
            stop_strings: med_rlvr::reward::stop_strings(a.prompt),
            n: a.n,
            seed: a.seed,
            ..Default::default()
        },
        verifier: med_rlvr::verifier::VerifierConfig {
            strict: a.strict,
            ..Default::default()
        },
        batch: a.batch,
    };
    let opts = LoadOptions {
        category: a.category.clone(),
        none_of_the_above: a.none_of_the_above,
        skip_invalid: a.skip_invalid,
    };
    // Every dataset is read and checked before anything is written.
    let mut sets = Vec::new();
    for path in &a.data {
        crate::app::demo::announce_default("data", path);
        let mut ds = task::load(path, a.format, &opts)?;
        if !ds.skipped.is_empty() {
            eprintln!(
                "{}: skipped {} malformed rows",
                path.display(),
                ds.skipped.len()
            );
        }
        if let Some(k) = a.limit {
            ds.items.truncate(k);
        }
        if ds.items.is_empty() {
            let why = match &a.category {
                Some(c) => {
                    let all = task::load(
                        path,
                        a.format,
                        &LoadOptions {
                            category: None,
                            ..opts.clone()
                        },
                    )?;
                    let mut cats: Vec<String> =
                        all.items.into_iter().filter_map(|it| it.category).collect();
                    cats.sort();
                    cats.dedup();
                    format!(
                        " of --category {c:?} (the file's categories: {})",
                        if cats.is_empty() {
                            "none".into()
                        } else {
                            cats.join(", ")
                        }
                    )
                }
                None => String::new(),
            };
            bail!("{}: no questions{why}; nothing to evaluate", path.display());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = ds.items.iter().find(|it| !seen.insert(it.id.as_str())) {
            bail!(
                "{}: question id {:?} appears more than once; ids must be unique to match \
                 generations to questions",
                path.display(),
                dup.id
            );
        }
        sets.push((path, ds));
    }
    let gen_path = a.out.join("generations.jsonl");
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", a.model.as_path())];
    inputs.extend(a.data.iter().map(|d| ("--data", d.as_path())));
    for f in ["generations.jsonl", "summary.json", "table.md"] {
        med_rlvr::paths::refuse_overlap("--out", &a.out.join(f), &inputs)?;
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let mut gen_file = std::io::BufWriter::new(
        std::fs::File::create(&gen_path)
            .with_context(|| format!("{}: cannot create", gen_path.display()))?,
    );
    let mut program = match a.reward_program.is_empty() {
        true => None,
        false => Some(med_rlvr::reward::RewardProgram::start(
            &a.reward_program,
            std::time::Duration::from_secs_f64(a.reward_timeout_s),
        )?),
    };
    let mut reports = Vec::new();
    for (path, ds) in sets {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let t0 = std::time::Instant::now();
        let mut gens = ev::generate_and_score(&model, &config, &tok, &ds.items, &settings, device)?;
        if let Some(p) = program.as_mut() {
            ev::program_rewards(p, &name, &ds.items, a.prompt, &mut gens)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{name}: {} questions in {secs:.1} s ({:.3} s per question)",
            ds.items.len(),
            secs / ds.items.len().max(1) as f64
        );
        for g in &gens {
            let mut v = serde_json::to_value(g)?;
            v["dataset"] = json!(name);
            writeln!(gen_file, "{v}")
                .with_context(|| format!("{}: cannot write", gen_path.display()))?;
        }
        reports.push(ev::report(
            &name,
            &path.display().to_string(),
            ds.items.len(),
            &gens,
            a.resamples,
            a.seed,
        ));
    }
    gen_file
        .flush()
        .with_context(|| format!("{}: cannot write", gen_path.display()))?;
    let model_name = a.name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    });
    let summary = json!({"model": model_name, "model_path": a.model, "prompt": a.prompt, "n": a.n, "temperature": a.temperature,
        "bootstrap_resamples": a.resamples, "seed": a.seed,
        "reward_program": (!a.reward_program.is_empty()).then(|| a.reward_program.join(" ")),
        "datasets": reports});
    let summary_path = a.out.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("{}: cannot write", summary_path.display()))?;
    let table = ev::markdown_table(&[(model_name, reports)]);
    let table_path = a.out.join("table.md");
    std::fs::write(&table_path, &table)
        .with_context(|| format!("{}: cannot write", table_path.display()))?;
    out!("{table}");
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn sft<B: AutodiffBackend>(a: SftArgs, device: &B::Device) -> Result<()> {
    use burn::module::AutodiffModule;
    use med_rlvr::sft::{self as s, SftConfig};
    let opts = med_rlvr::task::LoadOptions {
        category: a.category.clone(),
        none_of_the_above: a.none_of_the_above,
        skip_invalid: a.skip_invalid,
    };
    crate::app::demo::announce_default("model", &a.model);
    crate::app::demo::announce_default("data", &a.data);
    for (i, lr) in a.lr.iter().enumerate() {
        if a.lr[..i].contains(lr) {
            bail!("--lr {lr:e} is given twice: each learning rate writes one run folder");
        }
    }
    let ds = med_rlvr::task::load(&a.data, a.format, &opts)?;
    if ds.items.is_empty() {
        bail!(
            "{}: no examples{}",
            a.data.display(),
            a.category
                .as_ref()
                .map(|c| format!(" of --category {c:?}"))
                .unwrap_or_default()
        );
    }
    let (model_config, tok) = Tokenizer::for_model(&a.model)?;
    if a.lora_rank > model_config.hidden_size {
        bail!(
            "--lora-rank {}: above the model's hidden_size {}",
            a.lora_rank,
            model_config.hidden_size
        );
    }
    let pairs = med_rlvr::sft::pairs(&ds.items, &tok)?;
    if let Some((p, t)) = pairs.iter().max_by_key(|(p, t)| p.len() + t.len()) {
        med_rlvr::tokenizer::check_context(
            model_config.max_position_embeddings,
            p.len() + t.len(),
            &format!("the longest example of {}", a.data.display()),
        )?;
    }
    let outs: Vec<PathBuf> =
        a.lr.iter()
            .map(|lr| match a.lr.len() {
                1 => a.out.clone(),
                _ => a.out.join(format!("lr-{lr:e}")),
            })
            .collect();
    for out in &outs {
        for f in ["final", "final_adapter", "metrics.jsonl"] {
            med_rlvr::paths::refuse_overlap(
                "--out",
                &out.join(f),
                &[("--model", a.model.as_path()), ("--data", a.data.as_path())],
            )?;
        }
    }
    let steps_per_epoch = pairs.len().div_ceil(a.batch.max(1));
    for (&lr, out) in a.lr.iter().zip(outs) {
        let (config, model) = load_qwen2::<B>(&a.model, device)?;
        let lora = (a.lora_rank > 0).then(|| qwen2_burn::LoraSpec {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
            targets: qwen2_burn::PROJECTIONS.map(String::from).to_vec(),
        });
        let model = match &lora {
            Some(spec) => model.with_lora(spec, a.seed, device),
            None => model,
        };
        std::fs::create_dir_all(&out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = std::io::BufWriter::new(
            std::fs::File::create(&metrics_path)
                .with_context(|| format!("{}: cannot create", metrics_path.display()))?,
        );
        let cfg = SftConfig {
            epochs: a.epochs,
            batch: a.batch,
            lr,
            optim: Default::default(),
            seed: a.seed,
            logprob_chunk: 64,
            group_by_length: a.group_by_length,
        };
        let mut io_err = None;
        let (trained, hist) = s::train(model, &pairs, &cfg, device, |st| {
            if let Err(e) = writeln!(metrics, "{}", serde_json::to_string(st).unwrap_or_default()) {
                io_err.get_or_insert(e);
            }
            if (st.step + 1) % steps_per_epoch == 0 {
                eprintln!("lr {lr:e} epoch {} loss {:.4}", st.epoch + 1, st.loss);
            }
        })?;
        if let Some(e) = io_err {
            return Err(e).with_context(|| format!("{}: cannot write", metrics_path.display()));
        }
        metrics
            .flush()
            .with_context(|| format!("{}: cannot write", metrics_path.display()))?;
        let dir = out.join("final");
        if let Some(spec) = &lora {
            qwen2_burn::save_lora(&trained, spec, Some(&a.model), &out.join("final_adapter"))?;
        }
        qwen2_burn::save_qwen2(
            &trained.valid().merge_lora(),
            &config,
            &dir,
            qwen2_burn::SaveDtype::F32,
            5 << 30,
        )?;
        med_rlvr::checkpoint::copy_tokenizer_files(&a.model, &dir)?;
        eprintln!(
            "lr {lr:e}: {} steps, final loss {:.4}, model in {}",
            hist.len(),
            hist.last().map_or(f64::NAN, |h| h.loss),
            dir.display()
        );
    }
    Ok(())
}
