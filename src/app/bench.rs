//! `med-rlvr bench`: prefill and decode throughput of a model geometry with random weights, the
//! rollout throughput of the sampler, each weight-reading product of a decode step alone, and the
//! memory of one training update against the plan. `benches/torch_reference.py` measures
//! transformers on the same geometry and prints the same JSON, so the two can be compared side by
//! side.

use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use qwen2_burn::{KvCache, Qwen2, Qwen2Config};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use med_rlvr::sampler::{self, NoDetokenizer, SamplingParams};

#[derive(Debug, Serialize)]
pub struct KernelBench {
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Weight bytes read per decode step × steps per second (batch-1 decode is bound by this).
    pub decode_weight_bytes_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct RolloutBench {
    pub prompts: usize,
    pub n: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub stop_every: usize,
    pub finished_rows: &'static str,
    /// Rows decoded together (0 = all), and how: `continuous` (freed rows refilled) or `slices`
    /// (one sampler call per `max_rows` rows, the pre-continuous-batching way).
    pub max_rows: usize,
    pub batching: &'static str,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub generated_tok_s: f64,
    /// Decode passes, prefill passes, and the bytes read back from the device (all calls).
    pub decode_steps: usize,
    pub prefills: usize,
    /// `shared` (each prompt prefilled once for its samples) or `per sample`, the token positions
    /// the prefills ran (padding included), and those per sample.
    pub prefill: &'static str,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_sample: f64,
    pub bytes_read: usize,
    /// Bytes read back per token choice: O(1), not O(vocab).
    pub bytes_per_row_step: f64,
}

fn random_prompts(count: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect()
}

fn sync<B: Backend>(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32")
}

/// Prefill `batch × prompt_len` tokens, then `new_tokens` single-token decode steps through the
/// KV cache (greedy; logits of every step are brought to the host, as the sampler does).
pub fn kernels<B: Backend>(
    config: &Qwen2Config,
    model: &Qwen2<B>,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    device: &B::Device,
) -> KernelBench {
    let prompts = random_prompts(batch, prompt_len, config.vocab_size, 7);
    let toks: Vec<i64> = prompts.concat().iter().map(|&t| t as i64).collect();
    let pos: Vec<i64> = (0..batch).flat_map(|_| 0..prompt_len as i64).collect();
    let run = |cache: &mut KvCache<B>| {
        let t0 = Instant::now();
        let h = model.hidden(
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(toks.clone(), [batch, prompt_len]),
                device,
            ),
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(pos.clone(), [batch, prompt_len]),
                device,
            ),
            Tensor::<B, 2, Bool>::from_data(
                TensorData::new(vec![true; batch * prompt_len], [batch, prompt_len]),
                device,
            ),
            Some(cache),
        );
        let hd = h.dims()[2];
        let logits = sync(model.logits(h.slice([0..batch, prompt_len - 1..prompt_len, 0..hd])));
        (t0.elapsed().as_secs_f64(), logits)
    };
    // Warm-up (allocations, autotune on GPU backends).
    let mut warm = KvCache::<B>::new(config, batch, prompt_len + 2, device);
    let _ = run(&mut warm);
    let mut cache = KvCache::<B>::new(config, batch, prompt_len + new_tokens, device);
    let (prefill_s, mut logits) = run(&mut cache);
    let vocab = config.vocab_size;
    let t0 = Instant::now();
    for step in 0..new_tokens {
        let next: Vec<i64> = (0..batch)
            .map(|r| {
                let z = &logits[r * vocab..(r + 1) * vocab];
                z.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |x| x.0) as i64
            })
            .collect();
        let p = vec![(prompt_len + step) as i64; batch];
        let h = model.hidden(
            Tensor::<B, 2, Int>::from_data(TensorData::new(next, [batch, 1]), device),
            Tensor::<B, 2, Int>::from_data(TensorData::new(p, [batch, 1]), device),
            Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; batch], [batch, 1]), device),
            Some(&mut cache),
        );
        logits = sync(model.logits(h));
    }
    let decode_s = t0.elapsed().as_secs_f64();
    let steps_per_s = new_tokens as f64 / decode_s;
    // Bytes of the stored weights (4 in f32, 2 with a bf16 base).
    let weight_bytes =
        config.num_parameters() as f64 * model.embed_tokens.val().dtype().size() as f64;
    KernelBench {
        batch,
        prompt_len,
        new_tokens,
        prefill_tok_s: (batch * prompt_len) as f64 / prefill_s,
        decode_tok_s: (batch * new_tokens) as f64 / decode_s,
        decode_weight_bytes_per_s: weight_bytes * steps_per_s,
    }
}

