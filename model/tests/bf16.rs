//! A bf16 frozen base (`Qwen2::with_base_dtype`), on the `flex` CPU backend (ndarray has no bf16):
//! half the bytes, activations still f32, logits and adapter gradients close to the f32 base's,
//! merging returns to f32.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};
use qwen2_burn::PROJECTIONS;
use qwen2_burn::{load_qwen2, LoraSpec, Qwen2};

mod common;

type I = Flex;
type B = Autodiff<I>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn inputs<Bk: Backend>() -> (Tensor<Bk, 2, Int>, Tensor<Bk, 2, Int>, Tensor<Bk, 2, Bool>) {
    let dev = Default::default();
    let (b, t) = (2, 7);
    let toks: Vec<i64> = (0..b * t).map(|i| (i * 37 % 90) as i64).collect();
    let pos: Vec<i64> = (0..b * t).map(|i| (i % t) as i64).collect();
    (
        Tensor::from_data(TensorData::new(toks, [b, t]), &dev),
        Tensor::from_data(TensorData::new(pos, [b, t]), &dev),
        Tensor::from_data(TensorData::new(vec![true; b * t], [b, t]), &dev),
    )
}

fn logits<Bk: Backend>(m: &Qwen2<Bk>) -> Tensor<Bk, 3> {
    let (tokens, pos, valid) = inputs::<Bk>();
    m.logits(m.hidden(tokens, pos, valid, None))
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Bytes held by the module's float parameters.
fn param_bytes<Bk: Backend, M: Module<Bk>>(m: &M) -> usize {
    struct Sum(usize);
    impl<Bk: Backend> burn::module::ModuleVisitor<Bk> for Sum {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0 += p.val().into_data().bytes.len();
        }
    }
    let mut s = Sum(0);
    m.visit(&mut s);
    s.0
}

#[test]
fn a_bf16_base_halves_the_weights_and_tracks_the_f32_logits() {
    for name in [
        "qwen2/tied-f16-gqa",
        "qwen2/untied-f32-mha",
        "qwen3/bias-f32-gqa-hd24",
    ] {
        let (_, m32) = load_qwen2::<I>(&fixture(name), &Default::default()).unwrap();
        let m16 = m32.clone().with_base_dtype(FloatDType::BF16);
        assert_eq!(m16.embed_tokens.val().dtype(), DType::BF16);
        let l0 = &m16.layers[0];
        assert_eq!(l0.self_attn.q_proj.weight.val().dtype(), DType::BF16);
        assert_eq!(
            l0.self_attn.q_proj.bias.as_ref().unwrap().val().dtype(),
            DType::BF16
        );
        if let Some(b) = &l0.self_attn.o_proj.bias {
            assert_eq!(b.val().dtype(), DType::BF16);
        }
        if let Some(n) = &l0.self_attn.q_norm {
            assert_eq!(n.gamma.val().dtype(), DType::F32, "q_norm stays f32");
        }
        assert_eq!(l0.mlp.down_proj.weight.val().dtype(), DType::BF16);
        assert_eq!(l0.input_layernorm.gamma.val().dtype(), DType::F32);
        if let Some(h) = &m16.lm_head {
            assert_eq!(h.weight.val().dtype(), DType::BF16);
        }
        // Everything but the norms (a few thousand floats) is stored in half the bytes.
        let (b32, b16) = (param_bytes(&m32), param_bytes(&m16));
        assert!(
            (b16 as f64) < 0.51 * b32 as f64,
            "{name}: {b16} vs {b32} bytes"
        );

        let (z32, z16) = (logits(&m32), logits(&m16));
        assert_eq!(z16.dtype(), DType::F32, "activations and logits stay f32");
        let (z32, z16) = (values(z32), values(z16));
        // The same model with an f16 base (10 mantissa bits instead of 7): if the mixed-precision
        // path is right, its error shrinks with the format's precision (≈ 8×); a wrong cast,
        // layout or bias would not.
        let zh = values(logits(&m32.clone().with_base_dtype(FloatDType::F16)));
        let (d, dh, scale) = (
            common::max_diff(&z32, &z16),
            common::max_diff(&z32, &zh),
            max_abs(&z32),
        );
        eprintln!("{name}: max |Δ logit| bf16 {d:.4}, f16 {dh:.4}, max |logit| {scale:.3}");
        assert!(d > 0.0, "{name}: the bf16 path was not taken");
        // This random 3-layer model is sensitive: rounding only its weights to bf16 already
        // moves the logits by ~1.4 % of their range; bf16 GEMM inputs add as much again.
        assert!(d <= 0.04 * scale, "{name}: {d} vs scale {scale}");
        assert!(
            dh * 4.0 <= d,
            "{name}: f16 error {dh} not well below bf16 error {d}"
        );
    }
}

