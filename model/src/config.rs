//! `Qwen2Config`: the geometry of a Qwen2 / Qwen2.5 or Qwen3 (dense) decoder, read from a Hugging
//! Face `config.json` in either layout (`rope_theta` at the top level as in the published Qwen2.5 and
//! Qwen3 files, or transformers-5 `rope_parameters: {rope_theta, rope_type}`), and written back in
//! the former, with the family's `model_type` and `architectures`.
//!
//! The two families differ only in the attention (transformers' `modeling_qwen2.py` /
//! `modeling_qwen3.py`): Qwen2 has a bias on q/k/v (none on o) and `head_dim = hidden / heads`;
//! Qwen3 has an RMSNorm over `head_dim` on each query and key head (`q_norm`, `k_norm`, before
//! RoPE), a bias on q/k/v/o only when `attention_bias` is true, and an explicit `head_dim`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// Which Hugging Face architecture a checkpoint is (its `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Family {
    /// `qwen2` (`Qwen2ForCausalLM`): Qwen2, Qwen2.5.
    #[default]
    Qwen2,
    /// `qwen3` (`Qwen3ForCausalLM`): Qwen3 dense models (not the MoE `qwen3_moe`).
    Qwen3,
}

impl Family {
    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The `architectures` entry of the causal LM.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The family an `architectures` entry belongs to, if it is one we read.
    fn of_architecture(arch: &str) -> Option<Self> {
        match arch {
            "Qwen2ForCausalLM" | "Qwen2Model" | "Qwen2ForTokenClassification" => {
                Some(Family::Qwen2)
            }
            "Qwen3ForCausalLM" | "Qwen3Model" | "Qwen3ForTokenClassification" => {
                Some(Family::Qwen3)
            }
            _ => None,
        }
    }
}

