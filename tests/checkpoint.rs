//! Checkpoints on the CPU: exact resume, determinism, corrupt checkpoints, the NaN guard, and a
//! real SIGKILL in the middle of writing a checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use med_rlvr::checkpoint;
use med_rlvr::config::TrainConfig;
use med_rlvr::experience::Batch;
use med_rlvr::trainer::{self, Fault, Faults, StepMetrics, Trainer};

mod common;

type B = Autodiff<NdArray<f32>>;

/// A small PPO config on the demo (critic, two PPO epochs, two mini-batches, adaptive KL).
fn cfg(extra: &[&str]) -> TrainConfig {
    let mut set: Vec<String> = [
        "train.steps=4",
        "train.eval_every=0",
        "rollout.prompts_per_step=8",
        "rollout.max_new_tokens=24",
        "ppo.train_batch=4",
        "ppo.micro_batch=2",
        "ppo.kl_target=0.05",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set).unwrap()
}

/// Everything about a step except wall-clock numbers, as exact bits.
fn fingerprint(m: &StepMetrics) -> String {
    let mut v = serde_json::to_value(m).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("seconds");
    o.remove("tokens_per_s");
    o.remove("phase_seconds");
    for x in o.values_mut() {
        if let Some(f) = x.as_f64() {
            *x = serde_json::json!(format!("{:016x}", f.to_bits()));
        }
    }
    v.to_string()
}

fn weights<M: Module<Bk>, Bk: Backend>(m: &M) -> Vec<u32> {
    struct Collect(Vec<u32>);
    impl<Bk: Backend> burn::module::ModuleVisitor<Bk> for Collect {
        fn visit_float<const D: usize>(
            &mut self,
            p: &burn::module::Param<burn::tensor::Tensor<Bk, D>>,
        ) {
            let d = p.val().into_data().convert::<f32>();
            self.0
                .extend(d.as_slice::<f32>().unwrap().iter().map(|x| x.to_bits()));
        }
    }
    let mut c = Collect(vec![]);
    m.visit(&mut c);
    c.0
}

fn steps<Bk: AutodiffBackend>(t: &mut Trainer<Bk>, k: usize) -> Vec<String> {
    (0..k).map(|_| fingerprint(&t.step().unwrap().0)).collect()
}

/// Determinism and exact resume, on each CPU backend (flex is the binary's default).
#[cfg_attr(feature = "wgpu", allow(dead_code))] // in `per_backend!`'s CPU-only list
fn resume_is_bit_identical_and_runs_repeat<Bk: AutodiffBackend>() {
    let straight = {
        let mut t = Trainer::<Bk>::new(cfg(&[]), Default::default()).unwrap();
        let m = steps(&mut t, 4);
        (m, weights(&t.actor), weights(t.critic.as_ref().unwrap()))
    };
    // Same seed again: bit-identical (determinism on this backend).
    {
        let mut t = Trainer::<Bk>::new(cfg(&[]), Default::default()).unwrap();
        assert_eq!(steps(&mut t, 4), straight.0, "a repeat run differs");
        assert_eq!(weights(&t.actor), straight.1);
    }
    let run = tempfile::tempdir().unwrap();
    let mut first = Trainer::<Bk>::new(cfg(&[]), Default::default()).unwrap();
    let mut m = steps(&mut first, 2);
    let ck = first.save_checkpoint(run.path()).unwrap();
    assert_eq!(ck, run.path().join("checkpoints/step-000002"));
    assert_eq!(
        checkpoint::resolve(Path::new("latest"), Some(run.path())).unwrap(),
        ck
    );
    drop(first);
    let mut second = Trainer::<Bk>::new(cfg(&[]), Default::default()).unwrap();
    second.load_checkpoint(&ck).unwrap();
    assert_eq!(second.step, 2);
    m.extend(steps(&mut second, 2));
    assert_eq!(m, straight.0, "metrics after resume differ");
    assert_eq!(weights(&second.actor), straight.1, "actor weights differ");
    assert_eq!(
        weights(second.critic.as_ref().unwrap()),
        straight.2,
        "critic weights differ"
    );
}

