//! Export interop with transformers and peft, in CI without Python: against
//! `tests/fixtures/interop/reference.json`, written by `tests/fixtures/make_export_interop.py`
//! from what transformers and peft computed on `export`'s output and on an adapter peft saved.
//!
//! - `export` (a peft adapter merged into its base in f32 and bf16; a tied, sharded model to f16)
//!   writes the config.json and the tensor names, dtypes and shapes transformers loaded, and
//!   `logprobs` on the export equals transformers' log-probs on it within 1e-4 (the README's
//!   parity tolerance) — and peft's on base + adapter.
//! - An adapter written by `save_lora` holds peft's tensors bit for bit, with the config fields
//!   peft reads, so peft loads it as it loads its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::NdArray;
use serde_json::Value;

mod common;
use common::floats;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let p = fixtures().join("interop/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_med-rlvr"));
    c.current_dir(fixtures());
    c
}

fn run(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Every tensor of the folder's safetensors files: name → (dtype, shape).
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(name, (format!("{:?}", view.dtype()), view.shape().to_vec()));
            }
        }
    }
    out
}

#[test]
fn transformers_loads_what_export_writes() {
    let r = reference();
    let peft = floats(&r["peft_continuation_logprobs"]);
    let tmp = tempfile::tempdir().unwrap();
    let exports = r["exports"].as_object().unwrap();
    assert_eq!(exports.len(), 3);
    for (name, e) in exports {
        let out = tmp.path().join(name);
        let args: Vec<&str> = e["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        run(bin().arg("export").args(&args).arg("--out").arg(&out));
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config, e["config"], "{name}: config.json");
        let want: BTreeMap<String, (String, Vec<usize>)> = e["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let dtype = v[0].as_str().unwrap().to_string();
                let shape = v[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (k.clone(), (dtype, shape))
            })
            .collect();
        assert_eq!(tensors(&out), want, "{name}: tensor names, dtypes, shapes");

        let text = &fixtures()
            .join(e["text_of"].as_str().unwrap())
            .join("reference.json");
        let text: Value = serde_json::from_str(&std::fs::read_to_string(text).unwrap()).unwrap();
        let text = &text["text"];
        let line = run(bin()
            .args(["logprobs", "--json", "--model"])
            .arg(&out)
            .args(["--prompt", text["prompt"].as_str().unwrap()])
            .args(["--continuation", text["continuation"].as_str().unwrap()]));
        let got: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(got["prompt_ids"], text["prompt_ids"], "{name}");
        assert_eq!(got["continuation_ids"], text["continuation_ids"], "{name}");
        let ours = floats(&got["continuation_logprobs"]);
        let d = common::assert_close(
            &format!("{name}: med-rlvr vs transformers on the export"),
            &ours,
            &floats(&e["continuation_logprobs"]),
            1e-4,
        );
        eprintln!("{name}: max |Δ log-prob| vs transformers {d:.1e}");
        if name == "merged-f32" {
            let d = common::assert_close(
                "med-rlvr's merge vs peft's base + adapter",
                &ours,
                &peft,
                1e-4,
            );
            eprintln!("{name}: max |Δ log-prob| vs peft {d:.1e}");
        }
    }
}

#[test]
fn peft_reads_the_adapters_we_write() {
    type B = NdArray<f32>;
    let dev = Default::default();
    let adapter = fixtures().join("interop/peft-adapter");
    let (_, base) =
        qwen2_burn::load_qwen2::<B>(&fixtures().join("qwen2/untied-f32-mha"), &dev).unwrap();
    let (model, spec) = qwen2_burn::load_lora(base, &adapter, &dev).unwrap();
    let out = tempfile::tempdir().unwrap();
    qwen2_burn::save_lora(&model, &spec, None, out.path()).unwrap();

    let read = |dir: &Path| -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, v)| {
                let meta = (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                );
                (n, meta)
            })
            .collect()
    };
    let (ours, peft) = (read(out.path()), read(&adapter));
    assert_eq!(
        ours.len(),
        3 * 7 * 2,
        "A and B of 7 projections in 3 layers"
    );
    assert!(
        ours == peft,
        "tensor names, dtypes, shapes or bytes differ from peft's own file"
    );

    let config = |dir: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours, peft) = (config(out.path()), config(&adapter));
    for key in ["peft_type", "task_type", "r", "lora_alpha"] {
        assert_eq!(
            ours[key]
                .as_f64()
                .map(Value::from)
                .unwrap_or(ours[key].clone()),
            peft[key]
                .as_f64()
                .map(Value::from)
                .unwrap_or(peft[key].clone()),
            "adapter_config.json: {key}"
        );
    }
    let targets = |v: &Value| -> Vec<String> {
        let mut t: Vec<String> = v["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        targets(&ours),
        targets(&peft),
        "adapter_config.json: target_modules"
    );
}
