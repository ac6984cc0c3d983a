//! Training with recomputation, one decoder layer at a time (gradient checkpointing at layer
//! granularity), and the LM head differentiated one chunk of positions at a time.
//!
//! The forward runs without a graph and keeps only each layer's input `x_i: [b, t, hidden]`. The
//! backward walks down the stack: for layer `i` it re-runs `y = layer_i(x_i)` under autodiff from
//! a leaf copy of `x_i` and back-propagates `Σ y ⊙ dy` ([`vjp`]), which yields the layer's parameter
//! gradients and `dx_i = J_layer_i(x_i)ᵀ·dy`, the next layer's `dy`. Saved activations fall from
//! every intermediate of every layer to `L + 1` layer inputs plus one layer's intermediates; the
//! price is one more forward of the stack. Burn's `BalancedCheckpointing` recomputes only
//! element-wise ops (not the matmuls or the attention scores), so it cannot do this.
//!
//! The LM head works the same way ([`Qwen2::token_logprobs_backward`]): the caller computes the
//! log-probs without a graph, differentiates its loss with respect to them, and the head and
//! log-softmax are re-run chunk by chunk, so at most one chunk's `[b, chunk, vocab]` logits is
//! alive under autodiff.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Int, Tensor};

use crate::model::Qwen2;

/// What [`Qwen2::hidden_checkpointed`] keeps for [`Qwen2::backward_checkpointed`].
pub struct Checkpoints<B: AutodiffBackend> {
    /// `xs[i]`: the input of layer `i`; `xs[L]`: the last layer's output (the final norm's input).
    xs: Vec<Tensor<B::InnerBackend, 3>>,
    tokens: Tensor<B, 2, Int>,
    rope: (Tensor<B, 4>, Tensor<B, 4>),
    mask: Tensor<B, 4, Bool>,
}

/// `(∂θ, ∂x) of Σ f(x) ⊙ dy`: re-runs `f` under autodiff on a leaf copy of `x` and returns the
/// gradients of `module`'s parameters that `f` used and the vector–Jacobian product
/// `dx = J_f(x)ᵀ·dy`.
pub fn vjp<B, M, const D: usize, const E: usize>(
    module: &M,
    x: Tensor<B::InnerBackend, D>,
    dy: Tensor<B::InnerBackend, E>,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, E>,
) -> (GradientsParams, Tensor<B::InnerBackend, D>)
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let zeros = x.zeros_like();
    let x = Tensor::<B, D>::from_inner(x).require_grad();
    let y = f(x.clone());
    let mut grads = (y * Tensor::from_inner(dy)).sum().backward();
    let dx = x.grad_remove(&mut grads).unwrap_or(zeros);
    (GradientsParams::from_module(&mut grads, module), dx)
}

impl<B: AutodiffBackend> Qwen2<B> {
    /// The final hidden states of [`Qwen2::hidden`] (no cache), computed without a graph, and the
    /// checkpoints from which [`Qwen2::backward_checkpointed`] produces the parameter gradients.
    pub fn hidden_checkpointed(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        valid: Tensor<B, 2, Bool>,
    ) -> (Tensor<B::InnerBackend, 3>, Checkpoints<B>) {
        let t = tokens.dims()[1];
        let (rope, mask) = self.context(positions, valid, 0, t);
        let rope_inner = (rope.0.clone().inner(), rope.1.clone().inner());
        let mask_inner = mask.clone().inner();
        let model = self.valid();
        let mut x = model.embed(tokens.clone().inner());
        let mut xs = Vec::with_capacity(model.layers.len() + 1);
        for layer in &model.layers {
            xs.push(x.clone());
            x = layer.forward(x, &rope_inner, &mask_inner, None);
        }
        xs.push(x.clone());
        let hidden = model.norm.forward(x);
        let ckpt = Checkpoints {
            xs,
            tokens,
            rope,
            mask,
        };
        (hidden, ckpt)
    }

    /// The gradients of this model's stack (final norm, layers, input embedding) for a loss whose
    /// gradient with respect to the hidden states of [`Qwen2::hidden_checkpointed`] is `dh`.
    /// A tied head's own gradient is the caller's ([`Qwen2::token_logprobs_backward`]); both
    /// go through a `GradientsAccumulator`, which adds them.
    pub fn backward_checkpointed(
        &self,
        ckpt: Checkpoints<B>,
        dh: Tensor<B::InnerBackend, 3>,
    ) -> GradientsParams {
        let Checkpoints {
            mut xs,
            tokens,
            rope,
            mask,
        } = ckpt;
        let mut acc = GradientsAccumulator::<Self>::new();
        let last = xs.pop().expect("the last layer's output is kept");
        let (g, mut dx) = vjp(self, last, dh, |x| self.norm.forward(x));
        acc.accumulate(self, g);
        for (layer, x) in self.layers.iter().zip(xs).rev() {
            let (g, d) = vjp(self, x, dx, |x| layer.forward(x, &rope, &mask, None));
            acc.accumulate(self, g);
            dx = d;
        }
        if self.embed_tokens.val().is_require_grad() {
            let e = self.embed(tokens);
            let mut grads = (e * Tensor::from_inner(dx)).sum().backward();
            acc.accumulate(self, GradientsParams::from_module(&mut grads, self));
        }
        acc.grads()
    }

    /// The gradients of `Σ dlogp ⊙ log p(targets | hidden)` (`hidden: [b, t, h]` without a graph,
    /// `targets`, `dlogp: [b, t]`): the head and log-softmax re-run under autodiff `chunk`
    /// positions at a time. Returns the head's parameter gradients (`lm_head`, or the tied
    /// embedding) and `dhidden`.
    pub fn token_logprobs_backward(
        &self,
        hidden: Tensor<B::InnerBackend, 3>,
        targets: Tensor<B, 2, Int>,
        dlogp: Tensor<B::InnerBackend, 2>,
        chunk: usize,
    ) -> (GradientsParams, Tensor<B::InnerBackend, 3>) {
        let [b, t, h] = hidden.dims();
        let chunk = chunk.max(1);
        let mut acc = GradientsAccumulator::<Self>::new();
        let mut dh = Vec::with_capacity(t.div_ceil(chunk));
        for start in (0..t).step_by(chunk) {
            let end = (start + chunk).min(t);
            let tgt = targets.clone().slice([0..b, start..end]);
            let (g, d) = vjp(
                self,
                hidden.clone().slice([0..b, start..end, 0..h]),
                dlogp.clone().slice([0..b, start..end]),
                |x| self.logprobs_of(x, tgt),
            );
            acc.accumulate(self, g);
            dh.push(d);
        }
        (acc.grads(), Tensor::cat(dh, 1))
    }
}