#[test]
fn lora_resume_is_bit_identical() {
    let c = || cfg(&["lora.rank=4", "optim.actor_lr=5e-3", "train.steps=3"]);
    let straight = {
        let mut t = Trainer::<B>::new(c(), Default::default()).unwrap();
        let m = steps(&mut t, 3);
        (m, weights(&t.actor), weights(t.critic.as_ref().unwrap()))
    };
    let run = tempfile::tempdir().unwrap();
    let mut first = Trainer::<B>::new(c(), Default::default()).unwrap();
    let base = weights(first.reference());
    let rows: Vec<(&[u32], &[u32])> = vec![(&[5, 9, 17, 3], &[40, 41, 7]), (&[8, 2], &[11, 12])];
    let ref_logp = |t: &Trainer<B>| {
        let lp = Batch::new(&rows).logprobs(t.reference(), 64, &Default::default());
        lp.into_data().to_vec::<f32>().unwrap()
    };
    let before = ref_logp(&first);
    let mut m = steps(&mut first, 2);
    // The frozen base (inside the actor, and as the reference) is bit-identical after updates.
    assert_eq!(weights(&first.actor.clone().without_lora()), base);
    assert_eq!(weights(first.reference()), base);
    assert_eq!(ref_logp(&first), before, "reference log-probs changed");
    assert_ne!(
        weights(&first.actor),
        weights(&first.actor.clone().without_lora())
    );
    let ck = first.save_checkpoint(run.path()).unwrap();
    // Adapters only: the checkpoint does not copy the frozen base.
    assert!(ck.join("actor/adapter_model.safetensors").exists());
    assert!(!ck.join("actor/model.safetensors").exists());
    let mut second = Trainer::<B>::new(c(), Default::default()).unwrap();
    second.load_checkpoint(&ck).unwrap();
    m.extend(steps(&mut second, 1));
    assert_eq!(m, straight.0, "metrics after resume differ");
    assert_eq!(weights(&second.actor), straight.1, "actor differs");
    assert_eq!(
        weights(second.critic.as_ref().unwrap()),
        straight.2,
        "critic differs"
    );
    // A full-fine-tuning config cannot load an adapter checkpoint.
    let mut full = Trainer::<B>::new(cfg(&[]), Default::default()).unwrap();
    let err = format!("{:#}", full.load_checkpoint(&ck).unwrap_err());
    assert!(err.contains("LoRA"), "{err}");
}

/// Two PPO steps with a critic and LoRA adapters on a tiny budget (the one run on every backend,
/// wgpu included): finite numbers, a zero KL before the first update, and a checkpoint that
/// round-trips (weights bit for bit, the resumed step equal to the straight one).
fn ppo_steps_and_a_checkpoint_round_trip<Bk: AutodiffBackend>() {
    let c = || {
        cfg(&[
            "train.steps=2",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=8",
            "ppo.train_batch=2",
            "ppo.ppo_epochs=1",
            "lora.rank=4",
            "optim.actor_lr=5e-3",
        ])
    };
    let mut t = Trainer::<Bk>::new(c(), Default::default()).unwrap();
    let (m0, _) = t.step().unwrap();
    assert!(m0.kl.abs() < 1e-5, "step-0 KL {}", m0.kl);
    let run = tempfile::tempdir().unwrap();
    let ck = t.save_checkpoint(run.path()).unwrap();
    let (actor, critic) = (weights(&t.actor), weights(t.critic.as_ref().unwrap()));
    let straight = steps(&mut t, 1);
    let mut resumed = Trainer::<Bk>::new(c(), Default::default()).unwrap();
    resumed.load_checkpoint(&ck).unwrap();
    assert_eq!(weights(&resumed.actor), actor, "actor after the round trip");
    assert_eq!(weights(resumed.critic.as_ref().unwrap()), critic, "critic");
    let (m1, _) = resumed.step().unwrap();
    assert!(
        m1.policy_loss.is_finite() && m1.value_loss.is_finite(),
        "{m1:?}"
    );
    assert_eq!(vec![fingerprint(&m1)], straight, "the resumed step differs");
}

per_backend!(autodiff: ppo_steps_and_a_checkpoint_round_trip; cpu: resume_is_bit_identical_and_runs_repeat);

