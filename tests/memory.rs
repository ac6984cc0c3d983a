//! The memory plan against measured tensor sizes, its refusal, `rollout.generate_batch`, and a
//! bf16 frozen base (`model.base_dtype`, on the `flex` backend).

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use med_rlvr::config::TrainConfig;
use med_rlvr::memory::{self, MemoryPlan, PlanInputs};
use med_rlvr::trainer::Trainer;
use qwen2_burn::{load_qwen2, KvCache, LoraSpec};

type I = NdArray<f32>;
type B = Autodiff<I>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2")
        .join(name)
}

/// Trainable (requires-grad) and total float elements of a module.
fn counts<Bk: Backend, M: Module<Bk>>(m: &M) -> (u64, u64) {
    struct C(u64, u64);
    impl<Bk: Backend> ModuleVisitor<Bk> for C {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            let n = p.val().shape().num_elements() as u64;
            self.1 += n;
            if p.val().is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut c = C(0, 0);
    m.visit(&mut c);
    (c.0, c.1)
}

#[test]
fn weights_adapters_and_kv_cache_match_allocated_sizes() {
    let dev = Default::default();
    for name in ["tied-bf16-sharded", "untied-f32-mha", "tied-f16-gqa"] {
        let (cfg, model) = load_qwen2::<B>(&fixture(name), &dev).unwrap();
        assert_eq!(
            cfg.num_parameters() as u64,
            model.num_params() as u64,
            "{name}"
        );
        let spec = LoraSpec {
            rank: 3,
            alpha: 6.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        };
        let adapted = model.with_lora(&spec, 0, &dev);
        let (trainable, total) = counts(&adapted);
        assert_eq!(trainable, memory::lora_params(&cfg, &spec), "{name}");
        assert_eq!(total, cfg.num_parameters() as u64 + trainable, "{name}");
        let cache = KvCache::<I>::new(&cfg, 5, 37, &dev);
        assert_eq!(
            cache.num_elements() as u64,
            memory::kv_cache_elements(&cfg, 5, 37),
            "{name}"
        );
    }
}

fn demo(extra: &[&str]) -> TrainConfig {
    let mut set: Vec<String> = [
        "train.steps=2",
        "train.eval_every=0",
        "rollout.prompts_per_step=7",
        "rollout.max_new_tokens=16",
        "ppo.train_batch=7",
        "ppo.micro_batch=7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set).unwrap()
}

#[test]
fn the_plan_counts_what_the_trainer_trains() {
    for (extra, lora) in [
        (vec![], false),
        (vec!["lora.rank=4"], true),
        (
            vec!["lora.rank=4", "ppo.estimator=\"grpo\"", "rollout.n=2"],
            true,
        ),
    ] {
        let t = Trainer::<B>::new(demo(&extra), Default::default()).unwrap();
        let mut trainable = counts(&t.actor).0;
        if let Some(c) = &t.critic {
            trainable += counts(c).0;
        }
        assert_eq!(t.plan.trainable, trainable, "{extra:?}");
        let names: Vec<&str> = t.plan.items.iter().map(|i| i.what.as_str()).collect();
        assert_eq!(names.iter().any(|n| n.starts_with("LoRA")), lora);
        // Gradients and AdamW moments scale with the trainable count.
        let bytes = |prefix: &str| {
            t.plan
                .items
                .iter()
                .find(|i| i.what.starts_with(prefix))
                .unwrap()
                .bytes
        };
        assert_eq!(bytes("gradients"), 4 * trainable);
        assert_eq!(bytes("AdamW"), 8 * trainable);
    }
}

#[test]
fn over_the_limit_is_refused_naming_the_setting() {
    let err = Trainer::<B>::new(demo(&["model.memory_limit_gb=0.01"]), Default::default())
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("memory_limit_gb") && msg.contains("ppo.micro_batch"),
        "{msg}"
    );
    // The plan's rollout term follows rollout.generate_batch.
    let cfg = demo(&["rollout.generate_batch=2"]);
    let geometry = qwen2_burn::Qwen2Config::from_dir(&cfg.model.path).unwrap();
    let small = MemoryPlan::new(&PlanInputs::from_config(&cfg, &geometry, 150, 1));
    let big = MemoryPlan::new(&PlanInputs::from_config(&demo(&[]), &geometry, 150, 1));
    assert!(small.rollout * 3 < big.rollout);
}

#[test]
fn generate_batch_does_not_change_the_samples() {
    let run = |extra: &[&str]| {
        let mut t = Trainer::<B>::new(demo(extra), Default::default()).unwrap();
        let (m, shown) = t.step().unwrap();
        let texts: Vec<String> = shown.iter().map(|v| v["response"].to_string()).collect();
        (m.reward_mean, m.response_len_mean, texts, m.kl)
    };
    let (a, b) = (run(&[]), run(&["rollout.generate_batch=3"]));
    assert_eq!((a.0, a.1, &a.2), (b.0, b.1, &b.2), "samples differ");
    // Log-probs (hence KL) differ only by float rounding of the different batch shapes.
    assert!((a.3 - b.3).abs() < 1e-5, "kl {} vs {}", a.3, b.3);
}

/// Bytes held by a module's float parameters.
fn param_bytes<Bk: Backend, M: Module<Bk>>(m: &M) -> u64 {
    struct S(u64);
    impl<Bk: Backend> ModuleVisitor<Bk> for S {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0 += p.val().into_data().bytes.len() as u64;
        }
    }
    let mut s = S(0);
    m.visit(&mut s);
    s.0
}

