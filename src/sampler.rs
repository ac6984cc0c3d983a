//! The batched, KV-cached sampler; it is also the rollout engine. Prompts of different lengths are
//! left-padded into one batch (validity mask + per-row positions), decoded one token per step
//! through the model crate's cache, and each row stops on a stop token, a stop string or
//! `max_new_tokens`. With continuous batching a finished row's slot is refilled with the next
//! waiting prompt; once none waits, finished rows are dropped from the batch (cache compaction) so
//! they stop costing compute. The next token is chosen on the device ([`crate::next_token`]).
//!
//! Every sampled token comes with `log π(token)` under the model at temperature 1 — the number PPO
//! needs as `log π_old` — and its log-probability under the (tempered, truncated) sampling
//! distribution.

use std::collections::VecDeque;

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use qwen2_burn::{KvCache, Qwen2, Qwen2Config};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::next_token;

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
    /// What finished rows cost once no prompt waits for their slot: `true` (default) drops them
    /// from the batch and the KV cache; `false` keeps them in the batch, masked (no host work).
    /// Samples are the same either way; `bench --rollout --mask` compares the speed.
    pub compact: bool,
    /// Rows (prompt × sample) decoded together; 0 = all. A finished row's slot goes to the next
    /// waiting row (continuous batching). Samples do not depend on it.
    #[serde(default)]
    pub max_rows: usize,
    /// Prefill a prompt once for all its samples that start together and copy its KV-cache rows
    /// to them (default), instead of once per sample: `n` times fewer prefill tokens at `n`
    /// samples per prompt. Samples are the same either way (`bench --rollout --no-share-prefill`
    /// compares the cost).
    #[serde(default = "shared")]
    pub share_prefill: bool,
}

fn shared() -> bool {
    true
}

