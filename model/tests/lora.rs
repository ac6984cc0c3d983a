//! LoRA: starts equal to the base, only the adapters get gradients, merging changes nothing,
//! the PEFT-layout files round-trip exactly, bad adapter files are named. On a Qwen2 and a Qwen3
//! fixture (the latter with head_dim != hidden / heads, so q_proj and o_proj are not square).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use qwen2_burn::PROJECTIONS;
use qwen2_burn::{load_lora, load_qwen2, save_lora, LoraSpec, ModelError, Qwen2};

mod common;

type I = NdArray<f32>;
type B = Autodiff<I>;

const FIXTURES: [&str; 2] = ["qwen2/tied-f16-gqa", "qwen3/tied-bf16-gqa-hd16"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn spec(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: targets.iter().map(|s| s.to_string()).collect(),
    }
}

fn logits<Bk: Backend>(m: &Qwen2<Bk>) -> Vec<f32> {
    let dev = Default::default();
    let (b, t) = (2, 7);
    let toks: Vec<i64> = (0..b * t).map(|i| (i * 37 % 90) as i64).collect();
    let tokens = Tensor::<Bk, 2, Int>::from_data(TensorData::new(toks, [b, t]), &dev);
    let pos = Tensor::<Bk, 2, Int>::from_data(
        TensorData::new(
            (0..b * t).map(|i| (i % t) as i64).collect::<Vec<_>>(),
            [b, t],
        ),
        &dev,
    );
    let valid = Tensor::<Bk, 2, Bool>::from_data(TensorData::new(vec![true; b * t], [b, t]), &dev);
    let h = m.hidden(tokens, pos, valid, None);
    m.logits(h).into_data().convert::<f32>().to_vec().unwrap()
}

/// Sets every adapter's `B` to seeded non-zero values so the adapters change the function.
fn perturb(m: Qwen2<B>) -> Qwen2<B> {
    let mut m = m;
    let mut k = 0u32;
    for l in m.layers.iter_mut() {
        for lin in [
            &mut l.self_attn.q_proj,
            &mut l.self_attn.k_proj,
            &mut l.self_attn.v_proj,
            &mut l.self_attn.o_proj,
            &mut l.mlp.gate_proj,
            &mut l.mlp.up_proj,
            &mut l.mlp.down_proj,
        ] {
            if let Some(lora) = lin.lora.as_mut() {
                let [r, out] = lora.b.dims();
                let v: Vec<f32> = (0..r * out)
                    .map(|i| {
                        k = k
                            .wrapping_mul(1_103_515_245)
                            .wrapping_add(12_345 + i as u32);
                        ((k >> 16) as f32 / 65_536.0 - 0.5) * 0.2
                    })
                    .collect();
                lora.b = Param::initialized(
                    lora.b.id,
                    Tensor::from_data(TensorData::new(v, [r, out]), &Default::default())
                        .require_grad(),
                );
            }
        }
    }
    m
}

#[test]
fn starts_as_the_base_and_merges_exactly() {
    for name in FIXTURES {
        starts_as_the_base_and_merges_exactly_on(name);
    }
}

fn starts_as_the_base_and_merges_exactly_on(name: &str) {
    let dev = Default::default();
    let (_, base) = load_qwen2::<B>(&fixture(name), &dev).unwrap();
    let base_logits = logits(&base);
    let adapted = base.clone().with_lora(&spec(&PROJECTIONS), 1, &dev);
    assert!(adapted.has_lora() && !base.has_lora());
    assert_eq!(
        logits(&adapted),
        base_logits,
        "B = 0 must leave the function unchanged"
    );
    let adapted = perturb(adapted);
    let with = logits(&adapted);
    assert!(
        common::max_diff(&with, &base_logits) > 1e-3,
        "adapters had no effect"
    );
    let merged = logits(&adapted.clone().merge_lora());
    assert!(
        common::max_diff(&with, &merged) < 1e-4,
        "merge differs by {}",
        common::max_diff(&with, &merged)
    );
    // Adapters off is the base again.
    assert_eq!(logits(&adapted.without_lora()), base_logits);
}

