//! The `med-rlvr` command line. Every command is generic over the Burn backend; `main.rs` picks the
//! backend once, from the cargo features.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use clap::{Args, Parser, Subcommand};
use qwen2_burn::{load_qwen2, Qwen2, Qwen2Config};
use serde_json::json;

use crate::sampler::{self, SamplingParams};
use crate::tokenizer::Tokenizer;

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
    /// Rebuild the demo task and tiny model shipped in assets/demo (see src/demo.rs).
    DemoAssets(DemoArgs),
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
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = "assets/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Warm-start SFT epochs.
    #[arg(long, default_value_t = 8)]
    pub sft_epochs: usize,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// jsonl with `response`, `answer` (gold letter), optional `num_options` (default 10, A–J) and
    /// `gold_text`.
    #[arg(long)]
    pub input: PathBuf,
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
    #[arg(long, default_value_t = 0.0)]
    pub answer_leak_penalty: f32,
    /// Subtract this when more than 15 words precede `<think>` (off: 0).
    #[arg(long, default_value_t = 0.0)]
    pub preamble_penalty: f32,
}

#[derive(Args, Debug)]
pub struct LogprobsArgs {
    /// A Hugging Face Qwen2 folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
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
    #[arg(long)]
    pub model: PathBuf,
    /// One prompt (plain text, no template applied).
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A jsonl file, one `{"prompt": "..."}` (or a JSON string) per line; one output line per sample.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
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
    #[arg(long, default_value_t = 16)]
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
    #[arg(long)]
    pub verifier: Option<usize>,
    /// Use random weights (the only mode: benches measure kernels, not checkpoints).
    #[arg(long, default_value_t = true)]
    pub random_weights: bool,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Rollout mode: `--batch` prompts × `--n` samples through the sampler.
    #[arg(long)]
    pub rollout: bool,
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line on backend `B` (training commands use `B`, inference its inner
/// backend).
pub fn run<B: AutodiffBackend>(cli: Cli, device: B::Device) -> Result<()> {
    match cli.command {
        Command::Logprobs(a) => logprobs::<B::InnerBackend>(a, &device),
        Command::Generate(a) => generate::<B::InnerBackend>(a, &device),
        Command::Bench(a) => bench::<B::InnerBackend>(a, &device),
        Command::Score(a) => score(a),
        Command::Train(a) => train::<B>(a, device),
        Command::DemoAssets(a) => crate::demo::build::<B>(&a.out, a.seed, a.sft_epochs, &device),
    }
}

/// Loads model and tokenizer from a Hugging Face folder.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Qwen2Config, Qwen2<B>, Tokenizer)> {
    if !dir.is_dir() {
        bail!("{}: model folder not found", dir.display());
    }
    let tokenizer = Tokenizer::from_dir(dir)?;
    let (config, model) = load_qwen2::<B>(dir, device)?;
    Ok((config, model, tokenizer))
}

fn logprobs<B: Backend>(a: LogprobsArgs, device: &B::Device) -> Result<()> {
    let (_config, model, tok) = load_model::<B>(&a.model, device)?;
    let p = tok.encode(&a.prompt)?;
    let c = tok.encode(&a.continuation)?;
    if p.is_empty() {
        bail!("--prompt tokenizes to no tokens: the first continuation token needs a context");
    }
    let lps = continuation_logprobs(&model, &p, &c, device);
    if a.json {
        println!(
            "{}",
            json!({"prompt_ids": p, "continuation_ids": c, "continuation_logprobs": lps})
        );
    } else {
        for (id, lp) in c.iter().zip(&lps) {
            println!("{id}\t{lp:.6}\t{:?}", tok.decode_raw(&[*id]));
        }
        println!("sum\t{:.6}", lps.iter().map(|&x| x as f64).sum::<f64>());
    }
    Ok(())
}

/// `log p(c_j | p, c_<j)` for every continuation token, by one teacher-forced forward pass.
pub fn continuation_logprobs<B: Backend>(
    model: &Qwen2<B>,
    prompt: &[u32],
    cont: &[u32],
    device: &B::Device,
) -> Vec<f32> {
    if cont.is_empty() {
        return vec![];
    }
    let all: Vec<i64> = prompt.iter().chain(cont).map(|&t| t as i64).collect();
    let t = all.len() - 1;
    let hidden = model.hidden(
        Tensor::<B, 2, Int>::from_data(TensorData::new(all[..t].to_vec(), [1, t]), device),
        Tensor::<B, 2, Int>::from_data(
            TensorData::new((0..t as i64).collect::<Vec<_>>(), [1, t]),
            device,
        ),
        Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; t], [1, t]), device),
        None,
    );
    let lp = model.token_logprobs(
        hidden,
        Tensor::from_data(TensorData::new(all[1..].to_vec(), [1, t]), device),
        64,
    );
    let lp = lp
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32");
    lp[prompt.len() - 1..].to_vec()
}

