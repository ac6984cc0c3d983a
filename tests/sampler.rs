//! The sampler: padding-invariant greedy decoding, rollout log-probs equal to teacher forcing,
//! correct truncated distributions, per-row stopping, determinism.

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use med_rlvr::model_folder::continuation_logprobs;
use med_rlvr::next_token;
use med_rlvr::sampler::{self, FinishReason, NoDetokenizer, SamplingParams};
use med_rlvr::tokenizer::Tokenizer;
use qwen2_burn::{load_qwen2, Qwen2, Qwen2Config};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2")
        .join(name)
}

fn load<B: Backend>(name: &str) -> (Qwen2Config, Qwen2<B>) {
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

/// The sampler's greedy decoding (argmax on the device) gives transformers' greedy tokens, up to
/// the first step whose top-2 logit margin is within 1e-2 (a near tie could go either way).
fn device_greedy_matches_transformers_greedy<B: Backend>() {
    for name in ["tied-bf16-sharded", "tied-f16-gqa", "untied-f32-mha"] {
        let (c, m) = load::<B>(name);
        let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
        let g: serde_json::Value = serde_json::from_str(&text).unwrap();
        let list = |k: &str| common::floats(&g["greedy"][k]);
        let prompt: Vec<u32> = list("prompt_ids").iter().map(|&x| x as u32).collect();
        let want: Vec<u32> = list("output_ids").iter().map(|&x| x as u32).collect();
        let clear = list("margins").iter().take_while(|m| **m > 1e-2).count();
        assert!(clear >= 4, "{name}: too few clear steps ({clear})");
        let got = sampler::generate(
            &m,
            &c,
            &[prompt],
            &greedy(want.len()),
            &NoDetokenizer,
            &Default::default(),
        );
        assert_eq!(got[0].output_ids[..clear], want[..clear], "{name}");
    }
}

fn greedy_alone_equals_inside_a_padded_batch<B: Backend>() {
    for name in ["tied-bf16-sharded", "untied-f32-mha"] {
        let (c, m) = load::<B>(name);
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

fn rollout_logprobs_equal_teacher_forced_logprobs<B: Backend>() {
    let (c, m) = load::<B>("tied-bf16-sharded");
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
    for s in &samples {
        let tf = continuation_logprobs(&m, &prompts()[s.prompt_index], &s.output_ids, &dev);
        assert_eq!(tf.len(), s.output_ids.len());
        common::assert_close(
            "rollout vs teacher-forced log-probs",
            &s.logprobs,
            &tf,
            1e-4,
        );
    }
}

/// Pearson chi-square of observed counts against expected probabilities.
fn chi_square(counts: &[usize], probs: &[f64], n: usize) -> f64 {
    counts
        .iter()
        .zip(probs)
        .map(|(&o, &p)| (o as f64 - n as f64 * p).powi(2) / (n as f64 * p))
        .sum()
}

fn temperature_top_k_top_p_frequencies_match_the_truncated_distribution<B: Backend>() {
    let logits: Vec<f32> = vec![2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];
    let softmax = |t: f64, keep: &[usize]| {
        let w: Vec<f64> = keep.iter().map(|&i| (logits[i] as f64 / t).exp()).collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect::<Vec<_>>()
    };
    // The device draws `n` rows of the same logits at once, one host uniform per row.
    let n = 200_000;
    let dev = Default::default();
    let rows =
        Tensor::<B, 2>::from_data(TensorData::new(logits.clone(), [1, 8]), &dev).expand([n, 8]);
    let mut rng = StdRng::seed_from_u64(9);
    let uniforms: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    // T = 1 with no truncation is the plain path (the draw from π itself, `log q` = `log π`
    // gathered once); T = 0.7 the scaled one.
    for t in [1.0f64, 0.7] {
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
        for (params, keep) in cases {
            let want = softmax(t, &keep);
            let chosen = next_token::choose(rows.clone(), &params.draw(), &uniforms);
            let mut counts = vec![0usize; keep.len()];
            for (i, &id) in chosen.ids.iter().enumerate() {
                let k = keep
                    .iter()
                    .position(|&k| k == id as usize)
                    .unwrap_or_else(|| panic!("token {id} is outside {keep:?}"));
                counts[k] += 1;
                // `log q` is the truncated, renormalised probability of the drawn token.
                let q = chosen.sampling_logprobs[i] as f64;
                assert!((q - want[k].ln()).abs() < 1e-5, "{q} vs {}", want[k].ln());
            }
            // 99.9% critical values of chi-square for df = k − 1 ≤ 7 are below 24.4.
            let x2 = chi_square(&counts, &want, n);
            assert!(x2 < 24.4, "chi-square {x2} for keep={keep:?}");
            // `log π` and the entropy are the temperature-1 distribution's, whatever is sampled.
            let full1 = (0..8).map(|i| (logits[i] as f64).exp()).collect::<Vec<_>>();
            let z: f64 = full1.iter().sum();
            let h: f64 = -full1.iter().map(|p| p / z * (p / z).ln()).sum::<f64>();
            assert!((chosen.entropies[0] as f64 - h).abs() < 1e-5);
            let id = chosen.ids[0] as usize;
            assert!((chosen.logprobs[0] as f64 - (full1[id] / z).ln()).abs() < 1e-5);
        }
    }
    // Greedy puts all mass on the argmax, with log q = 0.
    let g = next_token::choose(rows.slice([0..3, 0..8]), &greedy(1).draw(), &[]);
    assert_eq!(g.ids, vec![0, 0, 0]);
    assert_eq!(g.sampling_logprobs, vec![0.0; 3]);
}

/// Per decode step the host reads back a few numbers per row, never the `[rows, vocab]` logits:
/// the bytes per token choice are the same for a vocabulary of 8 and of 1,024 (20 on ndarray:
/// an i64 id and three f32s).
fn bytes_read_back_per_decode_step_are_o_rows_not_o_vocab<B: Backend>() {
    let dev = Default::default();
    let per_row = |vocab: usize, rows: usize| {
        let z = Tensor::<B, 2>::random([rows, vocab], burn::tensor::Distribution::Default, &dev);
        let params = SamplingParams::default();
        next_token::choose(z, &params.draw(), &vec![0.5; rows]).bytes_read as f64 / rows as f64
    };
    let small = per_row(8, 4);
    assert_eq!(small, per_row(1024, 4));
    assert_eq!(small, per_row(1024, 64));
    assert!(small <= 24.0, "{small} bytes per row");
    // And through a whole rollout, on a real fixture (vocabulary 1,000+).
    let (c, m) = load::<B>("tied-bf16-sharded");
    let params = SamplingParams {
        max_new_tokens: 6,
        n: 2,
        seed: 1,
        ..Default::default()
    };
    let (samples, stats) = sampler::rollout(&m, &c, &prompts(), 0, &params, &NoDetokenizer, &dev);
    let tokens: usize = samples.iter().map(|s| s.output_ids.len()).sum();
    assert_eq!(stats.row_steps, tokens);
    assert_eq!(stats.bytes_per_row_step(), small);
    // Reading the f32 logits back would cost `vocab × 4` bytes per choice.
    assert!(stats.bytes_read * 10 < tokens * c.vocab_size * 4);
}

/// Continuous batching: with fewer rows than samples, finished rows hand their slot to waiting
/// prompts; every sample equals the one from decoding its prompt alone.
fn continuous_batching_gives_the_samples_of_one_prompt_at_a_time<B: Backend>() {
    let (c, m) = load::<B>("tied-bf16-sharded");
    let dev = Default::default();
    let many: Vec<Vec<u32>> = (0..7u32)
        .map(|i| {
            (0..(2 + (i * 5) % 9))
                .map(|j| (i * 37 + j * 11) % 250 + 1)
                .collect()
        })
        .collect();
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            temperature,
            max_new_tokens: 10,
            n: 2,
            seed: 5,
            // Rows end at different lengths, so slots free up at different steps.
            stop_token_ids: (0..40).collect(),
            ..Default::default()
        };
        for (max_rows, compact) in [(3, true), (5, false), (1, true)] {
            let p = SamplingParams {
                max_rows,
                compact,
                ..params.clone()
            };
            let (cont, stats) = sampler::rollout(&m, &c, &many, 0, &p, &NoDetokenizer, &dev);
            assert_eq!(cont.len(), 14);
            assert!(stats.max_rows <= max_rows);
            assert!(stats.prefills > 1, "rows were refilled");
            let lens: std::collections::HashSet<usize> =
                cont.iter().map(|s| s.output_ids.len()).collect();
            assert!(lens.len() > 1, "want ragged lengths, got {lens:?}");
            for (i, prompt) in many.iter().enumerate() {
                let alone = sampler::generate_from(
                    &m,
                    &c,
                    std::slice::from_ref(prompt),
                    i,
                    &params,
                    &NoDetokenizer,
                    &dev,
                );
                for (k, a) in alone.iter().enumerate() {
                    let s = &cont[i * 2 + k];
                    assert_eq!((s.prompt_index, s.sample_index), (i, k));
                    assert_eq!(
                        s.output_ids, a.output_ids,
                        "T={temperature} rows={max_rows} prompt {i}"
                    );
                    assert_eq!(s.finish_reason, a.finish_reason);
                    common::assert_close("log-probs", &s.logprobs, &a.logprobs, 1e-4);
                }
            }
        }
    }
}

fn a_row_that_emits_the_stop_token_stops_while_others_continue<B: Backend>() {
    let (c, m) = load::<B>("untied-f32-mha");
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

fn stop_strings_are_kept_and_end_the_row<B: Backend>() {
    let dir = fixture("untied-f32-mha");
    let (c, m) = load::<B>("untied-f32-mha");
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

fn same_seed_same_samples_and_n_per_prompt<B: Backend>() {
    let (c, m) = load::<B>("tied-f16-gqa");
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

fn masking_finished_rows_gives_the_same_samples_as_compacting_them<B: Backend>() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2/tied-bf16-sharded");
    let dev = Default::default();
    let (c, m) = qwen2_burn::load_qwen2::<B>(&dir, &dev).unwrap();
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
        common::assert_close("log-probs", &a.logprobs, &b.logprobs, 1e-4);
    }
}

/// A prompt prefilled once for its samples (the default) gives the samples of one prefill per
/// sample, at 1/n of the prefill tokens when all start together; also under continuous batching
/// (refills) and with finished rows masked.
fn a_shared_prefill_gives_the_samples_of_one_prefill_per_sample<B: Backend>() {
    let (c, m) = load::<B>("tied-bf16-sharded");
    let dev = Default::default();
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 10,
        n: 3,
        seed: 13,
        stop_token_ids: (0..40).collect(),
        ..Default::default()
    };
    for (max_rows, compact) in [(0, true), (4, true), (5, false)] {
        let p = SamplingParams {
            max_rows,
            compact,
            ..params.clone()
        };
        let (shared, s1) = sampler::rollout(&m, &c, &prompts(), 0, &p, &NoDetokenizer, &dev);
        let separate = SamplingParams {
            share_prefill: false,
            ..p.clone()
        };
        let (apart, s2) = sampler::rollout(&m, &c, &prompts(), 0, &separate, &NoDetokenizer, &dev);
        assert_eq!(shared.len(), 9);
        assert_eq!(shared.len(), apart.len());
        for (a, b) in shared.iter().zip(&apart) {
            assert_eq!(
                (a.prompt_index, a.sample_index),
                (b.prompt_index, b.sample_index)
            );
            assert_eq!(a.output_ids, b.output_ids, "rows={max_rows}");
            assert_eq!(a.finish_reason, b.finish_reason);
            common::assert_close("log-probs", &a.logprobs, &b.logprobs, 1e-4);
        }
        let lens: std::collections::HashSet<usize> =
            shared.iter().map(|s| s.output_ids.len()).collect();
        assert!(lens.len() > 1, "want ragged lengths, got {lens:?}");
        if max_rows == 0 {
            // 3 prompts × 3 samples in one pass, padded to the widest prompt (9 tokens).
            assert_eq!((s1.prefill_tokens, s2.prefill_tokens), (27, 81));
        } else {
            assert!(s1.prefill_tokens < s2.prefill_tokens, "{s1:?} vs {s2:?}");
        }
    }
}

per_backend!(
    device_greedy_matches_transformers_greedy,
    greedy_alone_equals_inside_a_padded_batch,
    rollout_logprobs_equal_teacher_forced_logprobs,
    temperature_top_k_top_p_frequencies_match_the_truncated_distribution,
    bytes_read_back_per_decode_step_are_o_rows_not_o_vocab,
    continuous_batching_gives_the_samples_of_one_prompt_at_a_time,
    a_row_that_emits_the_stop_token_stops_while_others_continue,
    stop_strings_are_kept_and_end_the_row,
    same_seed_same_samples_and_n_per_prompt,
    masking_finished_rows_gives_the_same_samples_as_compacting_them,
    a_shared_prefill_gives_the_samples_of_one_prefill_per_sample,
);