#[test]
fn only_adapters_get_gradients() {
    for name in FIXTURES {
        only_adapters_get_gradients_on(name);
    }
}

fn only_adapters_get_gradients_on(name: &str) {
    let dev = Default::default();
    let (_, base) = load_qwen2::<B>(&fixture(name), &dev).unwrap();
    let m = perturb(base.with_lora(&spec(&["q_proj", "down_proj"]), 2, &dev));
    let toks = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &dev);
    let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 3], [1, 4]), &dev);
    let valid = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; 4], [1, 4]), &dev);
    let loss = m
        .logits(m.hidden(toks, pos, valid, None))
        .powf_scalar(2.0)
        .mean();
    let g = loss.backward();
    let l0 = &m.layers[0];
    assert!(l0
        .self_attn
        .q_proj
        .lora
        .as_ref()
        .unwrap()
        .a
        .grad(&g)
        .is_some());
    assert!(l0.mlp.down_proj.lora.as_ref().unwrap().b.grad(&g).is_some());
    assert!(
        l0.self_attn.q_proj.weight.grad(&g).is_none(),
        "frozen base got a gradient"
    );
    assert!(m.embed_tokens.grad(&g).is_none());
    assert!(l0.self_attn.k_proj.lora.is_none());
}

#[test]
fn peft_files_round_trip_and_errors_name_the_tensor() {
    for name in FIXTURES {
        peft_files_round_trip_and_errors_name_the_tensor_on(name);
    }
}

fn peft_files_round_trip_and_errors_name_the_tensor_on(name: &str) {
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = load_qwen2::<B>(&fixture(name), &dev).unwrap();
    let s = spec(&["q_proj", "v_proj", "o_proj", "up_proj"]);
    let m = perturb(base.clone().with_lora(&s, 3, &dev));
    save_lora(&m, &s, Some(&fixture(name)), dir.path()).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let st = qwen2_burn::read_safetensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    let a = &st["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(
        a.shape.as_slice(),
        [4, m.layers[0].self_attn.q_proj.weight.dims()[0]]
    );
    // o_proj maps heads·head_dim → hidden (not square in the Qwen3 fixture): PEFT's A is
    // [r, in], B is [out, r].
    let [o_in, o_out] = m.layers[0].self_attn.o_proj.weight.dims();
    let o = "base_model.model.model.layers.0.self_attn.o_proj";
    assert_eq!(
        st[&format!("{o}.lora_A.weight")].shape.as_slice(),
        [4, o_in]
    );
    assert_eq!(
        st[&format!("{o}.lora_B.weight")].shape.as_slice(),
        [o_out, 4]
    );
    let (loaded, s2) = load_lora(base.clone(), dir.path(), &dev).unwrap();
    assert_eq!(s2, s);
    assert_eq!(
        logits(&loaded),
        logits(&m),
        "round trip changed the adapters"
    );

    // A missing tensor is named.
    let mut partial: BTreeMap<String, TensorData> = st.clone();
    assert!(partial
        .remove("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
        .is_some());
    let err = base
        .clone()
        .load_lora(&s, partial, Path::new("adapter_model.safetensors"), &dev)
        .unwrap_err();
    assert!(
        matches!(err, ModelError::MissingTensor { ref name, .. } if name.contains("layers.0.mlp.up_proj.lora_B"))
    );
    // An adapter for a layer the config does not target is named.
    let err = base
        .load_lora(&spec(&["q_proj", "v_proj"]), st, Path::new("x"), &dev)
        .unwrap_err();
    assert!(
        matches!(err, ModelError::UnexpectedTensor { ref name, .. } if name.contains("up_proj"))
    );
}