#[test]
fn keeps_the_last_n_and_refuses_corrupt_checkpoints() {
    let run = tempfile::tempdir().unwrap();
    let mut t = Trainer::<B>::new(
        cfg(&[
            "train.keep_checkpoints=2",
            "ppo.estimator=\"grpo\"",
            "rollout.n=2",
        ]),
        Default::default(),
    )
    .unwrap();
    for _ in 0..3 {
        t.step().unwrap();
        t.save_checkpoint(run.path()).unwrap();
    }
    let root = run.path().join("checkpoints");
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-000002", "step-000003"]);

    // Truncated tensor file.
    let ck = root.join("step-000003");
    let st = ck.join("actor/model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = format!(
        "{:#}",
        t.load_checkpoint(&ck).expect_err("truncated weights load")
    );
    assert!(err.contains("model.safetensors"), "{err}");

    // Truncated optimizer state.
    let ck2 = root.join("step-000002");
    let opt = ck2.join("optimizer/actor.mpk");
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&opt)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let err = format!("{:#}", t.load_checkpoint(&ck2).unwrap_err());
    assert!(err.contains("actor.mpk"), "{err}");

    // Missing state file: not a checkpoint, and `latest` falls back to nothing complete.
    std::fs::remove_file(ck.join("state.json")).unwrap();
    let err = format!("{:#}", t.load_checkpoint(&ck).unwrap_err());
    assert!(err.contains("state.json"), "{err}");
    std::fs::remove_file(ck2.join("state.json")).unwrap();
    let err = format!(
        "{:#}",
        checkpoint::resolve(Path::new("latest"), Some(run.path())).unwrap_err()
    );
    assert!(err.contains("no complete checkpoint"), "{err}");
}

#[test]
fn a_nan_step_is_skipped_and_the_run_carries_on() {
    let out = tempfile::tempdir().unwrap();
    let opts = trainer::RunOptions {
        quiet: true,
        faults: Faults::default().inject(1, None, Fault::PolicyLoss),
        ..Default::default()
    };
    let r = trainer::run::<B>(cfg(&[]), out.path(), Default::default(), &opts).unwrap();
    assert_eq!(r.metrics.len(), 4);
    assert!(r.metrics[1].skipped.is_some());
    assert!(r
        .metrics
        .iter()
        .enumerate()
        .all(|(i, m)| i == 1 || m.skipped.is_none()));
    assert!(r.metrics.iter().all(|m| m.grad_norm.is_finite()));
    assert!(out.path().join("final/model.safetensors").exists());

    // Consecutive faults stop the run with a checkpoint and a message.
    let out = tempfile::tempdir().unwrap();
    let faults = (0..4).fold(Faults::default(), |f, step| {
        f.inject(step, None, Fault::PolicyLoss)
    });
    let opts = trainer::RunOptions {
        quiet: true,
        faults,
        ..Default::default()
    };
    let err = trainer::run::<B>(
        cfg(&["train.max_bad_steps=2"]),
        out.path(),
        Default::default(),
        &opts,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("2 consecutive steps had NaN/Inf"), "{msg}");
    assert!(out
        .path()
        .join("checkpoints/step-000002/state.json")
        .exists());
}

/// No bad update is applied, whichever number goes bad: a non-finite rollout number, policy
/// loss, value loss or gradient (each planned at step 1, after a normal step 0) skips the step
/// with the cause named, leaves actor and critic bit-identical, and the next step trains again.
#[test]
fn every_fault_path_skips_the_step_and_leaves_the_weights() {
    for (fault, says) in [
        (Fault::Rollout, "non-finite log-probs, KL or advantages"),
        (Fault::PolicyLoss, "policy loss NaN"),
        (Fault::ValueLoss, "value loss NaN"),
        (Fault::Gradient, "gradient norm actor"),
    ] {
        let mut t = Trainer::<B>::new(cfg(&[]), Default::default()).unwrap();
        t.faults = Faults::default().inject(1, None, fault);
        t.step().unwrap();
        let actor = weights(&t.actor);
        let critic = weights(t.critic.as_ref().unwrap());
        let (m, _) = t.step().unwrap();
        let why = m
            .skipped
            .unwrap_or_else(|| panic!("{fault:?}: step 1 was not skipped"));
        assert!(why.contains(says), "{fault:?}: skipped for {why:?}");
        assert!(actor == weights(&t.actor), "{fault:?} changed the actor");
        assert!(
            critic == weights(t.critic.as_ref().unwrap()),
            "{fault:?} changed the critic"
        );
        let (m, _) = t.step().unwrap();
        assert!(m.skipped.is_none(), "{fault:?}: step 2 {:?}", m.skipped);
        assert!(
            actor != weights(&t.actor),
            "{fault:?}: step 2 did not train"
        );
    }
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_med-rlvr"))
}

