//! The trainer's batched teacher-forced log-probs (left-padded prompt | right-padded response) equal
//! the sampler's rollout log-probs, so the rollout's numbers can serve as log π_old.

use std::path::Path;

use burn::backend::NdArray;
use med_rlvr::experience::{ragged, Batch};
use med_rlvr::sampler::{self, NoDetokenizer, SamplingParams};
use qwen2_burn::load_qwen2;

type B = NdArray<f32>;

#[test]
fn batch_logprobs_equal_rollout_logprobs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2/tied-bf16-sharded");
    let dev = Default::default();
    let (c, m) = load_qwen2::<B>(&dir, &dev).unwrap();
    let prompts = vec![
        vec![5u32, 17, 33, 2, 90, 41, 7, 8, 200],
        vec![11, 12],
        vec![250, 3, 3, 3, 61],
    ];
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 9,
        n: 2,
        seed: 5,
        stop_token_ids: (0..100).collect(),
        ..Default::default()
    };
    let samples = sampler::generate(&m, &c, &prompts, &params, &NoDetokenizer, &dev);
    assert!(
        samples
            .iter()
            .map(|s| s.output_ids.len())
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1,
        "want ragged responses"
    );
    let rows: Vec<(&[u32], &[u32])> = samples
        .iter()
        .map(|s| (prompts[s.prompt_index].as_slice(), s.output_ids.as_slice()))
        .collect();
    let lens: Vec<usize> = samples.iter().map(|s| s.output_ids.len()).collect();
    let lp = ragged(Batch::new(&rows).logprobs(&m, 3, &dev), &lens);
    let mut worst = 0.0f64;
    for (s, row) in samples.iter().zip(&lp) {
        for (a, b) in s.logprobs.iter().zip(row) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    assert!(worst < 1e-4, "batch vs rollout log-prob max diff {worst:e}");
}
