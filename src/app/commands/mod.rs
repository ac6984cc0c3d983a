//! One file per command; `crate::app::cli` parses the arguments and dispatches here.

pub mod bench;
pub mod eval;
pub mod export;
pub mod generate;
pub mod logprobs;
pub mod plan;
pub mod plot;
pub mod score;
pub mod selfcheck;
pub mod sft;
pub mod train;
