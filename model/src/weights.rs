//! Hugging Face safetensors import and export (Qwen2 / Qwen2.5 and Qwen3 dense): a single
//! `model.safetensors` or shards listed in `model.safetensors.index.json`; f32, bf16 and f16 stored
//! tensors; `lm_head.weight` absent when the embedding is tied; attention biases and Qwen3's
//! `self_attn.q_norm` / `k_norm` weights present exactly when the config says so. Every refusal
//! names the file and the tensor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

use crate::config::Qwen2Config;
use crate::error::{ModelError, Result};
use crate::model::{Qwen2, TensorSource};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Storage dtype of exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

impl SaveDtype {
    /// The name transformers uses in `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" => Some(SaveDtype::F32),
            "bf16" | "bfloat16" => Some(SaveDtype::Bf16),
            "f16" | "float16" => Some(SaveDtype::F16),
            _ => None,
        }
    }
}

/// Loads `DIR/config.json` and the weights of a Hugging Face Qwen2 or Qwen3 (dense) folder.
pub fn load_qwen2<B: Backend>(dir: &Path, device: &B::Device) -> Result<(Qwen2Config, Qwen2<B>)> {
    let config = Qwen2Config::from_dir(dir)?;
    let model = load_weights(dir, &config, device)?;
    Ok((config, model))
}

/// The weights of folder `dir` for an already-read `config` (its `config.json`).
pub fn load_weights<B: Backend>(
    dir: &Path,
    config: &Qwen2Config,
    device: &B::Device,
) -> Result<Qwen2<B>> {
    let mut src = SafetensorsSource::open(dir)?;
    let model = Qwen2::build(config, &mut src, device)?;
    src.check_all_used(config.tie_word_embeddings)?;
    Ok(model)
}

/// The tensors of a folder, file by file, read lazily as the model asks for them.
struct SafetensorsSource {
    /// Tensor name → file holding it.
    location: HashMap<String, PathBuf>,
    /// File → its bytes, loaded on first use.
    files: HashMap<PathBuf, Vec<u8>>,
    used: HashSet<String>,
}

impl SafetensorsSource {
    fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX);
        let single = dir.join(SINGLE);
        let mut location = HashMap::new();
        let mut files = HashMap::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: index.clone(),
                    msg: format!("malformed JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            for (name, shard) in map {
                let shard = shard.as_str().ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    msg: format!("weight_map entry `{name}` is not a file name"),
                })?;
                let path = dir.join(shard);
                if !path.exists() {
                    return Err(ModelError::MissingShard {
                        path: index.clone(),
                        shard: shard.to_string(),
                    });
                }
                location.insert(name.clone(), path);
            }
        } else if single.exists() {
            let bytes = std::fs::read(&single).map_err(|e| ModelError::io(&single, e))?;
            let names = SafeTensors::deserialize(&bytes)
                .map_err(|e| ModelError::Safetensors {
                    path: single.clone(),
                    msg: e.to_string(),
                })?
                .names()
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>();
            for n in names {
                location.insert(n, single.clone());
            }
            files.insert(single, bytes);
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE} or {INDEX} in this folder"),
                ),
            ));
        }
        Ok(Self {
            location,
            files,
            used: HashSet::new(),
        })
    }

    /// Every stored tensor must have been consumed (a tied model may also carry a copy of the
    /// embedding as `lm_head.weight`; old checkpoints carry RoPE `inv_freq` buffers).
    fn check_all_used(&self, tied: bool) -> Result<()> {
        let mut extra: Vec<_> = self
            .location
            .iter()
            .filter(|(n, _)| !self.used.contains(*n))
            .filter(|(n, _)| !(tied && n.as_str() == "lm_head.weight"))
            .filter(|(n, _)| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        extra.sort();
        match extra.first() {
            Some((name, path)) => Err(ModelError::UnexpectedTensor {
                path: (*path).clone(),
                name: (*name).clone(),
            }),
            None => Ok(()),
        }
    }
}

/// A stored tensor's values as f32 (f32, bf16 and f16 are read).
fn decode(view: &safetensors::tensor::TensorView, path: &Path, name: &str) -> Result<Vec<f32>> {
    let raw = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::Dtype {
                path: path.to_path_buf(),
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// Every tensor of one safetensors file, as f32 data with its stored shape.
pub fn read_safetensors(path: &Path) -> Result<std::collections::BTreeMap<String, TensorData>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = decode(&view, path, &name)?;
            let shape = view.shape().to_vec();
            Ok((name, TensorData::new(values, shape)))
        })
        .collect()
}

