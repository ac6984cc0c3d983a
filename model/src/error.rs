//! One error type for everything the model crate can refuse: every variant names the file and,
//! where there is one, the tensor or key at fault.

use std::path::PathBuf;

/// Why a model folder, a config or a weight file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// (The io error is part of the message, not a `source`, so `{:#}` chains print it once.)
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error(
        "{path}: unexpected tensor `{name}` (not part of a Qwen2/Qwen3 model with this config)"
    )]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{name}` has unsupported dtype {dtype} (f32, bf16, f16 are supported)"
    )]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: shard `{shard}` named in the index does not exist")]
    MissingShard { path: PathBuf, shard: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            error: source,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
