//! The critic: a Qwen2 backbone with a scalar value head on the final hidden states. The head is
//! `[hidden, 1]`, no bias, initialised N(0, (1/(hidden+1))²) (OpenRLHF's value head).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use qwen2_burn::linear::Linear;
use qwen2_burn::Qwen2;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

#[derive(Module, Debug)]
pub struct Critic<B: Backend> {
    pub backbone: Qwen2<B>,
    pub value_head: Linear<B>,
}

impl<B: Backend> Critic<B> {
    /// A critic on `backbone` with a freshly drawn head.
    pub fn new(backbone: Qwen2<B>, seed: u64, device: &B::Device) -> Self {
        let hidden = backbone.embed_tokens.dims()[1];
        let normal = Normal::new(0.0f32, 1.0 / (hidden as f32 + 1.0)).expect("valid std");
        let mut rng = StdRng::seed_from_u64(seed ^ 0xC0FFEE);
        let w: Vec<f32> = (0..hidden).map(|_| normal.sample(&mut rng)).collect();
        Self::with_head(backbone, w, device)
    }

    /// A critic on `backbone` with head weights `w` (`hidden` values).
    fn with_head(backbone: Qwen2<B>, w: Vec<f32>, device: &B::Device) -> Self {
        let hidden = w.len();
        Self {
            backbone,
            value_head: Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(w, [hidden, 1]),
                    device,
                )),
                bias: None,
                lora: None,
            },
        }
    }

    /// Writes the head as `value_head.weight`, `[1, hidden]` (the `[out, in]` layout), f32.
    pub fn save_head(&self, path: &Path) -> Result<()> {
        let w: Vec<f32> = self
            .value_head
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow!("value head: {e:?}"))?;
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![1, w.len()], &bytes)?;
        safetensors::serialize_to_file([("value_head.weight", view)], None, path)
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// A critic on `backbone` with the head read from a file written by [`Critic::save_head`].
    pub fn load_head(backbone: Qwen2<B>, path: &Path, device: &B::Device) -> Result<Self> {
        let hidden = backbone.embed_tokens.dims()[1];
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{}: not safetensors: {e}", path.display()))?;
        let t = st
            .tensor("value_head.weight")
            .map_err(|_| anyhow!("{}: no tensor value_head.weight", path.display()))?;
        if t.dtype() != Dtype::F32 || t.shape() != [1, hidden] {
            bail!(
                "{}: value_head.weight is {:?} {:?}, expected F32 [1, {hidden}]",
                path.display(),
                t.dtype(),
                t.shape()
            );
        }
        let w: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self::with_head(backbone, w, device))
    }

    /// `V` at every position `[b, t]`.
    pub fn values(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        valid: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 2> {
        let h = self.backbone.hidden(tokens, positions, valid, None);
        self.value_head.forward(h).squeeze_dim::<2>(2)
    }
}
