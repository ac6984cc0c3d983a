//! A dense layer with its weight stored `[in, out]` (Burn's convention; Hugging Face stores
//! `[out, in]`, the weight loader transposes).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

/// `y = x·W + b` (plus `s·(x·A)·B` with a LoRA adapter).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[in, out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter (see `lora.rs`), absent on plain layers.
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> Linear<B> {
    /// Zero-initialised layer (the loader fills it; tests fill it with random values).
    pub fn zeros(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([d_in, d_out], device)),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            lora: None,
        }
    }

    /// `x: [..., in] → [..., out]`; the leading dimensions are flattened into one GEMM. A weight
    /// stored in another dtype than `x` (a bf16 frozen base, see [`crate::Qwen2::with_base_dtype`])
    /// multiplies `x` cast to its dtype, and the product comes back in `x`'s dtype; the adapter
    /// and the bias are applied in `x`'s dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let w = self.weight.val();
        let d_out = w.dims()[1];
        let x = x.reshape([rows, d_in]);
        let mut y = mixed_matmul(x.clone(), w);
        if let Some(l) = &self.lora {
            y = y + l.delta(x);
        }
        if let Some(b) = &self.bias {
            let dtype = y.dtype();
            y = y + to_dtype(b.val(), dtype).unsqueeze::<2>();
        }
        let mut out = dims;
        out[D - 1] = d_out;
        y.reshape(out)
    }
}

/// `t` in `dtype` (no operation, and no autodiff node, when it already is).
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// `x·W` with `W` in its stored dtype: `x` is cast to it for the GEMM and the result back to
/// `x`'s dtype (a no-op when both agree).
pub fn mixed_matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let (xt, wt) = (x.dtype(), w.dtype());
    if xt == wt {
        x.matmul(w)
    } else {
        x.cast(wt).matmul(w).cast(xt)
    }
}

/// One adapter: `Δy = s·(x·A)·B`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]`.
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// `Δy` for `x: [rows, in]`.
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.a.val())
            .matmul(self.b.val())
            .mul_scalar(self.scale)
    }
}
