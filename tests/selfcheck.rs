//! The differential sweep (`med_rlvr::selfcheck`): every model, trainer and sampler entry point
//! on the backend under test equals the CPU reference (ndarray) on a seeded property-based sweep
//! of shapes — batch 1–6, prompt and response lengths that cover every residue mod 8 plus odd
//! and prime lengths up to 40 each (totals up to 80), chunks that do and do not divide the
//! response width, tied/untied heads, GQA/MHA, hidden 32/64, vocabularies 61–1457, LoRA on and off,
//! Qwen2 and Qwen3 geometries (q/k norms, `head_dim` ≠ hidden / heads; by the seed's parity). Any
//! element outside its tolerance, any NaN/Inf, any length mismatch fails the case.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use med_rlvr::selfcheck::{run_case, Case, HIDDENS, VOCABS};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

mod common;

type Reference = Autodiff<NdArray<f32>>;

/// Lengths: 1–8 (every residue mod 8), then odd, even and prime ones up to 40.
const LENGTHS: [usize; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 16, 17, 22, 29, 37, 40];
const CHUNKS: [usize; 6] = [1, 2, 3, 5, 8, 64];

fn case() -> impl Strategy<Value = Case> {
    let len = || prop::sample::select(&LENGTHS[..]);
    (
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(&HIDDENS[..]),
        prop::sample::select(&VOCABS[..]),
        any::<bool>(),
        prop::collection::vec((len(), len()), 1..=6),
        prop::sample::select(&CHUNKS[..]),
    )
        .prop_map(|(seed, tied, gqa, hidden, vocab, lora, rows, chunk)| Case {
            seed: seed % 1_000_000,
            qwen3: seed % 2 == 1,
            tied,
            gqa,
            hidden,
            vocab,
            lora,
            rows,
            chunk,
        })
}

