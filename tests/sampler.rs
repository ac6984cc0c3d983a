//! The sampler: padding-invariant greedy decoding, rollout log-probs equal to teacher forcing,
//! correct truncated distributions, per-row stopping, determinism.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use med_rlvr::cli::continuation_logprobs;
use med_rlvr::sampler::{self, sampling_distribution, FinishReason, NoDetokenizer, SamplingParams};
use med_rlvr::tokenizer::Tokenizer;
use qwen2_burn::{load_qwen2, Qwen2, Qwen2Config};
use rand::{rngs::StdRng, SeedableRng};

type B = NdArray<f32>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2")
        .join(name)
}

fn load(name: &str) -> (Qwen2Config, Qwen2<B>) {
    load_qwen2::<B>(&fixture(name), &Default::default()).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 33, 2, 90, 41, 7, 8, 200],
        vec![11, 12],
        vec![250, 3, 3, 3, 61],
    ]
}

fn greedy(max_new: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_new_tokens: max_new,
        ..Default::default()
    }
}

#[test]
fn greedy_alone_equals_inside_a_padded_batch() {
    for name in ["tied-bf16-sharded", "untied-f32-mha"] {
        let (c, m) = load(name);
        let dev = Default::default();
        let batch = sampler::generate(&m, &c, &prompts(), &greedy(10), &NoDetokenizer, &dev);
        for (i, p) in prompts().iter().enumerate() {
            let alone = sampler::generate(
                &m,
                &c,
                std::slice::from_ref(p),
                &greedy(10),
                &NoDetokenizer,
                &dev,
            );
            assert_eq!(
                alone[0].output_ids, batch[i].output_ids,
                "{name} prompt {i}"
            );
        }
    }
}

#[test]
fn rollout_logprobs_equal_teacher_forced_logprobs() {
    let (c, m) = load("tied-bf16-sharded");
    let dev = Default::default();
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 12,
        n: 2,
        seed: 3,
        ..Default::default()
    };
    let samples = sampler::generate(&m, &c, &prompts(), &params, &NoDetokenizer, &dev);
    assert_eq!(samples.len(), 6);
    let mut worst = 0.0f32;
    for s in &samples {
        let tf = continuation_logprobs(&m, &prompts()[s.prompt_index], &s.output_ids, &dev);
        for (a, b) in s.logprobs.iter().zip(&tf) {
            worst = worst.max((a - b).abs());
        }
        // At temperature 1 without truncation the sampling distribution is the model's.
        for (a, b) in s.logprobs.iter().zip(&s.sampling_logprobs) {
            assert!((a - b).abs() < 1e-4);
        }
    }
    assert!(
        worst < 1e-4,
        "rollout vs teacher-forced log-prob max diff {worst:e}"
    );
}

/// Pearson chi-square of observed counts against expected probabilities.
fn chi_square(counts: &[usize], probs: &[f64], n: usize) -> f64 {
    counts
        .iter()
        .zip(probs)
        .map(|(&o, &p)| (o as f64 - n as f64 * p).powi(2) / (n as f64 * p))
        .sum()
}

#[test]
fn temperature_top_k_top_p_frequencies_match_the_truncated_distribution() {
    let logits: Vec<f32> = vec![2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];
    let softmax = |t: f64, keep: &[usize]| {
        let w: Vec<f64> = keep.iter().map(|&i| (logits[i] as f64 / t).exp()).collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect::<Vec<_>>()
    };
    let t = 0.7f64;
    let full = softmax(t, &(0..8).collect::<Vec<_>>());
    // Nucleus keeps the smallest prefix whose mass reaches top_p.
    let top_p = 0.8;
    let mut mass = 0.0;
    let nucleus: Vec<usize> = (0..8)
        .take_while(|&i| {
            let keep = mass < top_p;
            mass += full[i];
            keep
        })
        .collect();
    let cases: Vec<(SamplingParams, Vec<usize>)> = vec![
        (
            SamplingParams {
                temperature: t as f32,
                ..Default::default()
            },
            (0..8).collect(),
        ),
        (
            SamplingParams {
                temperature: t as f32,
                top_k: 3,
                ..Default::default()
            },
            vec![0, 1, 2],
        ),
        (
            SamplingParams {
                temperature: t as f32,
                top_p: top_p as f32,
                ..Default::default()
            },
            nucleus.clone(),
        ),
    ];
    assert!(nucleus.len() < 8 && nucleus.len() > 1);
    let n = 200_000;
    for (params, keep) in cases {
        let dist = sampling_distribution(&logits, &params);
        let want = softmax(t, &keep);
        assert_eq!(dist.len(), keep.len());
        for ((id, p), (&k, &w)) in dist.iter().zip(keep.iter().zip(&want)) {
            assert_eq!(*id as usize, k);
            assert!((p - w).abs() < 1e-6, "{p} vs {w}"); // temperature is an f32
        }
        let mut rng = StdRng::seed_from_u64(9);
        let mut counts = vec![0usize; keep.len()];
        for _ in 0..n {
            let (id, _) = sampler::draw(&dist, &mut rng);
            counts[keep.iter().position(|&k| k == id as usize).unwrap()] += 1;
        }
        // 99.9% critical values of chi-square for df = k − 1 ≤ 7 are below 24.4.
        let x2 = chi_square(&counts, &want, n);
        assert!(x2 < 24.4, "chi-square {x2} for keep={keep:?}");
    }
    // Greedy puts all mass on the argmax.
    assert_eq!(sampling_distribution(&logits, &greedy(1)), vec![(0, 1.0)]);
}