#[test]
fn a_bf16_base_trains_lora_and_is_planned_at_two_bytes() {
    type F = Autodiff<Flex>;
    let cfg = demo(&["lora.rank=4", "model.base_dtype=\"bf16\""]);
    let mut t = Trainer::<F>::new(cfg.clone(), Default::default()).unwrap();
    let reference = t.reference();
    assert_eq!(reference.embed_tokens.val().dtype(), DType::BF16);
    assert_eq!(
        t.actor.layers[0].mlp.up_proj.weight.val().dtype(),
        DType::BF16
    );
    // The plan's base item is the reference's measured bytes (norms, a few hundred floats, are
    // f32: within 1 %).
    let base = t
        .plan
        .items
        .iter()
        .find(|i| i.what.starts_with("base weights (bf16"))
        .unwrap()
        .bytes;
    let measured = param_bytes(reference);
    assert_eq!(base, 2 * t.model_config.num_parameters() as u64);
    assert!(
        measured >= base && (measured - base) * 100 < base,
        "{measured} vs {base}"
    );
    let f32_plan = Trainer::<B>::new(demo(&["lora.rank=4"]), Default::default())
        .unwrap()
        .plan;
    assert!(t.plan.persistent < f32_plan.persistent);
    // Two PPO steps: the rollout and reference agree at the start (same bf16 base, adapters
    // B = 0), the adapters train, every number is finite.
    let before = param_bytes(&t.actor);
    let m: Vec<_> = (0..2).map(|_| t.step().unwrap().0).collect();
    eprintln!(
        "bf16 base: kl {:e} then {:e}, grad norm {} {}",
        m[0].kl, m[1].kl, m[0].grad_norm, m[1].grad_norm
    );
    // README: step-0 KL 1.8e-6 in this test (rollout and reference from the same bf16 kernels).
    assert!(m[0].kl.abs() < 1e-5, "step-0 KL {}", m[0].kl);
    assert!(m.iter().all(|s| s.skipped.is_none() && s.grad_norm > 0.0));
    assert!(m
        .iter()
        .all(|s| s.policy_loss.is_finite() && s.value_loss.is_finite()));
    assert_eq!(
        param_bytes(&t.actor),
        before,
        "the base stays bf16 after updates"
    );
    assert_eq!(t.reference().embed_tokens.val().dtype(), DType::BF16);

    // Refusals: no bf16 on ndarray; bf16 without LoRA.
    let err = Trainer::<B>::new(cfg, Default::default()).err().unwrap();
    assert!(format!("{err:#}").contains("model.base_dtype"), "{err:#}");
    let err = TrainConfig::load(None, &["model.base_dtype=\"bf16\"".to_string()])
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("lora.rank"), "{err:#}");
}

/// `largest_fitting` finds the boundary: the micro-batch it returns fits the limit, one more
/// does not.
#[test]
fn the_largest_micro_batch_that_fits_is_the_boundary() {
    let cfg = demo(&[]);
    let geometry = qwen2_burn::Qwen2Config::from_dir(&cfg.model.path).unwrap();
    let peak = |m: usize| {
        let mut c = cfg.clone();
        c.ppo.micro_batch = m;
        MemoryPlan::new(&PlanInputs::from_config(&c, &geometry, 150, 1)).peak
    };
    // Large enough for the update to set the peak on the demo geometry.
    let limit = (peak(300) + peak(301)) / 2;
    assert!(
        peak(300) < peak(301),
        "the update grows with the micro-batch"
    );
    let m = memory::largest_fitting(4096, |m| peak(m) <= limit).unwrap();
    assert_eq!(m, 300);
    assert_eq!(memory::largest_fitting(4096, |m| peak(m) < peak(1)), None);
    assert_eq!(memory::largest_fitting(4096, |_| true), Some(4096));
}

/// The 3B preset plans to 23.9 GiB (the README's number) at `ppo.micro_batch = 4` with
/// layer-by-layer recomputation (the default), and keeping every activation would not fit in 80.
#[test]
fn the_3b_preset_plans_23_9_gib_at_micro_batch_4_with_recomputation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let geometry =
        qwen2_burn::Qwen2Config::from_file(&root.join("assets/configs/qwen2.5-3b.json")).unwrap();
    let peak = |recompute: bool| {
        let cfg = TrainConfig::load(
            Some(&root.join("assets/presets/med-rlvr-qwen2.5-3b.toml")),
            &[
                "ppo.micro_batch=4".to_string(),
                format!("model.recompute={recompute}"),
            ],
        )
        .unwrap();
        MemoryPlan::new(&PlanInputs::from_config(&cfg, &geometry, 512, 1)).peak as f64
            / (1u64 << 30) as f64
    };
    let (with, without) = (peak(true), peak(false));
    assert!(
        (with - 23.9).abs() < 0.05,
        "3B preset, micro-batch 4: {with:.2} GiB (README: 23.9)"
    );
    assert!(without > 80.0, "keeping every activation: {without:.1} GiB");
}
