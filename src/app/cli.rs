//! The `med-rlvr` command line. Every command is generic over the Burn backend; `main.rs` picks the
//! backend once, from the cargo features.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, Parser, Subcommand};

use crate::app::commands;

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
    /// A model folder, a config.json or a Hub id (only the geometry is read; for an id, only its
    /// config.json is fetched).
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
    /// The base model of a LoRA checkpoint, a folder or a Hub id (default: the one recorded in
    /// adapter_config.json).
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
    /// A Hugging Face Qwen2 folder, or a Hub id (`Qwen/Qwen2.5-3B[@revision]`: fetched into the
    /// Hugging Face cache, `HF_HOME`). Default: the embedded demo model.
    #[arg(long, default_value_os_t = crate::app::demo::model_dir())]
    pub model: PathBuf,
    /// A jsonl or parquet file, or `hf://datasets/OWNER/NAME[@REVISION]/PATH` on the Hub.
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
    /// A Hugging Face Qwen2 folder, or a Hub id (`Qwen/Qwen2.5-3B[@revision]`: fetched into the
    /// Hugging Face cache, `HF_HOME`). Default: the embedded demo model.
    #[arg(long, default_value_os_t = crate::app::demo::model_dir())]
    pub model: PathBuf,
    /// A LoRA adapter folder (PEFT layout) to apply to --model (merged before generating).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Dataset files (jsonl, parquet, or `hf://datasets/OWNER/NAME[@REVISION]/PATH` on the Hub);
    /// several give one table with a column each.
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
    #[command(flatten)]
    pub reward: RewardProgramArgs,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML config (assets/presets/*.toml); default: the embedded demo preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `model.path`: a model folder or a Hub id (`Qwen/Qwen2.5-3B[@revision]`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Overrides `data.train`: a file or `hf://datasets/OWNER/NAME[@REVISION]/PATH`.
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
    /// One process of a data-parallel job across processes and nodes over MPI: launch as
    /// `mpirun -n N med-rlvr train --mpi ...` (or `srun`). Every rank reads the same config and
    /// takes 1/N of `rollout.prompts_per_step` on the device its rank on the node picks; rank 0
    /// logs, evaluates and writes checkpoints. Needs a build with `--features mpi`.
    #[arg(long)]
    pub mpi: bool,
    /// With --mpi: abort the job when one collective waits longer than this for the other ranks
    /// (a hung or unreachable rank); 0: no limit. Rank 0's held-out evaluation and checkpoint
    /// writes happen while the others wait, so it must exceed them.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600.0, requires = "mpi",
          value_parser = seconds)]
    pub mpi_timeout: f64,
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
    /// Each request's `id`, `prompt`, `question`, `options` and `category` are the line's keys of
    /// those names when present (`id` defaults to `line-N`).
    #[command(flatten)]
    pub reward: RewardProgramArgs,
}

/// A reward program for `eval` and `score`, as `reward.program` in training.
#[derive(Args, Debug)]
pub struct RewardProgramArgs {
    /// Take each reply's reward from this program (one JSON request per line in, one
    /// `{"reward": …}` per line out); format and accuracy stay the verifier's. The command and its
    /// arguments, e.g. `--reward-program python3 examples/reward.py`.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub reward_program: Vec<String>,
    /// Seconds to wait for each of the program's answers.
    #[arg(long, default_value_t = 60.0, value_parser = positive_real)]
    pub reward_timeout_s: f64,
}

impl RewardProgramArgs {
    /// The program started, or `None` without `--reward-program`.
    pub fn start(&self) -> Result<Option<med_rlvr::reward::RewardProgram>> {
        let timeout = std::time::Duration::from_secs_f64(self.reward_timeout_s);
        med_rlvr::reward::RewardProgram::start_if_given(&self.reward_program, timeout)
    }
}

#[derive(Args, Debug)]
pub struct LogprobsArgs {
    /// A Hugging Face Qwen2 folder (config.json, safetensors, tokenizer.json), or a Hub id
    /// (`Qwen/Qwen2.5-3B[@revision]`, fetched into the Hugging Face cache).
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
    /// A Hugging Face Qwen2 folder, or a Hub id (`Qwen/Qwen2.5-3B[@revision]`: fetched into the
    /// Hugging Face cache, `HF_HOME`). Default: the embedded demo model.
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
    /// Rollout: prefill each sample's prompt on its own instead of once per prompt (the cost
    /// before shared prefill; the samples are the same).
    #[arg(long)]
    pub no_share_prefill: bool,
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
    /// Micro-batch mode: one mini-batch of `--batch` sequences (prompt `--prompt-len`, responses
    /// uniform over `--min-new-tokens`..=`--new-tokens`) trained as `--micro-batch` sequences per
    /// micro-batch and as groups under `--micro-batch-tokens` padded tokens, side by side:
    /// padded and real tokens, seconds, and the gradients' largest difference.
    #[arg(long, requires = "micro_batch_tokens")]
    pub micro_batches: bool,
    /// Micro-batches: the shortest response (default: `--new-tokens`, all the same length).
    #[arg(long, value_parser = at_least_one)]
    pub min_new_tokens: Option<usize>,
    /// Micro-batches: sequences per micro-batch of the count split (`ppo.micro_batch`).
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub micro_batch: usize,
    /// Micro-batches: the token budget of the other split (`ppo.micro_batch_tokens`).
    #[arg(long, value_parser = at_least_one)]
    pub micro_batch_tokens: Option<usize>,
    /// Products mode: each weight-reading product of one decode step at `--batch` rows (the
    /// seven projections and the tied head) timed alone, its weight read from memory; weight GB/s.
    #[arg(long, conflicts_with_all = ["rollout", "update", "micro_batches", "verifier"])]
    pub products: bool,
    /// Products mode: timed passes over each weight's copies (1 GiB together, 2–4,096 copies).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub passes: usize,
    /// Keep the main thread out of rayon's pool, as before it joined it (`src/app/threads.rs`):
    /// the CPU backend's ops are then handed to the pool's threads while the main thread waits.
    /// For timing that change side by side with one binary.
    #[arg(long)]
    pub outside_pool: bool,
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

/// A duration in seconds: a finite real in `[0, 1e9]`.
fn seconds(s: &str) -> Result<f64, String> {
    let x: f64 = finite(s)?;
    (0.0..=1e9)
        .contains(&x)
        .then_some(x)
        .ok_or_else(|| format!("{s} is out of range: must be in [0, 1e9] seconds"))
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
    /// Whether the main thread stays out of rayon's pool (`bench --outside-pool`).
    pub fn main_thread_outside_pool(&self) -> bool {
        matches!(&self.command, Command::Bench(b) if b.outside_pool)
    }

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
        Command::Logprobs(a) => commands::logprobs::run::<B::InnerBackend>(a, &device),
        Command::Generate(a) => commands::generate::run::<B::InnerBackend>(a, &device),
        Command::Bench(a) => commands::bench::run::<B>(a, &device),
        Command::Score(a) => commands::score::run(a),
        Command::Train(a) => commands::train::run::<B>(a, device),
        Command::DemoAssets(a) if a.task_only => {
            crate::app::demo::write_task(&a.out, a.seed).map(drop)
        }
        Command::DemoAssets(a) => crate::app::demo::build::<B>(&a.out, a.seed, a.epochs, &device),
        Command::Eval(a) => commands::eval::run::<B::InnerBackend>(a, &device),
        Command::Sft(a) => commands::sft::run::<B>(a, &device),
        Command::Plot(a) => commands::plot::run(a),
        Command::Export(a) => commands::export::run::<B::InnerBackend>(a, &device),
        Command::Plan(a) => commands::plan::run(a),
        Command::Selfcheck(a) => commands::selfcheck::run::<B>(a, &device),
    }
}
