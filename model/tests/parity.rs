//! The Burn Qwen2 / Qwen3 is the same function as transformers' (fixtures written by
//! `tests/fixtures/make_qwen2_fixtures.py` and `make_qwen3_fixtures.py`), its KV cache and padding
//! change nothing, and its safetensors export round-trips bit for bit. Every test runs over
//! [`MODELS`], both families; the comparison with transformers also runs on `flex`.

use std::path::{Path, PathBuf};

use burn::backend::{Flex, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use qwen2_burn::{
    load_qwen2, save_qwen2, Family, KvCache, ModelError, Qwen2, Qwen2Config, SaveDtype,
};
use serde_json::Value;

mod common;

type B = NdArray<f32>;

/// Every fixture, as `family/name` under `tests/fixtures`. Qwen3: GQA with head_dim 16 != hidden
/// 32 / 4 heads (tied, bf16, sharded), MHA (untied, f32), and attention_bias with head_dim 24;
/// all have random (not unit) q_norm / k_norm weights.
const MODELS: [&str; 6] = [
    "qwen2/tied-bf16-sharded",
    "qwen2/untied-f32-mha",
    "qwen2/tied-f16-gqa",
    "qwen3/tied-bf16-gqa-hd16",
    "qwen3/untied-f32-mha",
    "qwen3/bias-f32-gqa-hd24",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn int2<Bk: Backend>(rows: &[Vec<i64>]) -> Tensor<Bk, 2, Int> {
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, t]), &Default::default())
}

fn bool2<Bk: Backend>(rows: &[Vec<bool>]) -> Tensor<Bk, 2, Bool> {
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, t]), &Default::default())
}