/// One weight-reading product of a decode step, timed alone.
#[derive(Debug, Serialize)]
pub struct ProductTime {
    pub name: &'static str,
    /// `[m, k] × [k, n]`.
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub microseconds: f64,
    /// Weight bytes read per second: the product's speed limit at decode is memory bandwidth.
    pub weight_gb_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ProductsBench {
    pub batch: usize,
    /// `inside` (the binary's main thread is one of rayon's: `src/app/threads.rs`) or `outside`
    /// (`--outside-pool`: as before that change).
    pub main_thread: &'static str,
    pub products: Vec<ProductTime>,
}

/// Each product of one decode step of `config` at `batch` rows, timed alone: the attention and
/// MLP projections `[batch, k] × [k, n]` (the weight in our `Linear` layout, `[d_in, d_out]`) and
/// the tied head `E · hᵀ` (`[vocab, hidden] × [hidden, batch]`). Each weight has distinct copies
/// cycled through, 1 GiB together (2–4,096 copies: 2,340 for the 0.5B geometry's smallest), so
/// each product reads its weight from memory as a decode step does; `passes` timed passes over
/// them after one untimed pass; the last result read back once per pass (a GPU's queue drained).
pub fn products<B: Backend>(
    config: &Qwen2Config,
    batch: usize,
    passes: usize,
    main_thread: &'static str,
    device: &B::Device,
) -> ProductsBench {
    use burn::tensor::Distribution;
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let kv = config.num_key_value_heads * config.head_dim;
    let q = config.num_attention_heads * config.head_dim;
    // (name, m, k, n, whether the weight is the left-hand side: the head's `E`)
    let shapes: [(&'static str, usize, usize, usize, bool); 8] = [
        ("q_proj", batch, h, q, false),
        ("k_proj", batch, h, kv, false),
        ("v_proj", batch, h, kv, false),
        ("o_proj", batch, q, h, false),
        ("gate_proj", batch, h, i, false),
        ("up_proj", batch, h, i, false),
        ("down_proj", batch, i, h, false),
        ("tied_head", config.vocab_size, h, batch, true),
    ];
    let dist = Distribution::Uniform(-0.05, 0.05);
    let products = shapes
        .into_iter()
        .map(|(name, m, k, n, head)| {
            let weight_shape = if head { [m, k] } else { [k, n] };
            let weight_elems = weight_shape[0] * weight_shape[1];
            let copies = ((1usize << 30) / (4 * weight_elems)).clamp(2, 4096);
            let weights: Vec<Tensor<B, 2>> = (0..copies)
                .map(|_| Tensor::random(weight_shape, dist, device))
                .collect();
            // The head multiplies by the hidden states' transposed view, as `Qwen2::logits` does.
            let other = if head {
                Tensor::<B, 2>::random([n, k], dist, device).transpose()
            } else {
                Tensor::<B, 2>::random([m, k], dist, device)
            };
            let pass = || {
                let mut last = None;
                for w in &weights {
                    last = Some(if head {
                        w.clone().matmul(other.clone())
                    } else {
                        other.clone().matmul(w.clone())
                    });
                }
                let _ = last.map(|t| t.into_data());
            };
            pass();
            let t0 = Instant::now();
            for _ in 0..passes {
                pass();
            }
            let seconds = t0.elapsed().as_secs_f64() / (passes * copies) as f64;
            ProductTime {
                name,
                m,
                k,
                n,
                microseconds: seconds * 1e6,
                weight_gb_s: (4 * weight_elems) as f64 / seconds / 1e9,
            }
        })
        .collect();
    ProductsBench {
        batch,
        main_thread,
        products,
    }
}

/// How a rollout bench ends rows and treats finished ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct RolloutShape {
    /// 0: every row generates exactly `new_tokens`. k > 0: every k-th token id is a stop id, so
    /// (random weights sample near-uniformly) lengths are roughly geometric with mean k, capped.
    pub stop_every: usize,
    /// Keep finished rows in the batch, masked, instead of compacting them out.
    pub mask: bool,
    /// Rows decoded together (0 = all).
    pub max_rows: usize,
    /// Cut the rows into sampler calls of `max_rows` instead of continuous batching.
    pub slices: bool,
    /// Prefill every sample's prompt on its own (the cost before shared prefill).
    pub prefill_per_sample: bool,
}

/// `prompts × n` samples (temperature 1) through the sampler: exactly `new_tokens` each, or of
/// varied lengths with `shape.stop_every`.
#[allow(clippy::too_many_arguments)]
pub fn rollout<B: Backend>(
    config: &Qwen2Config,
    model: &Qwen2<B>,
    prompts: usize,
    n: usize,
    prompt_len: usize,
    new_tokens: usize,
    shape: RolloutShape,
    device: &B::Device,
) -> RolloutBench {
    let ps = random_prompts(prompts, prompt_len, config.vocab_size, 11);
    let stop_token_ids = match shape.stop_every {
        0 => vec![],
        k => (0..config.vocab_size as u32).step_by(k).collect(),
    };
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: new_tokens,
        n,
        seed: 1,
        stop_token_ids,
        compact: !shape.mask,
        max_rows: shape.max_rows,
        share_prefill: !shape.prefill_per_sample,
        ..Default::default()
    };
    let _ = sampler::generate(
        model,
        config,
        &ps[..1],
        &SamplingParams {
            max_new_tokens: 2,
            n: 1,
            ..params.clone()
        },
        &NoDetokenizer,
        device,
    );
    let t0 = Instant::now();
    let (mut generated, mut stats) = (0, sampler::RolloutStats::default());
    let per_call = match (shape.slices, shape.max_rows) {
        (true, m) if m > 0 => m.div_ceil(n.max(1)),
        _ => ps.len().max(1),
    };
    for (k, slice) in ps.chunks(per_call).enumerate() {
        let (samples, s) = sampler::rollout(
            model,
            config,
            slice,
            k * per_call,
            &params,
            &NoDetokenizer,
            device,
        );
        generated += samples.iter().map(|s| s.output_ids.len()).sum::<usize>();
        stats.decode_steps += s.decode_steps;
        stats.prefills += s.prefills;
        stats.prefill_tokens += s.prefill_tokens;
        stats.row_steps += s.row_steps;
        stats.bytes_read += s.bytes_read;
    }
    let seconds = t0.elapsed().as_secs_f64();
    RolloutBench {
        prompts,
        n,
        prompt_len,
        new_tokens,
        stop_every: shape.stop_every,
        finished_rows: if shape.mask { "masked" } else { "compacted" },
        max_rows: shape.max_rows,
        batching: if shape.slices { "slices" } else { "continuous" },
        generated_tokens: generated,
        seconds,
        generated_tok_s: generated as f64 / seconds,
        decode_steps: stats.decode_steps,
        prefills: stats.prefills,
        prefill: if shape.prefill_per_sample {
            "per sample"
        } else {
            "shared"
        },
        prefill_tokens: stats.prefill_tokens,
        prefill_tokens_per_sample: stats.prefill_tokens as f64 / (prompts * n).max(1) as f64,
        bytes_read: stats.bytes_read,
        bytes_per_row_step: stats.bytes_per_row_step(),
    }
}

