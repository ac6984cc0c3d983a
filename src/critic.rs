//! The critic: a Qwen2 backbone with a scalar value head on the final hidden states. The head is
//! `[hidden, 1]`, no bias, initialised N(0, (1/(hidden+1))²) (OpenRLHF's value head).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use qwen2_burn::linear::Linear;
use qwen2_burn::Qwen2;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

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
        Self {
            backbone,
            value_head: Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(w, [hidden, 1]),
                    device,
                )),
                bias: None,
            },
        }
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