/// Seeded non-zero `B` matrices, so the adapters change the function.
fn perturb(mut m: Qwen2<B>) -> Qwen2<B> {
    let mut k = 7u32;
    for l in m.layers.iter_mut() {
        for lin in [
            &mut l.self_attn.q_proj,
            &mut l.self_attn.v_proj,
            &mut l.mlp.down_proj,
        ] {
            if let Some(lora) = lin.lora.as_mut() {
                let [r, out] = lora.b.dims();
                let v: Vec<f32> = (0..r * out)
                    .map(|_| {
                        k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        ((k >> 16) as f32 / 65_536.0 - 0.5) * 0.2
                    })
                    .collect();
                let t = Tensor::from_data(TensorData::new(v, [r, out]), &Default::default());
                lora.b = Param::initialized(lora.b.id, t.require_grad());
            }
        }
    }
    m
}

#[test]
fn adapters_on_a_bf16_base_get_close_gradients_and_merge_to_f32() {
    let dev = Default::default();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
    };
    let (_, base) = load_qwen2::<B>(&fixture("qwen2/tied-f16-gqa"), &dev).unwrap();
    let run = |m: &Qwen2<B>| {
        let loss = logits(m).powf_scalar(2.0).mean();
        let g = loss.backward();
        let l0 = &m.layers[0];
        let a = l0
            .self_attn
            .q_proj
            .lora
            .as_ref()
            .unwrap()
            .a
            .grad(&g)
            .unwrap();
        let b = l0.mlp.down_proj.lora.as_ref().unwrap().b.grad(&g).unwrap();
        assert!(
            l0.self_attn.q_proj.weight.grad(&g).is_none(),
            "base is frozen"
        );
        assert!(m.embed_tokens.grad(&g).is_none(), "base is frozen");
        (values(a), values(b))
    };
    let m32 = perturb(base.clone().with_lora(&spec, 3, &dev));
    let m16 = perturb(
        base.with_base_dtype(FloatDType::BF16)
            .with_lora(&spec, 3, &dev),
    );
    assert_eq!(
        m16.layers[0]
            .self_attn
            .q_proj
            .lora
            .as_ref()
            .unwrap()
            .a
            .val()
            .dtype(),
        DType::F32,
        "adapters are f32"
    );
    let ((a32, b32), (a16, b16)) = (run(&m32), run(&m16));
    for (what, x, y) in [("q_proj A", &a32, &a16), ("down_proj B", &b32, &b16)] {
        assert_eq!(x.len(), y.len(), "{what}: gradient lengths");
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        let diff = x
            .iter()
            .zip(y.iter())
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f32>()
            .sqrt();
        eprintln!("{what}: relative gradient difference {:.4}", diff / norm);
        assert!(y.iter().all(|v| v.is_finite()) && norm > 0.0);
        assert!(diff <= 0.06 * norm, "{what}: {diff} vs norm {norm}");
    }
    // Merging folds the adapters into f32 weights, equal to the adapted bf16 model's function
    // up to bf16 rounding of the GEMM inputs.
    let merged = m16.clone().merge_lora();
    assert_eq!(
        merged.layers[0].self_attn.q_proj.weight.val().dtype(),
        DType::F32
    );
    let (zm, za) = (values(logits(&merged)), values(logits(&m16)));
    assert!(common::max_diff(&zm, &za) <= 0.02 * max_abs(&za));
}
