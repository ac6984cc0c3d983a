//! A Qwen2 / Qwen2.5 and Qwen3 (dense) decoder written natively in Burn: configuration, model, KV
//! cache and Hugging Face safetensors import/export. Generic over `B: Backend`; no training logic
//! here. [`Qwen2Config`] and [`Qwen2`] keep their historical names and cover both families
//! ([`config::Family`]).

pub mod cache;
pub mod config;
pub mod error;
pub mod linear;
pub mod lora;
pub mod model;
pub mod precision;
pub mod recompute;
pub mod rope;
pub mod weights;

pub use cache::KvCache;
pub use config::{Family, Qwen2Config};
pub use error::{ModelError, Result};
pub use lora::{load_lora, save_lora, LoraSpec};
pub use model::{log_softmax_gather, Qwen2, TensorSource, PROJECTIONS};
pub use recompute::{vjp, Checkpoints};
pub use weights::{hf_tensors, load_qwen2, load_weights, read_safetensors, save_qwen2, SaveDtype};
