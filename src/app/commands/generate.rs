//! `med-rlvr generate`: continuations from the batched KV-cached sampler.

use std::io::Write;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use serde_json::json;

use med_rlvr::sampler::{self, SamplingParams};

use crate::app::cli::GenerateArgs;

pub(crate) fn run<B: Backend>(mut a: GenerateArgs, device: &B::Device) -> Result<()> {
    crate::app::demo::announce_default("model", &a.model);
    a.model = med_rlvr::hub::model_dir(&a.model)?;
    let (config, model, tok) = med_rlvr::model_folder::load::<B>(&a.model, device)?;
    let texts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => med_rlvr::prompt::read_file(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    if let (true, Some(f)) = (texts.is_empty(), &a.prompts) {
        bail!(
            "{}: no prompts (the file has no non-empty line)",
            f.display()
        );
    }
    if let Some(&id) = a
        .stop_token
        .iter()
        .find(|&&id| id as usize >= config.vocab_size)
    {
        bail!(
            "--stop-token {id}: not a token of this model (vocab_size {})",
            config.vocab_size
        );
    }
    let mut stop_token_ids = a.stop_token.clone();
    if !a.no_eos_stop {
        stop_token_ids.push(tok.eos_id()?);
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        stop_token_ids,
        stop_strings: a.stop.clone(),
        n: a.n,
        seed: a.seed,
        max_rows: a.batch_size.max(1) * a.n.max(1),
        ..Default::default()
    };
    let encoded = texts
        .iter()
        .map(|t| tok.encode(t))
        .collect::<Result<Vec<_>>>()?;
    if let Some(i) = encoded.iter().position(Vec::is_empty) {
        bail!("prompt {} tokenizes to no tokens", i + 1);
    }
    for (i, p) in encoded.iter().enumerate() {
        med_rlvr::tokenizer::check_context(
            config.max_position_embeddings,
            p.len() + a.max_new_tokens,
            &format!(
                "prompt {} ({} tokens) and --max-new-tokens {}",
                i + 1,
                p.len(),
                a.max_new_tokens
            ),
        )?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for s in sampler::generate(&model, &config, &encoded, &params, &tok, device) {
        if let Some(j) = s.logprobs.iter().position(|x| !x.is_finite()) {
            bail!(
                "prompt {} sample {}: the model computed a non-finite log-prob at new token {j}: \
                 its weights in {} hold NaN/Inf or overflow",
                s.prompt_index + 1,
                s.sample_index,
                a.model.display()
            );
        }
        let prompt_ids = &encoded[s.prompt_index];
        let text = tok.decode(&s.output_ids);
        if a.json {
            let line = json!({
                "prompt_index": s.prompt_index,
                "sample_index": s.sample_index,
                "prompt_ids": prompt_ids,
                "output_ids": s.output_ids,
                "text": text,
                "logprobs": s.logprobs,
                "sampling_logprobs": s.sampling_logprobs,
                "finish_reason": s.finish_reason,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "[{} #{}] {}", s.prompt_index, s.sample_index, text)?;
        }
    }
    Ok(())
}
