//! Optimiser pieces: AdamW with PyTorch-style settings, global-norm gradient clipping (Burn's own
//! `GradientClippingConfig::Norm` clips each parameter separately), and the cosine schedule.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::config::OptimConfig;

/// AdamW with betas, eps and weight decay from the config (PyTorch semantics: decoupled decay,
/// bias-corrected moments, `eps` added to `√v̂`). No per-parameter clipping: see [`clip_global_norm`].
pub fn adamw(c: &OptimConfig) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(c.beta1 as f32)
        .with_beta_2(c.beta2 as f32)
        .with_epsilon(c.eps as f32)
        .with_weight_decay(c.weight_decay as f32)
}

/// Learning rate at optimizer step `step` of `total`: linear warm-up over `⌈warmup_ratio·total⌉`
/// steps, then cosine decay from `peak` to `min_lr_ratio·peak`:
/// `lr = floor + (peak − floor)·½(1 + cos(π·progress))`.
pub fn cosine_lr(
    peak: f64,
    step: usize,
    total: usize,
    warmup_ratio: f64,
    min_lr_ratio: f64,
) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as usize;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let floor = min_lr_ratio * peak;
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

struct ParamIds(Vec<(ParamId, usize)>);

impl<B: AutodiffBackend> ModuleVisitor<B> for ParamIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push((param.id, D));
    }
}

fn grad_sq<B: AutodiffBackend, const D: usize>(grads: &GradientsParams, id: ParamId) -> f64 {
    grads
        .get::<B::InnerBackend, D>(id)
        .map(|g| {
            g.powi_scalar(2)
                .sum()
                .into_data()
                .iter::<f64>()
                .next()
                .unwrap_or(0.0)
        })
        .unwrap_or(0.0)
}

fn scale<B: AutodiffBackend, const D: usize>(grads: &mut GradientsParams, id: ParamId, s: f64) {
    if let Some(g) = grads.remove::<B::InnerBackend, D>(id) {
        grads.register::<B::InnerBackend, D>(id, g.mul_scalar(s));
    }
}

/// Global L2 norm of all gradients of `module`'s parameters, `‖g‖ = √Σ‖g_p‖²`; when it exceeds
/// `max_norm > 0`, every gradient is multiplied by `max_norm / (‖g‖ + 1e-6)` (PyTorch's
/// `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut ids = ParamIds(Vec::new());
    module.visit(&mut ids);
    let mut sq = 0.0;
    for &(id, d) in &ids.0 {
        sq += match d {
            1 => grad_sq::<B, 1>(grads, id),
            2 => grad_sq::<B, 2>(grads, id),
            3 => grad_sq::<B, 3>(grads, id),
            _ => grad_sq::<B, 4>(grads, id),
        };
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for &(id, d) in &ids.0 {
            match d {
                1 => scale::<B, 1>(grads, id, s),
                2 => scale::<B, 2>(grads, id, s),
                3 => scale::<B, 3>(grads, id, s),
                _ => scale::<B, 4>(grads, id, s),
            }
        }
    }
    norm
}
