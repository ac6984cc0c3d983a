//! Layer-by-layer recomputation (`hidden_checkpointed` → `token_logprobs_backward` →
//! `backward_checkpointed`) gives the kept graph's gradients for every fixture of both families:
//! full fine-tuning (every tensor, Qwen3's q_norm / k_norm and attention biases included) and
//! LoRA. (The application's `tests/recompute.rs` checks the PPO losses on top, on every backend.)

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use qwen2_burn::{load_qwen2, LoraSpec, Qwen2};

mod common;

type I = NdArray<f32>;
type B = Autodiff<I>;

const MODELS: [&str; 4] = [
    "qwen2/tied-f16-gqa",
    "qwen3/tied-bf16-gqa-hd16",
    "qwen3/untied-f32-mha",
    "qwen3/bias-f32-gqa-hd24",
];

/// Two left-padded rows: tokens, positions, validity, targets and a per-token loss weight.
#[allow(clippy::type_complexity)]
fn inputs() -> (
    Tensor<B, 2, Int>,
    Tensor<B, 2, Int>,
    Tensor<B, 2, Bool>,
    Tensor<B, 2, Int>,
    Tensor<B, 2>,
) {
    let dev = Default::default();
    let (b, t, pad) = (2usize, 9usize, 3usize);
    let toks: Vec<i64> = (0..b * t).map(|i| (i * 37 % 290) as i64).collect();
    let valid: Vec<bool> = (0..b * t).map(|i| i / t == 0 || i % t >= pad).collect();
    let pos: Vec<i64> = (0..b * t)
        .map(|i| match i / t {
            0 => (i % t) as i64,
            _ => (i % t).saturating_sub(pad) as i64,
        })
        .collect();
    let targets: Vec<i64> = (0..b * t).map(|i| (i * 53 % 300) as i64).collect();
    let w: Vec<f32> = (0..b * t)
        .map(|i| {
            if valid[i] {
                (i as f32 * 0.7).sin()
            } else {
                0.0
            }
        })
        .collect();
    let int = |v: Vec<i64>| Tensor::from_data(TensorData::new(v, [b, t]), &dev);
    (
        int(toks),
        int(pos),
        Tensor::from_data(TensorData::new(valid, [b, t]), &dev),
        int(targets),
        Tensor::from_data(TensorData::new(w, [b, t]), &dev),
    )
}

/// Gradients of `Σ w ⊙ log p(targets)` with the whole graph kept (`false`) or recomputed (`true`).
fn grads(model: &Qwen2<B>, recompute: bool) -> GradientsParams {
    let (tokens, pos, valid, targets, w) = inputs();
    let chunk = 4;
    if !recompute {
        let h = model.hidden(tokens, pos, valid, None);
        let loss = (model.token_logprobs(h, targets, chunk) * w).sum();
        return GradientsParams::from_grads(loss.backward(), model);
    }
    let (h, ckpt) = model.hidden_checkpointed(tokens, pos, valid);
    let (g_head, dh) = model.token_logprobs_backward(h, targets, w.inner(), chunk);
    let g_stack = model.backward_checkpointed(ckpt, dh);
    let mut acc = GradientsAccumulator::<Qwen2<B>>::new();
    acc.accumulate(model, g_head);
    acc.accumulate(model, g_stack);
    acc.grads()
}

/// Every float parameter: `(has a gradient in a, in b, max |a − b|, max |a|)`.
fn compare(
    model: &Qwen2<B>,
    a: &GradientsParams,
    b: &GradientsParams,
) -> Vec<(bool, bool, f32, f32)> {
    struct Cmp<'a>(
        &'a GradientsParams,
        &'a GradientsParams,
        Vec<(bool, bool, f32, f32)>,
    );
    impl ModuleVisitor<B> for Cmp<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let values = |t: Tensor<I, D>| t.into_data().iter::<f32>().collect::<Vec<_>>();
            let (ga, gb) = (self.0.get::<I, D>(p.id), self.1.get::<I, D>(p.id));
            let row = match (ga, gb) {
                (Some(x), Some(y)) => {
                    let (x, y) = (values(x), values(y));
                    let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    (true, true, common::max_diff(&x, &y), scale)
                }
                (x, y) => (x.is_some(), y.is_some(), 0.0, 0.0),
            };
            self.2.push(row);
        }
    }
    let mut c = Cmp(a, b, vec![]);
    model.visit(&mut c);
    c.2
}

#[test]
fn recomputed_gradients_equal_the_kept_graph() {
    let dev = Default::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for name in MODELS {
        let (_, full) = load_qwen2::<B>(&dir.join(name), &dev).unwrap();
        let spec = LoraSpec {
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into(), "k_proj".into(), "o_proj".into()],
        };
        // B ≠ 0, so the A matrices get a gradient too.
        let mut lora = full.clone().with_lora(&spec, 5, &dev);
        for (k, (_, lin)) in lora.projections_mut(&spec.targets).into_iter().enumerate() {
            let l = lin.lora.as_mut().unwrap();
            let [r, out] = l.b.dims();
            let v: Vec<f32> = (0..r * out)
                .map(|i| 0.1 * ((i + 7 * k) as f32).sin())
                .collect();
            let t = Tensor::from_data(TensorData::new(v, [r, out]), &dev).require_grad();
            l.b = Param::initialized(l.b.id, t);
        }
        for (kind, model) in [("full", full), ("lora", lora)] {
            let rows = compare(&model, &grads(&model, false), &grads(&model, true));
            let trainable = rows.iter().filter(|r| r.0).count();
            assert!(
                rows.iter().all(|r| r.0 == r.1),
                "{name} {kind}: the same parameters get gradients"
            );
            let scale = rows.iter().fold(0.0f32, |m, r| m.max(r.3));
            let err = rows.iter().fold(0.0f32, |m, r| m.max(r.2)) / scale;
            eprintln!("{name} {kind}: {trainable} gradients, max relative difference {err:.2e}");
            assert!(scale > 0.0 && err < 1e-4, "{name} {kind}: {err:e}");
            let want = match kind {
                // Every tensor of the model (with Qwen3's q_norm / k_norm).
                "full" => rows.len(),
                // A and B of each target in each layer.
                _ => 2 * spec.targets.len() * model.num_layers(),
            };
            assert_eq!(
                trainable, want,
                "{name} {kind}: gradients of every trainable tensor"
            );
        }
        // The Qwen3 q_norm weights are trained in full fine-tuning.
        if name.starts_with("qwen3") {
            let (_, m) = load_qwen2::<B>(&dir.join(name), &dev).unwrap();
            let g = grads(&m, true);
            let qn = m.layers[0].self_attn.q_norm.as_ref().unwrap();
            assert!(
                g.get::<I, 1>(qn.gamma.id).is_some(),
                "{name}: q_norm gradient"
            );
        }
    }
}
