//! Data parallelism on the CPU: two replicas in one process, joined by Burn's collective, take the
//! same PPO update as one device on the combined batch (within 5e-6; 2e-7 for the LoRA run), with
//! sequence-mean and token-mean loss weighting, and stay equal to each other; a fault on one
//! replica skips the step on both.
//! One test function: the collective is process-wide, so its uses must not overlap.

use std::path::Path;
use std::thread;

use burn::backend::{Autodiff, NdArray};
use med_rlvr::config::TrainConfig;
use med_rlvr::parallel::World;
use med_rlvr::trainer::{self, Fault, Faults, RunOptions, StepMetrics, Trainer};

mod common;
use common::weights;

type Inner = NdArray<f32>;
type B = Autodiff<Inner>;

fn cfg(extra: &[&str]) -> TrainConfig {
    let mut set: Vec<String> = [
        "train.eval_every=0",
        "rollout.prompts_per_step=8",
        "rollout.n=2",
        "rollout.max_new_tokens=24",
        "ppo.micro_batch=2",
        "ppo.kl_target=0.05",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set).unwrap()
}

/// `max |a − b|` (NaN, infinity or a length mismatch fail the test).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    common::assert_close("weights", a, b, f64::MAX) as f32
}

/// Metrics, actor weights and critic weights after `steps` steps of one replica.
type Outcome = (Vec<StepMetrics>, Vec<f32>, Vec<f32>);

fn train(t: &mut Trainer<B>, steps: usize) -> Outcome {
    let m = (0..steps).map(|_| t.step().unwrap().0).collect();
    let critic = t.critic.as_ref().map(weights).unwrap_or_default();
    (m, weights(&t.actor), critic)
}

fn assert_same_metrics(one: &[StepMetrics], dp: &[StepMetrics]) {
    assert_eq!(one.len(), dp.len());
    for (a, b) in one.iter().zip(dp) {
        // Same samples (the sampler's streams are keyed by the prompt's index in the step).
        assert_eq!(a.reward_mean, b.reward_mean, "step {}", a.step);
        assert_eq!(a.response_len_mean, b.response_len_mean, "step {}", a.step);
        assert_eq!(a.stages, b.stages, "step {}", a.step);
        for (name, x, y) in [
            ("kl", a.kl, b.kl),
            ("entropy", a.entropy, b.entropy),
            ("policy_loss", a.policy_loss, b.policy_loss),
            ("value_loss", a.value_loss, b.value_loss),
            ("grad_norm", a.grad_norm, b.grad_norm),
            ("critic_grad_norm", a.critic_grad_norm, b.critic_grad_norm),
            ("explained_var", a.explained_var, b.explained_var),
            ("kl_coef", a.kl_coef, b.kl_coef),
        ] {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "step {} {name}: one device {x}, two {y}",
                a.step
            );
        }
    }
}

fn read_final(dir: &Path) -> Vec<f32> {
    let (_, m) = qwen2_burn::load_qwen2::<Inner>(&dir.join("final"), &Default::default()).unwrap();
    weights(&m)
}