fn train_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["train", "--quiet", "--out"]).arg(out).args([
        "--set",
        "train.steps=3",
        "--set",
        "train.eval_every=0",
        "--set",
        "rollout.prompts_per_step=4",
        "--set",
        "rollout.max_new_tokens=16",
        "--set",
        "ppo.train_batch=4",
        "--set",
        "ppo.micro_batch=4",
    ]);
    c.args(extra);
    c
}

#[test]
fn sigkill_while_writing_a_checkpoint_leaves_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = train_cmd(&out, &["--save-every", "1"])
        .env("MEDRLVR_CHECKPOINT_PAUSE_MS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = out.join("checkpoints");
    let t0 = Instant::now();
    // Wait until checkpoint 1 is complete and checkpoint 2 is being written, then SIGKILL.
    loop {
        if root.join("step-000001/state.json").exists() && root.join(".tmp-step-000002").exists() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("training ended early: {status}");
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("latest")).unwrap().trim(),
        "step-000001"
    );
    assert!(!root.join("step-000002").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().count() >= 2,
        "step 2's metrics were written"
    );

    // Resume from `latest`: the run finishes, and every step is in metrics.jsonl exactly once.
    let o = train_cmd(&out, &["--resume", "latest", "--save-every", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resumed from"), "{stderr}");
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [0, 1, 2]);
    assert!(out.join("final/model.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("latest")).unwrap().trim(),
        "step-000003"
    );

    // A config that changes the math is refused, naming the key.
    let o = train_cmd(&out, &["--resume", "latest", "--set", "optim.actor_lr=0.5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("optim.actor_lr"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // ... and accepted with --force, with a warning naming it.
    let o = train_cmd(
        &out,
        &[
            "--resume",
            "latest",
            "--set",
            "optim.actor_lr=0.5",
            "--force",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: resuming with a changed setting: optim.actor_lr"),
        "{stderr}"
    );

    // Export writes a loadable HF folder.
    let exported = dir.path().join("export");
    let o = Command::new(bin())
        .args(["export", "--checkpoint"])
        .arg(&out)
        .arg("--out")
        .arg(&exported)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(exported.join(f).exists(), "{f}");
    }
    // --dtype bf16 / f16 store that dtype, and the folder loads back (as f32) within its rounding.
    let (_, f32_model) =
        qwen2_burn::load_qwen2::<NdArray<f32>>(&exported, &Default::default()).unwrap();
    let reference = weights(&f32_model);
    for (dtype, tag, tol) in [("bf16", "BF16", 1e-2f32), ("f16", "F16", 1e-3)] {
        let dir_d = dir.path().join(format!("export-{dtype}"));
        let o = Command::new(bin())
            .args(["export", "--checkpoint"])
            .arg(&out)
            .arg("--out")
            .arg(&dir_d)
            .args(["--dtype", dtype])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(dir_d.join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
        let dtypes: Vec<&str> = header
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(_, v)| v["dtype"].as_str().unwrap())
            .collect();
        assert!(dtypes.iter().all(|d| *d == tag), "{dtype}: {dtypes:?}");
        let (_, m) = qwen2_burn::load_qwen2::<NdArray<f32>>(&dir_d, &Default::default()).unwrap();
        let got = weights(&m);
        assert_eq!(got.len(), reference.len());
        for (a, b) in got.iter().zip(&reference) {
            let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-3),
                "{dtype}: {a} vs {b}"
            );
        }
    }
}

/// A 50-step run in `out`, returned once `ready(out)` holds.
fn long_run_once(out: &Path, ready: impl Fn(&Path) -> bool) -> std::process::Child {
    let child = train_cmd(out, &["--set", "train.steps=50"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready(out) {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the run did not get there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn sigterm(child: &std::process::Child) {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn sigterm_finishes_the_step_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let child = long_run_once(&out, |out| {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count() >= 1)
            .unwrap_or(false)
    });
    sigterm(&child);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    let ck = checkpoint::resolve(Path::new("latest"), Some(&out)).unwrap();
    let st = checkpoint::read_state(&ck).unwrap();
    let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(st.step, lines, "checkpoint at the last finished step");
    assert!(st.step < 50);
}

/// A second SIGTERM while the first one's step finishes exits at once with status 130.
#[test]
fn a_second_signal_exits_at_once_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let child = long_run_once(&out, |out| out.join("config.toml").exists());
    for _ in 0..2 {
        sigterm(&child);
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("second interrupt"), "{stderr}");
}
