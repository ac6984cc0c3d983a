//! Mixed precision for a frozen base: its large weights stored in bf16 (or f16) while the
//! activations, norms and adapters stay f32. Each projection multiplies in the stored dtype and
//! returns to the activations' (`crate::linear::mixed_matmul`).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, FloatDType, Tensor};

use crate::model::{Qwen2, PROJECTIONS};

impl<B: Backend> Qwen2<B> {
    /// Freezes the model and stores its large frozen weights — the embedding, every projection
    /// and its bias, the output head — in `dtype` (bf16 halves the base's memory); the norms
    /// stay in their dtype, and so do the activations: each projection multiplies in `dtype`
    /// and returns to the activation dtype (see [`crate::linear::mixed_matmul`]). Adapters added
    /// afterwards by [`Qwen2::with_lora`] are f32.
    pub fn with_base_dtype(self, dtype: FloatDType) -> Self {
        fn cast<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, dtype: FloatDType) {
            let t = p.val();
            if t.dtype() != DType::from(dtype) {
                *p = Param::initialized(p.id, t.cast(dtype));
            }
        }
        let mut model = self.no_grad();
        cast(&mut model.embed_tokens, dtype);
        let mut head = model.lm_head.take();
        let mut lins = model.projections_mut(&PROJECTIONS);
        lins.extend(head.as_mut().map(|h| ("lm_head".to_string(), h)));
        for (_, lin) in lins {
            cast(&mut lin.weight, dtype);
            if let Some(b) = &mut lin.bias {
                cast(b, dtype);
            }
        }
        model.lm_head = head;
        model
    }
}
