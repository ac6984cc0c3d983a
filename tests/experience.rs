//! The trainer's batched teacher-forced log-probs (left-padded prompt | right-padded response) equal
//! the sampler's rollout log-probs, so the rollout's numbers can serve as log π_old.

use std::path::Path;

use burn::backend::NdArray;
use med_rlvr::critic::Critic;
use med_rlvr::experience::{ragged, token_budget_groups, Batch};
use med_rlvr::sampler::{self, NoDetokenizer, SamplingParams};
use qwen2_burn::load_qwen2;

mod common;

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
    assert_eq!(lp.len(), samples.len());
    for (s, row) in samples.iter().zip(&lp) {
        common::assert_close("batch vs rollout log-probs", row, &s.logprobs, 1e-4);
    }
}

/// Reference log-probs and critic values computed in token-budget batches (sequences grouped by
/// length) equal the one-sequence-at-a-time numbers within 1e-5.
#[test]
fn budget_batched_logprobs_and_values_equal_one_at_a_time() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2/untied-f32-mha");
    let dev = Default::default();
    let (c, m) = load_qwen2::<B>(&dir, &dev).unwrap();
    let critic = Critic::new(m.clone(), 3, &dev);
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..9u32)
        .map(|i| {
            let p = (0..2 + (i * 7) % 11)
                .map(|j| (i * 31 + j * 13) % 200 + 1)
                .collect();
            let r = (0..1 + (i * 5) % 8)
                .map(|j| (i * 17 + j * 3) % 200 + 1)
                .collect();
            (p, r)
        })
        .collect();
    let lens: Vec<(usize, usize)> = seqs.iter().map(|(p, r)| (p.len(), r.len())).collect();
    let budget = 40;
    let groups = token_budget_groups(&lens, budget);
    let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..seqs.len()).collect::<Vec<_>>(),
        "every sequence once"
    );
    assert!(groups.len() > 1 && groups.len() < seqs.len(), "{groups:?}");
    for g in &groups {
        let w = g.iter().map(|&i| lens[i].0).max().unwrap()
            + g.iter().map(|&i| lens[i].1).max().unwrap();
        assert!(
            g.len() == 1 || g.len() * w <= budget,
            "{g:?} pads to {} tokens",
            g.len() * w
        );
    }
    let one = |i: usize| {
        let rows = [(seqs[i].0.as_slice(), seqs[i].1.as_slice())];
        let b = Batch::new(&rows);
        let n = [seqs[i].1.len()];
        (
            ragged(b.logprobs(&m, 4, &dev), &n).remove(0),
            ragged(b.values(&critic, &dev), &n).remove(0),
        )
    };
    for g in &groups {
        let rows: Vec<(&[u32], &[u32])> = g
            .iter()
            .map(|&i| (seqs[i].0.as_slice(), seqs[i].1.as_slice()))
            .collect();
        let n: Vec<usize> = g.iter().map(|&i| seqs[i].1.len()).collect();
        let b = Batch::new(&rows);
        let lp = ragged(b.logprobs(&m, 4, &dev), &n);
        let v = ragged(b.values(&critic, &dev), &n);
        for (k, &i) in g.iter().enumerate() {
            let (lp1, v1) = one(i);
            common::assert_close("batched vs alone log-probs", &lp[k], &lp1, 1e-5);
            common::assert_close("batched vs alone values", &v[k], &v1, 1e-5);
        }
    }
    let _ = c;
}