/// Log-probs of each next token of one unpadded sequence, by a full forward pass.
fn full_logprobs<Bk: Backend>(model: &Qwen2<Bk>, seq: &[i64]) -> Vec<f32> {
    let t = seq.len();
    let hidden = model.hidden(
        int2(&[seq[..t - 1].to_vec()]),
        int2(&[(0..t as i64 - 1).collect()]),
        bool2(&[vec![true; t - 1]]),
        None,
    );
    let lp = model.token_logprobs(hidden, int2(&[seq[1..].to_vec()]), 5);
    lp.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn last_logits(model: &Qwen2<B>, hidden: Tensor<B, 3>) -> Vec<f32> {
    let [b, t, h] = hidden.dims();
    model
        .logits(hidden.slice([0..b, t - 1..t, 0..h]))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn argmax(x: &[f32]) -> i64 {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as i64
}

/// Greedy decoding through the KV cache: prefill the prompt, then one token per step.
fn greedy(model: &Qwen2<B>, config: &Qwen2Config, prompt: &[i64], n: usize) -> Vec<i64> {
    let dev = Default::default();
    let mut cache = KvCache::<B>::new(config, 1, prompt.len() + n, &dev);
    let p = prompt.len();
    let h = model.hidden(
        int2(&[prompt.to_vec()]),
        int2(&[(0..p as i64).collect()]),
        bool2(&[vec![true; p]]),
        Some(&mut cache),
    );
    let mut out = vec![argmax(&last_logits(model, h))];
    while out.len() < n {
        let pos = (p + out.len() - 1) as i64;
        let h = model.hidden(
            int2(&[vec![*out.last().unwrap()]]),
            int2(&[vec![pos]]),
            bool2(&[vec![true]]),
            Some(&mut cache),
        );
        out.push(argmax(&last_logits(model, h)));
    }
    out
}

/// Teacher-forced log-probs of every fixture's sequences equal transformers' within 1e-4.
fn logprobs_match_transformers<Bk: Backend>() {
    for name in MODELS {
        let (_, model) = load_qwen2::<Bk>(&fixture(name), &Default::default()).unwrap();
        let r = reference(name);
        let mut worst = 0.0f32;
        for (seq, want) in r["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["logprobs"].as_array().unwrap())
        {
            let got = full_logprobs(&model, &ids(seq));
            let d = common::max_diff(&got, &floats(want));
            assert!(d < 1e-4, "{name}: max |Δ logprob| = {d:e}");
            worst = worst.max(d);
        }
        eprintln!("{name}: max |Δ logprob| vs transformers = {worst:.2e}");
    }
}

#[test]
fn logprobs_match_transformers_within_1e4() {
    logprobs_match_transformers::<B>();
}

#[test]
fn logprobs_match_transformers_within_1e4_flex() {
    logprobs_match_transformers::<Flex>();
}

#[test]
fn greedy_tokens_match_transformers_where_the_margin_is_clear() {
    for name in MODELS {
        let (config, model) = load_qwen2::<B>(&fixture(name), &Default::default()).unwrap();
        let g = &reference(name)["greedy"];
        let want = ids(&g["output_ids"]);
        let margins = floats(&g["margins"]);
        let got = greedy(&model, &config, &ids(&g["prompt_ids"]), want.len());
        // Compare up to the first step whose top-2 margin is within 1e-2 (a tie could go either way).
        let clear = margins.iter().take_while(|m| **m > 1e-2).count();
        assert!(
            clear >= 4,
            "{name}: fixture has too few clear steps ({clear})"
        );
        assert_eq!(got[..clear], want[..clear], "{name}: greedy tokens differ");
    }
}

#[test]
fn cached_decode_equals_full_forward() {
    for name in MODELS {
        cached_decode_equals_full_forward_on(name);
    }
}

fn cached_decode_equals_full_forward_on(name: &str) {
    let (config, model) = load_qwen2::<B>(&fixture(name), &Default::default()).unwrap();
    let seq = ids(&reference(name)["sequences"][2]);
    let t = seq.len();
    let full = model.logits(model.hidden(
        int2(std::slice::from_ref(&seq)),
        int2(&[(0..t as i64).collect()]),
        bool2(&[vec![true; t]]),
        None,
    ));
    let full = full.into_data().to_vec::<f32>().unwrap();
    let v = config.vocab_size;
    let mut cache = KvCache::<B>::new(&config, 1, t, &Default::default());
    let split = 8;
    let mut stepwise = model
        .logits(model.hidden(
            int2(&[seq[..split].to_vec()]),
            int2(&[(0..split as i64).collect()]),
            bool2(&[vec![true; split]]),
            Some(&mut cache),
        ))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for (j, &tok) in seq.iter().enumerate().skip(split) {
        let h = model.hidden(
            int2(&[vec![tok]]),
            int2(&[vec![j as i64]]),
            bool2(&[vec![true]]),
            Some(&mut cache),
        );
        stepwise.extend(model.logits(h).into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(stepwise.len(), t * v);
    let d = common::max_diff(&stepwise, &full);
    assert!(d < 1e-5, "{name}: cached vs full logits: max diff {d:e}");
}

#[test]
fn left_padded_batch_equals_each_row_alone() {
    for name in MODELS {
        let (config, model) = load_qwen2::<B>(&fixture(name), &Default::default()).unwrap();
        let seqs: Vec<Vec<i64>> = reference(name)["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let width = seqs.iter().map(Vec::len).max().unwrap();
        let pad = config.eos_token_ids[0] as i64;
        let tokens: Vec<Vec<i64>> = seqs
            .iter()
            .map(|s| [vec![pad; width - s.len()], s.clone()].concat())
            .collect();
        let valid: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| [vec![false; width - s.len()], vec![true; s.len()]].concat())
            .collect();
        // HF convention: position = cumsum(mask) − 1, padding at 1 (irrelevant, it is masked).
        let positions: Vec<Vec<i64>> = seqs
            .iter()
            .map(|s| [vec![1; width - s.len()], (0..s.len() as i64).collect()].concat())
            .collect();
        // Batched prefill of all but the last token through the cache, then one decode step.
        let mut cache = KvCache::<B>::new(&config, seqs.len(), width, &Default::default());
        let cut = |rows: &[Vec<i64>], r: std::ops::Range<usize>| {
            rows.iter()
                .map(|x| x[r.clone()].to_vec())
                .collect::<Vec<_>>()
        };
        let vcut = valid
            .iter()
            .map(|x| x[..width - 1].to_vec())
            .collect::<Vec<_>>();
        let h = model.hidden(
            int2(&cut(&tokens, 0..width - 1)),
            int2(&cut(&positions, 0..width - 1)),
            bool2(&vcut),
            Some(&mut cache),
        );
        let mut batch_lp = Vec::new();
        let hidden = h.dims()[2];
        let last_tokens = cut(&tokens, width - 1..width);
        let prefill_lp = model.token_logprobs(h, int2(&cut(&tokens, 1..width)), 4);
        let prefill_lp = prefill_lp.into_data().to_vec::<f32>().unwrap();
        let h2 = model.hidden(
            int2(&last_tokens),
            int2(&cut(&positions, width - 1..width)),
            bool2(&vec![vec![true]; seqs.len()]),
            Some(&mut cache),
        );
        let step_logits = model.logits(h2).into_data().to_vec::<f32>().unwrap();
        let _ = hidden;
        for (i, s) in seqs.iter().enumerate() {
            let row = &prefill_lp[i * (width - 1)..(i + 1) * (width - 1)];
            batch_lp.push(row[width - s.len()..].to_vec());
            let alone = full_logprobs(&model, s);
            let d = common::max_diff(&row[width - s.len()..], &alone);
            assert!(d < 1e-5, "{name} row {i}: padded vs alone max diff {d:e}");
            // The decode step after the padded prefill equals the unpadded model's next logits.
            let t = s.len();
            let h = model.hidden(
                int2(std::slice::from_ref(s)),
                int2(&[(0..t as i64).collect()]),
                bool2(&[vec![true; t]]),
                None,
            );
            let alone_next = last_logits(&model, h);
            let v = config.vocab_size;
            let d = common::max_diff(&step_logits[i * v..(i + 1) * v], &alone_next);
            assert!(
                d < 1e-5,
                "{name} row {i}: padded decode step vs alone max diff {d:e}"
            );
        }
    }
}

fn all_weights(model: &Qwen2<B>) -> Vec<(String, Vec<u32>)> {
    qwen2_burn::hf_tensors(model)
        .into_iter()
        .map(|(n, d)| (n, d.iter::<f32>().map(f32::to_bits).collect()))
        .collect()
}

#[test]
fn export_reimport_is_bit_identical_single_and_sharded() {
    for name in MODELS {
        let (config, model) = load_qwen2::<B>(&fixture(name), &Default::default()).unwrap();
        for shard in [usize::MAX, 4096] {
            let dir = tempfile::tempdir().unwrap();
            save_qwen2(&model, &config, dir.path(), SaveDtype::F32, shard).unwrap();
            assert_eq!(
                dir.path().join("model.safetensors.index.json").exists(),
                shard == 4096
            );
            let (config2, model2) = load_qwen2::<B>(dir.path(), &Default::default()).unwrap();
            // The same config (family, head_dim, attention_bias, ...) but the recorded dtype.
            let no_dtype = |c: &Qwen2Config| Qwen2Config {
                torch_dtype: None,
                ..c.clone()
            };
            assert_eq!(
                no_dtype(&config2),
                no_dtype(&config),
                "{name}: config changed"
            );
            assert!(
                all_weights(&model) == all_weights(&model2),
                "{name}: weights changed"
            );
        }
        // The config's parameter count is the checkpoint's.
        let stored: usize = qwen2_burn::hf_tensors(&model)
            .iter()
            .map(|(_, d)| d.num_elements())
            .sum();
        assert_eq!(stored, config.num_parameters(), "{name}: parameter count");
        // bf16 storage of weights that came from bf16 is exact too.
        if name.contains("bf16") {
            let dir = tempfile::tempdir().unwrap();
            save_qwen2(&model, &config, dir.path(), SaveDtype::Bf16, usize::MAX).unwrap();
            let (_, model2) = load_qwen2::<B>(dir.path(), &Default::default()).unwrap();
            assert!(all_weights(&model) == all_weights(&model2));
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match load_qwen2::<B>(dir, &Default::default()) {
        Ok(_) => panic!("expected an error for {}", dir.display()),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "error is not one line: {s}");
            s
        }
    }
}

#[test]
fn bad_inputs_give_one_line_errors_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    // Truncated single-file checkpoint.
    let d = tmp.path().join("truncated");
    copy_dir(&fixture("qwen2/untied-f32-mha"), &d);
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    // Missing shard.
    let d = tmp.path().join("missing-shard");
    copy_dir(&fixture("qwen2/tied-bf16-sharded"), &d);
    std::fs::remove_file(d.join("model-00003-of-00010.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model-00003-of-00010.safetensors") && e.contains("does not exist"),
        "{e}"
    );
    // A tensor with the wrong shape: claim one more layer-0 head dimension in config → q_proj mismatch.
    let d = tmp.path().join("wrong-shape");
    copy_dir(&fixture("qwen2/untied-f32-mha"), &d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 97");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[96, 48]") && e.contains("[97, 48]"),
        "{e}"
    );
    // Malformed config.json.
    let d = tmp.path().join("bad-config");
    copy_dir(&fixture("qwen2/untied-f32-mha"), &d);
    std::fs::write(d.join("config.json"), "{\"hidden_size\": 48,").unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("malformed JSON"),
        "{e}"
    );
    // Missing key, sliding window, unknown architecture.
    for (text, needle) in [
        (r#"{"hidden_size": 8}"#, "missing key `vocab_size`"),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 8}"#,
            "unsupported architectures",
        ),
        (
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 3, "num_key_value_heads": 1}"#,
            "not divisible",
        ),
        (
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "use_sliding_window": true}"#,
            "sliding-window",
        ),
    ] {
        let e = Qwen2Config::from_json_str(text).unwrap_err();
        assert!(e.contains(needle), "{e}");
    }
    // A missing tensor names itself and the file: a tied checkpoint (no lm_head) claimed untied.
    let d = tmp.path().join("missing-tensor");
    copy_dir(&fixture("qwen2/tied-f16-gqa"), &d);
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    let text = text.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    std::fs::write(d.join("config.json"), text).unwrap();
    let e = load_err(&d);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
    assert!(matches!(
        load_qwen2::<B>(&d, &Default::default()),
        Err(ModelError::MissingTensor { .. })
    ));
}

