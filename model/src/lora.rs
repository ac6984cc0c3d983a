//! LoRA adapters (Hu et al. 2021) on the model's dense layers, with the PEFT file layout so
//! adapters trained here load in `peft` and back.
//!
//! On a target layer `y = x·W + b + s·(x·A)·B` with `A: [in, r]`, `B: [r, out]`, `s = α / r`;
//! `A ~ U(−1/√in, 1/√in)` and `B = 0` at the start, so the adapted model starts equal to the base.
//! The base weights are frozen (no gradients, no optimizer state) and shared by every copy of the
//! model that has them: adapters off is the base model itself.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::linear::{to_dtype, Lora};
use crate::model::{Qwen2, PROJECTIONS};

/// Rank, scale and targets of the adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Layer names among [`PROJECTIONS`].
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("lora.rank must be positive".into());
        }
        if self.targets.is_empty() {
            return Err("lora.targets is empty".into());
        }
        for t in &self.targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                return Err(format!(
                    "lora.targets: unknown layer `{t}` (known: {})",
                    PROJECTIONS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// xorshift64* uniform in [−1, 1): deterministic adapter init without a dependency.
fn uniform_pm1(state: &mut u64) -> f32 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn peft_names(layer: &str) -> (String, String) {
    (
        format!("base_model.model.{layer}.lora_A.weight"),
        format!("base_model.model.{layer}.lora_B.weight"),
    )
}

impl<B: Backend> Qwen2<B> {
    /// Freezes every base weight and adds fresh adapters (seeded) to the target layers.
    pub fn with_lora(self, spec: &LoraSpec, seed: u64, device: &B::Device) -> Self {
        let mut model = self.no_grad();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for (_, lin) in model.projections_mut(&spec.targets) {
            let [d_in, d_out] = lin.weight.dims();
            let bound = 1.0 / (d_in as f32).sqrt();
            let a: Vec<f32> = (0..d_in * spec.rank)
                .map(|_| bound * uniform_pm1(&mut state))
                .collect();
            lin.lora = Some(Lora {
                a: Param::from_tensor(Tensor::from_data(
                    TensorData::new(a, [d_in, spec.rank]),
                    device,
                )),
                b: Param::from_tensor(Tensor::zeros([spec.rank, d_out], device)),
                scale: spec.scale(),
            });
        }
        model
    }

    /// Whether any layer carries an adapter.
    pub fn has_lora(&self) -> bool {
        let mut m = self.clone();
        !m.projections_mut(&PROJECTIONS)
            .into_iter()
            .all(|(_, l)| l.lora.is_none())
    }

    /// The base model: adapters removed (weights shared, not copied).
    pub fn without_lora(mut self) -> Self {
        for (_, lin) in self.projections_mut(&PROJECTIONS) {
            lin.lora = None;
        }
        self
    }

    /// Folds every adapter into its layer: `W ← W + s·A·B`.
    pub fn merge_lora(mut self) -> Self {
        for (_, lin) in self.projections_mut(&PROJECTIONS) {
            if let Some(l) = lin.lora.take() {
                let delta = l.a.val().matmul(l.b.val()).mul_scalar(l.scale);
                // In the adapters' dtype (f32), also over a bf16 base.
                let w = to_dtype(lin.weight.val(), delta.dtype()) + delta;
                lin.weight = Param::initialized(lin.weight.id, w);
            }
        }
        self
    }

    /// The adapters in PEFT's layout: `…lora_A.weight` `[r, in]`, `…lora_B.weight` `[out, r]`.
    pub fn lora_tensors(&self) -> Vec<(String, TensorData)> {
        let mut m = self.clone();
        let mut out = Vec::new();
        for (name, lin) in m.projections_mut(&PROJECTIONS) {
            if let Some(l) = &lin.lora {
                let (an, bn) = peft_names(&name);
                out.push((an, l.a.val().transpose().into_data()));
                out.push((bn, l.b.val().transpose().into_data()));
            }
        }
        out
    }

    /// Attaches adapters read from `lora_tensors`-named data (the base is frozen). Every target
    /// must be present with the right shape; extra tensors are an error.
    pub fn load_lora(
        self,
        spec: &LoraSpec,
        mut tensors: BTreeMap<String, TensorData>,
        file: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        let mut model = self.no_grad();
        for (name, lin) in model.projections_mut(&spec.targets) {
            let [d_in, d_out] = lin.weight.dims();
            let (an, bn) = peft_names(&name);
            let mut take = |n: &str, shape: [usize; 2]| -> Result<Tensor<B, 2>> {
                let d = tensors.remove(n).ok_or_else(|| ModelError::MissingTensor {
                    path: file.to_path_buf(),
                    name: n.into(),
                })?;
                if d.shape.as_slice() != shape {
                    return Err(ModelError::Shape {
                        path: file.to_path_buf(),
                        name: n.into(),
                        expected: shape.to_vec(),
                        got: d.shape.to_vec(),
                    });
                }
                Ok(Tensor::<B, 2>::from_data(d.convert::<f32>(), device).transpose())
            };
            let a = take(&an, [spec.rank, d_in])?;
            let b = take(&bn, [d_out, spec.rank])?;
            // Contiguous copies (the transposes above are views).
            let a = Tensor::from_data(a.into_data(), device);
            let b = Tensor::from_data(b.into_data(), device);
            lin.lora = Some(Lora {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                scale: spec.scale(),
            });
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(ModelError::UnexpectedTensor {
                path: file.to_path_buf(),
                name: extra.clone(),
            });
        }
        Ok(model)
    }
}

/// PEFT's `adapter_config.json` (the fields we read and write).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn none() -> String {
    "none".into()
}

/// Writes `adapter_model.safetensors` (f32) and `adapter_config.json` into `dir`.
pub fn save_lora<B: Backend>(
    model: &Qwen2<B>,
    spec: &LoraSpec,
    base: Option<&Path>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = model.lora_tensors();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, d)| {
            let shape = d.shape.to_vec();
            let v: Vec<f32> = d.convert::<f32>().to_vec().unwrap_or_default();
            (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Safetensors {
            path: dir.join("adapter_model.safetensors"),
            msg: e.to_string(),
        })?;
    let path = dir.join("adapter_model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| ModelError::Safetensors {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let cfg = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: spec.rank,
        lora_alpha: spec.alpha,
        target_modules: spec.targets.clone(),
        lora_dropout: 0.0,
        bias: "none".into(),
        base_model_name_or_path: base.map(|p| p.display().to_string()),
    };
    let cpath = dir.join("adapter_config.json");
    std::fs::write(
        &cpath,
        serde_json::to_string_pretty(&cfg).expect("serialisable"),
    )
    .map_err(|e| ModelError::io(&cpath, e))
}

/// `DIR/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let cpath = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| ModelError::io(&cpath, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: cpath.clone(),
        msg: e.to_string(),
    })
}

/// Reads an adapter folder written by [`save_lora`] (or by PEFT with f32/bf16/f16 tensors and
/// these target names) and attaches it to `base`.
pub fn load_lora<B: Backend>(
    base: Qwen2<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<(Qwen2<B>, LoraSpec)> {
    let cpath = dir.join("adapter_config.json");
    let cfg = read_adapter_config(dir)?;
    let spec = LoraSpec {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        targets: cfg.target_modules,
    };
    spec.validate().map_err(|msg| ModelError::Config {
        path: cpath.clone(),
        msg,
    })?;
    let path = dir.join("adapter_model.safetensors");
    let tensors = crate::weights::read_safetensors(&path)?;
    let model = base.load_lora(&spec, tensors, &path, device)?;
    Ok((model, spec))
}