impl TensorSource for SafetensorsSource {
    fn tensor(&mut self, name: &str, hf_shape: &[usize]) -> Result<TensorData> {
        let path = match self.location.get(name) {
            Some(p) => p.clone(),
            None => {
                let path = self.location.values().next().cloned().unwrap_or_default();
                return Err(ModelError::MissingTensor {
                    path,
                    name: name.into(),
                });
            }
        };
        if !self.files.contains_key(&path) {
            let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            self.files.insert(path.clone(), bytes);
        }
        let bytes = &self.files[&path];
        let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|_| ModelError::MissingTensor {
            path: path.clone(),
            name: name.into(),
        })?;
        if view.shape() != hf_shape {
            return Err(ModelError::Shape {
                path,
                name: name.into(),
                expected: hf_shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let values = decode(&view, &path, name)?;
        self.used.insert(name.to_string());
        Ok(TensorData::new(values, hf_shape.to_vec()))
    }
}

/// Every tensor of the model under its Hugging Face name, in the HF layout (`[out, in]`).
pub fn hf_tensors<B: Backend>(model: &Qwen2<B>) -> Vec<(String, TensorData)> {
    fn data<B: Backend, const D: usize>(t: Tensor<B, D>) -> TensorData {
        t.into_data()
    }
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        data(model.embed_tokens.val()),
    )];
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        for (n, lin) in [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &l.mlp.gate_proj),
            ("mlp.up_proj", &l.mlp.up_proj),
            ("mlp.down_proj", &l.mlp.down_proj),
        ] {
            out.push((
                format!("{p}.{n}.weight"),
                data(lin.weight.val().transpose()),
            ));
            if let Some(b) = &lin.bias {
                out.push((format!("{p}.{n}.bias"), data(b.val())));
            }
        }
        for (n, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(norm) = norm {
                out.push((format!("{p}.self_attn.{n}.weight"), data(norm.gamma.val())));
            }
        }
        out.push((
            format!("{p}.input_layernorm.weight"),
            data(l.input_layernorm.gamma.val()),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            data(l.post_attention_layernorm.gamma.val()),
        ));
    }
    out.push(("model.norm.weight".into(), data(model.norm.gamma.val())));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".into(), data(head.weight.val().transpose())));
    }
    out
}

fn encode(data: &TensorData, dtype: SaveDtype) -> Vec<u8> {
    let values = data.iter::<f32>();
    match dtype {
        SaveDtype::F32 => values.flat_map(|x| x.to_le_bytes()).collect(),
        SaveDtype::Bf16 => values
            .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        SaveDtype::F16 => values
            .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Writes `config.json` and the weights in the Hugging Face layout: one `model.safetensors` when the
/// total fits in `max_shard_bytes`, otherwise `model-0000i-of-0000n.safetensors` plus
/// `model.safetensors.index.json`. Transformers loads the result.
pub fn save_qwen2<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    dir: &Path,
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
        SaveDtype::F16 => Dtype::F16,
    };
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = hf_tensors(model)
        .into_iter()
        .map(|(n, d)| {
            let shape = d.shape.to_vec();
            let bytes = encode(&d, dtype);
            (n, shape, bytes)
        })
        .collect();
    let total: usize = tensors.iter().map(|t| t.2.len()).sum();
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        if size > 0 && size + t.2.len() > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        size += t.2.len();
    }
    let n = shards.len();
    let metadata: Option<HashMap<String, String>> = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    let mut weight_map = BTreeMap::new();
    for (k, members) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> = members
            .iter()
            .map(|&i| {
                let (name, shape, bytes) = &tensors[i];
                weight_map.insert(name.clone(), file.clone());
                let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                    .expect("shape and byte length agree by construction");
                (name.clone(), view)
            })
            .collect();
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, metadata.clone(), &path).map_err(|e| {
            ModelError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            }
        })?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX);
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json"))
            .map_err(|e| ModelError::io(&path, e))?;
    } else {
        let _ = std::fs::remove_file(dir.join(INDEX));
    }
    let cfg = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json(dtype.torch_name())).expect("json");
    std::fs::write(&cfg, text).map_err(|e| ModelError::io(&cfg, e))?;
    Ok(())
}