#[derive(Debug, Serialize)]
pub struct VerifierBench {
    pub replies: usize,
    pub seconds: f64,
    pub replies_per_s: f64,
    /// Count of rewards −1, 0, +1 (anything else would be a bug).
    pub reward_counts: [usize; 3],
    pub other_rewards: usize,
}

/// Scores `count` seeded random replies — tag soup mixed with letters, answer phrases and
/// arbitrary Unicode — and checks every reward is −1, 0 or +1.
pub fn verifier(count: usize, seed: u64) -> VerifierBench {
    use med_rlvr::verifier::{verify, VerifierConfig};
    const PIECES: &[&str] = &[
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "The answer is ",
        "(",
        ")",
        " ",
        "\n",
        "C",
        "b",
        "J",
        "Step 1: ",
        "é",
        "日本",
        "🙂",
        "\u{0}",
        ".",
        ":",
        "option ",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let cfgs = [
        VerifierConfig::default(),
        VerifierConfig {
            strict: true,
            ..Default::default()
        },
    ];
    let mut counts = [0usize; 3];
    let mut other = 0;
    let mut reply = String::new();
    let t0 = Instant::now();
    for i in 0..count {
        reply.clear();
        for _ in 0..rng.random_range(0..24) {
            if rng.random_bool(0.15) {
                reply.push(char::from_u32(rng.random_range(0..0x2FFFF)).unwrap_or('?'));
            } else {
                reply.push_str(PIECES[rng.random_range(0..PIECES.len())]);
            }
        }
        let n = rng.random_range(1..=10);
        let gold = (b'A' + rng.random_range(0..n as u8)) as char;
        let v = verify(
            &reply,
            gold,
            n,
            Some("Cholesterol embolization"),
            &cfgs[i % 2],
        );
        if v.reward == -1.0 {
            counts[0] += 1;
        } else if v.reward == 0.0 {
            counts[1] += 1;
        } else if v.reward == 1.0 {
            counts[2] += 1;
        } else {
            other += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    VerifierBench {
        replies: count,
        seconds,
        replies_per_s: count as f64 / seconds,
        reward_counts: counts,
        other_rewards: other,
    }
}

/// One PPO update of one micro-batch and the resident memory it took, next to the plan.
#[derive(Debug, Serialize)]
pub struct UpdateBench {
    pub micro_batch: usize,
    pub prompt_len: usize,
    pub response_len: usize,
    pub layers: usize,
    pub lora_rank: usize,
    pub logprob_chunk: usize,
    pub recompute: bool,
    pub seconds: f64,
    /// Resident bytes before the update (weights, inputs) and at its peak.
    pub rss_before: u64,
    pub rss_peak: u64,
    /// `rss_peak − rss_before`: what the update's forward and backward held at once.
    pub measured_bytes: u64,
    /// The plan's update phase (`med-rlvr plan`) for the same geometry and batch.
    pub planned_bytes: u64,
    /// `planned / measured`.
    pub plan_over_measured: f64,
}

/// The micro-batch of an update bench and how it is differentiated.
#[derive(Debug, Clone, Copy)]
pub struct UpdateShape {
    pub batch: usize,
    pub prompt_len: usize,
    pub response_len: usize,
    /// `model.logprob_chunk`.
    pub chunk: usize,
    /// `model.recompute`.
    pub recompute: bool,
}

/// Resident and peak resident bytes of this process (`VmRSS`, `VmHWM` of /proc/self/status).
fn resident() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| {
        anyhow::anyhow!("/proc/self/status: {e} (bench --update measures memory on Linux only)")
    })?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("/proc/self/status: no {name} line"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("/proc/self/status: {name} {e}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A training forward and backward of the actor's PPO loss on `batch` random sequences of
/// `prompt_len + response_len` tokens (LoRA adapters on a frozen f32 base, so the gradients are
/// small and the memory measured is the activations'), in a fresh process: the peak resident
/// memory is reset (`/proc/self/clear_refs`) after the weights and inputs exist.
pub fn update<B: AutodiffBackend>(
    config: &Qwen2Config,
    model: &Qwen2<B>,
    lora: &qwen2_burn::LoraSpec,
    shape: UpdateShape,
    device: &B::Device,
) -> anyhow::Result<UpdateBench> {
    let UpdateShape {
        batch,
        prompt_len,
        response_len,
        chunk,
        recompute,
    } = shape;
    use med_rlvr::experience::Batch;
    use med_rlvr::loss::{policy_loss, Aggregation, Surrogate};
    let prompts = random_prompts(batch, prompt_len, config.vocab_size, 7);
    let responses = random_prompts(batch, response_len, config.vocab_size, 8);
    let rows: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .zip(&responses)
        .map(|(p, r)| (p.as_slice(), r.as_slice()))
        .collect();
    let b = Batch::new(&rows);
    let mask = b.mask_tensor::<B>(device);
    let advantages = Tensor::<B, 2>::from_data(
        TensorData::new(
            (0..batch * response_len)
                .map(|i| ((i as f32) * 0.37).sin())
                .collect::<Vec<f32>>(),
            [batch, response_len],
        ),
        device,
    );
    // Freed memory the allocator kept (`allocator::keep_freed_memory`) would be reused without
    // raising the resident size: give it back first, so the peak counts every page touched.
    crate::app::allocator::release_kept_memory();
    std::fs::write("/proc/self/clear_refs", "5")
        .map_err(|e| anyhow::anyhow!("/proc/self/clear_refs: {e} (cannot reset the peak)"))?;
    let (before, _) = resident()?;
    let t0 = Instant::now();
    let trainable = b.train_logprobs(model, chunk, recompute, device);
    let logp = trainable.output.clone();
    let (loss, _) = policy_loss(
        logp.clone(),
        logp.detach(),
        advantages,
        mask,
        &Surrogate::token(0.2, 0.2, Aggregation::TokenMean),
        None,
    );
    let grads = trainable.param_grads(loss.backward());
    drop(grads);
    let seconds = t0.elapsed().as_secs_f64();
    let (_, peak) = resident()?;
    let plan = med_rlvr::memory::MemoryPlan::new(&med_rlvr::memory::PlanInputs {
        model: config.clone(),
        lora: Some(lora.clone()),
        critic: false,
        rollout_rows: 1,
        refills: false,
        forward_tokens: batch * (prompt_len + response_len),
        prompt_len,
        max_new_tokens: response_len,
        micro_batch: batch,
        micro_batch_tokens: 0,
        logprob_chunk: chunk,
        recompute,
        base_bytes: 4,
        f32_logits_over_bf16: false,
    });
    let measured = peak.saturating_sub(before);
    Ok(UpdateBench {
        micro_batch: batch,
        prompt_len,
        response_len,
        layers: config.num_hidden_layers,
        lora_rank: lora.rank,
        logprob_chunk: chunk,
        recompute,
        seconds,
        rss_before: before,
        rss_peak: peak,
        measured_bytes: measured,
        planned_bytes: plan.update,
        plan_over_measured: plan.update as f64 / measured.max(1) as f64,
    })
}

/// A mini-batch of a micro-batch bench: `batch` sequences of `prompt_len` prompt tokens and
/// responses of uniformly drawn lengths in `min_response..=max_response`.
#[derive(Debug, Clone, Copy)]
pub struct MixShape {
    pub batch: usize,
    pub prompt_len: usize,
    pub min_response: usize,
    pub max_response: usize,
    /// `ppo.micro_batch` of the count split.
    pub micro_batch: usize,
    /// `ppo.micro_batch_tokens` of the budget split.
    pub budget: usize,
    pub chunk: usize,
    pub recompute: bool,
}

/// One way of cutting the mini-batch and what training it cost.
#[derive(Debug, Serialize)]
pub struct SplitBench {
    pub split: String,
    pub micro_batches: usize,
    /// `Σ rows × (max prompt + max response)` over the micro-batches.
    pub padded_tokens: usize,
    /// `Σ prompt + response` over the sequences.
    pub real_tokens: usize,
    pub seconds: f64,
    /// `real_tokens / seconds`.
    pub tokens_per_s: f64,
}

/// The two splits of one mini-batch side by side.
#[derive(Debug, Serialize)]
pub struct MicroBatchBench {
    pub sequences: usize,
    pub prompt_len: usize,
    pub min_response: usize,
    pub max_response: usize,
    pub splits: Vec<SplitBench>,
    /// The largest `|g_count − g_budget|` over every parameter's gradient, and the largest
    /// `|g_count|`: the split changes the order of the sums only.
    pub grad_max_abs_diff: f64,
    pub grad_max_abs: f64,
}

/// Every parameter gradient of `model` in `grads`, flattened, in visiting order.
fn flat_grads<B: AutodiffBackend>(
    model: &Qwen2<B>,
    grads: &burn::optim::GradientsParams,
) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Collect<'a>(&'a burn::optim::GradientsParams, Vec<f32>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.get::<B::InnerBackend, D>(param.id) {
                self.1.extend(g.into_data().convert::<f32>().iter::<f32>());
            }
        }
    }
    let mut c = Collect(grads, Vec::new());
    model.visit(&mut c);
    c.1
}

/// One mini-batch of the PPO policy loss (token-mean, as `ppo.loss_agg = "token-mean"`) trained
/// two ways with the trainer's rule ([`micro_batch_groups`](med_rlvr::experience::micro_batch_groups)
/// on the shuffled mini-batch): `micro_batch` sequences at a time, and groups under `budget`
/// padded tokens; each micro-batch's loss weighted by its share of the mini-batch's tokens and the
/// gradients accumulated. Runs the splits count, budget, count, budget and reports the second
/// round's times (the first warms the allocator and the caches).
pub fn micro_batches<B: AutodiffBackend>(
    model: &Qwen2<B>,
    vocab: usize,
    shape: MixShape,
    device: &B::Device,
) -> anyhow::Result<MicroBatchBench> {
    use burn::optim::GradientsAccumulator;
    use med_rlvr::experience::{grid_tensor, micro_batch_groups, pad_rows, Batch};
    use med_rlvr::loss::{policy_loss, Aggregation, Surrogate};
    use rand::seq::SliceRandom;
    let MixShape {
        batch,
        prompt_len,
        min_response,
        max_response,
        micro_batch,
        budget,
        chunk,
        recompute,
    } = shape;
    let mut rng = StdRng::seed_from_u64(9);
    let prompts = random_prompts(batch, prompt_len, vocab, 7);
    let responses: Vec<Vec<u32>> = random_prompts(batch, max_response, vocab, 8)
        .into_iter()
        .map(|mut r| {
            r.truncate(rng.random_range(min_response..=max_response));
            r
        })
        .collect();
    let advantages: Vec<Vec<f64>> = responses
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (0..r.len())
                .map(|j| ((i * 31 + j) as f64 * 0.37).sin())
                .collect()
        })
        .collect();
    let total: usize = responses.iter().map(Vec::len).sum();
    // The mini-batch in shuffled order, as the trainer holds it, cut by the trainer's rule.
    let mut order: Vec<usize> = (0..batch).collect();
    order.shuffle(&mut rng);
    let lens: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| (prompt_len, responses[i].len()))
        .collect();
    let split = |budget| -> Vec<Vec<usize>> {
        micro_batch_groups(&lens, micro_batch, budget)
            .into_iter()
            .map(|g| g.into_iter().map(|k| order[k]).collect())
            .collect()
    };
    let (by_count, by_budget) = (split(0), split(budget));
    let train = |groups: &[Vec<usize>]| -> (SplitBench, Vec<f32>) {
        let t0 = Instant::now();
        let mut acc = GradientsAccumulator::<Qwen2<B>>::new();
        let (mut padded, mut real) = (0, 0);
        for rows in groups {
            let seqs: Vec<(&[u32], &[u32])> = rows
                .iter()
                .map(|&i| (prompts[i].as_slice(), responses[i].as_slice()))
                .collect();
            let b = Batch::new(&seqs);
            let (r, p) = b.token_counts();
            real += r;
            padded += p;
            let adv: Vec<&[f64]> = rows.iter().map(|&i| advantages[i].as_slice()).collect();
            let adv = grid_tensor::<B>(&pad_rows(&adv, b.r), device);
            let trainable = b.train_logprobs(model, chunk, recompute, device);
            let logp = trainable.output.clone();
            let (loss, _) = policy_loss(
                logp.clone(),
                logp.detach(),
                adv,
                b.mask_tensor::<B>(device),
                &Surrogate::token(0.2, 0.2, Aggregation::TokenMean),
                None,
            );
            let tokens: usize = rows.iter().map(|&i| responses[i].len()).sum();
            let loss = loss.mul_scalar(tokens as f64 / total as f64);
            acc.accumulate(model, trainable.param_grads(loss.backward()));
        }
        let grads = flat_grads(model, &acc.grads());
        let seconds = t0.elapsed().as_secs_f64();
        let bench = SplitBench {
            split: String::new(),
            micro_batches: groups.len(),
            padded_tokens: padded,
            real_tokens: real,
            seconds,
            tokens_per_s: real as f64 / seconds,
        };
        (bench, grads)
    };
    let _ = train(&by_count);
    let _ = train(&by_budget);
    let (mut count, g_count) = train(&by_count);
    let (mut tokens, g_budget) = train(&by_budget);
    count.split = format!("micro_batch {micro_batch}");
    tokens.split = format!("micro_batch_tokens {budget}");
    let diff = med_rlvr::compare::check_close(
        "gradients, count split vs token budget",
        &g_budget,
        &g_count,
        med_rlvr::compare::Tolerance::abs(f64::INFINITY),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(MicroBatchBench {
        sequences: batch,
        prompt_len,
        min_response,
        max_response,
        splits: vec![count, tokens],
        grad_max_abs_diff: diff.max_abs,
        // Finite: the comparison above fails on NaN/Inf.
        grad_max_abs: g_count.iter().map(|&x| x.abs() as f64).fold(0.0, f64::max),
    })
}
