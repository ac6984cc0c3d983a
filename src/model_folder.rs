//! A Hugging Face model folder as the commands use it: config, weights and tokenizer loaded and
//! checked together, and the teacher-forced log-probs of a continuation (`logprobs`, the
//! differential checks).

use std::path::Path;

use anyhow::{bail, Result};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use qwen2_burn::{load_weights, Qwen2, Qwen2Config};

use crate::tokenizer::Tokenizer;

/// Loads model and tokenizer from a Hugging Face folder.
pub fn load<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Qwen2Config, Qwen2<B>, Tokenizer)> {
    if !dir.is_dir() {
        bail!("{}: model folder not found", dir.display());
    }
    let (config, tokenizer) = Tokenizer::for_model(dir)?;
    let model = load_weights::<B>(dir, &config, device)?;
    Ok((config, model, tokenizer))
}

/// `log p(c_j | p, c_<j)` for every continuation token, by one teacher-forced forward pass.
pub fn continuation_logprobs<B: Backend>(
    model: &Qwen2<B>,
    prompt: &[u32],
    cont: &[u32],
    device: &B::Device,
) -> Vec<f32> {
    if cont.is_empty() {
        return vec![];
    }
    let all: Vec<i64> = prompt.iter().chain(cont).map(|&t| t as i64).collect();
    let t = all.len() - 1;
    let hidden = model.hidden(
        Tensor::<B, 2, Int>::from_data(TensorData::new(all[..t].to_vec(), [1, t]), device),
        Tensor::<B, 2, Int>::from_data(
            TensorData::new((0..t as i64).collect::<Vec<_>>(), [1, t]),
            device,
        ),
        Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; t], [1, t]), device),
        None,
    );
    let lp = model.token_logprobs(
        hidden,
        Tensor::from_data(TensorData::new(all[1..].to_vec(), [1, t]), device),
        64,
    );
    let lp = lp
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32");
    lp[prompt.len() - 1..].to_vec()
}
