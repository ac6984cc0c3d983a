//! The batched, KV-cached sampler; it is also the rollout engine. Prompts of different lengths are
//! left-padded into one batch (validity mask + per-row positions), decoded one token per step
//! through the model crate's cache, and each row stops on a stop token, a stop string or
//! `max_new_tokens`. Finished rows are dropped from the batch (cache compaction) so they stop
//! costing compute.
//!
//! Every sampled token comes with `log π(token)` under the model at temperature 1 — the number PPO
//! needs as `log π_old` — and its log-probability under the (tempered, truncated) sampling
//! distribution.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use qwen2_burn::{KvCache, Qwen2, Qwen2Config};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus: keep the smallest set of most likely tokens whose mass reaches `top_p`; 1 disables.
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Stop after emitting any of these ids (the id is kept in the output).
    pub stop_token_ids: Vec<u32>,
    /// Stop once the decoded reply contains any of these (kept in the output).
    pub stop_strings: Vec<String>,
    /// Samples per prompt.
    pub n: usize,
    pub seed: u64,
    /// What finished rows cost: `true` (default) drops them from the batch and the KV cache;
    /// `false` keeps them in the batch, masked (fed a padding token marked invalid, no host work).
    /// Samples are the same either way; `bench --rollout --mask` compares the speed.
    pub compact: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            stop_token_ids: vec![],
            stop_strings: vec![],
            n: 1,
            seed: 0,
            compact: true,
        }
    }
}

/// Why a sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    StopToken,
    StopString,
    Length,
}

/// One generated continuation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub output_ids: Vec<u32>,
    /// `log π(token_j | ·)` at temperature 1, untruncated: reusable as PPO's `log π_old`.
    pub logprobs: Vec<f32>,
    /// `log q(token_j | ·)` under the distribution actually sampled from (0 for greedy).
    pub sampling_logprobs: Vec<f32>,
    /// Entropy `−Σ π log π` of the temperature-1 distribution at each step (nats).
    pub entropies: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Decodes token ids to text, for stop strings.
pub trait Detokenize {
    fn detokenize(&self, ids: &[u32]) -> String;
}

impl Detokenize for crate::tokenizer::Tokenizer {
    fn detokenize(&self, ids: &[u32]) -> String {
        self.decode_raw(ids)
    }
}

/// No stop strings are checked (for callers without a tokenizer).
pub struct NoDetokenizer;

impl Detokenize for NoDetokenizer {
    fn detokenize(&self, _ids: &[u32]) -> String {
        String::new()
    }
}

/// `log softmax(z)`, in f64 accumulation.
pub fn log_softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m as f64 + z.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln();
    z.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The sampling distribution over token ids, as `(id, probability)` pairs summing to 1:
/// `q ∝ softmax(z / T)` restricted to the `top_k` largest and then to the smallest prefix (by
/// descending probability) whose mass reaches `top_p` (a token is kept while the mass of the
/// tokens before it is `< top_p`), renormalised. `T = 0` is greedy: all mass on the argmax.
pub fn sampling_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    if params.temperature <= 0.0 {
        let best = argmax(logits);
        return vec![(best as u32, 1.0)];
    }
    let t = params.temperature as f64;
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, ((z as f64 - m) / t).exp()))
        .collect();
    let truncate = params.top_k > 0 && params.top_k < probs.len() || params.top_p < 1.0;
    if truncate {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            probs.truncate(params.top_k);
        }
        if params.top_p < 1.0 {
            let total: f64 = probs.iter().map(|p| p.1).sum();
            let mut mass = 0.0;
            let mut keep = 0;
            for p in &probs {
                if mass >= params.top_p as f64 * total {
                    break;
                }
                mass += p.1;
                keep += 1;
            }
            probs.truncate(keep.max(1));
        }
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs
}

