//! Greedy (or sampled) evaluation: render prompts, generate through the batched sampler, score with
//! the verifier. Used by `train` for held-out curves and by `eval`.

use anyhow::Result;
use burn::tensor::backend::Backend;
use qwen2_burn::{Qwen2, Qwen2Config};
use serde::Serialize;

use crate::prompt::{self, PromptStyle};
use crate::sampler::{self, SamplingParams};
use crate::task::McqaItem;
use crate::tokenizer::Tokenizer;
use crate::verifier::{self, Verdict, VerifierConfig};

/// One scored generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub id: String,
    pub category: Option<String>,
    pub gold: char,
    pub sample_index: usize,
    pub response: String,
    pub response_tokens: usize,
    pub verdict: Verdict,
}

/// How to generate and score.
#[derive(Debug, Clone)]
pub struct ScoreSettings {
    pub style: PromptStyle,
    pub sampling: SamplingParams,
    pub verifier: VerifierConfig,
    /// Prompts per sampler batch.
    pub batch: usize,
}

/// Generates `sampling.n` replies per item in batches and scores them. With the direct template, a
/// reply is scored by its first letter (format is not asked for).
pub fn generate_and_score<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    tok: &Tokenizer,
    items: &[McqaItem],
    settings: &ScoreSettings,
    device: &B::Device,
) -> Result<Vec<Generation>> {
    let (style, params, vcfg, batch) = (
        settings.style,
        &settings.sampling,
        &settings.verifier,
        settings.batch,
    );
    let mut out = Vec::with_capacity(items.len() * params.n);
    for (c, chunk) in items.chunks(batch.max(1)).enumerate() {
        let prompts = chunk
            .iter()
            .map(|it| tok.encode(&prompt::render(it, style)))
            .collect::<Result<Vec<_>>>()?;
        let samples = sampler::generate_from(
            model,
            config,
            &prompts,
            c * batch.max(1),
            params,
            tok,
            device,
        );
        for s in samples {
            let item = &chunk[s.prompt_index];
            let response = tok.decode(&s.output_ids);
            let verdict = match style {
                PromptStyle::R1 => verifier::verify(
                    &response,
                    item.answer,
                    item.num_options(),
                    Some(item.gold_text()),
                    vcfg,
                ),
                PromptStyle::Direct => {
                    verifier::verify_direct(&response, item.answer, item.num_options())
                }
            };
            out.push(Generation {
                id: item.id.clone(),
                category: item.category.clone(),
                gold: item.answer,
                sample_index: s.sample_index,
                response_tokens: s.output_ids.len(),
                response,
                verdict,
            });
        }
    }
    Ok(out)
}