/// Cases per backend: the sweep's count (`MEDRLVR_SWEEP_CASES` overrides it).
fn count() -> u32 {
    std::env::var("MEDRLVR_SWEEP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(feature = "wgpu") { 4 } else { 24 })
}

fn every_entry_point_equals_the_cpu_reference<B: AutodiffBackend>() {
    let config = Config {
        cases: count(),
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let started = std::time::Instant::now();
    let checked = std::cell::Cell::new(0usize);
    runner
        .run(&case(), |case| {
            let checks = run_case::<B, Reference>(&case, &Default::default(), &Default::default());
            prop_assert!(checks.len() > 40, "{case}: only {} outputs", checks.len());
            for c in &checks {
                if let Err(e) = &c.result {
                    return Err(TestCaseError::fail(format!("{case}: {e}")));
                }
            }
            checked.set(checked.get() + checks.len());
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{} cases, {} outputs compared in {:.1} s",
        count(),
        checked.get(),
        started.elapsed().as_secs_f64()
    );
}

/// Two PPO steps of the embedded demo (critic, GAE, layer recomputation — the production
/// default — two PPO epochs of micro-batches with ragged response lengths) on the backend under
/// test give the metrics of the CPU reference: the same samples (rewards, lengths, stages) and
/// losses, KL, entropy and gradient norms within 1e-4 relative.
fn two_ppo_steps_equal_the_cpu_reference<B: AutodiffBackend>() {
    use med_rlvr::config::TrainConfig;
    use med_rlvr::trainer::Trainer;
    let set: Vec<String> = [
        "train.eval_every=0",
        "model.recompute=true",
        "rollout.prompts_per_step=4",
        "rollout.n=2",
        "rollout.max_new_tokens=24",
        "ppo.train_batch=4",
        "ppo.micro_batch=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = TrainConfig::load(None, &set).unwrap();
    let mut got = Trainer::<B>::new(cfg.clone(), Default::default()).unwrap();
    let mut want = Trainer::<Reference>::new(cfg, Default::default()).unwrap();
    let mut lengths = std::collections::HashSet::new();
    for _ in 0..2 {
        let (g, samples) = got.step().unwrap();
        let (w, _) = want.step().unwrap();
        lengths.extend(
            samples
                .iter()
                .map(|s| s["response"].as_str().unwrap().len()),
        );
        assert_eq!(g.reward_mean, w.reward_mean, "step {}", w.step);
        assert_eq!(g.response_len_mean, w.response_len_mean, "step {}", w.step);
        assert_eq!(g.stages, w.stages, "step {}", w.step);
        let close = |name: &str, x: f64, y: f64| {
            let tol = 1e-4 * (1.0 + y.abs());
            common::assert_close(&format!("step {} {name}", w.step), &[x], &[y], tol);
        };
        close("kl", g.kl, w.kl);
        close("entropy", g.entropy, w.entropy);
        close("policy_loss", g.policy_loss, w.policy_loss);
        close("value_loss", g.value_loss, w.value_loss);
        close("grad_norm", g.grad_norm, w.grad_norm);
        close("critic_grad_norm", g.critic_grad_norm, w.critic_grad_norm);
        close("clip_frac", g.clip_frac, w.clip_frac);
        close("logprob_gap_max", g.logprob_gap_max, w.logprob_gap_max);
        assert!(
            w.logprob_gap_max < 1e-4,
            "the rollout-trainer gap was not measured small"
        );
    }
    assert!(
        lengths.len() > 2,
        "want ragged responses, got lengths {lengths:?}"
    );
}

/// `logprobs` (teacher forcing, the `logprobs` command's path) equals the CPU reference within
/// 1e-4 at every position for every total length 2–70, on the demo model (tied head, vocabulary
/// 1,457) and, on the CPU backends, the untied f32 fixture too (software Vulkan is slow).
fn logprobs_equal_the_cpu_reference_at_every_total_length<B: AutodiffBackend>() {
    use med_rlvr::model_folder::continuation_logprobs;
    use qwen2_burn::load_qwen2;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs: &[&str] = if cfg!(feature = "wgpu") {
        &["assets/demo/model"]
    } else {
        &["assets/demo/model", "tests/fixtures/qwen2/untied-f32-mha"]
    };
    for dir in dirs {
        let (c, got) = load_qwen2::<B>(&root.join(dir), &Default::default()).unwrap();
        let (_, want) = load_qwen2::<Reference>(&root.join(dir), &Default::default()).unwrap();
        for total in 2..=70usize {
            let ids: Vec<u32> = (0..total)
                .map(|i| ((i * 7919 + total * 31) % c.vocab_size) as u32)
                .collect();
            let (prompt, cont) = ids.split_at(1 + total % 5 % (total - 1));
            let g = continuation_logprobs(&got, prompt, cont, &Default::default());
            let w = continuation_logprobs(&want, prompt, cont, &Default::default());
            assert_eq!(w.len(), cont.len());
            common::assert_close(&format!("{dir} total {total}"), &g, &w, 1e-4);
        }
    }
}

/// The passes without a graph (rollout, reference, critic, recomputation's forward) run the
/// attention through Burn's fused `attention` op; autodiff differentiates the composed one
/// (`matmul`, mask, `softmax`, `matmul`). Both give the same hidden states at every position —
/// padding included, which needs the mask to let a padding query see itself — in one pass and
/// prefilled then decoded one column at a time through the KV cache, over a sweep of shapes. (On
/// CPU only: on wgpu the sweep above already compares the fused path's hidden states, logits and
/// samples with ndarray's, and this test's extra kernels cost CI over two minutes of lavapipe.)
#[cfg_attr(feature = "wgpu", allow(dead_code))] // in `per_backend!`'s CPU-only list
fn fused_attention_equals_the_composed_one_at_every_position<B: AutodiffBackend>() {
    use burn::tensor::{Bool, Int, Tensor};
    use med_rlvr::experience::Batch;
    use med_rlvr::selfcheck::{batch, config, host, model, token_rows};
    use qwen2_burn::KvCache;
    /// `hidden` on `m`, in one pass or column by column through a cache, `[b, t, hidden]` each.
    fn passes<B: burn::tensor::backend::Backend>(
        m: &qwen2_burn::Qwen2<B>,
        cfg: &qwen2_burn::Qwen2Config,
        batch: &Batch,
        device: &B::Device,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let (tokens, positions, valid): (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2, Bool>) =
            batch.inputs(device);
        let [b, t] = tokens.dims();
        let whole = host(m.hidden(tokens.clone(), positions.clone(), valid.clone(), None));
        let mut cache = KvCache::new(cfg, b, t, device);
        let first = (t / 2).max(1);
        let mut steps = vec![host(m.hidden(
            tokens.clone().slice([0..b, 0..first]),
            positions.clone().slice([0..b, 0..first]),
            valid.clone().slice([0..b, 0..first]),
            Some(&mut cache),
        ))];
        for j in first..t {
            steps.push(host(m.hidden(
                tokens.clone().slice([0..b, j..j + 1]),
                positions.clone().slice([0..b, j..j + 1]),
                valid.clone().slice([0..b, j..j + 1]),
                Some(&mut cache),
            )));
        }
        (whole, steps)
    }
    let sweep = Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(sweep, rng);
    runner
        .run(&case(), |case| {
            use burn::module::AutodiffModule;
            let device = Default::default();
            let composed = model::<B>(&case, &device);
            let fused = composed.valid();
            let batch = batch(&token_rows(&case));
            let cfg = config(&case);
            let (want, want_steps) = passes(&composed, &cfg, &batch, &device);
            let (got, got_steps) = passes(&fused, &cfg, &batch, &device);
            common::assert_close(&format!("{case}: hidden"), &got, &want, 2e-4);
            prop_assert_eq!(got_steps.len(), want_steps.len());
            for (i, (g, w)) in got_steps.iter().zip(&want_steps).enumerate() {
                common::assert_close(&format!("{case}: cached pass {i}"), g, w, 2e-4);
            }
            Ok(())
        })
        .unwrap();
}

per_backend!(
    autodiff: every_entry_point_equals_the_cpu_reference,
    logprobs_equal_the_cpu_reference_at_every_total_length,
    two_ppo_steps_equal_the_cpu_reference;
    cpu: fused_attention_equals_the_composed_one_at_every_position
);
