//! med-rlvr: reinforcement learning from verifiable rewards for medical multiple-choice QA, on a
//! Qwen2 model written in Burn (the `qwen2-burn` crate in `model/`).

pub mod next_token;
pub mod sampler;
pub mod tokenizer;

pub use qwen2_burn as model;
pub mod advantages;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod critic;
pub mod estimator;
pub mod eval;
pub mod exit;
pub mod experience;
pub mod hub;
pub mod loss;
pub mod memory;
pub mod model_folder;
pub mod optimizer;
pub mod parallel;
pub mod parquet_rows;
pub mod paths;
pub mod plot;
pub mod prompt;
pub mod reward;
pub mod selfcheck;
pub mod sft;
pub mod task;
pub mod trainer;
pub mod verifier;
