//! Supervised fine-tuning: minimise `−mean log π(target tokens | prompt)` over the target tokens
//! only (token mean over each batch), AdamW + global-norm clipping + cosine schedule. Used for the
//! paper's SFT baseline (direct template, target ` X<|endoftext|>`) and the demo model's warm start.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use qwen2_burn::Qwen2;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;

use crate::config::OptimConfig;
use crate::experience::Batch;
use crate::loss::{aggregate, Aggregation};
use crate::optimizer::{adamw, clip_global_norm, cosine_lr};
use crate::tokenizer::Tokenizer;

/// SFT settings.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub optim: OptimConfig,
    pub seed: u64,
    pub logprob_chunk: usize,
    /// Batch rows of similar length together ([`epoch_batches`]); less padding on mixed lengths.
    pub group_by_length: bool,
}

/// One optimizer step's record.
#[derive(Debug, Clone, Serialize)]
pub struct SftStep {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Trains `model` on `(prompt, target)` token pairs; returns the trained model and the loss curve.
/// `on_step` sees every step (for metrics files and progress).
pub fn train<B: AutodiffBackend>(
    mut model: Qwen2<B>,
    pairs: &[(Vec<u32>, Vec<u32>)],
    cfg: &SftConfig,
    device: &B::Device,
    mut on_step: impl FnMut(&SftStep),
) -> Result<(Qwen2<B>, Vec<SftStep>)> {
    let mut optim = adamw(&cfg.optim).init::<B, Qwen2<B>>();
    let steps_per_epoch = pairs.len().div_ceil(cfg.batch.max(1));
    let total = steps_per_epoch * cfg.epochs;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut history = Vec::with_capacity(total);
    let mut step = 0;
    let lens: Vec<usize> = pairs.iter().map(|(p, t)| p.len() + t.len()).collect();
    for epoch in 0..cfg.epochs {
        for idx in epoch_batches(&lens, cfg.batch, cfg.group_by_length, &mut rng) {
            let rows: Vec<(&[u32], &[u32])> = idx
                .iter()
                .map(|&i| (pairs[i].0.as_slice(), pairs[i].1.as_slice()))
                .collect();
            let batch = Batch::new(&rows);
            let logp = batch.logprobs(&model, cfg.logprob_chunk, device);
            let loss = aggregate(
                logp.neg(),
                batch.mask_tensor(device),
                Aggregation::TokenMean,
            );
            let value = loss
                .clone()
                .into_data()
                .iter::<f64>()
                .next()
                .unwrap_or(f64::NAN);
            if !value.is_finite() {
                anyhow::bail!(
                    "SFT step {step} (epoch {}): the loss is {value}; nothing was saved (NaN/Inf \
                     weights in the model, or a learning rate that diverged)",
                    epoch + 1
                );
            }
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            let grad_norm = clip_global_norm(&model, &mut grads, cfg.optim.grad_clip);
            if !grad_norm.is_finite() {
                anyhow::bail!(
                    "SFT step {step} (epoch {}): the gradient norm is {grad_norm}; nothing was \
                     saved (lower --lr)",
                    epoch + 1
                );
            }
            let lr = cosine_lr(
                cfg.lr,
                step,
                total,
                cfg.optim.warmup_ratio,
                cfg.optim.min_lr_ratio,
            );
            model = optim.step(lr, model, grads);
            let rec = SftStep {
                step,
                epoch,
                loss: value,
                grad_norm,
                lr,
            };
            on_step(&rec);
            history.push(rec);
            step += 1;
        }
    }
    Ok((model, history))
}

/// Batches per window that [`epoch_batches`] sorts by length.
const LENGTH_WINDOW_BATCHES: usize = 16;

/// One epoch's batches of row indices: a shuffle cut into batches of `batch`. `lens` are the rows'
/// token counts (prompt + target). With `by_length` (as Hugging Face's `group_by_length`), each
/// window of [`LENGTH_WINDOW_BATCHES`] batches of the shuffle is sorted by row length before it is
/// cut, and the batches are shuffled again, so a batch pads to a length near its rows' own while
/// the order stays random.
pub fn epoch_batches(
    lens: &[usize],
    batch: usize,
    by_length: bool,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.shuffle(rng);
    if !by_length {
        return order.chunks(batch).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch * LENGTH_WINDOW_BATCHES)
        .flat_map(|window| {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
            w.chunks(batch).map(<[usize]>::to_vec).collect::<Vec<_>>()
        })
        .collect();
    batches.shuffle(rng);
    batches
}

/// Mean target-token negative log-likelihood of `pairs` (no gradients).
pub fn eval_loss<B: AutodiffBackend>(
    model: &Qwen2<B>,
    pairs: &[(Vec<u32>, Vec<u32>)],
    chunk: usize,
    device: &B::Device,
) -> f64 {
    let inner = model.valid();
    let (mut sum, mut n) = (0.0, 0.0);
    for group in pairs.chunks(16) {
        let rows: Vec<(&[u32], &[u32])> = group
            .iter()
            .map(|p| (p.0.as_slice(), p.1.as_slice()))
            .collect();
        let batch = Batch::new(&rows);
        let logp = batch.logprobs(&inner, chunk, device);
        let tokens: f64 = batch.mask.iter().flatten().sum();
        let l = aggregate(
            logp.neg(),
            batch.mask_tensor(device),
            Aggregation::TokenMean,
        );
        sum += l.into_data().iter::<f64>().next().unwrap_or(f64::NAN) * tokens;
        n += tokens;
    }
    sum / n.max(1.0)
}

/// `(direct prompt, " X<|endoftext|>")` token pairs for SFT.
pub fn pairs(
    items: &[crate::task::McqaItem],
    tok: &Tokenizer,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    use crate::prompt::{self, PromptStyle};
    let eos = tok.eos_id()?;
    items
        .iter()
        .map(|it| {
            let mut target = tok.encode(&prompt::direct_target(it))?;
            target.push(eos);
            Ok((
                tok.encode(&prompt::render(it, PromptStyle::Direct))?,
                target,
            ))
        })
        .collect()
}