/// Draws one id from `(id, probability)` pairs by inverse CDF.
pub fn draw(dist: &[(u32, f64)], rng: &mut StdRng) -> (u32, f64) {
    let u: f64 = rng.random::<f64>();
    let mut acc = 0.0;
    for &(id, p) in dist {
        acc += p;
        if u < acc {
            return (id, p);
        }
    }
    *dist.last().expect("non-empty distribution")
}

/// Draws an index from a full probability vector by inverse CDF.
fn draw_index(probs: &[f64], rng: &mut StdRng) -> (u32, f64) {
    let u: f64 = rng.random::<f64>();
    let mut acc = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return (i as u32, p);
        }
    }
    let last = probs.len() - 1;
    (last as u32, probs[last])
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// The RNG of one (prompt, sample) pair: independent of batch composition, so a sample does not
/// change when other prompts join or leave the batch.
fn row_rng(seed: u64, prompt: usize, sample: usize) -> StdRng {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((prompt as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add((sample as u64 + 1).wrapping_mul(0x94D0_49BB_1331_11EB));
    StdRng::seed_from_u64(mix)
}

struct Row {
    rng: StdRng,
    next_position: i64,
    out: Sample,
}

/// Generates `params.n` continuations for each prompt, batched. Samples are returned ordered by
/// (prompt, sample).
pub fn generate<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    detok: &dyn Detokenize,
    device: &B::Device,
) -> Vec<Sample> {
    generate_from(model, config, prompts, 0, params, detok, device)
}

/// [`generate`] for a slice of a larger prompt list starting at `first_index`: prompt `i` of the
/// slice draws from the RNG of global prompt `first_index + i`, so samples do not depend on how a
/// prompt list is cut into batches. `prompt_index` in the output is local to the slice.
pub fn generate_from<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    prompts: &[Vec<u32>],
    first_index: usize,
    params: &SamplingParams,
    detok: &dyn Detokenize,
    device: &B::Device,
) -> Vec<Sample> {
    let mut rows: Vec<Row> = Vec::new();
    let mut row_prompts = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        assert!(!prompt.is_empty(), "prompt {p} is empty");
        for s in 0..params.n.max(1) {
            rows.push(Row {
                rng: row_rng(params.seed, first_index + p, s),
                next_position: prompt.len() as i64,
                out: Sample {
                    prompt_index: p,
                    sample_index: s,
                    output_ids: vec![],
                    logprobs: vec![],
                    sampling_logprobs: vec![],
                    entropies: vec![],
                    finish_reason: FinishReason::Length,
                },
            });
            row_prompts.push(prompt.as_slice());
        }
    }
    if rows.is_empty() || params.max_new_tokens == 0 {
        return rows.into_iter().map(|r| r.out).collect();
    }
    let width = row_prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut tokens = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    let mut valid = Vec::with_capacity(b * width);
    for p in &row_prompts {
        let pad = width - p.len();
        tokens.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().map(|&t| t as i64)));
        positions.extend(std::iter::repeat_n(1i64, pad).chain(0..p.len() as i64));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let mut cache = KvCache::<B>::new(config, b, width + params.max_new_tokens, device);
    let hidden = model.hidden(
        Tensor::from_data(TensorData::new(tokens, [b, width]), device),
        Tensor::from_data(TensorData::new(positions, [b, width]), device),
        Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [b, width]), device),
        Some(&mut cache),
    );
    let h = hidden.dims()[2];
    let mut last = hidden.slice([0..b, width - 1..width, 0..h]);
    let mut active: Vec<Row> = rows;
    let mut done: Vec<Sample> = Vec::new();
    // Mask mode: finished rows stay in the batch; `finished[i]` marks them.
    let mut finished = vec![false; active.len()];
    let max_stop = params
        .stop_strings
        .iter()
        .map(|s| s.len())
        .max()
        .unwrap_or(0);
    loop {
        let logits = model.logits(last).into_data().convert::<f32>();
        let logits = logits.as_slice::<f32>().expect("f32 logits");
        let vocab = logits.len() / active.len();
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (i, row) in active.iter_mut().enumerate() {
            if finished[i] {
                continue;
            }
            let z = &logits[i * vocab..(i + 1) * vocab];
            let lsm = log_softmax(z);
            // One pass of exp serves the entropy and, for plain temperature-1 sampling, the draw.
            let probs: Vec<f64> = lsm.iter().map(|&l| (l as f64).exp()).collect();
            let entropy = -probs
                .iter()
                .zip(&lsm)
                .map(|(p, &l)| p * l as f64)
                .sum::<f64>();
            let plain = params.temperature == 1.0
                && (params.top_k == 0 || params.top_k >= probs.len())
                && params.top_p >= 1.0;
            let (tok, q) = if params.temperature <= 0.0 {
                (argmax(z) as u32, 1.0)
            } else if plain {
                draw_index(&probs, &mut row.rng)
            } else {
                let dist = sampling_distribution(z, params);
                draw(&dist, &mut row.rng)
            };
            row.out.output_ids.push(tok);
            row.out.logprobs.push(lsm[tok as usize]);
            row.out.entropies.push(entropy as f32);
            row.out.sampling_logprobs.push(q.ln() as f32);
            let n_out = row.out.output_ids.len();
            let finish = if params.stop_token_ids.contains(&tok) {
                Some(FinishReason::StopToken)
            } else if max_stop > 0 && {
                // A stop string completed by this token lies within the last `max_stop` tokens.
                let from = n_out.saturating_sub(max_stop + 1);
                let tail = detok.detokenize(&row.out.output_ids[from..]);
                params
                    .stop_strings
                    .iter()
                    .any(|s| tail.contains(s.as_str()))
            } {
                Some(FinishReason::StopString)
            } else if n_out >= params.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(reason) => {
                    row.out.finish_reason = reason;
                    finished[i] = true;
                }
                None => {
                    keep.push(i);
                    next.push(tok as i64);
                }
            }
        }
        if !params.compact {
            if keep.is_empty() {
                done.extend(active.into_iter().map(|r| r.out));
                break;
            }
            // Every row takes a decode step; finished ones get a padding token marked invalid.
            let b = active.len();
            let mut toks = vec![0i64; b];
            for (k, &i) in keep.iter().enumerate() {
                toks[i] = next[k];
            }
            let valid: Vec<bool> = finished.iter().map(|f| !f).collect();
            let pos: Vec<i64> = active.iter().map(|r| r.next_position).collect();
            active.iter_mut().for_each(|r| r.next_position += 1);
            last = model.hidden(
                Tensor::<B, 2, Int>::from_data(TensorData::new(toks, [b, 1]), device),
                Tensor::<B, 2, Int>::from_data(TensorData::new(pos, [b, 1]), device),
                Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [b, 1]), device),
                Some(&mut cache),
            );
            continue;
        }
        if keep.len() < active.len() {
            if !keep.is_empty() && keep.len() < active.len() {
                cache.retain_rows(&keep);
            }
            let mut kept = Vec::with_capacity(keep.len());
            for (i, row) in active.into_iter().enumerate() {
                if keep.binary_search(&i).is_ok() {
                    kept.push(row);
                } else {
                    done.push(row.out);
                }
            }
            active = kept;
            finished = vec![false; active.len()];
        }
        if active.is_empty() {
            break;
        }
        let b = active.len();
        let pos: Vec<i64> = active.iter().map(|r| r.next_position).collect();
        active.iter_mut().for_each(|r| r.next_position += 1);
        last = model.hidden(
            Tensor::<B, 2, Int>::from_data(TensorData::new(next, [b, 1]), device),
            Tensor::<B, 2, Int>::from_data(TensorData::new(pos, [b, 1]), device),
            Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; b], [b, 1]), device),
            Some(&mut cache),
        );
    }
    done.sort_by_key(|s| (s.prompt_index, s.sample_index));
    done
}