impl SamplingParams {
    /// The distribution each next token is drawn from.
    pub fn draw(&self) -> next_token::Draw {
        next_token::Draw {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
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
            max_rows: 0,
            share_prefill: true,
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

impl Sample {
    /// Cut at the token limit (`max_new_tokens`) rather than ended by a stop.
    pub fn truncated(&self) -> bool {
        self.finish_reason == FinishReason::Length
    }
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

/// The RNG of one (prompt, sample) pair: independent of batch composition, so a sample does not
/// change when other prompts join or leave the batch.
fn row_rng(seed: u64, prompt: usize, sample: usize) -> StdRng {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((prompt as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add((sample as u64 + 1).wrapping_mul(0x94D0_49BB_1331_11EB));
    StdRng::seed_from_u64(mix)
}

/// One (prompt, sample) row: its prompt, RNG and output so far.
struct Row<'a> {
    prompt: &'a [u32],
    rng: StdRng,
    /// Position id of the next token fed.
    next_position: i64,
    /// The first cache column holding one of its tokens.
    start: usize,
    out: Sample,
}

/// What a sampler call cost: passes and the bytes read back from the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RolloutStats {
    /// Decode passes (one token for every row of the batch).
    pub decode_steps: usize,
    /// Prefill passes: the first batch, then one per refill of freed rows.
    pub prefills: usize,
    /// Token positions the prefill passes ran (left padding included): with a shared prefill,
    /// each prompt's once per pass, not once per sample.
    pub prefill_tokens: usize,
    /// Rows of the widest decode step.
    pub max_rows: usize,
    /// Token choices made (rows that chose, summed over steps).
    pub row_steps: usize,
    /// Bytes read back from the device by the token choices (ids, log-probs, entropies).
    pub bytes_read: usize,
}

impl RolloutStats {
    /// Bytes read back per token choice: a constant (a dozen or two), whatever the vocabulary.
    pub fn bytes_per_row_step(&self) -> f64 {
        self.bytes_read as f64 / self.row_steps.max(1) as f64
    }
}

/// Generates `params.n` continuations for each prompt. Samples are returned ordered by
/// (prompt, sample).
pub fn generate<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    detok: &dyn Detokenize,
    device: &B::Device,
) -> Vec<Sample> {
    rollout(model, config, prompts, 0, params, detok, device).0
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
    rollout(model, config, prompts, first_index, params, detok, device).0
}

/// The sampler with continuous batching: at most `params.max_rows` rows (0 = all) decode
/// together; when a row finishes, the next waiting (prompt, sample) is prefilled into its cache
/// row and decodes from the next step on. Once nothing waits, finished rows are dropped from the
/// batch (`params.compact`) or kept in it, masked. Each decode step reads back O(rows) bytes
/// (see [`next_token::choose`](crate::next_token::choose)); the returned stats count them.
pub fn rollout<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    prompts: &[Vec<u32>],
    first_index: usize,
    params: &SamplingParams,
    detok: &dyn Detokenize,
    device: &B::Device,
) -> (Vec<Sample>, RolloutStats) {
    let mut stats = RolloutStats::default();
    let mut queue: VecDeque<Row> = VecDeque::new();
    for (p, prompt) in prompts.iter().enumerate() {
        assert!(!prompt.is_empty(), "prompt {p} is empty");
        for s in 0..params.n.max(1) {
            queue.push_back(Row {
                prompt,
                rng: row_rng(params.seed, first_index + p, s),
                next_position: prompt.len() as i64,
                start: 0,
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
        }
    }
    let total = queue.len();
    if total == 0 || params.max_new_tokens == 0 {
        return (queue.into_iter().map(|r| r.out).collect(), stats);
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let rows = match params.max_rows {
        0 => total,
        m => m.min(total),
    };
    let columns = cache_columns(width, params.max_new_tokens, rows < total);
    // The first batch is padded to the widest prompt of the whole call, so every later prompt
    // fits before the shared write position (which never falls below `width`).
    let first: Vec<Row> = queue.drain(..rows).collect();
    let (mut last, mut cache) = prefill(
        model, config, &first, width, columns, params, &mut stats, device,
    );
    let mut slots: Vec<Option<Row>> = first
        .into_iter()
        .map(|mut r| {
            r.start = width - r.prompt.len();
            Some(r)
        })
        .collect();
    let mut done: Vec<Sample> = Vec::with_capacity(total);
    let max_stop = params
        .stop_strings
        .iter()
        .map(|s| s.len())
        .max()
        .unwrap_or(0);
    loop {
        // Choose every row's next token on the device.
        let b = slots.len();
        let [_, _, h] = last.dims();
        let logits = model.logits(last);
        let vocab = logits.dims()[2];
        let uniforms: Vec<f32> = slots
            .iter_mut()
            .map(|s| match s {
                Some(r) if params.temperature > 0.0 => r.rng.random::<f32>(),
                _ => 0.0,
            })
            .collect();
        let chosen = next_token::choose(logits.reshape([b, vocab]), &params.draw(), &uniforms);
        stats.bytes_read += chosen.bytes_read;
        stats.max_rows = stats.max_rows.max(b);
        // Record them; end the rows that stop.
        let mut feed = vec![0i64; b];
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(row) = slot else { continue };
            stats.row_steps += 1;
            let tok = chosen.ids[i];
            row.out.output_ids.push(tok);
            row.out.logprobs.push(chosen.logprobs[i]);
            row.out.sampling_logprobs.push(chosen.sampling_logprobs[i]);
            row.out.entropies.push(chosen.entropies[i]);
            match finish_reason(&row.out.output_ids, params, max_stop, detok) {
                Some(reason) => {
                    row.out.finish_reason = reason;
                    done.push(slot.take().expect("occupied").out);
                }
                None => feed[i] = tok as i64,
            }
        }
        if slots.iter().all(Option::is_none) && queue.is_empty() {
            break;
        }
        if queue.is_empty() && params.compact && slots.iter().any(Option::is_none) {
            let keep: Vec<usize> = (0..b).filter(|&i| slots[i].is_some()).collect();
            cache.retain_rows(&keep);
            feed = keep.iter().map(|&i| feed[i]).collect();
            slots.retain(Option::is_some);
        }
        // Room for one more column: drop the columns no row reads any more.
        if cache.len() == cache.capacity() {
            let keep = slots
                .iter()
                .flatten()
                .map(|r| cache.len() - r.start)
                .chain(queue.iter().map(|r| r.prompt.len()))
                .max()
                .unwrap_or(0);
            let dropped = cache.len() - keep;
            cache.keep_last(keep);
            slots.iter_mut().flatten().for_each(|r| r.start -= dropped);
        }
        // One decode step. A free row is fed token 0 marked valid: junk that no one reads (its
        // columns are invalidated when a new row moves in), but never a row without keys.
        let b = slots.len();
        let pos: Vec<i64> = slots
            .iter_mut()
            .map(|s| {
                s.as_mut().map_or(0, |r| {
                    r.next_position += 1;
                    r.next_position - 1
                })
            })
            .collect();
        last = model.hidden(
            Tensor::<B, 2, Int>::from_data(TensorData::new(feed, [b, 1]), device),
            Tensor::<B, 2, Int>::from_data(TensorData::new(pos, [b, 1]), device),
            Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; b], [b, 1]), device),
            Some(&mut cache),
        );
        stats.decode_steps += 1;
        // Waiting rows take the free slots: prefilled on their own, moved into the cache rows.
        let free: Vec<usize> = (0..b).filter(|&i| slots[i].is_none()).collect();
        if !free.is_empty() && !queue.is_empty() {
            let joiners: Vec<Row> = queue.drain(..free.len().min(queue.len())).collect();
            let w = joiners.iter().map(|r| r.prompt.len()).max().unwrap_or(1);
            let (first_hidden, fresh) =
                prefill(model, config, &joiners, w, w, params, &mut stats, device);
            cache.write_rows(&free[..joiners.len()], &fresh);
            for (k, (&slot, mut row)) in free.iter().zip(joiners).enumerate() {
                row.start = cache.len() - row.prompt.len();
                last = last.slice_assign(
                    [slot..slot + 1, 0..1, 0..h],
                    first_hidden.clone().slice([k..k + 1, 0..1, 0..h]),
                );
                slots[slot] = Some(row);
            }
        }
    }
    done.sort_by_key(|s| (s.prompt_index, s.sample_index));
    (done, stats)
}

/// KV-cache columns for a call: the widest prompt and a reply, plus, when finished rows are
/// refilled, room for another reply before the cache drops the columns nobody reads.
pub fn cache_columns(prompt_len: usize, max_new_tokens: usize, refills: bool) -> usize {
    prompt_len + max_new_tokens * if refills { 2 } else { 1 }
}

/// Prefills `rows`' prompts, left-padded to `width`, into a new cache of `columns` columns;
/// returns the last column's hidden state `[rows, 1, hidden]` (it predicts each row's first new
/// token) and the cache. With `params.share_prefill`, rows of one prompt (its samples) share one
/// prefilled row: each distinct prompt runs once, and its cache row and hidden state are copied
/// to its samples.
#[allow(clippy::too_many_arguments)]
fn prefill<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    rows: &[Row],
    width: usize,
    columns: usize,
    params: &SamplingParams,
    stats: &mut RolloutStats,
    device: &B::Device,
) -> (Tensor<B, 3>, KvCache<B>) {
    // `of[i]`: the prefilled row that row `i` copies.
    let mut distinct: Vec<&Row> = Vec::with_capacity(rows.len());
    let mut of = Vec::with_capacity(rows.len());
    for r in rows {
        let same = |d: &&Row| d.out.prompt_index == r.out.prompt_index;
        match distinct
            .iter()
            .position(same)
            .filter(|_| params.share_prefill)
        {
            Some(k) => of.push(k),
            None => {
                of.push(distinct.len());
                distinct.push(r);
            }
        }
    }
    let b = distinct.len();
    let mut cache = KvCache::<B>::new(config, b, columns, device);
    let mut tokens = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    let mut valid = Vec::with_capacity(b * width);
    for r in &distinct {
        let (p, pad) = (r.prompt, width - r.prompt.len());
        tokens.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().map(|&t| t as i64)));
        positions.extend(std::iter::repeat_n(1i64, pad).chain(0..p.len() as i64));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let hidden = model.hidden(
        Tensor::from_data(TensorData::new(tokens, [b, width]), device),
        Tensor::from_data(TensorData::new(positions, [b, width]), device),
        Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [b, width]), device),
        Some(&mut cache),
    );
    stats.prefills += 1;
    stats.prefill_tokens += b * width;
    let h = hidden.dims()[2];
    let mut last = hidden.slice([0..b, width - 1..width, 0..h]);
    if b < rows.len() {
        cache.retain_rows(&of);
        let idx: Vec<i64> = of.iter().map(|&k| k as i64).collect();
        let n = idx.len();
        last = last.select(0, Tensor::from_data(TensorData::new(idx, [n]), device));
    }
    (last, cache)
}

/// Why a row whose outputs are `ids` ends now, if it does: a stop token, a stop string completed
/// by the last token (it lies within the last `max_stop + 1` tokens), or the length limit.
fn finish_reason(
    ids: &[u32],
    params: &SamplingParams,
    max_stop: usize,
    detok: &dyn Detokenize,
) -> Option<FinishReason> {
    let tok = *ids.last()?;
    if params.stop_token_ids.contains(&tok) {
        return Some(FinishReason::StopToken);
    }
    if max_stop > 0 {
        let tail = detok.detokenize(&ids[ids.len().saturating_sub(max_stop + 1)..]);
        if params
            .stop_strings
            .iter()
            .any(|s| tail.contains(s.as_str()))
        {
            return Some(FinishReason::StopString);
        }
    }
    (ids.len() >= params.max_new_tokens).then_some(FinishReason::Length)
}
