//! Short seeded runs on the demo model: PPO (full and LoRA) and GRPO raise the mean rollout
//! reward, and PPO raises the held-out accuracy (the paper's effect). The demo model samples about
//! a third of its replies with the tags (reward −1 for the rest), so the first steps' mean reward
//! is near −0.5; the assertion is that the mean over the last 4 steps beats the mean over the first
//! 2 by at least 0.4.

use burn::backend::{Autodiff, NdArray};
use med_rlvr::config::TrainConfig;
use med_rlvr::trainer;

type B = Autodiff<NdArray<f32>>;

/// A quiet run of the embedded demo preset with `set` overrides; checks that it wrote its metrics
/// and final model, and returns the per-step metrics.
fn run_demo(set: &[String]) -> Vec<trainer::StepMetrics> {
    let cfg = TrainConfig::load(None, set).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = trainer::RunOptions {
        quiet: true,
        ..Default::default()
    };
    let m = trainer::run::<B>(cfg, out.path(), Default::default(), &opts)
        .unwrap()
        .metrics;
    assert!(
        out.path().join("metrics.jsonl").exists()
            && out.path().join("final/model.safetensors").exists()
    );
    m
}

fn learns(overrides: &[&str]) -> (f64, f64) {
    let mut set: Vec<String> = vec![
        "train.steps=14".into(),
        "train.eval_every=0".into(),
        "rollout.prompts_per_step=16".into(),
        "ppo.train_batch=16".into(),
        "ppo.micro_batch=16".into(),
    ];
    set.extend(overrides.iter().map(|s| s.to_string()));
    let m = run_demo(&set);
    let mean = |xs: &[trainer::StepMetrics]| {
        xs.iter().map(|m| m.reward_mean).sum::<f64>() / xs.len() as f64
    };
    let (start, end) = (mean(&m[..2]), mean(&m[m.len() - 4..]));
    eprintln!("{overrides:?}: mean reward first 2 steps {start:.3}, last 4 steps {end:.3}");
    (start, end)
}

#[test]
fn ppo_raises_mean_reward() {
    // 5e-4, not the preset's 1e-4: this short run (14 steps of 16 prompts) is tuned at 5e-4.
    let (start, end) = learns(&["optim.actor_lr=5e-4"]);
    assert!(end - start >= 0.4, "PPO: reward {start:.3} -> {end:.3}");
}

#[test]
fn ppo_with_lora_raises_mean_reward() {
    // Rank-8 adapters on every projection of a frozen base (actor and critic), reference = base.
    let (start, end) = learns(&["lora.rank=8", "lora.alpha=16.0", "optim.actor_lr=5e-3"]);
    assert!(
        end - start >= 0.4,
        "PPO + LoRA: reward {start:.3} -> {end:.3}"
    );
}

#[test]
fn ppo_with_truncated_importance_sampling_raises_mean_reward() {
    let (start, end) = learns(&["optim.actor_lr=5e-4", "ppo.rollout_is_cap=2.0"]);
    assert!(
        end - start >= 0.4,
        "PPO + TIS: reward {start:.3} -> {end:.3}"
    );
}

#[test]
fn grpo_raises_mean_reward() {
    let (start, end) = learns(&[
        "ppo.estimator=\"grpo\"",
        "rollout.n=4",
        "rollout.prompts_per_step=8",
        "optim.actor_lr=5e-4",
        "train.steps=20",
        "ppo.use_kl_loss=true",
        "ppo.kl_coef=0.001",
    ]);
    assert!(end - start >= 0.4, "GRPO: reward {start:.3} -> {end:.3}");
}

/// The paper's effect on the embedded demo, shortened: the base answers without the tags (greedy
/// held-out accuracy 0, at most 0.35), and 12 PPO steps of the preset lift the held-out greedy
/// accuracy on 60 questions by at least 0.3 with the format learned — the knowledge was in the base.
#[test]
fn ppo_raises_held_out_accuracy_on_the_demo() {
    let set: Vec<String> = [
        "train.steps=12",
        "train.eval_every=12",
        "data.eval_limit=60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let m = run_demo(&set);
    let (first, last) = (&m[0], &m[m.len() - 1]);
    let (a0, a1) = (first.eval_accuracy.unwrap(), last.eval_accuracy.unwrap());
    let f1 = last.eval_format_rate.unwrap();
    eprintln!("held-out greedy accuracy {a0:.3} -> {a1:.3}, format rate -> {f1:.3}");
    assert!(a0 <= 0.35, "the base already answers: {a0}");
    assert!(a1 - a0 >= 0.3, "held-out accuracy {a0:.3} -> {a1:.3}");
    assert!(f1 >= 0.9, "format rate {f1}");
}

/// Training with the direct prompt (`data.prompt = "direct"`) scores replies with the direct rule
/// (1 for the gold letter first on the first line, else 0) and stops them at the newline: the
/// rewards are 0/1, never the r1 rule's −1 for a missing `<think>`, and PPO raises their mean.
#[test]
fn ppo_with_the_direct_prompt_raises_mean_reward() {
    let mut set: Vec<String> = [
        "data.prompt=\"direct\"",
        "optim.actor_lr=5e-4",
        "train.steps=14",
        "train.eval_every=0",
        "rollout.prompts_per_step=16",
        "ppo.train_batch=16",
        "ppo.micro_batch=16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.push("rollout.max_new_tokens=8".into());
    let m = run_demo(&set);
    for s in &m {
        assert!(
            (0.0..=1.0).contains(&s.reward_mean),
            "step {}: mean reward {} outside the direct rule's [0, 1]",
            s.step,
            s.reward_mean
        );
    }
    let mean = |xs: &[trainer::StepMetrics]| {
        xs.iter().map(|m| m.reward_mean).sum::<f64>() / xs.len() as f64
    };
    let (start, end) = (mean(&m[..2]), mean(&m[m.len() - 4..]));
    eprintln!("direct prompt: mean reward first 2 steps {start:.3}, last 4 steps {end:.3}");
    assert!(
        end - start >= DIRECT_GAIN,
        "direct: reward {start:.3} -> {end:.3}"
    );
}

/// The least rise of the direct prompt's mean reward (accuracy) over its 14 steps (measured on
/// ndarray: 0.031 over the first 2 steps, 0.203 over the last 4).
const DIRECT_GAIN: f64 = 0.12;

/// `demo-assets` is deterministic: the task and tokenizer it writes for seed 0 are the committed
/// `assets/demo` files byte for byte (drawn before any training, so no kernel's rounding enters).
#[test]
fn demo_assets_rewrite_the_committed_task_and_tokenizer() {
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
        .args(["demo-assets", "--task-only", "--seed", "0", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "demo-assets --task-only: {status}");
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    for f in ["train.jsonl", "test.jsonl", "model/tokenizer.json"] {
        let (got, want) = (
            std::fs::read(out.path().join(f)).unwrap(),
            std::fs::read(assets.join(f)).unwrap(),
        );
        assert!(
            got == want,
            "{f}: {} bytes written, {} committed differ",
            got.len(),
            want.len()
        );
    }
}