#[test]
fn two_replicas_take_the_single_device_update() {
    // 1. PPO with a critic (GAE, whitening over both shards, adaptive KL), two PPO epochs of four
    //    mini-batches of 4 samples, two steps; the replicas built and stepped directly.
    let c = cfg(&["ppo.train_batch=4"]);
    let one = train(
        &mut Trainer::<B>::new(c.clone(), Default::default()).unwrap(),
        2,
    );
    let replicas: Vec<Outcome> = (0..2)
        .map(|rank| {
            let c = c.clone();
            thread::spawn(move || {
                let dev = Default::default();
                let world = World::join::<Inner>(rank, 2, &dev).unwrap();
                let mut t = Trainer::<B>::replica(c, dev, world).unwrap();
                let out = train(&mut t, 2);
                world.leave::<Inner>().unwrap();
                out
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(replicas[0].1, replicas[1].1, "actor replicas diverged");
    assert_eq!(replicas[0].2, replicas[1].2, "critic replicas diverged");
    assert_same_metrics(&one.0, &replicas[0].0);
    let (da, dc) = (
        max_diff(&one.1, &replicas[0].1),
        max_diff(&one.2, &replicas[0].2),
    );
    eprintln!("PPO: max |Δ actor| {da:e}, max |Δ critic| {dc:e}");
    // README: within 5e-6 (measured 3.2e-7 actor, 1.8e-6 critic on this machine).
    assert!(da <= 5e-6 && dc <= 5e-6, "actor {da}, critic {dc}");
    // The updates were real: the weights moved by far more than the tolerance.
    let start = weights(&Trainer::<B>::new(c, Default::default()).unwrap().actor);
    assert!(max_diff(&start, &one.1) > 1e-3);

    // 2. The same through `trainer::run` (threads, logging on replica 0, the final model):
    //    REINFORCE++ (critic-free, whitened over the whole batch) with LoRA, mini-batches of 2
    //    samples, so that a replica often holds none of a mini-batch's samples.
    let c = cfg(&[
        "train.steps=2",
        "ppo.estimator=\"reinforce_pp\"",
        "ppo.train_batch=2",
        "lora.rank=4",
    ]);
    let run = |devices: usize| {
        let out = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            quiet: true,
            devices,
            ..Default::default()
        };
        let m = trainer::run::<B>(c.clone(), out.path(), Default::default(), &opts)
            .unwrap()
            .metrics;
        let lines = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2, "one metrics line per step");
        (m, read_final(out.path()))
    };
    let (m1, w1) = run(1);
    let (m2, w2) = run(2);
    assert_same_metrics(&m1, &m2);
    let d = max_diff(&w1, &w2);
    eprintln!("REINFORCE++ with LoRA through `run`: max |Δ merged actor| {d:e}");
    // README: within 2e-7 (measured 4.5e-8).
    assert!(d <= 2e-7, "{d}");

    // 3. Token-mean loss weighting across replicas (each micro-batch weighted by its share of
    //    the global mini-batch's response tokens), PPO with a critic, and a fault on one replica
    //    only: a NaN policy loss on replica 1 at step 1. Both replicas skip that step (replica 0
    //    is told by the all-reduce) and the run goes on to equal one device with the same fault.
    let c = cfg(&[
        "train.steps=3",
        "ppo.loss_agg=\"token-mean\"",
        "ppo.train_batch=4",
    ]);
    let run = |devices: usize, rank: Option<usize>| {
        let out = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            quiet: true,
            devices,
            faults: Faults::default().inject(1, rank, Fault::PolicyLoss),
            ..Default::default()
        };
        let m = trainer::run::<B>(c.clone(), out.path(), Default::default(), &opts)
            .unwrap()
            .metrics;
        (m, read_final(out.path()))
    };
    let (m1, w1) = run(1, None);
    let (m2, w2) = run(2, Some(1));
    let skipped: Vec<Option<&str>> = m2.iter().map(|m| m.skipped.as_deref()).collect();
    assert_eq!(
        skipped,
        [None, Some("a non-finite loss on another device"), None],
        "replica 0's view of the fault on replica 1"
    );
    assert!(m1[1].skipped.is_some() && m1[0].skipped.is_none() && m1[2].skipped.is_none());
    let good = |m: &[StepMetrics]| -> Vec<StepMetrics> {
        m.iter().filter(|m| m.skipped.is_none()).cloned().collect()
    };
    assert_same_metrics(&good(&m1), &good(&m2));
    let d = max_diff(&w1, &w2);
    eprintln!("token-mean PPO with a fault on one replica: max |Δ actor| {d:e}");
    // README: within 5e-6, as for the sequence-mean run above.
    assert!(d <= 5e-6, "{d}");

    // 4. A step count the devices cannot share is refused with the setting to change.
    let err = Trainer::<B>::replica(
        cfg(&["rollout.prompts_per_step=3", "ppo.train_batch=4"]),
        Default::default(),
        World { rank: 0, size: 2 },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("rollout.prompts_per_step"),
        "{err}"
    );
}