#[test]
fn a_row_that_emits_the_stop_token_stops_while_others_continue() {
    let (c, m) = load("untied-f32-mha");
    let dev = Default::default();
    let free = sampler::generate(&m, &c, &prompts(), &greedy(12), &NoDetokenizer, &dev);
    // A token that row 0 emits but rows 1 and 2 never do.
    let (pos, stop) = free[0]
        .output_ids
        .iter()
        .enumerate()
        .find(|(_, t)| !free[1].output_ids.contains(t) && !free[2].output_ids.contains(t))
        .map(|(i, &t)| (i, t))
        .expect("fixture rows differ");
    let params = SamplingParams {
        stop_token_ids: vec![stop],
        ..greedy(12)
    };
    let out = sampler::generate(&m, &c, &prompts(), &params, &NoDetokenizer, &dev);
    assert_eq!(out[0].finish_reason, FinishReason::StopToken);
    assert_eq!(
        out[0].output_ids,
        free[0].output_ids[..=pos].to_vec(),
        "stop token kept, nothing after"
    );
    for r in 1..3 {
        assert_eq!(out[r].finish_reason, FinishReason::Length);
        assert_eq!(
            out[r].output_ids, free[r].output_ids,
            "row {r} must be unaffected"
        );
    }
}

#[test]
fn stop_strings_are_kept_and_end_the_row() {
    let dir = fixture("untied-f32-mha");
    let (c, m) = load("untied-f32-mha");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let dev = Default::default();
    let p = vec![tok.encode("A 45-year-old man").unwrap()];
    let free = sampler::generate(&m, &c, &p, &greedy(16), &tok, &dev);
    let text = tok.decode_raw(&free[0].output_ids);
    // Use a 2-character piece of the greedy text that appears after its start as the stop string.
    let stop: String = text.chars().skip(3).take(2).collect();
    let params = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..greedy(16)
    };
    let out = sampler::generate(&m, &c, &p, &params, &tok, &dev);
    assert_eq!(out[0].finish_reason, FinishReason::StopString);
    let got = tok.decode_raw(&out[0].output_ids);
    assert!(got.contains(&stop), "{got:?} lacks {stop:?}");
    assert!(out[0].output_ids.len() < free[0].output_ids.len());
    // Without the last token, the stop string had not appeared yet.
    let before = tok.decode_raw(&out[0].output_ids[..out[0].output_ids.len() - 1]);
    assert!(!before.contains(&stop));
}

#[test]
fn same_seed_same_samples_and_n_per_prompt() {
    let (c, m) = load("tied-f16-gqa");
    let dev = Default::default();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 50,
        max_new_tokens: 10,
        n: 3,
        seed: 42,
        ..Default::default()
    };
    let a = sampler::generate(&m, &c, &prompts(), &params, &NoDetokenizer, &dev);
    let b = sampler::generate(&m, &c, &prompts(), &params, &NoDetokenizer, &dev);
    assert_eq!(a.len(), 9);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.output_ids, y.output_ids);
        assert_eq!(x.logprobs, y.logprobs);
    }
    // Different samples of one prompt differ (with overwhelming probability at T = 1).
    assert!(a[0].output_ids != a[1].output_ids || a[1].output_ids != a[2].output_ids);
    // A sample does not depend on which other prompts share the batch.
    let alone = sampler::generate_from(&m, &c, &prompts()[2..], 2, &params, &NoDetokenizer, &dev);
    assert_eq!(alone[1].output_ids, a[7].output_ids);
    let other_seed = sampler::generate(
        &m,
        &c,
        &prompts(),
        &SamplingParams {
            seed: 43,
            ..params.clone()
        },
        &NoDetokenizer,
        &dev,
    );
    assert!(a
        .iter()
        .zip(&other_seed)
        .any(|(x, y)| x.output_ids != y.output_ids));
}

#[test]
fn masking_finished_rows_gives_the_same_samples_as_compacting_them() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2/tied-bf16-sharded");
    let dev = Default::default();
    let (c, m) = qwen2_burn::load_qwen2::<burn::backend::NdArray<f32>>(&dir, &dev).unwrap();
    let prompts = vec![
        vec![5u32, 17, 33, 2, 90, 41, 7, 8, 200],
        vec![11, 12],
        vec![250, 3, 3, 3, 61],
    ];
    let params = med_rlvr::sampler::SamplingParams {
        temperature: 1.0,
        max_new_tokens: 12,
        n: 3,
        seed: 9,
        stop_token_ids: (0..60).collect(),
        ..Default::default()
    };
    let det = &med_rlvr::sampler::NoDetokenizer;
    let compacted = med_rlvr::sampler::generate(&m, &c, &prompts, &params, det, &dev);
    let masked = med_rlvr::sampler::generate(
        &m,
        &c,
        &prompts,
        &med_rlvr::sampler::SamplingParams {
            compact: false,
            ..params.clone()
        },
        det,
        &dev,
    );
    let lens: std::collections::HashSet<usize> =
        compacted.iter().map(|s| s.output_ids.len()).collect();
    assert!(lens.len() > 2, "want ragged lengths, got {lens:?}");
    assert_eq!(compacted.len(), masked.len());
    for (a, b) in compacted.iter().zip(&masked) {
        assert_eq!(a.output_ids, b.output_ids);
        assert_eq!(a.finish_reason, b.finish_reason);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}