/// Rewrites `dir/config.json` by `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn qwen3_mismatches_give_one_line_errors_naming_the_tensor_or_key() {
    let tmp = tempfile::tempdir().unwrap();
    let as_family = |c: &mut serde_json::Map<String, Value>, ty: &str, arch: &str| {
        c.insert("model_type".into(), ty.into());
        c.insert("architectures".into(), serde_json::json!([arch]));
    };
    // A Qwen2 checkpoint declared Qwen3: the first q_norm is missing (the geometry fits).
    let d = tmp.path().join("qwen2-as-qwen3");
    copy_dir(&fixture("qwen2/tied-f16-gqa"), &d);
    edit_config(&d, |c| {
        as_family(c, "qwen3", "Qwen3ForCausalLM");
        c.insert("head_dim".into(), 8.into());
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("`model.layers.0.self_attn.q_norm.weight` is missing"),
        "{e}"
    );
    // A Qwen3 checkpoint declared Qwen2 (head_dim 12 = 48 / 4 fits): its q_proj has no bias.
    let d = tmp.path().join("qwen3-as-qwen2");
    copy_dir(&fixture("qwen3/untied-f32-mha"), &d);
    edit_config(&d, |c| as_family(c, "qwen2", "Qwen2ForCausalLM"));
    let e = load_err(&d);
    assert!(
        e.contains("`model.layers.0.self_attn.q_proj.bias` is missing"),
        "{e}"
    );
    // Biases the config does not declare are refused by name.
    let d = tmp.path().join("undeclared-bias");
    copy_dir(&fixture("qwen3/bias-f32-gqa-hd24"), &d);
    edit_config(&d, |c| {
        c.insert("attention_bias".into(), false.into());
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("unexpected tensor `model.layers.0.self_attn.k_proj.bias`"),
        "{e}"
    );
    // Declared biases that are not stored are missing by name.
    let d = tmp.path().join("missing-bias");
    copy_dir(&fixture("qwen3/untied-f32-mha"), &d);
    edit_config(&d, |c| {
        c.insert("attention_bias".into(), true.into());
    });
    let e = load_err(&d);
    assert!(
        e.contains("`model.layers.0.self_attn.q_proj.bias` is missing"),
        "{e}"
    );
    // A wrong head_dim is a shape error (q_norm's, the first tensor of that size asked for).
    let d = tmp.path().join("wrong-head-dim");
    copy_dir(&fixture("qwen3/tied-bf16-gqa-hd16"), &d);
    edit_config(&d, |c| {
        c.insert("head_dim".into(), 8.into());
    });
    let e = load_err(&d);
    assert!(
        e.contains("`model.layers.0.self_attn.q_norm.weight` has shape [16], expected [8]"),
        "{e}"
    );
    // Config keys.
    let base = r#""vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1"#;
    for (extra, needle) in [
        (
            r#""model_type": "qwen3", "architectures": ["Qwen2ForCausalLM"]"#,
            "model_type `qwen3` disagrees with architectures",
        ),
        (
            r#""model_type": "qwen3_moe""#,
            "unsupported model_type `qwen3_moe`",
        ),
        (
            r#""model_type": "qwen3", "head_dim": 7"#,
            "head_dim 7 must be even",
        ),
        (
            r#""model_type": "qwen3", "head_dim": "x""#,
            "key `head_dim`",
        ),
        (
            r#""model_type": "qwen3", "attention_bias": 1"#,
            "key `attention_bias` is not a boolean",
        ),
        (
            r#""model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]"#,
            "layer_types contains \"sliding_attention\"",
        ),
    ] {
        let e = Qwen2Config::from_json_str(&format!("{{{base}, {extra}}}")).unwrap_err();
        assert!(e.contains(needle) && !e.contains('\n'), "{e}");
    }
    // Qwen3 needs no divisibility of hidden by heads, and defaults head_dim as transformers does.
    let c = Qwen2Config::from_json_str(
        r#"{"vocab_size": 8, "hidden_size": 6, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "model_type": "qwen3"}"#,
    )
    .unwrap();
    assert_eq!(
        (c.family, c.head_dim, c.attention_bias),
        (Family::Qwen3, 128, false)
    );
}

#[test]
fn both_config_layouts_parse() {
    let new = Qwen2Config::from_dir(&fixture("qwen2/tied-bf16-sharded")).unwrap();
    assert_eq!(new.rope_theta, 1e6);
    assert!(new.tie_word_embeddings);
    assert_eq!(
        (
            new.num_attention_heads,
            new.num_key_value_heads,
            new.head_dim
        ),
        (4, 2, 16)
    );
    let old = Qwen2Config::from_dir(&fixture("qwen2/untied-f32-mha")).unwrap();
    assert_eq!(old.rope_theta, 1e4);
    assert!(!old.tie_word_embeddings);
    assert_eq!(
        (old.family, old.qkv_bias(), old.o_bias(), old.qk_norm()),
        (Family::Qwen2, true, false, false)
    );
    let q3 = Qwen2Config::from_dir(&fixture("qwen3/tied-bf16-gqa-hd16")).unwrap();
    assert_eq!(
        (
            q3.family,
            q3.hidden_size,
            q3.num_attention_heads,
            q3.num_key_value_heads,
            q3.head_dim
        ),
        (Family::Qwen3, 32, 4, 2, 16)
    );
    assert_eq!(
        (q3.qkv_bias(), q3.o_bias(), q3.qk_norm(), q3.rope_theta),
        (false, false, true, 1e6)
    );
    let biased = Qwen2Config::from_dir(&fixture("qwen3/bias-f32-gqa-hd24")).unwrap();
    assert_eq!(
        (biased.qkv_bias(), biased.o_bias(), biased.head_dim),
        (true, true, 24)
    );
    // Export writes the family's layout back.
    let v = q3.to_hf_json("bfloat16");
    assert_eq!(v["model_type"], "qwen3");
    assert_eq!(v["architectures"], serde_json::json!(["Qwen3ForCausalLM"]));
    assert_eq!(
        (v["head_dim"].as_u64(), v["attention_bias"].as_bool()),
        (Some(16), Some(false))
    );
    let v = old.to_hf_json("float32");
    assert_eq!(
        (v["model_type"].as_str(), v.get("head_dim")),
        (Some("qwen2"), None)
    );
}
