//! The rollout–trainer log-prob gap, measured every step, and truncated importance sampling.

use burn::backend::{Autodiff, NdArray};
use med_rlvr::config::TrainConfig;
use med_rlvr::trainer::Trainer;

type B = Autodiff<NdArray<f32>>;

fn first_step(extra: &[&str]) -> med_rlvr::trainer::StepMetrics {
    let mut set: Vec<String> = [
        "train.steps=2",
        "train.eval_every=0",
        "rollout.prompts_per_step=8",
        "ppo.train_batch=8",
        "ppo.micro_batch=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    let cfg = TrainConfig::load(None, &set).unwrap();
    let mut t = Trainer::<B>::new(cfg, Default::default()).unwrap();
    t.step().unwrap().0
}

/// On ndarray the sampler (one token at a time through the KV cache) and the update (the whole
/// sequence, under autodiff) differ only by f32 rounding of different GEMM shapes.
#[test]
fn the_gap_is_measured_and_tiny_on_ndarray() {
    let m = first_step(&[]);
    // Measured: different GEMM shapes round differently, so an exact 0 means it was not measured.
    assert!(m.logprob_gap_max > 0.0, "the gap was not measured");
    assert!(m.logprob_gap_mean <= m.logprob_gap_max);
    eprintln!(
        "gap mean {:e}, max {:e}, ratio std {:e}",
        m.logprob_gap_mean, m.logprob_gap_max, m.rollout_ratio_std
    );
    // README: "gap ≈ 1e-6 on ndarray".
    assert!(m.logprob_gap_max < 5e-6, "gap max {}", m.logprob_gap_max);
    assert!(
        m.rollout_ratio_std < 5e-6,
        "ratio std {}",
        m.rollout_ratio_std
    );
}

/// With `ppo.rollout_is_cap`, `log π_old` is recomputed by the trainer's kernels: at step 0 the
/// actor is the reference, computed in the same batches, so the KL is exactly 0 (the sampler's
/// log-probs give a KL of float rounding instead).
#[test]
fn truncated_is_uses_the_trainers_own_old_logprobs() {
    let with = first_step(&["ppo.rollout_is_cap=2.0"]);
    assert_eq!(with.kl, 0.0);
    let without = first_step(&[]);
    assert!(without.kl.abs() < 1e-6);
    // Same samples either way: the correction changes only the update.
    assert_eq!(with.reward_mean, without.reward_mean);
    assert_eq!(with.response_len_mean, without.response_len_mean);
    assert!(with.policy_loss.is_finite() && with.skipped.is_none());
}

#[test]
fn a_non_positive_cap_is_refused_with_the_key() {
    let err = TrainConfig::load(None, &["ppo.rollout_is_cap=0.0".to_string()]).unwrap_err();
    assert!(format!("{err:#}").contains("ppo.rollout_is_cap"), "{err:#}");
}