/// Geometry and constants of a Qwen2 / Qwen2.5 or Qwen3 dense model (the name is historical: one
/// config and one model type, [`crate::Qwen2`], cover both families). Field names follow Hugging Face.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// Qwen2 or Qwen3: decides the attention's biases and q/k norms (see the module doc).
    #[serde(default)]
    pub family: Family,
    /// Qwen3's `attention_bias`: a bias on the q, k, v and o projections. Unused for Qwen2, whose
    /// q/k/v always have one and o never (false there).
    #[serde(default)]
    pub attention_bias: bool,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype` / `dtype`), if any.
    pub torch_dtype: Option<String>,
}

impl Qwen2Config {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates one `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses a config from JSON text; the error is a one-line reason.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        let obj = v.as_object().ok_or("top level is not a JSON object")?;
        let arch_family = match obj.get("architectures").and_then(Value::as_array) {
            Some(archs) => match archs
                .iter()
                .find_map(|a| a.as_str().and_then(Family::of_architecture))
            {
                Some(f) => Some(f),
                None => {
                    return Err(format!(
                        "unsupported architectures {archs:?}: only Qwen2ForCausalLM and Qwen3ForCausalLM are supported"
                    ))
                }
            },
            None => None,
        };
        let type_family = match obj.get("model_type").and_then(Value::as_str) {
            Some("qwen2") => Some(Family::Qwen2),
            Some("qwen3") => Some(Family::Qwen3),
            None => None,
            Some(other) => {
                return Err(format!(
                    "unsupported model_type `{other}` (expected `qwen2` or `qwen3`)"
                ))
            }
        };
        let family = match (type_family, arch_family) {
            (Some(t), Some(a)) if t != a => {
                return Err(format!(
                    "model_type `{}` disagrees with architectures (a {} model)",
                    t.model_type(),
                    a.architecture()
                ))
            }
            (Some(f), _) | (None, Some(f)) => f,
            (None, None) => Family::Qwen2,
        };
        if let Some(types) = obj.get("layer_types").and_then(Value::as_array) {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(format!(
                    "layer_types contains {t}: only `full_attention` layers are supported"
                ));
            }
        }
        if obj.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(
                "use_sliding_window is true: sliding-window attention is not supported".into(),
            );
        }
        if let Some(rs) = obj.get("rope_scaling") {
            if !rs.is_null() {
                return Err(format!(
                    "rope_scaling {rs} is not supported (only plain RoPE)"
                ));
            }
        }
        let usize_key = |k: &str| -> std::result::Result<usize, String> {
            obj.get(k)
                .ok_or_else(|| format!("missing key `{k}`"))?
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| format!("key `{k}` is not a non-negative integer"))
        };
        let vocab_size = usize_key("vocab_size")?;
        let hidden_size = usize_key("hidden_size")?;
        let intermediate_size = usize_key("intermediate_size")?;
        let num_hidden_layers = usize_key("num_hidden_layers")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => usize_key("num_key_value_heads")?,
        };
        let max_position_embeddings = match obj.get("max_position_embeddings") {
            None => 32768,
            Some(_) => usize_key("max_position_embeddings")?,
        };
        let rms_norm_eps = obj
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6);
        let rope_theta = match (obj.get("rope_theta"), obj.get("rope_parameters")) {
            (Some(t), _) if !t.is_null() => t.as_f64().ok_or("key `rope_theta` is not a number")?,
            (_, Some(p)) if !p.is_null() => {
                if let Some(kind) = p.get("rope_type").and_then(Value::as_str) {
                    if kind != "default" {
                        return Err(format!(
                            "rope_parameters.rope_type `{kind}` is not supported (only `default`)"
                        ));
                    }
                }
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .ok_or("rope_parameters has no numeric `rope_theta`")?
            }
            _ => 10000.0,
        };
        let tie_word_embeddings = obj
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for (k, x) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
        ] {
            if x == 0 {
                return Err(format!("key `{k}` must be positive"));
            }
        }
        // Bounds far above any released model, so sizes computed from the geometry (parameter
        // counts, memory plans) cannot overflow.
        for (k, x, max) in [
            ("vocab_size", vocab_size, 1usize << 24),
            ("hidden_size", hidden_size, 1 << 18),
            ("intermediate_size", intermediate_size, 1 << 20),
            ("num_hidden_layers", num_hidden_layers, 1 << 12),
            ("num_attention_heads", num_attention_heads, 1 << 12),
            ("max_position_embeddings", max_position_embeddings, 1 << 24),
        ] {
            if x > max {
                return Err(format!("key `{k}` = {x} is above the supported {max}"));
            }
        }
        let head_dim = match family {
            Family::Qwen2 => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
                    ));
                }
                let head_dim = hidden_size / num_attention_heads;
                if let Some(hd) = obj.get("head_dim").and_then(Value::as_u64) {
                    if hd as usize != head_dim {
                        return Err(format!(
                            "head_dim {hd} disagrees with hidden_size / num_attention_heads = {head_dim}"
                        ));
                    }
                }
                head_dim
            }
            // Explicit in every Qwen3 config (Qwen3-0.6B: hidden 1024, 16 heads, head_dim 128);
            // transformers' Qwen3Config defaults it to 128, not to hidden / heads.
            Family::Qwen3 => match obj.get("head_dim") {
                None | Some(Value::Null) => 128,
                Some(_) => usize_key("head_dim")?,
            },
        };
        if head_dim == 0 || head_dim > 1 << 12 {
            return Err(format!(
                "key `head_dim` = {head_dim} is outside the supported 1..={}",
                1 << 12
            ));
        }
        let attention_bias = match (family, obj.get("attention_bias")) {
            (Family::Qwen2, _) | (Family::Qwen3, None | Some(Value::Null)) => false,
            (Family::Qwen3, Some(b)) => {
                b.as_bool().ok_or("key `attention_bias` is not a boolean")?
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("head_dim {head_dim} must be even for RoPE"));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        if rms_norm_eps.is_nan() || rms_norm_eps <= 0.0 || rope_theta.is_nan() || rope_theta <= 0.0
        {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        let eos_token_ids = match obj.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        };
        let bos_token_id = obj
            .get("bos_token_id")
            .and_then(Value::as_u64)
            .map(|x| x as u32);
        let torch_dtype = obj
            .get("torch_dtype")
            .or_else(|| obj.get("dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            family,
            attention_bias,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
            torch_dtype,
        })
    }

    /// The Hugging Face `config.json` for this geometry (top-level `rope_theta` layout, which
    /// transformers 4 and 5 both read). `dtype` is recorded as `torch_dtype`. A Qwen3 config also
    /// has `head_dim`, `attention_bias` and `layer_types`.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut v = json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
        });
        if self.family == Family::Qwen3 {
            let obj = v.as_object_mut().expect("an object");
            obj.insert("head_dim".into(), json!(self.head_dim));
            obj.insert("attention_bias".into(), json!(self.attention_bias));
            obj.insert(
                "layer_types".into(),
                json!(vec!["full_attention"; self.num_hidden_layers]),
            );
        }
        v
    }

    /// Whether the q, k and v projections have a bias (always for Qwen2; `attention_bias` for
    /// Qwen3).
    pub fn qkv_bias(&self) -> bool {
        match self.family {
            Family::Qwen2 => true,
            Family::Qwen3 => self.attention_bias,
        }
    }

    /// Whether the output projection `o_proj` has a bias (Qwen3 with `attention_bias` only).
    pub fn o_bias(&self) -> bool {
        self.family == Family::Qwen3 && self.attention_bias
    }

    /// Whether each query and key head goes through an RMSNorm over `head_dim` (`q_norm`,
    /// `k_norm`) before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family == Family::Qwen3
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameter count (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (qb, ob) = (usize::from(self.qkv_bias()), usize::from(self.o_bias()));
        let q = h * self.num_attention_heads * hd + qb * self.num_attention_heads * hd;
        let kv = 2 * (h * self.num_key_value_heads * hd + qb * self.num_key_value_heads * hd);
        let o = self.num_attention_heads * hd * h + ob * h;
        let qk_norm = 2 * hd * usize::from(self.qk_norm());
        let mlp = 3 * h * i;
        let layer = q + kv + o + qk_norm + mlp + 2 * h;
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_hidden_layers * layer + h
    }
}