/// Reads a prompts file: each line a JSON string or an object with a string `prompt`.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let p = match &v {
            serde_json::Value::String(s) => s.clone(),
            other => other
                .get("prompt")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .with_context(|| format!("{}:{}: no string key `prompt`", path.display(), i + 1))?,
        };
        out.push(p);
    }
    Ok(out)
}

fn generate<B: Backend>(a: GenerateArgs, device: &B::Device) -> Result<()> {
    let (config, model, tok) = load_model::<B>(&a.model, device)?;
    let texts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => read_prompts(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 {
        bail!("--temperature must be >= 0, got {}", a.temperature);
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
    };
    let encoded = texts
        .iter()
        .map(|t| tok.encode(t))
        .collect::<Result<Vec<_>>>()?;
    if let Some(i) = encoded.iter().position(Vec::is_empty) {
        bail!("prompt {} tokenizes to no tokens", i + 1);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (chunk_index, chunk) in encoded.chunks(a.batch_size.max(1)).enumerate() {
        let base = chunk_index * a.batch_size.max(1);
        for s in sampler::generate_from(&model, &config, chunk, base, &params, &tok, device) {
            let prompt_ids = &chunk[s.prompt_index];
            let text = tok.decode(&s.output_ids);
            if a.json {
                let line = json!({
                    "prompt_index": base + s.prompt_index,
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
                writeln!(
                    out,
                    "[{} #{}] {}",
                    base + s.prompt_index,
                    s.sample_index,
                    text
                )?;
            }
        }
    }
    Ok(())
}

fn bench<B: Backend>(a: BenchArgs, device: &B::Device) -> Result<()> {
    if let Some(count) = a.verifier {
        println!(
            "{}",
            serde_json::to_string(&crate::bench::verifier(count, 0))?
        );
        return Ok(());
    }
    let config = Qwen2Config::from_file(a.config.as_deref().context("--config is required")?)?;
    let model = Qwen2::<B>::init_random(&config, 0, device);
    let line = if a.rollout {
        serde_json::to_value(crate::bench::rollout(
            &config,
            &model,
            a.batch,
            a.n,
            a.prompt_len,
            a.new_tokens,
            device,
        ))?
    } else {
        serde_json::to_value(crate::bench::kernels(
            &config,
            &model,
            a.batch,
            a.prompt_len,
            a.new_tokens,
            device,
        ))?
    };
    if a.json {
        println!("{line}");
    } else {
        println!("{}", serde_json::to_string_pretty(&line)?);
    }
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    use crate::verifier::{self, Summary, VerifierConfig};
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
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut verdicts = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{}: cannot read", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut v: serde_json::Value =
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
        let gold_text = v
            .get("gold_text")
            .and_then(|x| x.as_str())
            .map(str::to_string);
        let mut verdict = verifier::verify(response, gold, n, gold_text.as_deref(), &cfg);
        if let (Some(t), Some(think)) = (&tok, verifier::think_text(response)) {
            verdict.diagnostics.think_tokens = Some(t.encode(think)?.len());
        }
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
        writeln!(out, "{v}")?;
        verdicts.push(verdict);
    }
    out.flush()?;
    let s = Summary::from_verdicts(&verdicts);
    eprintln!(
        "scored {}: mean reward {:.4}, format rate {:.4}, accuracy {:.4}",
        s.count, s.reward_mean, s.format_rate, s.accuracy
    );
    eprintln!("stages: {}", serde_json::to_string(&s.stages)?);
    Ok(())
}

fn train<B: AutodiffBackend>(a: TrainArgs, device: B::Device) -> Result<()> {
    let mut cfg = crate::config::TrainConfig::load(a.config.as_deref(), &a.set)?;
    if let Some(m) = a.model {
        cfg.model.path = m;
    }
    if let Some(d) = a.data {
        cfg.data.train = d;
    }
    let out = a.out.unwrap_or_else(crate::trainer::default_out_dir);
    eprintln!("run folder: {}", out.display());
    let metrics = crate::trainer::run::<B>(cfg, &out, device, a.quiet)?;
    let first = metrics
        .first()
        .and_then(|m| m.eval_accuracy.zip(m.eval_format_rate));
    let last = metrics
        .last()
        .and_then(|m| m.eval_accuracy.zip(m.eval_format_rate));
    if let (Some((a0, f0)), Some((a1, f1))) = (first, last) {
        eprintln!("held-out accuracy {a0:.3} -> {a1:.3}, format rate {f0:.3} -> {f1:.3}");
    }
    eprintln!(
        "metrics: {}, final model: {}",
        out.join("metrics.jsonl").display(),
        out.join("final").display()
    );
    Ok(())
}
