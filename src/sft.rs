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

/// SFT settings.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub optim: OptimConfig,
    pub seed: u64,
    pub logprob_chunk: usize,
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
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.shuffle(&mut rng);
        for idx in order.chunks(cfg.batch.max(1)) {
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
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            let grad_norm = clip_global_norm(&model, &mut grads, cfg.optim.grad_clip);
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
